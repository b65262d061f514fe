"""Issue 11, faults 3 and 4: a full disk and a read-only location still serve every hit.

A store opened for writing that cannot write falls back to reading by itself (``degraded``
says why), retries writing at most every ``_REOPEN_EVERY`` seconds, and the proxy keeps the
responses it could not write, writing the backlog in batches as space returns. One warning.

The real faults (a full tmpfs, a read-only bind mount) run in a forked child inside a private
mount namespace; the other-user case as ``nobody``.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from faults import (
    NOBODY,
    Echo,
    fill,
    in_child,
    mount,
    need_mounts,
    need_root,
    reqs,
    shared_tmp,
    warnings_during,
)
from lmms_cache import cached, proxy
from lmms_cache.store import Entry, NullStore, SQLiteStore, StoreError
from lmms_cache.store import sqlite as sqlite_backend


def proxy_of(model: Echo, directory: Path, **options: Any) -> Any:
    return cached(model, directory, model_id="echo", **options)


def fill_cache(directory: Path, n: int, size: int = 0) -> None:
    lm = proxy_of(Echo(size), directory, batch_size=8)
    lm.generate_until(reqs("old", n))
    assert lm.cache_stats.written == n
    lm.cache_close()


def stats(lm: Any) -> dict[str, int]:
    s = lm.cache_stats
    return {"hits": s.hits, "misses": s.misses, "written": s.written}


# -- a full disk --------------------------------------------------------------------------------


def full_disk_then_space(base: str) -> dict[str, Any]:
    sqlite_backend._REOPEN_EVERY = 0.5  # the bound on write retries, shortened (private knob)
    mnt = Path(base)
    mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", base)
    d = mnt / "c"
    fill_cache(d, 40)
    filler = fill(mnt)
    out: dict[str, Any] = {}
    with warnings_during() as warnings:
        model = Echo()
        lm = proxy_of(model, d, batch_size=8)
        answers = lm.generate_until(reqs("old", 40) + reqs("new", 10))
        out["correct"] = answers == [model.answer(p) for p, _ in reqs("old", 40) + reqs("new", 10)]
        out["full"] = stats(lm)
        out["degraded"] = lm.cache_store.degraded
        os.remove(filler)  # space returns
        lm.generate_until(reqs("newer", 1))
        out["at_once"] = stats(lm)  # within the bound: not retried yet
        time.sleep(0.6)
        lm.generate_until(reqs("newest", 1))
        out["later"] = stats(lm)
        out["degraded_later"] = lm.cache_store.degraded
        lm.cache_close()
        again = Echo()
        lm = proxy_of(again, d)
        lm.generate_until(reqs("old", 40) + reqs("new", 10) + reqs("newer", 1) + reqs("newest", 1))
        out["rerun_asked"] = again.asked
        lm.cache_close()
    out["warnings"] = warnings
    return out


@pytest.mark.slow
def test_a_full_disk_serves_every_hit_and_writing_resumes_when_space_returns() -> None:
    need_mounts()
    with tempfile.TemporaryDirectory() as base:
        out = in_child(full_disk_then_space, base, namespace=True)
    assert out["correct"]
    assert out["full"] == {"hits": 40, "misses": 10, "written": 0}
    assert "disk is full" in out["degraded"]
    assert out["at_once"]["written"] == 0
    assert out["later"]["written"] == 12 and out["degraded_later"] is None
    assert out["rerun_asked"] == []  # everything was written in the end
    assert len(out["warnings"]) == 1, out["warnings"]
    assert "disk is full" in out["warnings"][0] and "read-only" in out["warnings"][0]


def backlog_larger_than_the_freed_space(base: str) -> dict[str, Any]:
    sqlite_backend._REOPEN_EVERY = 0.2
    mnt = Path(base)
    mount("-t", "tmpfs", "-o", "size=2m", "tmpfs", base)
    d = mnt / "c"
    fill_cache(d, 5)
    filler = fill(mnt)
    out: dict[str, Any] = {}
    with warnings_during() as warnings:
        lm = proxy_of(Echo(size=3000), d, batch_size=8)
        lm.generate_until(reqs("big", 160))  # ~0.5 MB of responses that cannot be written
        out["full"] = stats(lm)
        os.truncate(filler, max(0, filler.stat().st_size - 256 * 1024))  # a part of it returns
        time.sleep(0.3)
        lm.generate_until(reqs("more", 1))
        out["part"] = stats(lm)
        out["pending_part"] = len(lm._self_cache.pending)
        os.remove(filler)  # all of it returns
        time.sleep(0.3)
        lm.generate_until(reqs("last", 1))
        out["all"] = stats(lm)
        out["pending_all"] = len(lm._self_cache.pending)
        lm.cache_close()
    out["warnings"] = warnings
    return out


@pytest.mark.slow
def test_a_backlog_larger_than_the_freed_space_drains_in_batches() -> None:
    need_mounts()
    with tempfile.TemporaryDirectory() as base:
        out = in_child(backlog_larger_than_the_freed_space, base, namespace=True)
    assert out["full"]["written"] == 0
    assert 0 < out["part"]["written"] < 161, out  # what fits is written, the rest kept
    assert out["pending_part"] == 161 - out["part"]["written"]
    assert out["all"]["written"] == 162 and out["pending_all"] == 0
    assert len(out["warnings"]) == 1, out["warnings"]


# -- a read-only location -----------------------------------------------------------------------


def read_only_mount(base: str) -> dict[str, Any]:
    d = Path(base) / "c"
    fill_cache(d, 10)
    mount("--bind", str(d), str(d))
    mount("-o", "remount,ro,bind", str(d))
    with warnings_during() as warnings:
        model = Echo()
        lm = proxy_of(model, d)  # the default mode: readwrite
        answers = lm.generate_until(reqs("old", 10) + reqs("new", 5))
        out = {"stats": stats(lm), "asked": model.asked, "uncached": isinstance(lm.cache_store, NullStore),
               "correct": answers == [model.answer(p) for p, _ in reqs("old", 10) + reqs("new", 5)]}  # fmt: skip
        lm.cache_close()
    out["warnings"] = warnings
    out["files"] = sorted(os.listdir(d))
    return out


@pytest.mark.slow
def test_a_read_only_mount_in_readwrite_mode_serves_hits_read_only() -> None:
    need_mounts()
    with tempfile.TemporaryDirectory() as base:
        out = in_child(read_only_mount, base, namespace=True)
    assert out["correct"] and not out["uncached"]
    assert out["stats"] == {"hits": 10, "misses": 5, "written": 0}
    assert out["asked"] == [f"new {i}" for i in range(5)]
    assert len(out["warnings"]) == 1 and "read-only" in out["warnings"][0], out["warnings"]
    assert out["files"] == ["cache.db"]


def unwritable_directory(directory: str) -> dict[str, Any]:
    with warnings_during() as warnings:
        model = Echo()
        lm = proxy_of(model, Path(directory))
        lm.generate_until(reqs("old", 10) + reqs("new", 5))
        out = {"stats": stats(lm), "asked": model.asked, "degraded": lm.cache_store.degraded}
        lm.cache_close()
    out["warnings"] = warnings
    return out


def test_a_directory_the_user_cannot_write_serves_hits_read_only() -> None:
    need_root()
    with shared_tmp() as base:
        d = base / "c"
        fill_cache(d, 10)
        for p in [d, *d.iterdir()]:
            os.chown(p, NOBODY, NOBODY)
        d.chmod(0o500)  # the user's own, but not writable: no -wal, no -shm can be made
        out = in_child(unwritable_directory, str(d), uid=NOBODY, gid=NOBODY)
    assert out["stats"] == {"hits": 10, "misses": 5, "written": 0}
    assert out["asked"] == [f"new {i}" for i in range(5)]
    assert "cannot write" in out["degraded"]
    assert len(out["warnings"]) == 1 and "read-only" in out["warnings"][0], out["warnings"]


# -- in process: the store's retry bound and the proxy's backlog -------------------------------


def entry(i: int) -> Entry:
    return Entry(key=i.to_bytes(16, "big"), value=b"value %d" % i, model="m", method="generate_until")


def test_a_store_that_cannot_write_reads_and_retries_writing_at_most_every_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SQLiteStore(str(tmp_path / "c"))
    store.put_many([entry(1)])
    store.close()
    real_connect = sqlite_backend.sqlite3.connect
    attempts: list[str] = []
    full = [True]

    def connect(database: str, *args: Any, **kwargs: Any) -> Any:
        if "immutable=1" not in database:
            attempts.append(database)
            if full[0]:  # what a disk without room for the 32 KB -shm answers
                raise sqlite_backend.sqlite3.OperationalError("disk I/O error")
        return real_connect(database, *args, **kwargs)

    clock = [1000.0]
    monkeypatch.setattr(sqlite_backend.sqlite3, "connect", connect)
    monkeypatch.setattr(sqlite_backend.time, "monotonic", lambda: clock[0])
    store = SQLiteStore(str(tmp_path / "c"))
    try:
        assert store.degraded is not None and not store.readonly
        assert store.get_many([entry(1).key]).keys() == {entry(1).key}
        tried = len(attempts)
        for _ in range(20):  # many writes within the interval: no reopening attempt
            with pytest.raises(StoreError, match="cannot be written"):
                store.put_many([entry(2)])
        assert len(attempts) == tried
        clock[0] += sqlite_backend._REOPEN_EVERY
        with pytest.raises(StoreError):
            store.put_many([entry(2)])
        assert len(attempts) == tried + 1  # one attempt per interval
        full[0] = False
        clock[0] += sqlite_backend._REOPEN_EVERY
        store.put_many([entry(2)])
        assert store.degraded is None
        assert store.get_many([entry(1).key, entry(2).key]).keys() == {entry(1).key, entry(2).key}
    finally:
        store.close()


class Refusing:
    """A store double: put_many fails once more than ``room`` entries were written."""

    def __init__(self, real: Any, room: int) -> None:
        self.real, self.room, self.batches = real.put_many, room, []  # the method, before patching

    def put_many(self, entries: list[Entry], **kwargs: Any) -> int:
        if len(entries) > self.room:
            raise StoreError("database or disk is full")
        self.room -= len(entries)
        self.batches.append(len(entries))
        return int(self.real(entries, **kwargs))


def test_the_backlog_is_written_in_bounded_batches_keeping_what_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lm = proxy_of(Echo(), tmp_path, batch_size=4)
    real = lm.cache_store
    double = Refusing(real, room=0)
    monkeypatch.setattr(real, "put_many", double.put_many)
    with warnings_during() as warnings:
        lm.generate_until(reqs("a", 30))
        assert lm.cache_stats.written == 0 and len(lm._self_cache.pending) == 30
        double.room = 10  # some space returns
        lm.generate_until(reqs("b", 1))
        assert lm.cache_stats.written == 8 and len(lm._self_cache.pending) == 23
        assert double.batches == [4, 4]  # never more than batch_size in one transaction
        double.room = 10**9
        lm.generate_until(reqs("c", 1))
    assert lm.cache_stats.written == 32 and lm._self_cache.pending == []
    assert len(warnings) == 1
    lm.cache_close()


def test_a_backlog_past_the_cap_drops_the_oldest_with_one_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy, "_MAX_PENDING", 10)
    lm = proxy_of(Echo(), tmp_path, batch_size=4)
    double = Refusing(lm.cache_store, room=0)
    monkeypatch.setattr(lm.cache_store, "put_many", double.put_many)
    with warnings_during() as warnings:
        for i in range(5):
            lm.generate_until(reqs(f"call{i}", 4))
    pending = lm._self_cache.pending
    assert len(pending) == 10
    assert {e.key for e in pending} == {e.key for e in pending[-10:]}
    assert len(warnings) == 2 and "dropped" in warnings[1], warnings  # the write failure, then the loss
    double.room = 10**9
    lm.cache_close()
    rerun = Echo()
    proxy_of(rerun, tmp_path).generate_until(reqs("call4", 4) + reqs("call3", 4) + reqs("call0", 4))
    assert rerun.asked == [f"call0 {i}" for i in range(4)]  # the oldest were dropped, the newest kept


def test_an_interrupt_while_saving_loses_no_response(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lm = proxy_of(Echo(), tmp_path, batch_size=4)
    real = lm.cache_store.put_many

    def interrupted(entries: list[Entry], **kwargs: Any) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(lm.cache_store, "put_many", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lm.generate_until(reqs("a", 4))
    monkeypatch.setattr(lm.cache_store, "put_many", real)
    lm.generate_until(reqs("b", 1))
    assert lm.cache_stats.written == 5
    lm.cache_close()
