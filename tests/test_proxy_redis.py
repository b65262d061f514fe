"""The proxy on a real redis-server (Debian's package, started here on a free loopback port
with ``appendonly yes``): a server as the cache, and as the shared tier behind a local one;
the faults through ``cached(...)``: a server down at the start, killed and restarted
mid-run, hung (SIGSTOP), out of memory; forged values from the shared tier; every
management command on a ``redis://`` location."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cli_run import cli_json, run_cli
from fakes import FakeModel, gen_request, task_dict
from lmms_cache import cached, codec, trust
from lmms_cache.store import Entry, NullStore, SQLiteStore, open_store
from lmms_cache.store.redis import RedisStore
from redis_server import RedisServer
from test_store_redis import check_consistent, own_server, prefix_of, server, wipe  # noqa: F401 (fixtures)
from test_tiers import Unsafe, gen_key

pytestmark = pytest.mark.e2e


def model(n: int = 8) -> FakeModel:
    m = FakeModel()
    m.task_dict = task_dict(n)
    return m


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "lmms_cache"]


def texts(results: list[Any]) -> list[str]:
    return [r.text for r in results]


def stored(location: str | Path) -> dict[Any, Entry]:
    store = open_store(location, readonly=True)
    try:
        return {e.doc_id: e for e in store.scan()}
    finally:
        store.close()


@pytest.fixture
def url(server: RedisServer, request: pytest.FixtureRequest) -> Iterator[str]:  # noqa: F811
    """A prefix of this test's own on the shared server, wiped afterwards (checked consistent)."""
    prefix = prefix_of(request)
    yield server.url(prefix)
    store = RedisStore(server.url(prefix))
    check_consistent(store)
    store.close()
    wipe(server, prefix)


# -- a server as the cache ------------------------------------------------------------------------


def test_a_redis_location_serves_hits_and_keeps_the_memos_local(url: str) -> None:
    first = cached(model(), url)
    assert texts(first.generate_until([gen_request(i) for i in range(4)])) == [f"answer to q{i}" for i in range(4)]
    first.cache_close()
    assert isinstance(first.cache_store, RedisStore) and first.cache_store.location in repr(first)
    m = model()
    again = cached(m, url)
    assert texts(again.generate_until([gen_request(i) for i in range(4)])) == [f"answer to q{i}" for i in range(4)]
    assert m.calls == 0 and again.cache_stats.hits == 4
    memos = again._self_cache.memos
    assert isinstance(memos, SQLiteStore) and memos.directory == os.environ["LMMS_CACHE_DIR"]
    again.cache_close()
    assert sorted(stored(url)) == [0, 1, 2, 3]


