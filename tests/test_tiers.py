"""Two tiers through the proxy, without a server: the shared tier here is a second cache
directory (any location works as one), made to fail where a test needs it. The same
semantics on a real redis-server: tests/test_proxy_redis.py."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from fakes import FakeModel, gen_request, task_dict
from lmms_cache import cached, codec, tiers, trust
from lmms_cache.engine import Observer
from lmms_cache.guard import Guarded, Warnings
from lmms_cache.store import Entry, NullStore, SQLiteStore, StoreError, open_store


def model() -> FakeModel:
    m = FakeModel()
    m.task_dict = task_dict(8)
    return m


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def entries_of(location: Path) -> dict[Any, Entry]:
    store = open_store(location, readonly=True)
    try:
        return {e.doc_id: e for e in store.scan()}
    finally:
        store.close()


def refuse_writes(monkeypatch: pytest.MonkeyPatch, lm: Any) -> None:
    """The shared tier refuses every write from now on (a server gone away)."""

    def refuse(*args: Any, **kwargs: Any) -> int:
        raise StoreError("the server went away")

    shared = lm._self_cache.tiers.shared
    monkeypatch.setattr(shared.store, "put_many", refuse)
    monkeypatch.setattr(shared.store, "get_many", lambda *a, **k: refuse())


def test_reads_go_local_first_then_shared_and_shared_hits_are_copied_locally(tmp_path: Path) -> None:
    shared = tmp_path / "team"
    writer = cached(model(), tmp_path / "a", shared=str(shared))
    writer.generate_until([gen_request(i) for i in range(4)])
    writer.cache_close()
    assert len(entries_of(tmp_path / "a")) == 4 and len(entries_of(shared)) == 4  # written to both
    m = model()
    reader = cached(m, tmp_path / "b", shared=str(shared))
    assert [r.text for r in reader.generate_until([gen_request(i) for i in range(5)])] == [
        f"answer to q{i}" for i in range(5)]  # fmt: skip
    assert m.calls == 1 and [args[0] for _, args in m.seen] == ["q4"]  # four from the shared tier
    reader.cache_close()
    copied = entries_of(tmp_path / "b")
    assert sorted(copied) == [0, 1, 2, 3, 4]
    # copies are imports, never "ours": their origin is not this user's
    assert {copied[i].origin for i in range(4)} == {trust.imported_origin(trust.local_origin())}
    assert copied[4].origin == trust.local_origin()  # computed here
    alone = model()
    again = cached(alone, tmp_path / "b")  # the local tier alone now answers everything
    again.generate_until([gen_request(i) for i in range(5)])
    assert alone.calls == 0


def test_writes_that_the_shared_tier_refuses_wait_in_a_durable_outbox(tmp_path: Path, caplog, monkeypatch) -> None:
    shared = tmp_path / "team"
    lm = cached(model(), tmp_path / "a", shared=str(shared), batch_size=2)
    refuse_writes(monkeypatch, lm)
    lm.generate_until([gen_request(i) for i in range(5)])
    assert lm.cache_stats.written == 5  # durable locally
    assert len(entries_of(tmp_path / "a")) == 5
    queue = SQLiteStore(str(tmp_path / "a"), readonly=True)
    target = lm._self_cache.tiers.target
    assert len(queue.queued(target)) == 5  # in the local file: a crash now loses nothing
    queue.close()
    assert set(lm._self_cache.tiers.outbox.values()) == {None}  # in memory: keys only, read back when sent
    lm.cache_close()
    warned = warnings_of(caplog)
    assert len([w for w in warned if "went away" in w]) == 1  # one warning for the outage
    assert any("5 responses could not be sent" in w and "lmms-cache push" in w for w in warned)
    monkeypatch.undo()
    # a later run sends them with its first batch
    later = cached(model(), tmp_path / "a", shared=str(shared))
    later.generate_until([gen_request(6)])
    later.cache_close()
    assert sorted(entries_of(shared)) == [0, 1, 2, 3, 4, 6]
    queue = SQLiteStore(str(tmp_path / "a"), readonly=True)
    assert queue.queued(target) == []
    queue.close()


def test_push_drains_the_outbox_by_hand(tmp_path: Path, monkeypatch) -> None:
    from cli_run import cli_json

    shared = tmp_path / "team"
    lm = cached(model(), tmp_path / "a", shared=str(shared))
    refuse_writes(monkeypatch, lm)
    lm.generate_until([gen_request(i) for i in range(3)])
    lm.cache_close()
    monkeypatch.undo()
    target = lm._self_cache.tiers.target
    out = cli_json("push", tmp_path / "a")
    assert out["outboxes"] == [{"shared": target, "pushed": 3, "missing": 0, "left": 0}]
    assert sorted(entries_of(shared)) == [0, 1, 2]
    assert cli_json("push", tmp_path / "a")["outboxes"] == []


def test_the_outbox_is_bounded_and_says_so_once(tmp_path: Path, caplog, monkeypatch) -> None:
    monkeypatch.setattr(tiers, "OUTBOX_MAX", 3)
    lm = cached(model(), tmp_path / "a", shared=str(tmp_path / "team"), batch_size=2)
    refuse_writes(monkeypatch, lm)
    lm.generate_until([gen_request(i) for i in range(5)])
    lm.generate_until([gen_request(i) for i in range(5, 8)])
    t = lm._self_cache.tiers
    assert list(t.outbox) == [gen_key(lm, i) for i in range(5, 8)]  # the newest three wait
    assert len(entries_of(tmp_path / "a")) == 8  # every response is still in the local tier
    assert len([w for w in warnings_of(caplog) if "no longer wait" in w]) == 1
    monkeypatch.undo()
    lm.cache_close()
    assert sorted(entries_of(tmp_path / "team")) == [5, 6, 7]
    queue = SQLiteStore(str(tmp_path / "a"), readonly=True)
    assert queue.queued(t.target) == []  # the dropped ones left the local queue too
    queue.close()


def gen_key(lm: Any, doc_id: int) -> bytes:
    (rk,) = lm._self_cache.keys.keys("generate_until", [gen_request(doc_id)], count=False)
    return rk.key  # type: ignore[no-any-return]


def test_readonly_reads_both_tiers_and_writes_neither(tmp_path: Path) -> None:
    shared = tmp_path / "team"
    cached(model(), tmp_path / "a", shared=str(shared)).generate_until([gen_request(0)])
    cached(model(), shared).generate_until([gen_request(1)])  # only in the shared tier
    m = model()
    lm = cached(m, tmp_path / "a", shared=str(shared), mode="readonly")
    lm.generate_until([gen_request(0), gen_request(1), gen_request(2)])
    lm.cache_close()
    assert m.calls == 1 and [args[0] for _, args in m.seen] == ["q2"]
    assert sorted(entries_of(tmp_path / "a")) == [0] and sorted(entries_of(shared)) == [0, 1]
    assert {e.hits for e in entries_of(shared).values()} == {0}


def test_refresh_writes_both_tiers(tmp_path: Path) -> None:
    shared = tmp_path / "team"
    cached(model(), tmp_path / "a", shared=str(shared)).generate_until([gen_request(0)])
    stale = {k: e.created_at for k, e in entries_of(shared).items()}
    m = model()
    lm = cached(m, tmp_path / "a", shared=str(shared), mode="refresh")
    lm.generate_until([gen_request(0)])
    lm.cache_close()
    assert m.calls == 1
    assert entries_of(shared)[0].created_at > stale[0] and entries_of(tmp_path / "a")[0].created_at > stale[0]


def test_hits_are_recorded_in_the_tier_that_served_them(tmp_path: Path) -> None:
    shared = tmp_path / "team"
    cached(model(), tmp_path / "a", shared=str(shared)).generate_until([gen_request(0)])
    cached(model(), shared).generate_until([gen_request(1)])
    lm = cached(model(), tmp_path / "a", shared=str(shared))
    lm.generate_until([gen_request(0), gen_request(1)])
    lm.cache_close()
    local, team = entries_of(tmp_path / "a"), entries_of(shared)
    assert (local[0].hits, team[0].hits) == (1, 0)  # served locally
    assert (local[1].hits, team[1].hits) == (0, 1)  # served by the shared tier (then copied)


def test_max_size_applies_to_the_local_tier_alone(tmp_path: Path) -> None:
    shared = tmp_path / "team"
    lm = cached(model(), tmp_path / "a", shared=str(shared), max_size=1)
    lm.generate_until([gen_request(i) for i in range(4)])
    lm.cache_close()
    assert len(entries_of(tmp_path / "a")) <= 1 and len(entries_of(shared)) == 4


class Unsafe:
    """A response class outside the restricted loader's allow-list: loading it would run
    this module's code (``loaded`` counts it)."""

    loaded = 0

    def __setstate__(self, state: Any) -> None:
        Unsafe.loaded += 1


