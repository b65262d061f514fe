"""The store contract (run against every backend) and the SQLite backend's guarantees."""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.synchronize
import os
import pickle
import shlex
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from lmms_cache.store import (
    Entry,
    NullStore,
    SQLiteStore,
    Store,
    Stored,
    StoreError,
    Where,
    default_location,
    open_store,
)
from lmms_cache.store import sqlite as sqlite_backend
from lmms_cache.store.sqlite import APPLICATION_ID, SCHEMA_VERSION, network_filesystem

# Every backend runs the contract suite below. To add one, add a line: name -> opener of a
# store at a location derived from the test's tmp_path (the same location on every call).
BACKENDS: dict[str, Callable[[Path], Store]] = {
    "sqlite": lambda tmp: SQLiteStore(str(tmp / "cache")),
}


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def values(found: Mapping[bytes, Stored]) -> dict[bytes, bytes]:
    """The values of a lookup's answer."""
    return {k: s.value for k, s in found.items()}


def entry(i: int, value: bytes | None = None, **fields: object) -> Entry:
    base: dict[str, object] = dict(
        key=key(i), value=value if value is not None else f"value {i}".encode(), model="m1",
        method="generate_until", task="t", split="test", doc_id=str(i),
    )  # fmt: skip
    base.update(fields)
    return Entry(**base)  # type: ignore[arg-type]


@pytest.fixture(params=sorted(BACKENDS))
def open_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Store]]:
    """Opens (and finally closes) stores of the parametrized backend at one location."""
    opened: list[Store] = []

    def opener() -> Store:
        store = BACKENDS[request.param](tmp_path)
        opened.append(store)
        return store

    yield opener
    for store in opened:
        store.close()


@pytest.fixture
def store(open_backend: Callable[[], Store]) -> Store:
    return open_backend()


# -- the contract ---------------------------------------------------------------------------


def test_get_many_of_absent_keys_is_empty(store: Store) -> None:
    assert store.get_many([key(1), key(2)]) == {}
    assert store.get_many([]) == {}


def test_many_keys_round_trip_across_lookup_chunks(store: Store) -> None:
    entries = [entry(i) for i in range(2000)]  # more than twice the 900-key chunk
    store.put_many(entries)
    wanted = [key(i) for i in range(-50, 2050) if i >= 0] + [key(10**6 + i) for i in range(50)]
    assert values(store.get_many(wanted)) == {e.key: e.value for e in entries}


def test_put_many_of_nothing_is_a_no_op(store: Store) -> None:
    store.put_many([])
    assert store.stats()["entries"] == 0


def test_put_overwrites_an_existing_key(store: Store) -> None:
    store.put_many([entry(1, b"old", model="m1")])
    store.put_many([entry(1, b"newer value", model="m2", model_seconds=2.5)])
    assert values(store.get_many([key(1)])) == {key(1): b"newer value"}
    (stored,) = list(store.scan())
    assert (stored.model, stored.model_seconds) == ("m2", 2.5)
    assert store.stats()["entries"] == 1
    assert store.stats()["bytes"] == len(b"newer value")


def test_same_key_twice_in_one_batch_keeps_the_last(store: Store) -> None:
    store.put_many([entry(1, b"first"), entry(1, b"second")])
    assert values(store.get_many([key(1)])) == {key(1): b"second"}
    assert store.stats()["entries"] == 1


def test_delete_returns_how_many_were_there(store: Store) -> None:
    store.put_many([entry(i) for i in range(1500)])
    assert store.delete([key(i) for i in range(1000)] + [key(99_999)]) == 1000
    assert store.delete([key(0)]) == 0
    assert values(store.get_many([key(0), key(999), key(1000)])) == {key(1000): entry(1000).value}
    assert store.stats()["entries"] == 500


def test_delete_where_removes_exactly_the_matching_entries(store: Store) -> None:
    store.put_many([entry(i, model=f"m{i % 2}", task=f"t{i % 3}") for i in range(60)]
                   + [entry(100, model="m0", method="loglikelihood", task="t0")])  # fmt: skip
    assert store.delete_where(Where(models=("m0",), task="t0", method="generate_until")) == 10
    assert store.delete_where(Where(models=("m0",), task="t0")) == 1  # the loglikelihood entry
    assert store.delete_where(Where(models=("m1", "m9"))) == 30
    assert store.delete_where(Where(models=())) == 0
    left = list(store.scan())
    assert len(left) == 20 and all(e.model == "m0" and e.task != "t0" for e in left)
    assert store.delete_where(Where(doc_id="4")) == 1
    assert store.delete_where(Where(created_before=0.5)) == 0
    assert store.stats()["entries"] == 19