def test_the_password_never_reaches_a_log_or_the_key(own_server: Callable[..., RedisServer],  # noqa: F811
                                                     caplog: pytest.LogCaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    srv = own_server("--requirepass", "pw-in-url")
    caplog.set_level(logging.DEBUG, logger="lmms_cache")
    lm = cached(model(), srv.url("p", password="pw-in-url"))
    lm.generate_until([gen_request(0)])
    lm.cache_close()
    key_by_url = gen_key(lm, 0)
    monkeypatch.setenv("LMMS_CACHE_REDIS_PASSWORD", "pw-in-url")
    lm = cached(model(), srv.url("p"))  # the password from the environment
    assert lm.generate_until([gen_request(0)]) and lm.cache_stats.hits == 1
    assert gen_key(lm, 0) == key_by_url
    lm.cache_close()
    assert not any("pw-in-url" in r.getMessage() for r in caplog.records)
    assert "pw-in-url" not in repr(lm)


def test_a_run_started_while_the_server_is_down_recovers_once_it_is_back(
    own_server: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    srv = own_server()
    srv.kill()
    location = srv.url("down") + "&breaker=0.2&connect_timeout=0.5"
    m = model()
    lm = cached(m, location)  # nothing listens: not an error, and not a null store for the run
    assert isinstance(lm.cache_store, RedisStore)
    assert texts(lm.generate_until([gen_request(0), gen_request(1)])) == ["answer to q0", "answer to q1"]
    assert lm.cache_stats.written == 0
    srv.start()
    time.sleep(0.3)  # the breaker's window
    lm.generate_until([gen_request(2)])
    assert lm.cache_stats.written == 3  # the two computed while it was down, and the new one
    lm.cache_close()
    assert sorted(stored(srv.url("down"))) == [0, 1, 2]
    assert len(warnings_of(caplog)) == 1  # one outage, one warning (not the store's and the proxy's)
    srv.kill()  # a second outage: its own warning
    time.sleep(0.3)
    lm.generate_until([gen_request(3)])
    assert len(warnings_of(caplog)) == 2


def test_a_hung_server_costs_one_socket_timeout_per_breaker_window(
    own_server: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    srv = own_server()
    lm = cached(model(), srv.url("hung") + "&timeout=0.5&connect_timeout=0.5&breaker=30")
    lm.generate_until([gen_request(0)])
    srv.pause()
    try:
        started = time.monotonic()
        assert texts(lm.generate_until([gen_request(0), gen_request(1)])) == ["answer to q0", "answer to q1"]
        assert time.monotonic() - started < 1.5  # one socket timeout; the write is skipped
        started = time.monotonic()
        for i in range(2, 6):
            lm.generate_until([gen_request(i)])
        assert time.monotonic() - started < 0.2  # within the window: no waiting at all
        assert len(warnings_of(caplog)) == 1
    finally:
        srv.resume()


def test_out_of_memory_rejects_whole_batches_and_the_run_goes_on(
    own_server: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    srv = own_server("--maxmemory", "3mb")

    class Big(FakeModel):
        def generate_until(self, requests: list[Any]) -> list[Any]:
            return [os.urandom(40_000).hex() + str(r.args[0]) for r in requests]

    m = Big()
    m.task_dict = task_dict(200)
    location = srv.url("oom")
    lm = cached(m, location, batch_size=4)
    out = lm.generate_until([gen_request(i) for i in range(120)])
    assert [o[-len(f"q{i}") :] for i, o in enumerate(out)] == [f"q{i}" for i in range(120)]
    written = lm.cache_stats.written
    assert 0 < written < 120
    warned = warnings_of(caplog)
    assert len(warned) == 1 and "out of memory" in warned[0]
    store = RedisStore(location)
    assert store.stats()["entries"] == written  # whole batches or nothing
    assert written % 4 == 0
    check_consistent(store)
    store.close()


# -- two tiers ------------------------------------------------------------------------------------


def test_two_tiers_share_a_teams_responses(url: str, tmp_path: Path) -> None:
    writer = cached(model(), tmp_path / "node-a", shared=url)
    writer.generate_until([gen_request(i) for i in range(4)])
    writer.cache_close()
    m = model()
    reader = cached(m, tmp_path / "node-b", shared=url)
    assert texts(reader.generate_until([gen_request(i) for i in range(5)])) == [f"answer to q{i}" for i in range(5)]
    assert m.calls == 1  # q4 only
    reader.cache_close()
    local = stored(tmp_path / "node-b")
    assert sorted(local) == [0, 1, 2, 3, 4]
    assert {local[i].origin for i in range(4)} == {trust.imported_origin(trust.local_origin())}
    team = stored(url)
    assert sorted(team) == [0, 1, 2, 3, 4] and {team[i].hits for i in range(4)} == {1}


def test_killed_and_restarted_mid_run_the_run_completes_and_the_shared_tier_gets_everything(
    own_server: Callable[..., RedisServer], tmp_path: Path  # noqa: F811
) -> None:
    srv = own_server()
    location = srv.url("team") + "&breaker=0.2"

    class Chaos(FakeModel):
        batches = 0

        def generate_until(self, requests: list[Any]) -> list[Any]:
            self.batches += 1
            if self.batches == 3:
                srv.kill()  # after two batches were acknowledged
            if self.batches == 7:
                srv.start()  # from its append-only file
                time.sleep(0.3)  # the breaker's window passes
            return super().generate_until(requests)

    m = Chaos()
    m.task_dict = task_dict(80)
    lm = cached(m, tmp_path / "local", shared=location, batch_size=8)
    assert texts(lm.generate_until([gen_request(i) for i in range(80)])) == [f"answer to q{i}" for i in range(80)]
    assert m.batches == 10 and lm.cache_stats.written == 80
    lm.cache_close()
    store = RedisStore(location)
    assert store.stats()["entries"] == 80  # exact: the acknowledged ones and the outage's
    assert sorted(e.doc_id for e in store.scan(values=False)) == list(range(80))
    check_consistent(store)
    store.close()
    local = SQLiteStore(str(tmp_path / "local"))
    assert local.stats()["entries"] == 80 and local.outboxes() == {}
    local.close()


def test_a_forged_signature_and_an_unsigned_foreign_class_from_the_shared_tier_are_refused(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(trust.SECRET_ENV, "team secret")
    k = gen_key(cached(model(), tmp_path / "probe"), 0)
    value = Unsafe()
    value.state = "loading runs __setstate__"  # type: ignore[attr-defined]
    blob = codec.encode(value)
    for n, signature in enumerate((None, b"\0" * 32, trust.sign(b"another key" + b"\0" * 5, blob))):
        planted = RedisStore(url)
        # a claim of this very user's origin: on a server, a claim proves nothing
        planted.put_many([Entry(key=k, value=blob, model="m", method="generate_until", task="t", split="test",
                                doc_id=0, origin=trust.local_origin(), signature=signature)])  # fmt: skip
        planted.close()
        for where, shared in ((tmp_path / f"local{n}", url), (url, None)):
            Unsafe.loaded = 0
            m = model()
            lm = cached(m, where, shared=shared)
            assert texts(lm.generate_until([gen_request(0)])) == ["answer to q0"]  # recomputed
            lm.cache_close()
            assert Unsafe.loaded == 0 and m.calls == 1
            replant = RedisStore(url)
            replant.put_many([Entry(key=k, value=blob, model="m", method="generate_until", origin="x",
                                    signature=signature)])  # fmt: skip
            replant.close()
        local = stored(tmp_path / f"local{n}")[0]
        assert local.origin == trust.local_origin() and local.value != blob  # ours: the model's answer


# -- management on a redis:// location -------------------------------------------------------------


def test_every_management_command_works_on_a_redis_location(url: str, server: RedisServer,  # noqa: F811
                                                             request: pytest.FixtureRequest, tmp_path: Path) -> None:  # fmt: skip
    lm = cached(model(), url)
    lm.generate_until([gen_request(i) for i in range(4)])
    lm.generate_until([gen_request(0)])
    lm.cache_close()
    text = run_cli("stats", url)
    assert text.returncode == 0 and "server memory" in text.stdout and "on disk" not in text.stdout
    stats = cli_json("stats", url)
    assert stats["entries"] == 4 and stats["hits"] == 1 and stats["server_bytes"] > 0
    listed = cli_json("ls", url)["entries"]
    assert sorted(r["doc_id"] for r in listed) == [0, 1, 2, 3]
    assert cli_json("show", url, listed[0]["key"][:10])["response"]["text"].startswith("answer to")
    assert cli_json("explain", url, "--task", "t", "--doc-id", "1")[0]["doc_id"] == 1
    assert cli_json("verify", url)["damaged"] == []
    cli_json("export", url, tmp_path / "x.lmmscache", "--task", "t")
    other = server.url(prefix_of(request) + "-import")
    try:
        assert cli_json("import", other, tmp_path / "x.lmmscache")["added"] == 4
        assert cli_json("copy", url, tmp_path / "laptop")["added"] == 4  # warm a laptop from the team's
        assert cli_json("copy", tmp_path / "laptop", other)["conflicts"] == 4
        assert sorted(stored(tmp_path / "laptop")) == [0, 1, 2, 3]
        assert cli_json("rm", url, "--doc-id", "3")["removed"] == 1
        assert cli_json("prune", url, "--max-size", "1")["removed"] == 3
        assert cli_json("clear", other, "--yes")["removed"] == 4
        assert cli_json("stats", url)["entries"] == 0
    finally:
        wipe(server, prefix_of(request) + "-import")
    assert run_cli("stats", "redis://127.0.0.1:1/0").returncode == 1  # nothing listens: a failure, said at once


def test_push_sends_the_outbox_with_the_password_from_the_environment(
    own_server: Callable[..., RedisServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    srv = own_server("--requirepass", "team-pw")
    location = srv.url("team", password="team-pw") + "&breaker=30"
    srv.kill()
    lm = cached(model(), tmp_path / "local", shared=location)
    lm.generate_until([gen_request(i) for i in range(3)])
    lm.cache_close()  # the shared tier is away: queued
    srv.start()
    queue = SQLiteStore(str(tmp_path / "local"))
    ((target, waiting),) = queue.outboxes().items()
    queue.close()
    assert waiting == 3 and "team-pw" not in target
    assert run_cli("push", tmp_path / "local").returncode == 1  # no password: refused, said
    monkeypatch.setenv("LMMS_CACHE_REDIS_PASSWORD", "team-pw")
    out = cli_json("push", tmp_path / "local")
    assert out["outboxes"] == [{"shared": target, "pushed": 3, "missing": 0, "left": 0}]
    assert sorted(stored(location)) == [0, 1, 2]
    assert isinstance(lm._self_cache.tiers.shared.store, RedisStore)
    assert not isinstance(lm.cache_store, NullStore)


def _write_through_two_tiers(local: str, shared: str, first: int, count: int) -> None:
    m = model(400)
    lm = cached(m, local, shared=shared, batch_size=16)
    lm.generate_until([gen_request(i) for i in range(first, first + count)])
    lm.cache_close()


def test_four_writer_processes_through_two_tiers_lose_nothing(url: str, tmp_path: Path) -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    # Overlapping ranges: the same request answered by two processes is one entry.
    procs = [ctx.Process(target=_write_through_two_tiers, args=(str(tmp_path / f"node{n}"), url, n * 80, 120))
             for n in range(4)]  # fmt: skip
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    store = RedisStore(url)
    assert store.stats()["entries"] == 360
    assert sorted(e.doc_id for e in store.scan(values=False)) == list(range(360))
    store.close()
    assert all(len(stored(tmp_path / f"node{n}")) == 120 for n in range(4))
