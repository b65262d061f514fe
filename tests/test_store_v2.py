"""Schema 2 of the SQLite store: what it keeps per entry, the memo tables, and the upgrade
of a schema-1 file."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmms_cache.store import LEGACY_KEY_SCHEMA, Entry, NullStore, SQLiteStore, Stored, StoreError, Where
from lmms_cache.store import sqlite as sqlite_backend
from lmms_cache.store.sqlite import SCHEMA_VERSION

KEY_2 = "lmms-cache/key/2"


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def entry(i: int, **fields: Any) -> Entry:
    base: dict[str, Any] = dict(key=key(i), value=f"value {i}".encode(), model="m1", method="generate_until",
                                task="t", split="test", doc_id=i, key_schema=KEY_2)  # fmt: skip
    base.update(fields)
    return Entry(**base)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(str(tmp_path / "c"))
    yield s
    s.close()


def raw(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True)


def query(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    conn = raw(db)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def user_version(db: Path) -> int:
    return int(query(db, "PRAGMA user_version")[0][0])


# -- a schema-1 file, exactly as lmms-cache 1.x (store schema 1) creates it -------------------

# Copied from src/lmms_cache/store/sqlite.py at schema 1 (and checked, when this test was
# written, to give the same sqlite_master and header settings as the schema-1 code).
V1_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS entries (
        id INTEGER PRIMARY KEY,
        key BLOB NOT NULL UNIQUE,
        value BLOB NOT NULL,
        model TEXT NOT NULL,
        method TEXT NOT NULL,
        task TEXT,
        split TEXT,
        doc_id TEXT,
        created_at REAL NOT NULL,
        size INTEGER NOT NULL,
        raw_size INTEGER NOT NULL DEFAULT 0,
        model_seconds REAL NOT NULL DEFAULT 0,
        hits INTEGER NOT NULL DEFAULT 0,
        used_at REAL NOT NULL,
        components TEXT,
        prompt TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS entries_model_task ON entries (model, task)",
    "CREATE INDEX IF NOT EXISTS entries_document ON entries (task, doc_id)",
    "CREATE INDEX IF NOT EXISTS entries_prompt ON entries (prompt)",
    "CREATE INDEX IF NOT EXISTS entries_used ON entries (used_at)",
    """CREATE TABLE IF NOT EXISTS totals (
        id INTEGER PRIMARY KEY CHECK (id = 0),
        entries INTEGER NOT NULL, bytes INTEGER NOT NULL, raw_bytes INTEGER NOT NULL
    )""",
    "INSERT OR IGNORE INTO totals VALUES (0, 0, 0, 0)",
    """CREATE TRIGGER IF NOT EXISTS entries_insert AFTER INSERT ON entries BEGIN
        UPDATE totals SET entries = entries + 1, bytes = bytes + new.size,
            raw_bytes = raw_bytes + new.raw_size WHERE id = 0;
    END""",
    """CREATE TRIGGER IF NOT EXISTS entries_delete AFTER DELETE ON entries BEGIN
        UPDATE totals SET entries = entries - 1, bytes = bytes - old.size,
            raw_bytes = raw_bytes - old.raw_size WHERE id = 0;
    END""",
    """CREATE TRIGGER IF NOT EXISTS entries_resize AFTER UPDATE OF size, raw_size ON entries BEGIN
        UPDATE totals SET bytes = bytes - old.size + new.size,
            raw_bytes = raw_bytes - old.raw_size + new.raw_size WHERE id = 0;
    END""",
    """CREATE TABLE IF NOT EXISTS models (
        digest TEXT PRIMARY KEY,
        description TEXT NOT NULL,
        first_seen REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS files (
        path TEXT PRIMARY KEY,
        signature TEXT NOT NULL,
        digest BLOB NOT NULL
    )""",
)
V1_INSERT = (
    "INSERT INTO entries (key, value, model, method, task, split, doc_id, created_at, model_seconds, raw_size, "
    "components, hits, used_at, prompt, size) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
V1_APPLICATION_ID = 0x4C4D4331
V1_FIELDS = ("key", "value", "model", "method", "task", "split", "doc_id", "created_at", "model_seconds",
             "raw_size", "components", "hits", "used_at", "prompt")  # fmt: skip


def v1_entries() -> list[dict[str, Any]]:
    """Schema-1 rows, with every kind of metadata the schema-1 proxy wrote (doc_id as text)."""
    rows = []
    for i in range(1200):  # more than one 900-key lookup chunk
        rows.append(dict(key=key(i), value=os.urandom(40 + i % 300), model=f"m{i % 3}",
                         method=("generate_until", "loglikelihood")[i % 2], task=f"task{i % 4}", split="test",
                         doc_id=str(i), created_at=1000.0 + i, model_seconds=i / 7, raw_size=3 * i,
                         components='{"context": "%02x"}' % (i % 256), hits=i % 5, used_at=2000.0 + i,
                         prompt=f"{i:016x}" if i % 2 else None))  # fmt: skip
    rows.append(dict(key=key(10_000), value=b"no document", model="m0", method="loglikelihood", task=None,
                     split=None, doc_id=None, created_at=5.0, model_seconds=0.0, raw_size=0, components=None,
                     hits=0, used_at=5.0, prompt=None))  # fmt: skip
    return rows


def make_v1_cache(directory: Path, rows: list[dict[str, Any]] | None = None) -> Path:
    """A schema-1 cache file: created as the schema-1 code created one, filled through its INSERT."""
    rows = v1_entries() if rows is None else rows
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    db = directory / "cache.db"
    os.close(os.open(db, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("BEGIN IMMEDIATE")
        for statement in V1_SCHEMA:
            conn.execute(statement)
        conn.execute(f"PRAGMA application_id = {V1_APPLICATION_ID}")
        conn.execute("PRAGMA user_version = 1")
        conn.execute("COMMIT")
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(V1_INSERT, [(*(r[f] for f in V1_FIELDS), len(r["value"])) for r in rows])
        conn.execute("INSERT INTO models VALUES ('m0', '{\"class\": \"Fake\"}', 1.0)")
        conn.execute("INSERT INTO files VALUES ('/data/a.png', '1:2:3', ?)", (b"d" * 16,))
        conn.execute("COMMIT")
    finally:
        conn.close()
    return db


def as_v2(row: dict[str, Any]) -> Entry:
    """What a schema-1 row reads as under schema 2."""
    return Entry(**{f: row[f] for f in V1_FIELDS}, key_schema=LEGACY_KEY_SCHEMA)


def dump(db: Path) -> list[str]:
    """The whole logical content of a database file, schema included."""
    conn = raw(db)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def files(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of a cache directory: its bytes and modification time."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


def database_files(directory: Path) -> dict[str, Any]:
    """What a read-only connection must leave as it was: the database file's bytes and
    mtime, and the WAL's content. (Closing a read-only connection to a WAL file leaves an
    empty -wal and the -shm, the WAL index, that it needed to read: no database content.)"""
    wal = directory / "cache.db-wal"
    return {"db": files(directory)["cache.db"], "wal": wal.read_bytes() if wal.exists() else b""}


def values_of(found: dict[bytes, Stored]) -> dict[bytes, bytes]:
    return {k: s.value for k, s in found.items()}


# -- what an entry keeps ------------------------------------------------------------------


def test_a_new_cache_is_schema_2(store: SQLiteStore) -> None:
    db = Path(store.path)
    assert SCHEMA_VERSION == 2
    assert user_version(db) == 2
    tables = {name for (name,) in query(db, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"entries", "row_digests", "derived"} <= tables
    columns = {name: declared for _, name, declared, *_ in query(db, "PRAGMA table_info(entries)")}
    assert columns["doc_id"] == ""  # no type: no affinity
    assert {"key_schema", "deps", "origin", "signature"} <= set(columns)


def test_doc_id_keeps_its_type(store: SQLiteStore) -> None:
    store.put_many([entry(1, doc_id=17), entry(2, doc_id="17"), entry(3, doc_id="doc-3"), entry(4, doc_id=None),
                    entry(5, doc_id=-(2**63)), entry(6, doc_id=2**70)])  # fmt: skip
    got = {e.key: e.doc_id for e in store.scan()}
    assert got == {key(1): 17, key(2): "17", key(3): "doc-3", key(4): None, key(5): -(2**63),
                   key(6): str(2**70)}  # fmt: skip  # beyond SQLite's INTEGER: kept as its text
    assert [type(got[key(i)]) for i in (1, 2)] == [int, str]
    kinds = dict(query(Path(store.path), "SELECT doc_id, typeof(doc_id) FROM entries WHERE doc_id IN (17, '17')"))
    assert sorted(kinds.values()) == ["integer", "text"]
    assert store.get(key(1)).doc_id == 17  # type: ignore[union-attr]


def test_doc_id_of_an_integer_type_of_another_library_is_stored_as_an_int(store: SQLiteStore) -> None:
    np = pytest.importorskip("numpy")
    store.put_many([entry(1, doc_id=np.int64(5)), entry(2, doc_id=2.5)])
    assert {e.key: e.doc_id for e in store.scan()} == {key(1): 5, key(2): "2.5"}


def test_where_doc_id_given_as_text_or_int_finds_both_stored_forms(store: SQLiteStore) -> None:
    entries = [entry(1, doc_id=17), entry(2, doc_id="17"), entry(3, doc_id=170), entry(4, doc_id="017"),
               entry(5, doc_id=17, task="other"), entry(6, doc_id=" 17"), entry(7, doc_id=-4),
               entry(8, doc_id="-4")]  # fmt: skip
    store.put_many(entries)

    def found(where: Where) -> set[int]:
        keys = {e.key for e in store.scan(where, values=False)}
        assert keys == {e.key for e in entries if where.matches(e)}  # matches() agrees with the store
        return {int.from_bytes(k, "big") for k in keys}

    assert found(Where(doc_id="17", task="t")) == {1, 2}
    assert found(Where(doc_id=17, task="t")) == {1, 2}
    assert found(Where(doc_id="17")) == {1, 2, 5}
    assert found(Where(doc_id="017")) == {4}  # not the canonical text of an int: itself only
    assert found(Where(doc_id=" 17")) == {6}
    assert found(Where(doc_id="-4")) == {7, 8}
    assert found(Where(doc_id="18")) == set()
    assert store.delete_where(Where(doc_id="17", task="t")) == 2
    assert store.stats()["entries"] == len(entries) - 2


def test_similar_finds_the_document_by_int_or_text(store: SQLiteStore) -> None:
    store.put_many([entry(1, doc_id=17), entry(2, doc_id="17"), entry(3, doc_id=18)])
    for doc_id in (17, "17"):
        assert {e.key for e in store.similar("generate_until", task="t", doc_id=doc_id, prompt=None)} == {key(1), key(2)}


def test_get_many_returns_deps_origin_and_signature(store: SQLiteStore) -> None:
    store.put_many([entry(1, deps=b"\x00media", origin="uid:1000@abc", signature=b"s" * 32, created_at=300.0),
                    entry(2, created_at=100.0)])  # fmt: skip
    got = store.get_many([key(1), key(2), key(3)])
    assert got == {key(1): Stored(b"value 1", b"\x00media", "uid:1000@abc", b"s" * 32),
                   key(2): Stored(b"value 2", None, None, None)}  # fmt: skip
    assert got[key(1)].value == b"value 1" and got[key(1)].deps == b"\x00media"
    assert set(store.get_many([key(1), key(2)], created_after=200.0)) == {key(1)}


def test_a_lookup_across_chunks_returns_every_field(store: SQLiteStore) -> None:
    entries = [entry(i, deps=b"%d" % i if i % 2 else None, origin=f"o{i}", signature=bytes([i % 256]) * 8)
               for i in range(2000)]  # fmt: skip
    store.put_many(entries)
    got = store.get_many([key(i) for i in range(2100)])
    assert got == {e.key: Stored(e.value, e.deps, e.origin, e.signature) for e in entries}


def test_an_entry_without_a_key_schema_is_of_the_first_one(store: SQLiteStore) -> None:
    store.put_many([entry(1, key_schema=None), entry(2)])
    assert {e.key: e.key_schema for e in store.scan()} == {key(1): LEGACY_KEY_SCHEMA, key(2): KEY_2}


def test_replacing_an_entry_replaces_its_new_fields_and_keeping_keeps_them(store: SQLiteStore) -> None:
    store.put_many([entry(1, deps=b"old", origin="a", signature=b"sig", key_schema="lmms-cache/key/1")])
    store.put_many([entry(1, deps=b"new", origin="b", signature=b"sig2")], replace=False)
    assert store.get_many([key(1)])[key(1)] == Stored(b"value 1", b"old", "a", b"sig")
    store.put_many([entry(1, value=b"v2")])  # deps, origin, signature: none any more
    assert store.get_many([key(1)])[key(1)] == Stored(b"v2", None, None, None)
    assert store.get(key(1)).key_schema == KEY_2  # type: ignore[union-attr]


def test_where_key_schema_and_old_schema(store: SQLiteStore) -> None:
    store.put_many([entry(i, key_schema=f"lmms-cache/key/{1 + i % 3}", value=b"x" * (i + 1)) for i in range(30)])
    current = "lmms-cache/key/2"
    assert {e.key_schema for e in store.scan(Where(key_schema=current))} == {current}
    assert len(list(store.scan(Where(key_schema=current)))) == 10
    assert len(list(store.scan(Where(key_schema="lmms-cache/key/9")))) == 0
    assert {e.key_schema for e in store.scan(Where(old_schema=current))} == {"lmms-cache/key/1", "lmms-cache/key/3"}
    kept = {e.key for e in store.scan() if e.key_schema == current}
    assert store.delete_where(Where(old_schema=current)) == 20
    assert {e.key for e in store.scan()} == kept
    stats = store.stats()
    assert (stats["entries"], stats["bytes"]) == (10, sum(i + 1 for i in range(30) if i % 3 == 1))
    assert store.delete_where(Where(old_schema=current)) == 0


def test_summary_groups_by_key_schema(store: SQLiteStore) -> None:
    store.put_many([entry(i, key_schema=None if i < 3 else KEY_2, value=b"v" * 10) for i in range(8)])
    by_schema = {r["key_schema"]: r for r in store.summary()["by_schema"]}
    assert by_schema == {
        LEGACY_KEY_SCHEMA: {"key_schema": LEGACY_KEY_SCHEMA, "entries": 3, "bytes": 30},
        KEY_2: {"key_schema": KEY_2, "entries": 5, "bytes": 50},
    }
    assert NullStore().summary()["by_schema"] == []


def test_an_entry_keeps_every_field_through_export_and_import(tmp_path: Path, store: SQLiteStore) -> None:
    from lmms_cache import codec, manage, trust

    e = entry(1, value=codec.encode("an answer"), doc_id=3, deps=b"d", origin="uid:1@x", signature=b"s" * 32)
    store.put_many([e])
    assert manage.export(store, str(tmp_path / "out.db")) == 1
    other = SQLiteStore(str(tmp_path / "other"))
    try:
        assert manage.import_(other, str(tmp_path / "out.db"))["added"] == 1
        (got,) = list(other.scan())
        kept = ("key", "value", "model", "method", "task", "split", "doc_id", "created_at", "components", "deps",
                "key_schema")  # fmt: skip
        assert [getattr(got, f) for f in kept] == [getattr(store.get(key(1)), f) for f in kept]
        assert (got.doc_id, got.deps, got.key_schema) == (3, b"d", KEY_2)
        # never the file's origin (anyone can write one); an invalid signature is dropped
        assert got.origin == trust.imported_origin("uid:1@x") and got.signature is None
    finally:
        other.close()


# -- the memo tables ----------------------------------------------------------------------


def test_row_digests_round_trip_and_replace(store: SQLiteStore) -> None:
    digests = b"".join(os.urandom(16) for _ in range(1000))
    assert store.row_digests("fingerprint-a", "test") is None
    store.remember_row_digests("fingerprint-a", "test", digests)
    store.remember_row_digests("fingerprint-a", "train", digests[:32])
    assert store.row_digests("fingerprint-a", "test") == digests
    assert store.row_digests("fingerprint-a", "train") == digests[:32]
    assert store.row_digests("fingerprint-b", "test") is None
    store.remember_row_digests("fingerprint-a", "test", digests[:160])
    assert store.row_digests("fingerprint-a", "test") == digests[:160]
    assert query(Path(store.path), "SELECT count FROM row_digests WHERE split = 'test'") == [(10,)]
    store.remember_row_digests("fingerprint-a", "empty", b"")
    assert store.row_digests("fingerprint-a", "empty") == b""
    with pytest.raises(ValueError, match="16 bytes"):
        store.remember_row_digests("fingerprint-a", "test", b"x" * 17)
    assert store.row_digests("fingerprint-a", "test") == digests[:160]


def test_row_digests_that_do_not_add_up_are_not_trusted(store: SQLiteStore) -> None:
    store.remember_row_digests("fp", "test", b"d" * 64)
    conn = sqlite3.connect(store.path)
    with conn:
        conn.execute("UPDATE row_digests SET count = 5")
    conn.close()
    assert store.row_digests("fp", "test") is None


def test_derived_round_trip_across_chunks_and_forget_one_function(store: SQLiteStore) -> None:
    fa, fb = b"function-a" * 2, b"function-b" * 2
    rows = [os.urandom(16) for _ in range(2000)]
    items_a = [(fa, r, os.urandom(16), b"deps" if i % 2 else None) for i, r in enumerate(rows)]
    items_b = [(fb, r, os.urandom(16), None) for r in rows[:300]]
    store.remember_derived(items_a + items_b)
    absent = [os.urandom(16) for _ in range(50)]
    assert store.derived_many(fa, rows + absent) == {r: (d, deps) for _, r, d, deps in items_a}
    assert store.derived_many(fb, rows) == {r: (d, deps) for _, r, d, deps in items_b}
    assert store.derived_many(b"function-c", rows) == {}
    assert store.derived_many(fa, []) == {}
    store.remember_derived([(fa, rows[0], b"n" * 16, b"new deps")])  # replaces
    assert store.derived_many(fa, rows[:1]) == {rows[0]: (b"n" * 16, b"new deps")}
    assert store.forget_derived(fa) == 2000
    assert store.derived_many(fa, rows) == {}
    assert store.derived_many(fb, rows) == {r: (d, deps) for _, r, d, deps in items_b}
    assert store.forget_derived(fa) == 0
    store.remember_derived([])


def test_memos_of_a_read_only_store_are_read_and_never_written(tmp_path: Path) -> None:
    w = SQLiteStore(str(tmp_path / "c"))
    w.remember_row_digests("fp", "test", b"r" * 16)
    w.remember_derived([(b"f", b"row", b"d" * 16, None)])
    w.close()
    before = dump(tmp_path / "c" / "cache.db")
    r = SQLiteStore(str(tmp_path / "c"), readonly=True)
    try:
        assert r.row_digests("fp", "test") == b"r" * 16
        assert r.derived_many(b"f", [b"row"]) == {b"row": (b"d" * 16, None)}
        r.remember_row_digests("fp", "test", b"x" * 16)  # best effort: silently not kept
        r.remember_derived([(b"f", b"row", b"x" * 16, None)])
        with pytest.raises(StoreError, match="read-only"):
            r.forget_derived(b"f")
    finally:
        r.close()
    assert dump(tmp_path / "c" / "cache.db") == before


def test_only_a_local_file_holds_memos() -> None:
    """The memos are not part of the store interface: a null store (or a server) has none,
    and the proxy keeps them in a local SQLite file (tests/test_proxy_redis.py)."""
    s = NullStore()
    for name in ("row_digests", "remember_row_digests", "derived_many", "remember_derived", "forget_derived",
                 "file_digest", "remember_files"):  # fmt: skip
        assert not hasattr(s, name), name
    assert s.get_many([key(1)]) == {}


# -- upgrading a schema-1 file --------------------------------------------------------------


def test_a_schema_1_cache_upgrades_keeping_every_entry_and_its_metadata(tmp_path: Path) -> None:
    rows = v1_entries()
    db = make_v1_cache(tmp_path / "c", rows)
    s = SQLiteStore(str(tmp_path / "c"))
    try:
        assert user_version(db) == 2
        assert sorted(s.scan(), key=lambda e: e.key) == sorted(map(as_v2, rows), key=lambda e: e.key)
        assert values_of(s.get_many([r["key"] for r in rows])) == {r["key"]: r["value"] for r in rows}
        stats = s.stats()
        assert (stats["entries"], stats["bytes"], stats["raw_bytes"]) == (
            len(rows), sum(len(r["value"]) for r in rows), sum(r["raw_size"] for r in rows))  # fmt: skip
        assert s.models() == {"m0": '{"class": "Fake"}'}
        assert s.file_digest("/data/a.png", (1, 2, 3)) == b"d" * 16
        assert s.summary()["by_schema"] == [{"key_schema": LEGACY_KEY_SCHEMA, "entries": len(rows),
                                             "bytes": stats["bytes"]}]  # fmt: skip
        # Schema-1 ids stay text; ids written now keep their type; "17" finds both.
        s.put_many([entry(20_000, doc_id=17, task="task1", deps=b"d", origin="o", signature=b"s")])
        assert query(db, "SELECT typeof(doc_id) FROM entries WHERE key IN (?, ?) ORDER BY id",
                     key(17), key(20_000)) == [("text",), ("integer",)]  # fmt: skip
        assert {e.key for e in s.scan(Where(doc_id="17", task="task1"))} == {key(17), key(20_000)}
        assert s.get_many([key(20_000)])[key(20_000)] == Stored(b"value 20000", b"d", "o", b"s")
        assert s.delete_where(Where(old_schema=KEY_2)) == len(rows)
        assert [e.key for e in s.scan()] == [key(20_000)]
        s.remember_derived([(b"f", b"r", b"d" * 16, None)])
        assert s.derived_many(b"f", [b"r"]) == {b"r": (b"d" * 16, None)}
    finally:
        s.close()
    assert query(db, "PRAGMA integrity_check") == [("ok",)]


HEADER = ("user_version", "application_id", "auto_vacuum", "journal_mode", "page_size")


def test_an_upgraded_cache_has_the_schema_of_a_new_one(tmp_path: Path) -> None:
    make_v1_cache(tmp_path / "old", [])
    SQLiteStore(str(tmp_path / "old")).close()
    SQLiteStore(str(tmp_path / "new")).close()

    def schema(db: Path) -> dict[str, Any]:
        objects = query(db, "SELECT type, name, tbl_name FROM sqlite_master ORDER BY name")
        return {
            "objects": objects,
            "tables": {t: query(db, f"PRAGMA table_xinfo({t})") for ty, t, _ in objects if ty == "table"},
            "indexes": {i: query(db, f"PRAGMA index_xinfo({i})") for ty, i, _ in objects if ty == "index"},
            "header": [query(db, f"PRAGMA {p}")[0][0] for p in HEADER],
        }

    assert schema(tmp_path / "old" / "cache.db") == schema(tmp_path / "new" / "cache.db")


class FailingConnection(sqlite3.Connection):
    """While ``armed``, records the statements run from the first BEGIN IMMEDIATE on, and
    fails the one numbered ``fail_at`` as a full disk or an I/O error would."""

    armed = False
    fail_at: int | None = None
    seen: list[str] = []  # noqa: RUF012  # reset by each test

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:  # type: ignore[override]
        seen = FailingConnection.seen
        if FailingConnection.armed and (sql == "BEGIN IMMEDIATE" or seen):
            seen.append(sql)
            if FailingConnection.fail_at is not None and len(seen) - 1 == FailingConnection.fail_at:
                raise sqlite3.OperationalError("database or disk is full")
        return super().execute(sql, *args)


@pytest.fixture
def failing_connections(monkeypatch: pytest.MonkeyPatch) -> type[FailingConnection]:
    real_connect = sqlite3.connect

    def connect(database: str, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        return real_connect(database, *args, factory=FailingConnection, **kwargs)

    monkeypatch.setattr(sqlite_backend.sqlite3, "connect", connect)
    FailingConnection.seen, FailingConnection.fail_at, FailingConnection.armed = [], None, False
    return FailingConnection


def open_armed(failing: type[FailingConnection], directory: Path, fail_at: int | None) -> SQLiteStore:
    failing.seen, failing.fail_at, failing.armed = [], fail_at, True
    try:
        return SQLiteStore(str(directory))
    finally:
        failing.armed = False


def test_the_upgrade_is_one_transaction(tmp_path: Path, failing_connections: type[FailingConnection]) -> None:
    # The statements of a successful upgrade, from BEGIN IMMEDIATE to COMMIT.
    make_v1_cache(tmp_path / "probe", v1_entries()[:5])
    open_armed(failing_connections, tmp_path / "probe", None).close()
    upgrade = failing_connections.seen[: failing_connections.seen.index("COMMIT") + 1]
    first_alter = next(i for i, s in enumerate(upgrade) if s.startswith("ALTER TABLE"))
    assert upgrade[-1] == "COMMIT" and first_alter + 1 < len(upgrade) - 1
    # A failure at any statement (the one right after the first ALTER TABLE among them, and
    # the COMMIT itself) leaves the schema-1 file exactly as it was, and usable by the next open.
    for fail_at in range(len(upgrade)):
        directory = tmp_path / f"c{fail_at}"
        db = make_v1_cache(directory)
        before = dump(db)
        with pytest.raises(StoreError, match="disk is full") as failed:
            open_armed(failing_connections, directory, fail_at)
        assert fail_at < 2 or "cannot upgrade" in str(failed.value)  # past BEGIN and reading the version
        assert failing_connections.seen[fail_at] == upgrade[fail_at]  # failed there
        assert dump(db) == before, f"failing at {upgrade[fail_at]!r} changed the file"
        assert user_version(db) == 1
        assert query(db, "PRAGMA integrity_check") == [("ok",)]
        s = SQLiteStore(str(directory))
        try:
            assert len(list(s.scan(values=False))) == len(v1_entries())
        finally:
            s.close()
        assert user_version(db) == 2


def test_a_schema_1_cache_opened_read_only_is_read_as_it_is_without_writing(tmp_path: Path) -> None:
    rows = v1_entries()
    db = make_v1_cache(tmp_path / "c", rows)
    before = database_files(tmp_path / "c")
    s = SQLiteStore(str(tmp_path / "c"), readonly=True)
    try:
        assert sorted(s.scan(), key=lambda e: e.key) == sorted(map(as_v2, rows), key=lambda e: e.key)
        assert s.get_many([key(1), key(99_999)]) == {key(1): Stored(rows[1]["value"], None, None, None)}
        assert s.get(key(2)) == as_v2(rows[2])
        assert len(list(s.scan(Where(key_schema=LEGACY_KEY_SCHEMA), values=False))) == len(rows)
        assert len(list(s.scan(Where(old_schema=KEY_2), values=False))) == len(rows)
        assert list(s.scan(Where(old_schema=LEGACY_KEY_SCHEMA))) == []
        assert {e.key for e in s.scan(Where(doc_id=17))} == {key(17)}
        assert {e.key for e in s.similar("loglikelihood", task="task1", doc_id=17, prompt=None)} == {key(17)}
        assert s.summary()["by_schema"] == [{"key_schema": LEGACY_KEY_SCHEMA, "entries": len(rows),
                                             "bytes": sum(len(r["value"]) for r in rows)}]  # fmt: skip
        assert s.row_digests("fp", "test") is None
        assert s.derived_many(b"f", [b"r"]) == {}
    finally:
        s.close()
    assert database_files(tmp_path / "c") == before
    assert user_version(db) == 1


def test_a_read_only_store_follows_an_upgrade_made_meanwhile(tmp_path: Path) -> None:
    make_v1_cache(tmp_path / "c")
    reader = SQLiteStore(str(tmp_path / "c"), readonly=True)
    try:
        assert reader.get_many([key(1)])[key(1)].deps is None
        writer = SQLiteStore(str(tmp_path / "c"))  # upgrades
        try:
            writer.put_many([entry(50_000, deps=b"media", signature=b"sig")])
            writer.remember_derived([(b"f", b"r", b"d" * 16, None)])
        finally:
            writer.close()
        assert reader.get_many([key(50_000)]) == {key(50_000): Stored(b"value 50000", b"media", None, b"sig")}
        assert reader.get(key(50_000)).key_schema == KEY_2  # type: ignore[union-attr]
        assert reader.derived_many(b"f", [b"r"]) == {b"r": (b"d" * 16, None)}
    finally:
        reader.close()


@pytest.mark.parametrize("readonly", [False, True])
def test_a_cache_of_a_newer_schema_is_refused_untouched(tmp_path: Path, readonly: bool) -> None:
    SQLiteStore(str(tmp_path / "c")).close()
    db = tmp_path / "c" / "cache.db"
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("PRAGMA user_version = 3")
    conn.close()
    before = database_files(tmp_path / "c")
    with pytest.raises(StoreError, match=r"newer lmms-cache \(schema 3\)"):
        SQLiteStore(str(tmp_path / "c"), readonly=readonly)
    assert database_files(tmp_path / "c") == before


def _open_and_count(directory: str, start: Any, results: Any) -> None:
    try:
        start.wait(30)
        s = SQLiteStore(directory)
        results.put(s.stats()["entries"])
        s.close()
    except BaseException as exc:
        results.put(repr(exc))


def test_processes_opening_a_schema_1_cache_together_upgrade_it_once(tmp_path: Path) -> None:
    """The ranks of a node start at once on a schema-1 cache: one upgrades, all succeed."""
    ctx = multiprocessing.get_context("fork")
    for attempt in range(3):
        directory = tmp_path / f"c{attempt}"
        make_v1_cache(directory)
        start, results = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_open_and_count, args=(str(directory), start, results)) for _ in range(4)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(60)
        assert outcomes == [len(v1_entries())] * 4
        assert user_version(directory / "cache.db") == 2
        columns = [c[1] for c in query(directory / "cache.db", "PRAGMA table_info(entries)")]
        assert len(columns) == 20 and columns[-4:] == ["key_schema", "deps", "origin", "signature"]