def plant(location: Path, key: bytes, blob: bytes, **fields: Any) -> None:
    store = open_store(location)
    store.put_many([Entry(key=key, value=blob, model="m", method="generate_until", task="t", split="test",
                          doc_id=0, **fields)])  # fmt: skip
    store.close()


def test_a_shared_value_that_is_neither_ours_nor_signed_loads_restricted_and_is_not_copied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(trust.SECRET_ENV, "team secret")
    shared = tmp_path / "team"
    probe = cached(model(), tmp_path / "probe")
    k = gen_key(probe, 0)
    value = Unsafe()
    value.state = "loaded runs __setstate__"  # type: ignore[attr-defined]
    blob = codec.encode(value)
    # A local file's origin would be proof; another tier's claim is not, whatever it says.
    planted_origin = trust.local_origin()
    for forged in (None, b"\0" * 32):
        Unsafe.loaded = 0
        plant(shared, k, blob, origin=planted_origin, signature=forged)
        m = model()
        lm = cached(m, tmp_path / f"a{forged is None}", shared=str(shared))
        out = lm.generate_until([gen_request(0)])
        lm.cache_close()
        assert Unsafe.loaded == 0 and m.calls == 1 and out[0].text == "answer to q0"  # refused, recomputed
        local = entries_of(tmp_path / f"a{forged is None}")[0]
        assert local.origin == trust.local_origin() and codec.decode(local.value).text == "answer to q0"
    # A valid signature is proof of the secret: it loads in full and keeps its signature in the copy.
    good = trust.sign(k, blob)
    plant(shared, k, blob, origin="uid:0@elsewhere", signature=good)
    Unsafe.loaded = 0
    m = model()
    lm = cached(m, tmp_path / "signed", shared=str(shared))
    (out,) = lm.generate_until([gen_request(0)])
    lm.cache_close()
    assert isinstance(out, Unsafe) and Unsafe.loaded == 1 and m.calls == 0
    copy = entries_of(tmp_path / "signed")[0]
    assert copy.signature == good and copy.origin == trust.imported_origin("uid:0@elsewhere")