def test_scan_yields_every_entry_with_its_metadata(store: Store) -> None:
    entries = [entry(i, task=f"task{i % 3}", doc_id=str(i) if i % 2 else i, created_at=1000.0 + i,
                     model_seconds=i / 10, used_at=1000.0 + i, raw_size=i, components='{"context": "ab"}',
                     key_schema=f"lmms-cache/key/{1 + i % 2}", deps=b"deps %d" % i if i % 3 else None,
                     origin=f"uid:{i}@machine", signature=os.urandom(32))
               for i in range(600)]  # fmt: skip
    entries.append(entry(10_000, method="loglikelihood", task=None, split=None, doc_id=None, created_at=5.0,
                         used_at=5.0, key_schema="lmms-cache/key/2"))  # fmt: skip
    store.put_many(entries)
    assert sorted(store.scan(), key=lambda e: e.key) == sorted(entries, key=lambda e: e.key)


def test_scan_of_an_empty_store_is_empty(store: Store) -> None:
    assert list(store.scan()) == []


def test_creation_time_is_filled_in_when_missing(store: Store) -> None:
    store.put_many([entry(1, created_at=0.0)])
    (stored,) = list(store.scan())
    assert stored.created_at > 1_600_000_000  # a real wall-clock time


def test_stats_count_entries_and_value_bytes(store: Store) -> None:
    store.put_many([entry(1, b"x" * 10), entry(2, b"y" * 32)])
    stats = store.stats()
    assert (stats["entries"], stats["bytes"]) == (2, 42)
    store.delete([key(1)])
    stats = store.stats()
    assert (stats["entries"], stats["bytes"]) == (1, 32)


def test_file_digest_is_found_only_with_an_equal_signature(store: Store) -> None:
    assert store.file_digest("/data/a.png", (1, 2, 3)) is None
    store.remember_files([("/data/a.png", (1, 2, 3), b"d" * 16), ("/data/b.png", (4, 5, 6), b"e" * 16)])
    assert store.file_digest("/data/a.png", (1, 2, 3)) == b"d" * 16
    assert store.file_digest("/data/a.png", (1, 2, 4)) is None  # the file changed
    assert store.file_digest("/data/a.png", (1, 23)) is None  # no confusion of "1:2:3" layouts
    assert store.file_digest("/data/c.png", (1, 2, 3)) is None
    store.remember_files([("/data/a.png", (1, 2, 4), b"f" * 16)])
    assert store.file_digest("/data/a.png", (1, 2, 4)) == b"f" * 16
    assert store.file_digest("/data/a.png", (1, 2, 3)) is None
    store.remember_files([])


def test_remember_model_is_idempotent(store: Store) -> None:
    store.put_many([entry(1)])
    store.remember_model("abc123", '{"class": "Fake"}')
    store.remember_model("abc123", '{"class": "Fake"}')
    store.remember_model("abc123", '{"class": "Other"}')
    assert values(store.get_many([key(1)])) == {key(1): entry(1).value}
    assert store.stats()["entries"] == 1


def test_entries_survive_close_and_reopen(open_backend: Callable[[], Store]) -> None:
    first = open_backend()
    first.put_many([entry(1)])
    first.close()
    assert values(first.get_many([key(1)])) == {key(1): entry(1).value}  # reopens on next use
    first.close()
    assert values(open_backend().get_many([key(1)])) == {key(1): entry(1).value}


def test_a_store_is_usable_from_several_threads(store: Store) -> None:
    errors: list[BaseException] = []

    def write(offset: int) -> None:
        try:
            for i in range(offset, offset + 50):
                store.put_many([entry(i)])
                assert values(store.get_many([key(i)])) == {key(i): entry(i).value}
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n * 1000,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.stats()["entries"] == 200


def test_null_store_never_hits_and_keeps_nothing() -> None:
    store = NullStore("/nowhere", "mode off")
    store.put_many([entry(1)])
    store.remember_model("abc", "{}")
    assert store.get_many([key(1)]) == {}
    assert store.entries([key(1)]) == [] and store.get(key(1)) is None
    assert store.delete([key(1)]) == 0
    assert list(store.scan()) == []
    assert store.stats() == {"entries": 0, "bytes": 0}
    store.close()


# -- SQLite: settings and file permissions --------------------------------------------------


