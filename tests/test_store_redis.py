"""The Redis store against a real redis-server (Debian's package), started here on a free
loopback port: the store contract of the SQLite tests, a differential run against SQLite, the
layout's invariants, and the faults issue 13 saw on a real server (killed mid-batch, killed
and restarted, hung with SIGSTOP, out of memory, four writer processes).

Skipped without redis-server or the redis package, except on CI (``CI=true``), where a
missing server fails: .ci/run installs it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import pickle
import random
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lmms_cache.store import LEGACY_KEY_SCHEMA, Entry, SQLiteStore, Store, Stored, StoreError, Where
from lmms_cache.store import redis as redis_backend
from lmms_cache.store.redis import PASSWORD_ENV, RedisStore, parse_url
from redis_server import RedisServer, redis_server_binary

# The store contract: the SQLite suite's own cases, run here on Redis (their fixtures
# `store` and `open_backend` are this module's). Cases about SQLite's file are left out.
from test_store import (  # noqa: F401
    test_a_new_entry_is_last_used_when_created,
    test_a_store_is_usable_from_several_threads,
    test_creation_time_is_filled_in_when_missing,
    test_delete_returns_how_many_were_there,
    test_delete_where_removes_exactly_the_matching_entries,
    test_entries_returns_whole_entries_in_the_order_asked,
    test_entries_survive_close_and_reopen,
    test_evict_removes_least_recently_used_until_under_the_limit,
    test_get_many_can_ignore_entries_older_than_a_time,
    test_get_many_of_absent_keys_is_empty,
    test_many_keys_round_trip_across_lookup_chunks,
    test_put_many_of_nothing_is_a_no_op,
    test_put_overwrites_an_existing_key,
    test_put_without_replace_keeps_existing_values_and_counts_new_ones,
    test_remember_model_is_idempotent,
    test_same_key_twice_in_one_batch_keeps_the_last,
    test_scan_filters_limits_and_can_leave_values_out,
    test_scan_of_an_empty_store_is_empty,
    test_scan_yields_every_entry_with_its_metadata,
    test_stats_count_entries_and_value_bytes,
    test_summary_groups_by_model_and_task_with_the_time_hits_saved,
    test_totals_follow_inserts_overwrites_and_deletes,
    test_touch_counts_hits_and_moves_entries_up_the_lru_order,
)
from test_store_v2 import (  # noqa: F401
    test_a_lookup_across_chunks_returns_every_field,
    test_an_entry_keeps_every_field_through_export_and_import,
    test_an_entry_without_a_key_schema_is_of_the_first_one,
    test_doc_id_of_an_integer_type_of_another_library_is_stored_as_an_int,
    test_get_many_returns_deps_origin_and_signature,
    test_replacing_an_entry_replaces_its_new_fields_and_keeping_keeps_them,
    test_similar_finds_the_document_by_int_or_text,
    test_summary_groups_by_key_schema,
    test_where_doc_id_given_as_text_or_int_finds_both_stored_forms,
    test_where_key_schema_and_old_schema,
)

pytestmark = pytest.mark.e2e


def require_redis() -> None:
    """Skip without redis-server or redis-py; on CI fail instead (CI installs both)."""
    missing = []
    if redis_server_binary() is None:
        missing.append("redis-server (apt-get install redis-server)")
    try:
        import redis  # noqa: F401
    except ImportError:
        missing.append("the redis package (pip install 'lmms-cache[redis]')")
    if missing:
        message = "the Redis store's tests need " + " and ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; CI must have them (.ci/run installs redis-server)")
        pytest.skip(message)


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def entry(i: int, **fields: Any) -> Entry:
    base: dict[str, Any] = dict(key=key(i), value=f"value {i}".encode(), model="m1", method="generate_until",
                                task="t", split="test", doc_id=i, key_schema="lmms-cache/key/2")  # fmt: skip
    base.update(fields)
    return Entry(**base)


class Clock:
    """A monotonic clock the test moves by hand (the breaker's)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# -- servers ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One server for the contract cases (each test has a prefix of its own)."""
    require_redis()
    srv = RedisServer(tmp_path_factory.mktemp("redis"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Starts servers of this test alone (faults), stopped and removed afterwards."""
    require_redis()
    started: list[RedisServer] = []

    def start(*options: str, unix_socket: bool = False) -> RedisServer:
        srv = RedisServer(tmp_path / f"redis{len(started)}", options, unix_socket=unix_socket)
        started.append(srv)
        srv.start()
        return srv

    yield start
    for srv in started:
        srv.stop()


def prefix_of(request: pytest.FixtureRequest) -> str:
    return "t" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:16]


def wipe(srv: RedisServer, prefix: str) -> None:
    client = srv.client()
    try:
        keys = list(client.scan_iter(match=f"lmc:{{{prefix}}}:*", count=1000))
        for start in range(0, len(keys), 1000):
            client.unlink(*keys[start : start + 1000])
    finally:
        client.close()


@pytest.fixture
def open_backend(server: RedisServer, request: pytest.FixtureRequest) -> Iterator[Callable[[], Store]]:
    """Opens (and finally closes) Redis stores of one prefix, wiped afterwards."""
    prefix = prefix_of(request)
    opened: list[Store] = []

    def opener() -> Store:
        store = RedisStore(server.url(prefix))
        opened.append(store)
        return store

    yield opener
    for store in opened:
        if isinstance(store, RedisStore):
            check_consistent(store)
        store.close()
    wipe(server, prefix)


@pytest.fixture
def store(open_backend: Callable[[], Store]) -> Store:
    return open_backend()


@pytest.fixture(params=["sqlite", "redis"])
def either(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A store of each backend: the cases below hold for both."""
    if request.param == "sqlite":
        s: Store = SQLiteStore(str(tmp_path / "c"))
        yield s
        s.close()
        return
    srv = request.getfixturevalue("server")
    prefix = prefix_of(request)
    s = RedisStore(srv.url(prefix))
    yield s
    check_consistent(s)
    s.close()
    wipe(srv, prefix)


# -- the layout's invariants ----------------------------------------------------------------------


def raw_client(store: RedisStore) -> Any:
    return store._client()


def check_consistent(store: RedisStore) -> dict[str, Any]:
    """Every structure of the layout agrees with the entries' metadata: values and metadata
    in pairs, both sorted sets, the hit counts, every index, every counter. Returns what it
    read, for more checks."""
    c = raw_client(store)
    p = store._p
    names = set(c.scan_iter(match=p + b"*", count=1000))
    values = {n[len(p) + 2 :] for n in names if n.startswith(p + b"v:")}
    metas = {n[len(p) + 2 :] for n in names if n.startswith(p + b"m:")}
    assert values == metas, "a value without its metadata, or the reverse"
    keys = sorted(metas)
    assert set(c.zrange(p + b"u", 0, -1)) == metas
    assert set(c.zrange(p + b"c", 0, -1)) == metas
    hits = {k: int(v) for k, v in c.hgetall(p + b"h").items()}
    assert set(hits) <= metas and all(v > 0 for v in hits.values())
    parsed: dict[bytes, list[Any]] = {}
    for start in range(0, len(keys), 1000):
        chunk = keys[start : start + 1000]
        for k, meta, blob in zip(chunk, c.mget([p + b"m:" + k for k in chunk]),
                                 c.mget([p + b"v:" + k for k in chunk]), strict=True):  # fmt: skip
            m = json.loads(meta[: meta.index(b"\0")])  # the JSON part; the components follow
            assert m[8] == len(blob) - redis_backend._header_length(blob), "size is the envelope's"
            parsed[k] = m

    def task_enc(task: str | None) -> bytes:
        return b"n" if task is None else b"s:" + task.encode()

    # indexes
    loose: dict[bytes, set[bytes]] = {}  # per task, entries without a document
    by_model: dict[bytes, set[bytes]] = {}
    by_doc: dict[bytes, dict[bytes, set[bytes]]] = {}  # per task, per document
    by_prompt: dict[bytes, set[bytes]] = {}
    for k, m in parsed.items():
        if m[5] is not None:
            by_doc.setdefault(task_enc(m[3]), {}).setdefault(m[5].encode(), set()).add(k)
        else:
            loose.setdefault(task_enc(m[3]), set()).add(k)
        by_model.setdefault(m[1].encode(), set()).add(k)
        if m[9] is not None:
            by_prompt.setdefault(m[9].encode(), set()).add(k)
    for prefix, expected in ((b"i:t:", loose), (b"i:m:", by_model)):
        found = {n[len(p) + len(prefix) :]: c.smembers(n) for n in names if n.startswith(p + prefix)}
        assert found == expected

    def packed_index(name: bytes) -> dict[bytes, set[bytes]]:
        packed = c.hgetall(name)
        found = {f: set(redis_backend._unpack_keys(v)) for f, v in packed.items()}
        assert all(len(v) % 16 == 0 and len(v) // 16 == len(found[f]) for f, v in packed.items()), "no duplicates"
        return found

    assert {n[len(p) + 4 :]: packed_index(n) for n in names if n.startswith(p + b"i:d:")} == by_doc
    assert packed_index(p + b"i:p") == by_prompt
    # counters
    def sums(selected: list[bytes]) -> dict[str, float]:
        ms = [parsed[k] for k in selected]
        return {"n": len(ms), "b": sum(m[8] for m in ms), "r": sum(m[7] for m in ms),
                "h": sum(hits.get(k, 0) for k in selected),
                "s": sum(hits.get(k, 0) * parsed[k][6] for k in selected), "ms": sum(m[6] for m in ms)}  # fmt: skip

    def counters(name: bytes) -> dict[str, float]:
        raw = c.hgetall(name)
        return {f: float(raw.get(f.encode(), 0)) for f in ("n", "b", "r", "h", "s", "ms")}

    def same(found: dict[str, float], expected: dict[str, float]) -> bool:
        return all(math.isclose(found[f], expected[f], rel_tol=1e-9, abs_tol=1e-6) for f in expected)

    totals = counters(p + b"t")
    assert same(totals, sums(keys)), (totals, sums(keys))
    assert all(totals[f] == sums(keys)[f] for f in ("n", "b", "r", "h")), "entry, byte and hit totals are exact"
    groups = {
        b"g:m": {m[1].encode() for m in parsed.values()},
        b"g:t": {task_enc(m[3]) for m in parsed.values()},
        b"g:s": {m[10].encode() for m in parsed.values()},
    }
    for registry, members in groups.items():
        assert c.smembers(p + registry) == members
        group_names = {n for n in names if n.startswith(p + registry + b":")}
        assert group_names == {p + registry + b":" + g for g in members}, "no counters of empty groups"
        for g in members:
            column = {b"g:m": 1, b"g:t": 3, b"g:s": 10}[registry]
            selected = [k for k, m in parsed.items()
                        if (task_enc(m[column]) if registry == b"g:t" else m[column].encode()) == g]  # fmt: skip
            assert same(counters(p + registry + b":" + g), sums(selected))
    known = {p + s for s in (b"t", b"u", b"c", b"h", b"i:p", b"g:m", b"g:t", b"g:s", b"models", b"layout")}
    for n in names:
        rest = n[len(p) :]
        assert n in known or rest[:2] in (b"v:", b"m:") or rest[:4] in (b"i:d:", b"i:t:", b"i:m:", b"g:m:", b"g:t:",
                                                                           b"g:s:"), n  # fmt: skip
    return {"keys": keys, "meta": parsed, "hits": hits, "totals": totals}


def test_the_layout_is_the_documented_one(store: RedisStore) -> None:
    store.put_many([entry(1, task="mme", doc_id=17, prompt=None), entry(2, task=None, doc_id=None, prompt="ab12"),
                    entry(3, model="m2", key_schema=None)])  # fmt: skip
    store.touch({key(1): 2}, when=5e9)
    store.remember_model("m1", '{"class": "Fake"}')
    c = raw_client(store)
    p = store._p
    assert p == b"lmc:{" + prefix_from(store).encode() + b"}:"
    names = {n[len(p) :] for n in c.scan_iter(match=p + b"*")}
    per_entry = {b"v:" + key(i) for i in (1, 2, 3)} | {b"m:" + key(i) for i in (1, 2, 3)}
    assert names - per_entry == {
        b"t", b"u", b"c", b"h", b"i:p", b"models", b"layout",
        b"i:d:s:mme", b"i:t:n", b"i:d:s:t", b"i:m:m1", b"i:m:m2",
        b"g:m", b"g:m:m1", b"g:m:m2", b"g:t", b"g:t:s:mme", b"g:t:n", b"g:t:s:t",
        b"g:s", b"g:s:lmms-cache/key/2", b"g:s:" + LEGACY_KEY_SCHEMA.encode(),
    }  # fmt: skip
    assert c.hgetall(p + b"i:d:s:mme") == {b"i:17": key(1)}
    assert c.hgetall(p + b"i:d:s:t") == {b"i:3": key(3)}
    assert c.smembers(p + b"i:t:n") == {key(2)}  # no document
    assert c.hgetall(p + b"i:p") == {b"ab12": key(2)}
    assert c.hgetall(p + b"h") == {key(1): b"2"}
    assert c.zscore(p + b"u", key(1)) == 5e9
    assert c.get(p + b"layout") == b"lmms-cache/redis/1"
    blob = c.get(p + b"v:" + key(1))
    assert blob.endswith(b"value 1") and len(blob) == redis_backend._header_length(blob) + len(b"value 1")
    meta = c.get(p + b"m:" + key(1))
    assert json.loads(meta[: meta.index(b"\0")])[1:6] == ["m1", "generate_until", "mme", "test", "i:17"]
    check_consistent(store)


def prefix_from(store: RedisStore) -> str:
    return parse_url(store._url).prefix


# -- the contract, on both backends ---------------------------------------------------------------


def test_scan_pages_through_many_entries_of_one_time_exactly_once(either: Store) -> None:
    either.put_many([entry(i, created_at=0.0) for i in range(1100)])  # one `now` for all: ties
    assert sorted(e.key for e in either.scan(values=False)) == [key(i) for i in range(1100)]
    recent = [e.key for e in either.scan(values=False, recent_first=True)]
    assert len(recent) == 1100 and set(recent) == {key(i) for i in range(1100)}
    assert len({e.key for e in either.scan(limit=700, recent_first=True)}) == 700


def test_scan_orders_oldest_first_and_most_recently_used_first(either: Store) -> None:
    order = [(i * 7) % 10 for i in range(10)]  # keys not in key order, written as they were created
    for n, i in enumerate(order):
        either.put_many([entry(i, created_at=100.0 + n)])
    either.touch({key(3): 1}, when=500.0)
    either.touch({key(8): 1}, when=600.0)
    assert [e.key for e in either.scan()] == [key(i) for i in order]
    assert [e.key for e in either.scan(recent_first=True)][:2] == [key(8), key(3)]


def test_where_created_before_selects_by_creation_time(either: Store) -> None:
    either.put_many([entry(i, created_at=1000.0 + i) for i in range(600)])
    got = [e.key for e in either.scan(Where(created_before=1300.0), values=False)]
    assert sorted(got) == [key(i) for i in range(300)]
    assert either.delete_where(Where(created_before=1300.0, task="t")) == 300
    assert either.stats()["entries"] == 300


def test_where_filters_combine(either: Store) -> None:
    either.put_many([entry(i, model=f"m{i % 3}", task=f"t{i % 2}", method=("a", "b")[i % 5 == 0], doc_id=i % 7)
                     for i in range(210)])  # fmt: skip
    wheres = [Where(models=("m1",), task="t0"), Where(models=("m1", "m2"), task="t1", method="b"),
              Where(models=("m0", "m9")), Where(doc_id="3"), Where(doc_id=3, task="t1", models=("m2",)),
              Where(method="b"), Where(task="nope"), Where(models=())]  # fmt: skip
    everything = list(either.scan())
    for where in wheres:
        assert {e.key for e in either.scan(where)} == {e.key for e in everything if where.matches(e)}, where


def test_similar_by_prompt_and_by_document_most_recent_first(either: Store) -> None:
    either.put_many([entry(1, task=None, doc_id=None, prompt="p1", created_at=10.0),
                     entry(2, task=None, doc_id=None, prompt="p1", created_at=20.0),
                     entry(3, task=None, doc_id=None, prompt="p2", created_at=30.0),
                     entry(4, task="t", doc_id=9, created_at=40.0),
                     entry(5, task="t", doc_id=9, method="loglikelihood", created_at=50.0)])  # fmt: skip
    found = either.similar("generate_until", task="t", doc_id="9", prompt="p1")
    assert [e.key for e in found] == [key(4), key(2), key(1)]
    assert all(e.value == b"" for e in found)
    assert [e.key for e in either.similar("generate_until", task=None, doc_id=None, prompt="p1", limit=1)] == [key(2)]
    assert either.similar("generate_until", task=None, doc_id=None, prompt=None) == []


def test_touch_of_absent_keys_and_an_empty_touch_change_nothing(either: Store) -> None:
    either.put_many([entry(1, created_at=10.0)])
    either.touch({}, when=99.0)
    either.touch({key(2): 4}, when=99.0)
    assert either.get(key(2)) is None
    got = either.get(key(1))
    assert got is not None and (got.hits, got.used_at) == (0, 10.0)
    assert either.summary()["hits"] == 0


def test_unicode_names_round_trip(either: Store) -> None:
    e = entry(1, model="modèle-✓", task="tâche\0x", split="tëst", doc_id="doc ü", prompt="π",
              components='{"d": {"ctx": "é"}}', origin="uid:1@ü")  # fmt: skip
    either.put_many([e])
    got = either.get(key(1))
    assert got is not None and (got.model, got.task, got.doc_id, got.prompt, got.origin) == (
        "modèle-✓", "tâche\0x", "doc ü", "π", "uid:1@ü")  # fmt: skip
    assert [r["task"] for r in either.summary()["by_task"]] == ["tâche\0x"]
    assert {x.key for x in either.scan(Where(task="tâche\0x", doc_id="doc ü", models=("modèle-✓",)))} == {key(1)}
    assert [x.key for x in either.similar("generate_until", task="tâche\0x", doc_id="doc ü", prompt="π")] == [key(1)]
    assert either.delete_where(Where(models=("modèle-✓",))) == 1


def test_empty_and_none_fields_stay_apart(either: Store) -> None:
    either.put_many([entry(1, deps=b"", origin="", signature=b"", components="", task=""),
                     entry(2, deps=None, origin=None, signature=None, components=None, task=None)])  # fmt: skip
    assert either.get_many([key(1), key(2)]) == {key(1): Stored(b"value 1", b"", "", b""),
                                                 key(2): Stored(b"value 2", None, None, None)}  # fmt: skip
    one, two = either.get(key(1)), either.get(key(2))
    assert one is not None and two is not None
    assert (one.components, one.task, two.components, two.task) == ("", "", None, None)


def test_components_are_kept_exactly_and_long_ones_compressed(store: RedisStore) -> None:
    long = json.dumps({"d": {f"gen_kwargs.setting_{i}": f"{i:016x}" for i in range(12)}, "v": {"x": "\0é"}})
    store.put_many([entry(1, components=long), entry(2, components="{}"), entry(3, components=None),
                    entry(4, components="")])  # fmt: skip
    assert [e.components for e in store.scan()] == [long, "{}", None, ""]
    meta = raw_client(store).get(store._p + b"m:" + key(1))
    assert len(meta) < len(long) and json.loads(meta[: meta.index(b"\0")])[11] == 2  # zstd


def test_a_non_finite_model_time_is_stored_as_zero(either: Store) -> None:
    if isinstance(either, SQLiteStore):
        pytest.skip("SQLite keeps it as it is")
    either.put_many([entry(1, model_seconds=float("nan")), entry(2, model_seconds=float("inf"))])
    assert [e.model_seconds for e in either.scan()] == [0.0, 0.0]


# -- the same operations on SQLite and Redis give the same answers --------------------------------


def random_entry(rng: random.Random, i: int, t: float) -> Entry:
    return Entry(
        key=key(i), value=rng.randbytes(rng.randrange(1, 300)), model=rng.choice(["m0", "m1", "m2"]),
        method=rng.choice(["generate_until", "loglikelihood"]), task=rng.choice(["t0", "t1", None]),
        split=rng.choice(["test", None]), doc_id=rng.choice([i % 5, str(i % 5), f"d{i % 3}", None]),
        created_at=t, model_seconds=rng.choice([0.0, 0.5, 1.25, 3.0]), raw_size=rng.randrange(0, 1000),
        components=rng.choice([None, '{"d": {"x": "1"}}']), used_at=t,
        prompt=rng.choice([None, None, "p0", "p1"]), key_schema=rng.choice([None, "lmms-cache/key/2", "k3"]),
        deps=rng.choice([None, b"", b"deps"]), origin=rng.choice([None, "uid:1@a"]),
        signature=rng.choice([None, rng.randbytes(32)]),
    )  # fmt: skip


def random_where(rng: random.Random) -> Where:
    return Where(
        models=rng.choice([None, None, ("m0",), ("m1", "m2"), ()]), task=rng.choice([None, None, "t0", "t1"]),
        method=rng.choice([None, None, "loglikelihood"]), doc_id=rng.choice([None, None, None, "3", 3, "d1"]),
        created_before=rng.choice([None, None, 1050.0]), key_schema=rng.choice([None, None, "k3"]),
        old_schema=rng.choice([None, None, "lmms-cache/key/2"]),
    )  # fmt: skip


def state(store: Store) -> dict[str, Any]:
    summary = store.summary()

    def rows(label: str) -> list[tuple[Any, ...]]:
        return sorted((tuple((k, round(v, 6) if isinstance(v, float) else v) for k, v in sorted(r.items())))
                      for r in summary[label])  # fmt: skip

    return {
        "entries": sorted(store.scan(), key=lambda e: e.key),
        "recent": [e.key for e in store.scan(values=False, recent_first=True)],
        "stats": {k: store.stats()[k] for k in ("entries", "bytes", "raw_bytes")},
        "by": [rows(label) for label in ("by_model", "by_task", "by_schema")],
        "hits": summary["hits"], "saved": round(summary["seconds_saved"], 6),
    }  # fmt: skip


@pytest.mark.parametrize("seed", range(4))
def test_redis_answers_as_sqlite_does(server: RedisServer, tmp_path: Path, request: pytest.FixtureRequest,
                                      seed: int) -> None:  # fmt: skip
    rng = random.Random(seed)
    prefix = prefix_of(request)
    sqlite, redis_store = SQLiteStore(str(tmp_path / "c")), RedisStore(server.url(prefix))
    stores: tuple[Store, Store] = (sqlite, redis_store)
    t = 1000.0
    try:
        for step in range(150):
            op = rng.choices(["put", "keep", "touch", "delete", "where", "evict", "similar", "scan"],
                             [8, 3, 4, 2, 1, 1, 2, 2])[0]  # fmt: skip
            if op in ("put", "keep"):
                batch = []
                for _ in range(rng.randrange(1, 12)):
                    t += 1
                    batch.append(random_entry(rng, rng.randrange(80), t))
                answers = [s.put_many(batch, replace=op == "put") for s in stores]
            elif op == "touch":
                t += 1
                hit = {key(rng.randrange(90)): rng.randrange(1, 4)}
                answers = [s.touch(hit, t) for s in stores]
            elif op == "delete":
                doomed = [key(rng.randrange(90)) for _ in range(rng.randrange(1, 6))]
                answers = [s.delete(doomed) for s in stores]
            elif op == "where":
                where = random_where(rng)
                answers = [s.delete_where(where) for s in stores]
            elif op == "evict":
                limit = int(sqlite.stats()["bytes"] * rng.uniform(0.5, 1.0))
                answers = [s.evict(limit) for s in stores]
            elif op == "similar":
                args = dict(task=rng.choice(["t0", "t1", None]), doc_id=rng.choice([3, "3", "d1", None]),
                            prompt=rng.choice(["p0", None]))  # fmt: skip
                method = rng.choice(["generate_until", "loglikelihood"])
                answers = [[e.key for e in s.similar(method, **args)] for s in stores]  # type: ignore[arg-type]
            else:
                where = random_where(rng)
                recent = rng.random() < 0.5
                answers = [[e.key for e in s.scan(where, values=False, recent_first=recent)] for s in stores]
                if not recent:  # SQLite pages by row id, Redis by creation time: the same set
                    answers = [sorted(a) for a in answers]
            assert answers[0] == answers[1], (step, op)
            if step % 25 == 0:
                assert state(sqlite) == state(redis_store), step
        assert state(sqlite) == state(redis_store)
        assert sqlite.stats()["entries"] > 10
        check_consistent(redis_store)
    finally:
        sqlite.close()
        redis_store.close()
        wipe(server, prefix)


# -- the store's own guarantees -------------------------------------------------------------------


def test_a_replayed_batch_changes_nothing(store: RedisStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """redis-py resends a command after a reconnect: a batch that ran but whose reply was
    lost runs again. Entries and byte totals stay exact; a replayed touch may count twice."""
    import redis

    real = RedisStore._invoke
    lost: list[str] = []

    def reply_lost_once(self: RedisStore, client: Any, name: str, args: Any) -> Any:
        result = real(self, client, name, args)
        if not lost:
            lost.append(name)
            raise redis.ConnectionError("Connection closed by server.")
        return result

    store.put_many([entry(i, value=b"x" * 10, model_seconds=1.0) for i in range(5)])
    monkeypatch.setattr(RedisStore, "_invoke", reply_lost_once)
    store.put_many([entry(i, value=b"y" * 20, model_seconds=2.0) for i in range(3, 8)])
    assert lost == ["put"]
    stats = store.stats()
    assert (stats["entries"], stats["bytes"]) == (8, 3 * 10 + 5 * 20)
    lost.clear()
    assert store.put_many([entry(i) for i in range(7, 10)], replace=False) == 0  # the replay found them
    assert store.stats()["entries"] == 10
    lost.clear()
    store.touch({key(1): 1}, when=9e9)
    got = store.get(key(1))
    assert got is not None and got.hits in (1, 2) and got.used_at == 9e9  # at least once
    lost.clear()
    assert store.delete([key(0), key(1)]) == 0  # the replay found them gone: the count is the replay's
    assert store.stats()["entries"] == 8
    check_consistent(store)


def test_readonly_reads_and_never_writes(server: RedisServer, request: pytest.FixtureRequest,
                                         caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    prefix = prefix_of(request)
    writer = RedisStore(server.url(prefix))
    reader = RedisStore(server.url(prefix), readonly=True)
    try:
        writer.put_many([entry(1)])
        writer.remember_model("m1", "{}")
        before = sorted(raw_client(writer).scan_iter(match=writer._p + b"*"))
        assert reader.get_many([key(1)])[key(1)].value == b"value 1"
        assert reader.models() == {"m1": "{}"}
        reader.touch({key(1): 1}, when=9e9)
        reader.remember_model("m2", "{}")
        for write in (lambda: reader.put_many([entry(2)]), lambda: reader.delete([key(1)]),
                      lambda: reader.delete_where(Where()), lambda: reader.evict(0)):  # fmt: skip
            with pytest.raises(StoreError, match="read-only"):
                write()
        assert sorted(raw_client(writer).scan_iter(match=writer._p + b"*")) == before
        assert reader.get(key(1)).hits == 0  # type: ignore[union-attr]
        fresh = RedisStore(server.url(prefix + "x"), readonly=True)  # an empty prefix: nothing written
        assert fresh.stats()["entries"] == 0 and list(fresh.scan()) == []
        assert list(raw_client(writer).scan_iter(match=fresh._p + b"*")) == []
        fresh.close()
    finally:
        writer.close()
        reader.close()
        wipe(server, prefix)


def test_a_cache_of_a_newer_layout_or_foreign_keys_are_refused(server: RedisServer,
                                                                 request: pytest.FixtureRequest) -> None:  # fmt: skip
    prefix = prefix_of(request)
    client = server.client()
    try:
        client.set(f"lmc:{{{prefix}}}:layout", "lmms-cache/redis/2")
        with pytest.raises(StoreError, match="newer lmms-cache"):
            RedisStore(server.url(prefix))
        client.set(f"lmc:{{{prefix}}}:layout", "something else")
        with pytest.raises(StoreError, match="something else"):
            RedisStore(server.url(prefix), readonly=True)
    finally:
        client.close()
        wipe(server, prefix)


def test_functions_reload_after_a_flush_and_evalsha_serves_older_servers(server: RedisServer,
                                                                         request: pytest.FixtureRequest) -> None:  # fmt: skip
    prefix = prefix_of(request)
    store = RedisStore(server.url(prefix))
    legacy = RedisStore(server.url(prefix), functions=False)
    try:
        store.put_many([entry(1)])
        assert store._functions is True
        assert raw_client(store).function_list(library=redis_backend._LIBRARY)
        raw_client(store).function_flush()
        store.put_many([entry(2)])  # loads the library again
        legacy.put_many([entry(i) for i in range(3, 40)])
        legacy.touch({key(3): 2}, when=9e9)
        assert legacy.delete([key(4)]) == 1
        removed, freed = legacy.evict(100)
        assert removed > 0 and freed > 0 and legacy.stats()["bytes"] <= 100
        assert legacy._functions is False
        assert store.stats() == {**legacy.stats(), "file_bytes": store.stats()["file_bytes"],
                                 "server_bytes": store.stats()["server_bytes"]}
        check_consistent(store)
    finally:
        store.close()
        legacy.close()
        wipe(server, prefix)


def test_store_survives_pickling_and_forking(store: RedisStore) -> None:
    store.put_many([entry(1)])
    copy = pickle.loads(pickle.dumps(store))
    try:
        assert copy.location == store.location
        assert copy.get_many([key(1)])[key(1)].value == b"value 1"
    finally:
        copy.close()
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    child = ctx.Process(target=_child_writes, args=(store, results))
    child.start()
    assert results.get(timeout=60) is None
    child.join(30)
    assert store.get_many([key(2)])[key(2)].value == b"value 2"


def _child_writes(store: RedisStore, results: Any) -> None:
    try:
        assert store.get_many([key(1)])
        store.put_many([entry(2)])
        results.put(None)
    except BaseException as exc:
        results.put(repr(exc))


def test_keys_must_be_16_bytes(store: RedisStore) -> None:
    with pytest.raises(ValueError, match="16-byte"):
        store.put_many([entry(1)._replace(key=b"short")])
    assert store.get_many([b"short"]) == {}


# -- locations --------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "location", "password"), [
    ("redis://localhost", "redis://localhost:6379/0?prefix=default", None),
    ("redis://:pw@cache.lan:7000/3?prefix=team-a", "redis://cache.lan:7000/3?prefix=team-a", "pw"),
    ("redis://alice:p%40ss%2Fw@h/1", "redis://alice@h:6379/1?prefix=default", "p@ss/w"),
    ("rediss://h:6380?prefix=x&ssl_ca_certs=/ca.pem", "rediss://h:6380/0?ssl_ca_certs=%2Fca.pem&prefix=x", None),
    ("unix:///run/redis.sock?db=2&prefix=p", "unix:///run/redis.sock?db=2&prefix=p", None),
    ("unix://:pw@/run/redis.sock", "unix:///run/redis.sock?db=0&prefix=default", "pw"),
    ("redis://[::1]:6379/0", "redis://[::1]:6379/0?prefix=default", None),
    ("redis://h/0?prefix=t&timeout=0.5&breaker=2", "redis://h:6379/0?prefix=t", None),  # not part of the location
])  # fmt: skip
def test_urls_parse_and_the_location_has_no_password(url: str, location: str, password: str | None) -> None:
    target = parse_url(url, environ={})
    assert (target.location, target.password) == (location, password)
    assert "pw" not in repr(target) and "ss/w" not in repr(target)
    assert parse_url(target.location, environ={}).location == location


def test_timeouts_in_the_url_tune_the_fault_handling() -> None:
    require_redis()
    store = RedisStore("redis://127.0.0.1:1/0?timeout=0.5&connect_timeout=0.25&breaker=7", lazy=True)
    assert (store._socket_timeout, store._connect_timeout, store._breaker.seconds) == (0.5, 0.25, 7.0)
    assert parse_url("redis://h?breaker=7").timeouts == {"breaker": 7.0}


def test_the_password_comes_from_the_environment_when_the_url_has_none() -> None:
    assert parse_url("redis://h", environ={PASSWORD_ENV: "env-secret"}).password == "env-secret"
    assert parse_url("redis://:url@h", environ={PASSWORD_ENV: "env-secret"}).password == "url"
    assert parse_url("redis://h", environ={PASSWORD_ENV: ""}).password is None


@pytest.mark.parametrize(("url", "message"), [
    ("http://h", "redis://, rediss:// or unix://"),
    ("redis://h?prefix=a{b}", "prefix"),
    ("redis://h?prefix=", "prefix"),
    ("redis://h?retries=3", "unknown option"),
    ("redis://h?timeout=soon", "timeout must be a number of seconds"),
    ("redis://h?breaker=0", "breaker must be a number of seconds"),
    ("redis://h?prefix=a&prefix=b", "twice"),
    ("redis://h/zero", "db must be a number"),
    ("redis://:sekrit@h:99999", "not a Redis URL"),
    ("redis://h?ssl_ca_certs=/x", "rediss://"),
    ("rediss://h?ssl_cert_reqs=maybe", "ssl_cert_reqs"),
    ("unix://", "no socket path"),
    ("redis:///0", "no host"),
])  # fmt: skip
def test_bad_urls_are_store_errors_that_hide_the_password(url: str, message: str) -> None:
    with pytest.raises(StoreError, match=message) as raised:
        parse_url(url, environ={})
    assert "sekrit" not in str(raised.value)


def test_password_from_url_or_environment_never_shown(own_server: Callable[..., RedisServer],
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    srv = own_server("--requirepass", "s3cret-pw")
    with caplog.at_level(logging.DEBUG, logger="lmms_cache"):
        store = RedisStore(srv.url(password="s3cret-pw"))
        store.put_many([entry(1)])
        assert "s3cret" not in store.location and "s3cret" not in repr(store)
        store.close()
        monkeypatch.setenv(PASSWORD_ENV, "s3cret-pw")
        from_env = RedisStore(srv.url())
        assert from_env.get_many([key(1)])
        from_env.close()
        monkeypatch.delenv(PASSWORD_ENV)
        with pytest.raises(StoreError) as refused:
            RedisStore(srv.url(password="wrong-pw"))
        with pytest.raises(StoreError):
            RedisStore(srv.url())
    assert "s3cret" not in str(refused.value) and "wrong-pw" not in str(refused.value)
    assert not any("s3cret" in r.getMessage() or "wrong-pw" in r.getMessage() for r in caplog.records)


def test_a_unix_socket(own_server: Callable[..., RedisServer]) -> None:
    srv = own_server(unix_socket=True)
    store = RedisStore(f"unix://{srv.socket_path}?prefix=sock")
    try:
        store.put_many([entry(1)])
        assert store.get_many([key(1)])[key(1)].value == b"value 1"
    finally:
        store.close()


def test_tls(own_server: Callable[..., RedisServer], tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl to make certificates")
    d = tmp_path / "tls"
    d.mkdir()

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=lmms-cache test CA")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=127.0.0.1")  # fmt: skip
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")  # fmt: skip
    from redis_server import free_port

    tls_port = free_port()
    srv = own_server("--tls-port", str(tls_port), "--tls-cert-file", str(d / "server.pem"),
                     "--tls-key-file", str(d / "server.key"), "--tls-ca-cert-file", str(d / "ca.pem"),
                     "--tls-auth-clients", "no")  # fmt: skip
    assert srv.ping()
    store = RedisStore(f"rediss://127.0.0.1:{tls_port}/0?prefix=tls&ssl_ca_certs={d / 'ca.pem'}")
    try:
        store.put_many([entry(1)])
        assert store.get_many([key(1)])[key(1)].value == b"value 1"
    finally:
        store.close()
    with pytest.raises(StoreError):  # the server's certificate is not trusted without the CA
        RedisStore(f"rediss://127.0.0.1:{tls_port}/0?prefix=tls", connect_timeout=2)


# -- the server's settings ----------------------------------------------------------------------


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "lmms_cache"]


def test_eviction_and_no_persistence_are_warned_once_per_store(own_server: Callable[..., RedisServer],
                                                               caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    srv = own_server("--maxmemory-policy", "allkeys-lru", "--appendonly", "no")
    with caplog.at_level(logging.INFO, logger="lmms_cache"):
        store = RedisStore(srv.url())
        store.put_many([entry(1)])
        store.close()
        store.get_many([key(1)])  # reconnects: no new warning
        store.close()
    warned = warnings_of(caplog)
    assert len(warned) == 2
    assert "maxmemory-policy allkeys-lru" in warned[0] and "noeviction" in warned[0] and "metadata" in warned[0]
    assert "appendonly no" in warned[1] and "restart loses" in warned[1]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lmms_cache"):
        RedisStore(srv.url()).close()
    assert len(warnings_of(caplog)) == 2  # each store says it once


def test_a_good_server_is_not_warned_about(server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="lmms_cache"):
        RedisStore(server.url("quiet"), readonly=True).close()
    assert warnings_of(caplog) == []


def test_appendfsync_no_is_warned(own_server: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture) -> None:
    srv = own_server("--appendfsync", "no")
    with caplog.at_level(logging.INFO, logger="lmms_cache"):
        RedisStore(srv.url()).close()
    (warned,) = warnings_of(caplog)
    assert "appendfsync no" in warned


def test_a_server_without_config_is_warned_that_it_could_not_be_checked(
    own_server: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    srv = own_server("--rename-command", "CONFIG", "")
    with caplog.at_level(logging.INFO, logger="lmms_cache"):
        store = RedisStore(srv.url())
        store.put_many([entry(1)])
        store.close()
    (warned,) = warnings_of(caplog)
    assert "could not check" in warned and "noeviction" in warned and "appendonly yes" in warned


def test_a_user_without_config_and_info_works_and_is_warned(own_server: Callable[..., RedisServer],
                                                            caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """A managed service's ACL: no CONFIG, no INFO. The store works; stats lack the server's memory."""
    srv = own_server()
    admin = srv.client()
    admin.acl_setuser("app", enabled=True, passwords=["+app-pw"], keys=["*"], channels=["*"],
                      commands=["+@all", "-config", "-info"])  # fmt: skip
    admin.close()
    with caplog.at_level(logging.INFO, logger="lmms_cache"):
        store = RedisStore(f"redis://app:app-pw@127.0.0.1:{srv.port}/0?prefix=acl")
        store.put_many([entry(1)])
        stats = store.stats()
        store.close()
    assert (stats["entries"], stats["file_bytes"]) == (1, 0)
    (warned,) = warnings_of(caplog)
    assert "could not check" in warned


# -- faults -----------------------------------------------------------------------------------


def test_an_unreachable_server_is_a_store_error_at_once(tmp_path: Path) -> None:
    require_redis()
    from redis_server import free_port

    started = time.monotonic()
    with pytest.raises(StoreError, match="failed"):
        RedisStore(f"redis://127.0.0.1:{free_port()}/0")
    assert time.monotonic() - started < 1.0  # no retries with backoff (redis-py's default: seconds)


def test_killed_mid_batch_keeps_none_of_the_batch(own_server: Callable[..., RedisServer]) -> None:
    """SIGKILL while the batch's function runs (the server answers BUSY to others then):
    after a restart from the append-only file, none of that batch is there."""
    import redis

    srv = own_server("--busy-reply-threshold", "20")
    store = RedisStore(srv.url(), socket_timeout=60)
    store.put_many([entry(i) for i in range(100)])
    big = [entry(100_000 + i, value=os.urandom(100), task=f"t{i % 50}") for i in range(40_000)]
    outcome: list[BaseException | int] = []

    def write() -> None:
        try:
            outcome.append(store.put_many(big))
        except BaseException as exc:
            outcome.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    probe = srv.client(socket_timeout=5)
    deadline = time.monotonic() + 60
    busy = False
    while time.monotonic() < deadline and not busy and writer.is_alive():
        try:
            probe.ping()
        except redis.ResponseError as exc:
            busy = str(exc).startswith("BUSY")
        time.sleep(0.002)
    probe.close()
    assert busy, "the batch's function never ran long enough to be caught"
    srv.kill()
    writer.join(60)
    assert len(outcome) == 1 and isinstance(outcome[0], StoreError)
    srv.start()
    after = RedisStore(srv.url())
    try:
        assert after.stats()["entries"] == 100
        assert after.get_many([e.key for e in big[::997]]) == {}
        check_consistent(after)
    finally:
        after.close()
        store.close()


def test_killed_and_restarted_mid_run_keeps_every_acknowledged_batch(own_server: Callable[..., RedisServer]) -> None:
    srv = own_server()
    store = RedisStore(srv.url(), breaker_seconds=0.2)
    acknowledged: list[int] = []
    failed: list[int] = []
    stop = threading.Event()

    def chaos() -> None:
        time.sleep(0.3)
        srv.kill()
        time.sleep(0.5)
        srv.start()
        time.sleep(0.5)
        stop.set()

    killer = threading.Thread(target=chaos)
    killer.start()
    batch = 0
    while not stop.is_set() or batch < 20:
        try:
            store.put_many([entry(batch * 64 + i, value=os.urandom(500)) for i in range(64)])
            acknowledged.append(batch)
        except StoreError:
            failed.append(batch)
            time.sleep(0.01)
        batch += 1
    killer.join()
    assert failed, "the server was never down while writing"
    assert acknowledged[-1] > failed[-1], "writing never resumed after the restart"
    present = store.get_many([key(b * 64 + i) for b in range(batch) for i in range(64)])
    for b in acknowledged:
        assert all(key(b * 64 + i) in present for i in range(64)), f"acknowledged batch {b} lost"
    for b in failed:  # all or nothing (a batch may have been written before its reply was lost)
        assert len([i for i in range(64) if key(b * 64 + i) in present]) in (0, 64)
    assert store.stats()["entries"] == len(present)
    check_consistent(store)
    store.close()


def test_a_hung_server_costs_one_socket_timeout_per_breaker_window(own_server: Callable[..., RedisServer],
                                                                   caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    srv = own_server()
    clock = Clock()
    store = RedisStore(srv.url(), socket_timeout=0.5, connect_timeout=0.5, breaker_seconds=30, clock=clock)
    store.put_many([entry(1)])
    srv.pause()
    try:
        with caplog.at_level(logging.INFO, logger="lmms_cache"):
            started = time.monotonic()
            with pytest.raises(StoreError, match=r"no reply within 0\.5 s"):
                store.get_many([key(1)])
            assert 0.45 <= time.monotonic() - started < 1.0
            started = time.monotonic()
            for call in (lambda: store.get_many([key(1)]), lambda: store.put_many([entry(2)]),
                         lambda: store.touch({key(1): 1}, 5.0), lambda: list(store.scan()), store.summary):  # fmt: skip
                with pytest.raises(StoreError, match="skipped"):
                    call()
            assert time.monotonic() - started < 0.1  # the window: no waiting at all
            clock.advance(31)
            started = time.monotonic()
            with pytest.raises(StoreError, match="no reply"):
                store.put_many([entry(2)])
            assert time.monotonic() - started < 1.0  # one socket timeout (a connect, then no reply)
            with pytest.raises(StoreError, match="skipped"):
                store.get_many([key(1)])
        assert len(warnings_of(caplog)) == 1  # the first failure warns; later ones are INFO
    finally:
        srv.resume()
    with pytest.raises(StoreError, match="skipped"):
        store.get_many([key(1)])  # still within the window
    clock.advance(31)
    assert store.get_many([key(1)])[key(1)].value == b"value 1"
    store.put_many([entry(2)])
    assert store.stats()["entries"] == 2
    store.close()


def test_a_dead_server_is_skipped_and_found_again(own_server: Callable[..., RedisServer]) -> None:
    srv = own_server()
    clock = Clock()
    store = RedisStore(srv.url(), breaker_seconds=30, clock=clock)
    store.put_many([entry(1)])
    srv.kill()
    started = time.monotonic()
    with pytest.raises(StoreError, match="failed"):
        store.get_many([key(1)])
    with pytest.raises(StoreError, match="skipped"):
        store.put_many([entry(2)])
    assert time.monotonic() - started < 1.0
    srv.start()
    clock.advance(31)
    assert store.get_many([key(1)])  # acknowledged before the kill: in the append-only file
    store.close()


@pytest.mark.parametrize("functions", [True, False], ids=["functions", "evalsha"])
def test_out_of_memory_rejects_whole_batches_and_still_reads_and_deletes(
    own_server: Callable[..., RedisServer], functions: bool
) -> None:
    srv = own_server()
    store = RedisStore(srv.url(), functions=functions)
    store.put_many([entry(i) for i in range(10)])
    admin = srv.client()
    used = int(admin.info("memory")["used_memory"])
    admin.config_set("maxmemory", used + 3_000_000)
    written = 10
    rejected = None
    for batch in range(1, 200):
        attempt = [entry(batch * 1000 + i, value=os.urandom(2048)) for i in range(64)]
        try:
            store.put_many(attempt)
            written += 64
        except StoreError as exc:
            rejected = exc
            break
    assert rejected is not None and "out of memory" in str(rejected) and "rejected whole" in str(rejected)
    assert store.get_many([e.key for e in attempt]) == {}  # none of the rejected batch
    assert store.stats()["entries"] == written
    check_consistent(store)
    assert len(store.get_many([key(i) for i in range(10)])) == 10
    assert store.delete([key(1000 + i) for i in range(64)]) == 64  # deleting works on a full server
    removed, _ = store.evict(5 * 2048 * 64)
    assert removed > 0
    check_consistent(store)
    admin.config_set("maxmemory", 0)
    store.put_many([entry(99)])
    admin.close()
    store.close()


def _process_writer(url: str, tag: int, start: Any, results: Any) -> None:
    try:
        store = RedisStore(url)
        start.wait(30)
        for batch in range(40):
            base = tag * 1000 + batch * 25  # neighbours overlap: 1000 apart, 2000 written each
            store.put_many([entry(base + i, value=b"%d" % (base + i) * 8) for i in range(50)])
            store.touch({key(base): 1}, when=time.time())
        store.close()
        results.put(None)
    except BaseException as exc:
        results.put(repr(exc))


def test_four_writer_processes_lose_nothing(own_server: Callable[..., RedisServer]) -> None:
    srv = own_server()
    ctx = multiprocessing.get_context("spawn")  # like lmms-eval's ranks: nothing shared
    start, results = ctx.Barrier(4), ctx.Queue()
    writers = [ctx.Process(target=_process_writer, args=(srv.url(), tag, start, results)) for tag in range(4)]
    for w in writers:
        w.start()
    outcomes = [results.get(timeout=120) for _ in writers]
    for w in writers:
        w.join(60)
    assert outcomes == [None] * 4
    store = RedisStore(srv.url())
    expected = {tag * 1000 + n for tag in range(4) for n in range(40 * 25 + 25)}
    stats = store.stats()
    assert stats["entries"] == len(expected)
    assert stats["bytes"] == sum(len(b"%d" % i) * 8 for i in expected)
    assert store.summary()["hits"] >= 4 * 40  # at least once
    check_consistent(store)
    store.close()