def test_an_unusable_shared_tier_leaves_the_local_one_working(tmp_path: Path, caplog) -> None:
    lm = cached(model(), tmp_path / "a", shared="redis://127.0.0.1:6379/0?prefix=bad prefix")
    lm.generate_until([gen_request(0)])
    assert isinstance(lm._self_cache.tiers.shared.store, NullStore)
    assert len(entries_of(tmp_path / "a")) == 1
    (warned,) = warnings_of(caplog)
    assert "shared cache is unusable" in warned


def test_a_crash_after_the_local_commit_loses_nothing_the_shared_tier_lacks(tmp_path: Path, monkeypatch) -> None:
    """The outbox row commits with the entry: a process killed before its push leaves it queued."""
    shared = tmp_path / "team"
    lm = cached(model(), tmp_path / "a", shared=str(shared))
    t = lm._self_cache.tiers
    monkeypatch.setattr(t, "drain", lambda **kw: 0)  # killed right after the local commit
    lm.generate_until([gen_request(0), gen_request(1)])
    with sqlite3.connect(tmp_path / "a" / "cache.db") as conn:
        assert conn.execute("SELECT count(*) FROM outbox").fetchone()[0] == 2
    monkeypatch.undo()
    fresh = cached(model(), tmp_path / "a", shared=str(shared))
    fresh.cache_close()  # close drains what an earlier run left
    assert sorted(entries_of(shared)) == [0, 1]


# -- the fault wrapper on its own ------------------------------------------------------------------


class Flaky(NullStore):
    """A store whose reads and writes fail while ``down``."""

    def __init__(self) -> None:
        super().__init__("flaky://")
        self.down = True
        self.written: list[Entry] = []

    def get_many(self, keys: Any, *, created_after: Any = None) -> Any:
        if self.down:
            raise StoreError("down")
        return {}

    def put_many(self, entries: Any, *, replace: bool = True) -> int:
        if self.down:
            raise StoreError("down")
        self.written += entries
        return len(entries)


def test_the_fault_wrapper_warns_once_per_outage(caplog) -> None:
    store = Flaky()
    g = Guarded(store, Warnings(), batch_size=2)
    g.writable = True  # (a null store is never written: this one pretends)
    e = [Entry(key=bytes([i]) * 16, value=b"v", model="m", method="g") for i in range(3)]
    for i in range(3):
        assert g.get_many([b"k" * 16]) == {}
        assert g.save(e[i : i + 1]) == 0
    assert len(warnings_of(caplog)) == 1 and len(g.pending) == 3 and store.quiet
    store.down = False
    assert g.save([]) == 3 and g.pending == []  # the backlog, in batches
    assert g.get_many([b"k" * 16]) == {} and not g.failing
    store.down = True
    g.get_many([b"k" * 16])
    assert len(warnings_of(caplog)) == 2  # a new outage: its own warning


def test_the_fault_wrapper_drops_the_oldest_past_its_bound(caplog) -> None:
    store = Flaky()
    g = Guarded(store, Warnings(), max_pending=2)
    g.writable = True
    e = [Entry(key=bytes([i]) * 16, value=b"v", model="m", method="g") for i in range(3)]
    g.save(e)
    assert g.pending == e[1:]
    assert any("oldest unsaved ones were dropped" in w for w in warnings_of(caplog))


class Collect(Observer):
    def __init__(self) -> None:
        self.counted: list[dict[bytes, int]] = []
        self.missed: list[Any] = []

    def hits(self, counts: Any) -> None:
        self.counted.append(dict(counts))

    def misses(self, method: str, missed: Any, described: Any) -> None:
        self.missed += [rk.view.doc_id for rk in missed]


def test_observers_watch_hits_and_misses(tmp_path: Path) -> None:
    from lmms_cache.proxy import Options, wrap

    seen = Collect()
    lm = wrap(model(), Options.make(path=tmp_path, observers=[seen]))
    lm.generate_until([gen_request(0), gen_request(1)])
    lm.generate_until([gen_request(0), gen_request(0), gen_request(2)])
    lm.cache_close()
    assert seen.missed == [0, 1, 2]
    assert seen.counted == [{gen_key(lm, 0): 2}]