def raw(path: Path) -> sqlite3.Connection:
    """A read-only connection of our own, to inspect a database file."""
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def pragma(conn: sqlite3.Connection, name: str) -> object:
    return conn.execute(f"PRAGMA {name}").fetchone()[0]


def test_sqlite_uses_wal_and_full_synchronous_by_default(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "c"))
    try:
        assert pragma(store._conn(), "journal_mode") == "wal"
        assert pragma(store._conn(), "synchronous") == 2  # FULL
    finally:
        store.close()
    with raw(tmp_path / "c" / "cache.db") as conn:  # WAL is a property of the file
        assert pragma(conn, "journal_mode") == "wal"


def test_sqlite_not_durable_uses_normal_synchronous(tmp_path: Path) -> None:
    store = open_store(tmp_path / "c", durable=False)
    try:
        assert pragma(store._conn(), "synchronous") == 1  # type: ignore[attr-defined]  # NORMAL
    finally:
        store.close()


def test_sqlite_files_are_private_to_the_user(tmp_path: Path) -> None:
    directory = tmp_path / "deep" / "c"
    store = SQLiteStore(str(directory))
    try:
        store.put_many([entry(1)])
        assert os.stat(directory).st_mode & 0o777 == 0o700
        assert os.stat(directory / "cache.db").st_mode & 0o777 == 0o600
        assert os.stat(directory / "cache.db-wal").st_mode & 0o777 == 0o600
    finally:
        store.close()


def test_sqlite_marks_the_file_as_ours(tmp_path: Path) -> None:
    SQLiteStore(str(tmp_path / "c")).close()
    with raw(tmp_path / "c" / "cache.db") as conn:
        assert pragma(conn, "application_id") == APPLICATION_ID
        assert pragma(conn, "user_version") == SCHEMA_VERSION


def test_sqlite_location_that_cannot_be_created_is_store_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("a regular file")
    with pytest.raises(StoreError, match="cannot create"):
        SQLiteStore(str(tmp_path / "file" / "c"))


# -- SQLite: opening a current cache writes nothing ------------------------------------------


