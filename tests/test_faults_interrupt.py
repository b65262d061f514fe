"""Issue 11, fault 1: a Ctrl-C (or any exception) inside a write transaction must leave the
connection outside any transaction, and the lock free for every other process."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from lmms_cache import cached
from lmms_cache.store import Entry, SQLiteStore
from lmms_cache.store import sqlite as sqlite_backend


def entry(i: int) -> Entry:
    return Entry(key=i.to_bytes(16, "big"), value=b"value %d" % i, model="m", method="generate_until")


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no answer from the child within {timeout} s"
    return proc.stdout.readline()


_WAITER = textwrap.dedent(
    """
    import json, sys, traceback
    from lmms_cache.store import Entry, SQLiteStore

    def entry(i):
        return Entry(key=i.to_bytes(16, "big"), value=b"value %d" % i, model="m", method="generate_until")

    store = SQLiteStore(sys.argv[1], timeout=30)  # a short busy timeout: a private test knob
    out = {}
    print("waiting", flush=True)
    try:
        store.put_many([entry(1)])  # waits for the other process's lock
        out["interrupted"] = False
    except KeyboardInterrupt:
        out["interrupted"] = True
        out["where"] = [frame.name for frame in traceback.extract_tb(sys.exc_info()[2])]
    conn = store._conn_obj
    out["in_transaction"] = None if conn is None else conn.in_transaction
    print(json.dumps(out), flush=True)  # (the other writer still holds its lock)
    sys.stdin.readline()  # told when it has finished
    try:
        store.put_many([entry(2)])
        out["later_write"] = "ok"
    except Exception as exc:
        out["later_write"] = str(exc)
    print(json.dumps(out), flush=True)
    sys.stdin.readline()  # stays alive until told: its lock must not outlive the interrupt
    store.close()
    """
)


class Scripted:
    pretrained = "scripted/model"

    def generate_until(self, requests: list[Any]) -> list[str]:
        return [f"answer to {r[0]}" for r in requests]


@pytest.mark.slow
def test_ctrl_c_while_waiting_for_another_writers_lock_leaves_the_cache_usable(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    SQLiteStore(str(directory)).close()
    holder = sqlite3.connect(directory / "cache.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process writing: the waiter queues behind it
    waiter = subprocess.Popen([sys.executable, "-c", _WAITER, str(directory)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    try:
        assert read_line(waiter, 60).strip() == "waiting"
        # The user's Ctrl-C, while the child waits inside put_many for the lock held here: it
        # cannot get out but by the interrupt, so a signal that came too early (still printing)
        # would kill it, and one that came late is simply sent again, never a race.
        time.sleep(0.5)
        assert waiter.stdout is not None
        for _ in range(40):
            waiter.send_signal(signal.SIGINT)
            ready, _, _ = select.select([waiter.stdout], [], [], 0.5)
            if ready:
                break
        out = json.loads(read_line(waiter, 30))
        assert out["interrupted"] and "put_many" in out["where"], out
        assert out["in_transaction"] is not True
        holder.execute("ROLLBACK")  # the other writer finishes
        assert waiter.stdin is not None
        waiter.stdin.write("\n")
        waiter.stdin.flush()
        later = json.loads(read_line(waiter, 60))
        assert later["later_write"] == "ok"  # the interrupted process writes on
        # ... and, while it is still alive, every other process can write at once.
        other = SQLiteStore(str(directory), timeout=2)
        try:
            other.put_many([entry(3)])
        finally:
            other.close()
        started = time.monotonic()
        lm = cached(Scripted(), directory)
        assert lm.generate_until([("q", {})]) == ["answer to q"]
        assert lm.cache_stats.written == 1
        lm.cache_close()
        assert time.monotonic() - started < 5
    finally:
        holder.close()
        if waiter.poll() is None:
            assert waiter.stdin is not None
            waiter.stdin.write("\n")
            waiter.stdin.flush()
        waiter.wait(30)
        for stream in (waiter.stdin, waiter.stdout):
            if stream is not None:
                stream.close()


# -- an exception at every statement of a transaction ------------------------------------------


class Interrupting(sqlite3.Connection):
    """Raises KeyboardInterrupt right before, or right after, the n-th statement (counted from
    arming): what a signal arriving there does."""

    seen: list[str] = []  # noqa: RUF012  # reset by each test
    fail_at: int | None = None
    after: bool = False

    def _step(self, sql: str) -> None:
        cls = type(self)
        if cls.fail_at is not None and len(cls.seen) == cls.fail_at:
            cls.fail_at = None
            raise KeyboardInterrupt(sql)
        cls.seen.append(sql)

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:  # type: ignore[override]
        if not type(self).after:
            self._step(sql)
        cursor = super().execute(sql, *args)
        if type(self).after:
            self._step(sql)
        return cursor

    def executemany(self, sql: str, *args: Any) -> sqlite3.Cursor:  # type: ignore[override]
        if not type(self).after:
            self._step(sql)
        cursor = super().executemany(sql, *args)
        if type(self).after:
            self._step(sql)
        return cursor


@pytest.fixture
def interrupting(monkeypatch: pytest.MonkeyPatch) -> type[Interrupting]:
    real_connect = sqlite3.connect

    def connect(database: str, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        return real_connect(database, *args, factory=Interrupting, **kwargs)

    monkeypatch.setattr(sqlite_backend.sqlite3, "connect", connect)
    Interrupting.seen, Interrupting.fail_at = [], None
    return Interrupting


def lock_is_free(db: Path) -> bool:
    conn = sqlite3.connect(db, isolation_level=None, timeout=0)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()


@pytest.mark.parametrize("after", [False, True], ids=["before", "after"])
def test_an_interrupt_at_any_statement_of_a_write_leaves_no_transaction(
    tmp_path: Path, interrupting: type[Interrupting], after: bool
) -> None:
    store = SQLiteStore(str(tmp_path / "c"), timeout=1)
    try:
        store.put_many([entry(0)])
        interrupting.seen = []
        store.put_many([entry(1)], replace=False)
        statements = list(interrupting.seen)
        assert "BEGIN IMMEDIATE" in statements and statements[-1] == "COMMIT"
        for n in range(len(statements)):
            interrupting.seen, interrupting.fail_at, interrupting.after = [], n, after
            with pytest.raises(KeyboardInterrupt):
                store.put_many([entry(100 + n)], replace=False)
            conn = store._conn_obj
            assert conn is None or not conn.in_transaction, f"left in a transaction at {statements[n]!r}"
            assert lock_is_free(tmp_path / "c" / "cache.db"), f"lock kept after {statements[n]!r}"
            store.put_many([entry(200 + n)])  # and the store writes on
        assert store.get_many([entry(200 + n).key for n in range(len(statements))]).keys() == {
            entry(200 + n).key for n in range(len(statements))
        }
    finally:
        interrupting.fail_at = None
        store.close()


@pytest.mark.slow  # a new cache per statement: ~60 fsyncs
@pytest.mark.parametrize("after", [False, True], ids=["before", "after"])
def test_an_interrupt_while_creating_the_schema_leaves_the_file_unlocked(
    tmp_path: Path, interrupting: type[Interrupting], after: bool
) -> None:
    SQLiteStore(str(tmp_path / "probe")).close()
    statements = list(interrupting.seen)
    for n in range(statements.index("COMMIT") + 1):
        directory = tmp_path / f"c{n}"
        interrupting.seen, interrupting.fail_at, interrupting.after = [], n, after
        with contextlib.suppress(KeyboardInterrupt):
            SQLiteStore(str(directory), timeout=1).close()
        interrupting.fail_at = None
        assert lock_is_free(directory / "cache.db"), f"lock kept after {statements[n]!r}"
        store = SQLiteStore(str(directory), timeout=1)
        try:
            store.put_many([entry(1)])
        finally:
            store.close()