def files(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of a cache directory: its bytes and modification time."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


@pytest.fixture
def current(tmp_path: Path) -> Path:
    """A cache directory of the current schema holding entries, its writer closed."""
    store = SQLiteStore(str(tmp_path / "c"))
    store.put_many([entry(i) for i in range(50)])
    store.remember_model("m1", "{}")
    store.close()
    return tmp_path / "c"


@pytest.mark.parametrize("durable", [True, False])
def test_sqlite_opening_a_current_cache_and_reading_writes_nothing(current: Path, durable: bool) -> None:
    before = files(current)
    assert list(before) == ["cache.db"]  # the last connection to close removed -wal and -shm
    store = SQLiteStore(str(current), durable=durable)
    try:
        assert len(store.get_many([key(i) for i in range(50)])) == 50
        assert store.stats()["entries"] == 50
        assert len(list(store.scan(Where(doc_id="7")))) == 1
    finally:
        store.close()
    # While open, SQLite kept an empty -wal and a -shm (the WAL index); closing removed both.
    assert files(current) == before  # same bytes, same mtime


def test_sqlite_opening_a_current_cache_leaves_a_live_writers_wal_alone(current: Path) -> None:
    writer = SQLiteStore(str(current))
    try:
        writer.put_many([entry(100)])  # committed, in the WAL: the writer is still open
        db, wal = current / "cache.db", current / "cache.db-wal"
        before = (db.read_bytes(), db.stat().st_mtime_ns, wal.read_bytes())
        assert len(before[2]) > 0
        reader = SQLiteStore(str(current))
        try:
            assert values(reader.get_many([key(100)])) == {key(100): entry(100).value}
        finally:
            reader.close()
        assert (db.read_bytes(), db.stat().st_mtime_ns, wal.read_bytes()) == before
        writer.put_many([entry(101)])
    finally:
        writer.close()


def test_sqlite_opening_a_current_cache_does_not_wait_for_a_writer(current: Path) -> None:
    """A rank opening the cache while another holds the write lock reads at once (WAL)."""
    holder = sqlite3.connect(current / "cache.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        holder.execute("UPDATE entries SET hits = hits + 1")
        store = SQLiteStore(str(current), timeout=0.2)  # any write at open would fail: locked
        try:
            assert len(store.get_many([key(i) for i in range(50)])) == 50
        finally:
            store.close()
        holder.execute("ROLLBACK")
    finally:
        holder.close()


# -- SQLite: files that are not (or no longer) our cache -------------------------------------


def make_foreign_database(path: Path, application_id: int = 0) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")
        conn.execute("INSERT INTO notes VALUES ('precious')")
        conn.execute(f"PRAGMA application_id = {application_id}")
    conn.close()
    return path.read_bytes()


@pytest.mark.parametrize("application_id", [0, 0x1234])
@pytest.mark.parametrize("readonly", [False, True])
def test_sqlite_refuses_another_programs_database_and_leaves_it_alone(
    tmp_path: Path, application_id: int, readonly: bool
) -> None:
    db = tmp_path / "c" / "cache.db"
    before = make_foreign_database(db, application_id)
    with pytest.raises(StoreError, match="another program"):
        SQLiteStore(str(tmp_path / "c"), readonly=readonly)
    assert db.read_bytes() == before
    assert sorted(p.name for p in db.parent.iterdir() if "corrupt" in p.name) == []


def test_sqlite_sets_a_damaged_file_aside_and_starts_fresh(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "c"
    directory.mkdir()
    garbage = b"this is not a database " * 200
    (directory / "cache.db").write_bytes(garbage)
    with caplog.at_level(logging.WARNING, logger="lmms_cache"):
        store = SQLiteStore(str(directory))
    try:
        aside = [p for p in directory.iterdir() if p.name.startswith("cache.db.corrupt-")]
        assert len(aside) == 1
        assert aside[0].read_bytes() == garbage
        assert any("damaged" in r.getMessage() and aside[0].name in r.getMessage() for r in caplog.records)
        store.put_many([entry(1)])
        assert values(store.get_many([key(1)])) == {key(1): entry(1).value}
    finally:
        store.close()


def test_sqlite_second_damage_does_not_overwrite_the_first_copy(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    directory.mkdir()
    for n in range(2):  # twice within the same second, most likely
        (directory / "cache.db").write_bytes(b"garbage %d " % n * 100)
        SQLiteStore(str(directory)).close()
    kept = sorted(p.read_bytes() for p in directory.iterdir() if p.name.startswith("cache.db.corrupt-")
                  and not p.name.endswith(("-wal", "-shm")))  # fmt: skip
    assert kept == [b"garbage 0 " * 100, b"garbage 1 " * 100]


def test_sqlite_readonly_does_not_set_a_damaged_file_aside(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    directory.mkdir()
    (directory / "cache.db").write_bytes(b"garbage " * 100)
    with pytest.raises(StoreError):
        SQLiteStore(str(directory), readonly=True)
    assert [p.name for p in directory.iterdir()] == ["cache.db"]
    assert (directory / "cache.db").read_bytes() == b"garbage " * 100


@pytest.mark.parametrize("readonly", [False, True])
def test_sqlite_refuses_a_cache_of_a_newer_schema(tmp_path: Path, readonly: bool) -> None:
    SQLiteStore(str(tmp_path / "c")).close()
    with sqlite3.connect(tmp_path / "c" / "cache.db") as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        SQLiteStore(str(tmp_path / "c"), readonly=readonly)


# -- SQLite: read-only mode -----------------------------------------------------------------


def test_sqlite_readonly_of_a_missing_cache_is_store_error_and_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no cache"):
        SQLiteStore(str(tmp_path / "c"), readonly=True)
    assert not (tmp_path / "c").exists()


@pytest.fixture
def written(tmp_path: Path) -> Path:
    """A cache directory holding entry 1, its writer closed."""
    store = SQLiteStore(str(tmp_path / "c"))
    store.put_many([entry(1)])
    store.remember_files([("/a", (1,), b"d" * 16)])
    store.close()
    return tmp_path / "c"


def test_sqlite_readonly_reads_and_never_writes(written: Path) -> None:
    before = (written / "cache.db").read_bytes()
    store = open_store(written, readonly=True)
    try:
        assert store.readonly
        assert values(store.get_many([key(1)])) == {key(1): entry(1).value}
        assert store.file_digest("/a", (1,)) == b"d" * 16
        with pytest.raises(StoreError, match="read-only"):
            store.put_many([entry(2)])
        with pytest.raises(StoreError, match="read-only"):
            store.delete([key(1)])
        store.remember_files([("/b", (2,), b"e" * 16)])  # silently not kept
        store.remember_model("abc", "{}")
        assert store.stats()["entries"] == 1
    finally:
        store.close()
    assert (written / "cache.db").read_bytes() == before
    with raw(written / "cache.db") as conn:
        assert conn.execute("SELECT count(*) FROM models").fetchone()[0] == 0


def test_sqlite_readonly_sees_a_live_writers_later_commits(written: Path) -> None:
    writer = SQLiteStore(str(written))
    reader = SQLiteStore(str(written), readonly=True)
    try:
        assert reader.get_many([key(2)]) == {}
        writer.put_many([entry(2)])
        assert values(reader.get_many([key(2)])) == {key(2): entry(2).value}
    finally:
        reader.close()
        writer.close()


def test_sqlite_readonly_falls_back_to_immutable_when_the_wal_index_cannot_be_made(
    written: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_connect = sqlite3.connect
    uris: list[str] = []

    def connect(database: str, *args: object, **kwargs: object) -> sqlite3.Connection:
        uris.append(database)
        if "mode=ro" in database:  # what read-only media answer: no -shm can be created
            raise sqlite3.OperationalError("unable to open database file")
        return real_connect(database, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(sqlite_backend.sqlite3, "connect", connect)
    store = SQLiteStore(str(written), readonly=True)
    try:
        assert values(store.get_many([key(1)])) == {key(1): entry(1).value}
    finally:
        store.close()
    assert "immutable=1" in uris[-1]
    assert sorted(p.name for p in written.iterdir()) == ["cache.db"]  # no -wal, no -shm


def test_sqlite_readonly_does_not_read_around_a_locked_database(written: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_connect = sqlite3.connect

    def connect(database: str, *args: object, **kwargs: object) -> sqlite3.Connection:
        if "mode=ro" in database:  # a writer holds the lock: immutable could read torn pages
            raise sqlite3.OperationalError("database is locked")
        return real_connect(database, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(sqlite_backend.sqlite3, "connect", connect)
    with pytest.raises(StoreError, match="locked"):
        SQLiteStore(str(written), readonly=True)


_READ_ON_READONLY_MEDIA = """
import os, sys
from lmms_cache.store import open_store
directory = sys.argv[1]
try:
    open(os.path.join(directory, "probe"), "w")
except OSError:
    pass
else:
    sys.exit("the bind mount is writable")
store = open_store(directory, readonly=True)
value = store.get_many([(1).to_bytes(16, "big")])[(1).to_bytes(16, "big")].value
store.close()
print(value.decode())
"""


def test_sqlite_readonly_works_on_read_only_media(written: Path) -> None:
    """A read-only bind mount in a private mount namespace (needs unshare and mount rights)."""
    if sys.platform != "linux" or shutil.which("unshare") is None:
        pytest.skip("needs Linux unshare")
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("no permission to create a mount namespace")
    script = (
        f"mount --bind {written} {written} && mount -o remount,bind,ro {written} && "
        f"{sys.executable} -c {shlex.quote(_READ_ON_READONLY_MEDIA)} {written}"
    )
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    if "mount:" in done.stderr:
        pytest.skip(f"cannot bind-mount read-only: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "value 1"
    assert sorted(p.name for p in written.iterdir()) == ["cache.db"]


# -- SQLite: failures while running ---------------------------------------------------------


def test_sqlite_full_disk_is_store_error_and_reads_still_work(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "c"))
    try:
        store.put_many([entry(1)])
        conn = store._conn()
        pages = pragma(conn, "page_count")
        conn.execute(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(StoreError, match="full"):
            store.put_many([entry(i, os.urandom(4000)) for i in range(2, 30)])
        assert values(store.get_many([key(1), key(2)])) == {key(1): entry(1).value}  # all or nothing
        assert store.stats()["entries"] == 1
        conn.execute("PRAGMA max_page_count = 1073741823")  # space freed
        store.put_many([entry(2)])
        assert values(store.get_many([key(2)])) == {key(2): entry(2).value}
    finally:
        store.close()


def _child_uses_inherited_store(store: SQLiteStore, results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    try:
        inherited = store._conn_obj
        seen = store.get_many([key(1)])
        store.put_many([entry(2)])
        own_connection = store._conn_obj is not None and store._conn_obj is not inherited
        store.close()
        results.put((seen, own_connection))
    except BaseException as exc:
        results.put(repr(exc))


def test_sqlite_forked_child_uses_its_own_connection_and_parent_keeps_working(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "c"))
    try:
        store.put_many([entry(1)])
        ctx = multiprocessing.get_context("fork")
        results = ctx.Queue()
        child = ctx.Process(target=_child_uses_inherited_store, args=(store, results))
        child.start()
        outcome = results.get(timeout=60)
        child.join(60)
        assert outcome == ({key(1): Stored(entry(1).value, None, None, None)}, True)
        assert child.exitcode == 0
        assert values(store.get_many([key(2)])) == {key(2): entry(2).value}
        store.put_many([entry(3)])
        assert store.stats()["entries"] == 3
    finally:
        store.close()


def _writer(directory: str, start: multiprocessing.synchronize.Barrier, tag: int,
            results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]  # fmt: skip
    try:
        start.wait(30)
        store = open_store(directory)  # the ranks of a node create the cache together
        for batch in range(50):
            store.put_many([entry(tag * 100_000 + batch * 10 + i) for i in range(10)])
        store.close()
        results.put(None)
    except BaseException as exc:
        results.put(repr(exc))


def _opener(directory: str, start: multiprocessing.synchronize.Barrier,
            results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]  # fmt: skip
    try:
        start.wait(30)
        open_store(directory).close()
        results.put(None)
    except BaseException as exc:
        results.put(repr(exc))


def test_sqlite_processes_creating_the_cache_together_all_succeed(tmp_path: Path) -> None:
    """The ranks of one node start at once and race to create the file and its schema."""
    ctx = multiprocessing.get_context("fork")
    for attempt in range(6):
        directory = str(tmp_path / f"c{attempt}")
        start, results = ctx.Barrier(4), ctx.Queue()
        openers = [ctx.Process(target=_opener, args=(directory, start, results)) for _ in range(4)]
        for p in openers:
            p.start()
        outcomes = [results.get(timeout=120) for _ in openers]
        for p in openers:
            p.join(60)
        assert outcomes == [None] * 4


def test_sqlite_two_processes_writing_at_once_lose_nothing(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    start, results = ctx.Barrier(2), ctx.Queue()
    writers = [ctx.Process(target=_writer, args=(str(tmp_path / "c"), start, tag, results)) for tag in (1, 2)]
    for w in writers:
        w.start()
    outcomes = [results.get(timeout=120) for _ in writers]
    for w in writers:
        w.join(60)
    assert outcomes == [None, None]
    store = open_store(tmp_path / "c", readonly=True)
    try:
        expected = [key(tag * 100_000 + n) for tag in (1, 2) for n in range(500)]
        assert len(store.get_many(expected)) == 1000
        assert store.stats()["entries"] == 1000
    finally:
        store.close()


def test_sqlite_store_survives_pickling(tmp_path: Path) -> None:
    """Spawned workers receive the store pickled: it reopens the same file."""
    store = SQLiteStore(str(tmp_path / "c"), durable=False)
    try:
        store.put_many([entry(1)])
        copy = pickle.loads(pickle.dumps(store))
        try:
            assert copy.path == store.path
            assert values(copy.get_many([key(1)])) == {key(1): entry(1).value}
            assert pragma(copy._conn(), "synchronous") == 1
        finally:
            copy.close()
    finally:
        store.close()


# -- network file systems and the default location ------------------------------------------


def test_network_filesystem_is_none_for_local_tmp(tmp_path: Path) -> None:
    assert network_filesystem(str(tmp_path)) is None


def test_network_filesystem_reads_the_mount_table(tmp_path: Path) -> None:
    base = os.path.realpath(tmp_path)
    mounts = textwrap.dedent(f"""\
        /dev/vda / ext4 rw,relatime 0 0
        server:/export {base}/shared nfs4 rw,relatime 0 0
        /dev/vdb {base}/shared/scratch ext4 rw 0 0
        //nas/x {base}/my\\040files cifs rw 0 0
        """)
    assert network_filesystem(f"{base}/shared", mounts) == "nfs4"
    assert network_filesystem(f"{base}/shared/cache/deeper", mounts) == "nfs4"
    assert network_filesystem(f"{base}/shared/scratch/cache", mounts) is None  # a local mount inside
    assert network_filesystem(f"{base}/sharedness", mounts) is None  # a prefix is not a parent
    assert network_filesystem(f"{base}/my files/cache", mounts) == "cifs"
    assert network_filesystem(f"{base}/elsewhere", mounts) is None


def test_sqlite_on_a_network_filesystem_uses_a_rollback_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sqlite_backend, "network_filesystem", lambda path: "nfs")
    with caplog.at_level(logging.WARNING, logger="lmms_cache"):
        store = SQLiteStore(str(tmp_path / "c"))
    try:
        assert pragma(store._conn(), "journal_mode") == "delete"
        assert any("network file system (nfs)" in r.getMessage() for r in caplog.records)
        store.put_many([entry(1)])
        assert values(store.get_many([key(1)])) == {key(1): entry(1).value}
    finally:
        store.close()


def test_open_store_without_a_location_uses_lmms_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMMS_CACHE_DIR", str(tmp_path / "from-env"))
    assert default_location() == str(tmp_path / "from-env")
    store = open_store(None)
    try:
        assert store.location == str(tmp_path / "from-env" / "cache.db")
        store.put_many([entry(1)])
    finally:
        store.close()
    assert (tmp_path / "from-env" / "cache.db").is_file()


def test_default_location_is_the_user_cache_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LMMS_CACHE_DIR", raising=False)
    assert os.path.basename(default_location()) == "lmms-cache"


# -- management: bookkeeping, eviction, expiry, summaries -------------------------------------


def test_a_new_entry_is_last_used_when_created(store: Store) -> None:
    store.put_many([entry(1, created_at=1234.5)])
    got = store.get(key(1))
    assert got is not None and got.used_at == 1234.5 and got.hits == 0
    assert store.get(key(2)) is None


def test_touch_counts_hits_and_moves_entries_up_the_lru_order(store: Store) -> None:
    store.put_many([entry(i, created_at=100.0 + i) for i in range(5)])
    store.touch({key(0): 3, key(2): 1, key(99): 1}, when=500.0)
    got = {e.key: e for e in store.scan()}
    assert (got[key(0)].hits, got[key(0)].used_at) == (3, 500.0)
    assert (got[key(1)].hits, got[key(1)].used_at) == (0, 101.0)
    store.touch({key(0): 1}, when=400.0)  # an older flush never moves an entry back
    assert store.get(key(0)).used_at == 500.0  # type: ignore[union-attr]
    recent = [e.key for e in store.scan(recent_first=True, values=False)]
    assert recent == [key(2), key(0), key(4), key(3), key(1)]


def test_scan_filters_limits_and_can_leave_values_out(store: Store) -> None:
    store.put_many([entry(i, task=f"t{i % 2}", value=b"v" * 50) for i in range(700)])
    only = list(store.scan(Where(task="t1"), values=False, limit=300))
    assert len(only) == 300 and all(e.task == "t1" and e.value == b"" for e in only)
    assert len({e.key for e in store.scan(recent_first=True, limit=650)}) == 650


def test_evict_removes_least_recently_used_until_under_the_limit(store: Store) -> None:
    store.put_many([entry(i, value=b"x" * 100, created_at=1000.0 + i) for i in range(30)])
    store.touch({key(0): 1, key(1): 1}, when=5000.0)  # the two oldest were used last
    removed, freed = store.evict(max_bytes=1000)
    assert (removed, freed) == (20, 2000)
    left = {e.key for e in store.scan()}
    assert left == {key(0), key(1)} | {key(i) for i in range(22, 30)}
    assert store.stats()["bytes"] == 1000
    assert store.evict(max_bytes=1000) == (0, 0)


def test_get_many_can_ignore_entries_older_than_a_time(store: Store) -> None:
    store.put_many([entry(1, created_at=100.0), entry(2, created_at=300.0)])
    assert set(values(store.get_many([key(1), key(2)], created_after=200.0))) == {key(2)}


def test_put_without_replace_keeps_existing_values_and_counts_new_ones(store: Store) -> None:
    store.put_many([entry(1, b"kept")])
    assert store.put_many([entry(1, b"other"), entry(2, b"new")], replace=False) == 1
    assert values(store.get_many([key(1), key(2)])) == {key(1): b"kept", key(2): b"new"}


def test_totals_follow_inserts_overwrites_and_deletes(store: Store) -> None:
    store.put_many([entry(i, b"a" * 10, raw_size=40) for i in range(10)])
    store.put_many([entry(0, b"b" * 30, raw_size=90)])
    store.delete([key(1)])
    stats = store.stats()
    assert (stats["entries"], stats["bytes"], stats["raw_bytes"]) == (9, 8 * 10 + 30, 8 * 40 + 90)


def test_summary_groups_by_model_and_task_with_the_time_hits_saved(store: Store) -> None:
    store.put_many([entry(i, b"v" * 10, model=f"m{i % 2}", task="t", model_seconds=2.0) for i in range(4)])
    store.touch({key(0): 5, key(1): 1}, when=10.0)
    summary = store.summary()
    by_model = {row["model"]: row for row in summary["by_model"]}
    assert by_model["m0"]["entries"] == 2 and by_model["m0"]["hits"] == 5
    assert by_model["m0"]["seconds_saved"] == 10.0 and by_model["m1"]["seconds_saved"] == 2.0
    assert summary["hits"] == 6 and summary["seconds_saved"] == 12.0
    assert summary["by_task"][0]["entries"] == 4


def test_compact_gives_space_back_after_deleting(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "c"))
    store.put_many([entry(i, os.urandom(4000)) for i in range(500)])
    store.compact()
    full = os.path.getsize(store.path)
    store.delete_where(Where())
    store.compact()
    assert os.path.getsize(store.path) < full / 4
    store.close()


# -- the split interfaces and open_store's routing -----------------------------------------------


def test_entries_returns_whole_entries_in_the_order_asked(store: Store) -> None:
    store.put_many([entry(i, components='{"d":{}}', prompt="p") for i in range(5)])
    found = store.entries([key(3), key(9), key(1)])
    assert [e.key for e in found] == [key(3), key(1)]
    assert found[0].value == b"value 3" and found[0].components == '{"d":{}}' and found[0].prompt == "p"
    assert [e.value for e in store.entries([key(2)], values=False)] == [b""]
    assert store.entries([]) == []
    assert store.get(key(4)) == store.entries([key(4)])[0]


def test_the_interfaces_split_what_each_user_needs() -> None:
    from lmms_cache.store import Backend, Catalogue, Memos

    backend = {"get_many", "put_many", "touch", "evict", "close"}
    catalogue = {"entries", "scan", "stats", "summary", "delete", "delete_where", "similar", "models"}
    assert backend <= set(dir(Backend)) and not catalogue & set(dir(Backend))
    assert catalogue <= set(dir(Catalogue)) and not {"get_many", "put_many", "touch"} & set(dir(Catalogue))
    assert issubclass(SQLiteStore, Backend) and issubclass(SQLiteStore, Catalogue)
    assert isinstance(NullStore(), Store)
    memos = {"file_digest", "remember_files", "row_digests", "remember_row_digests", "derived_many",
             "remember_derived", "forget_derived"}  # fmt: skip
    assert memos <= set(dir(Memos)) and memos <= set(dir(SQLiteStore))
    assert not memos & set(dir(Store))  # a server never holds the memos


def test_open_store_takes_a_directory_a_database_file_or_a_url(tmp_path: Path) -> None:
    by_directory = open_store(tmp_path / "c")
    by_directory.put_many([entry(1)])
    by_directory.close()
    assert isinstance(by_directory, SQLiteStore) and by_directory.location == str(tmp_path / "c" / "cache.db")
    by_file = open_store(tmp_path / "c" / "cache.db", readonly=True)
    assert isinstance(by_file, SQLiteStore) and by_file.get_many([key(1)])
    by_file.close()
    with pytest.raises(StoreError, match="no cache"):
        open_store(tmp_path / "nothing", create=False)
    assert not (tmp_path / "nothing").exists()
    pytest.importorskip("redis")
    from lmms_cache.store.redis import RedisStore

    lazy = open_store("redis://:secret@127.0.0.1:1/0?prefix=t&breaker=5", lazy=True)  # nothing listens: no error yet
    assert isinstance(lazy, RedisStore) and "secret" not in lazy.location and not lazy.origins_proven
    with pytest.raises(StoreError):
        lazy.get_many([key(1)])
    with pytest.raises(StoreError):
        open_store("redis://127.0.0.1:1/0")  # eager (management): at once


def test_sqlite_outbox_queues_in_the_writing_transaction(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "c"))
    assert store.queued("redis://x") == [] and store.outboxes() == {}
    store.put_many([entry(i) for i in range(3)], outbox="redis://x")
    store.put_many([entry(3)], outbox="redis://x", sent=[key(0), key(1)])
    store.put_many([entry(4)])  # not queued
    assert store.queued("redis://x") == [key(2), key(3)] and store.queued("redis://y") == []
    assert store.outboxes() == {"redis://x": 2}
    assert store.dequeue("redis://x", [key(2), key(7)]) == 1
    reopened = SQLiteStore(str(tmp_path / "c"), readonly=True)  # durable: another connection sees it
    assert reopened.queued("redis://x") == [key(3)]
    reopened.close()
    store.close()
