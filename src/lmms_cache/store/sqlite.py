"""The embedded default: one SQLite file in WAL mode, no server.

Why these settings:

* WAL lets the ranks of one node read while one of them writes, across processes.
* Writes take the lock up front (``BEGIN IMMEDIATE``), so two writers queue on the busy
  timeout instead of dead-locking on a read-to-write upgrade; each batch of responses is
  one transaction.
* ``synchronous=FULL`` by default: a commit is on disk when ``put_many`` returns, even
  across a power loss. It costs one fsync per *batch*, milliseconds next to the seconds a
  batch of model calls costs. ``durable=False`` selects ``NORMAL``, which survives a
  killed process but may lose the last batches on a power cut.
* Keys are 16-byte BLOBs under a unique index; values are BLOBs in a rowid table, which
  suits values larger than a few hundred bytes better than ``WITHOUT ROWID``.
* WAL needs shared memory that network file systems do not provide: on one, the store
  warns and uses a rollback journal.
* Opening a file of the current schema only reads (no ``auto_vacuum``, no write
  transaction): a rank opening a busy cache neither waits for its writers nor adds to its
  WAL. Only a new file is set up, in one transaction.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from .base import Entry, Store, StoreError, Where

__all__ = ["SQLiteStore", "network_filesystem"]

log = logging.getLogger("lmms_cache")

FILENAME = "cache.db"
SCHEMA_VERSION = 1
APPLICATION_ID = 0x4C4D4331  # "LMC1": tells our file from any other SQLite database
_LOOKUP_CHUNK = 900  # bound parameters per SELECT ... IN (...)
_SCAN_PAGE = 256  # rows per query of scan()
_EVICT_PAGE = 1000  # least recently used rows looked at per eviction query

_NETWORK_FS = frozenset(
    {
        "nfs", "nfs3", "nfs4", "cifs", "smbfs", "smb2", "smb3", "lustre", "gpfs", "beegfs",
        "ceph", "fuse.ceph", "panfs", "pvfs2", "orangefs", "fuse.sshfs", "fuse.rclone",
        "fuse.s3fs", "fuse.goofys", "fuse.gcsfuse", "afs", "9p", "glusterfs", "fuse.glusterfs",
        "wekafs", "fuse.juicefs",
    }
)  # fmt: skip

# One statement per item (the triggers contain semicolons).
_SCHEMA = (
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
    # Explaining a miss looks for the stored entries of the same document or prompt.
    "CREATE INDEX IF NOT EXISTS entries_document ON entries (task, doc_id)",
    "CREATE INDEX IF NOT EXISTS entries_prompt ON entries (prompt)",
    "CREATE INDEX IF NOT EXISTS entries_used ON entries (used_at)",
    # Running totals kept by triggers: stats and the size limit read one row, never a scan.
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
_COLUMNS = ("key, value, model, method, task, split, doc_id, created_at, model_seconds, raw_size, "
            "components, hits, used_at, prompt")
_META_COLUMNS = _COLUMNS.replace("value,", "x'',")

# Connections inherited through fork() must never be used or closed by the child (SQLite
# forbids it): the child keeps them referenced here, for its lifetime, so GC never closes them.
_INHERITED: list[sqlite3.Connection] = []

_CORRUPT = ("file is not a database", "malformed", "file is encrypted")


def network_filesystem(path: str, mounts: str | None = None) -> str | None:
    """The type of the network file system holding ``path``, or None for a local one.

    ``mounts`` is a mount table in the ``/proc/self/mounts`` format (read when None).
    """
    if mounts is None:
        try:
            with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
                mounts = f.read()
        except OSError:
            return None
    real = os.path.realpath(path)
    best, best_type = "", None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        # The kernel escapes space, tab, newline and backslash in mount points as \ooo.
        mount_point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
        fs_type = fields[2]
        inside = real == mount_point or real.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, best_type = mount_point, fs_type
    return best_type if best_type in _NETWORK_FS else None


class SQLiteStore(Store):
    """Responses in ``<directory>/cache.db``.

    Args:
        directory: created (0700) when missing; the database file is created 0600.
        readonly: open the file read-only and never write (works on read-only media).
        durable: ``synchronous=FULL`` (default) or ``NORMAL``; see the module notes.
        timeout: seconds a writer waits for another process's transaction.

    Raises:
        StoreError: the location cannot hold a cache (not creatable, not a database of
            ours, written by a newer version). A damaged database is renamed aside to
            ``cache.db.corrupt-<time>`` and a fresh one started, with a warning.
    """

    def __init__(
        self, directory: str, *, readonly: bool = False, durable: bool = True, timeout: float = 60.0,
        filename: str = FILENAME, trust: bool = False,
    ) -> None:  # fmt: skip
        self.directory = os.path.abspath(os.path.expanduser(directory))
        self.path = os.path.join(self.directory, filename)
        self.location = self.path
        self.readonly = readonly
        self._filename = filename
        self._trust = trust
        self._durable = durable
        self._timeout = timeout
        self._lock = threading.RLock()
        self._conn_pid: int | None = None
        self._conn_obj: sqlite3.Connection | None = None
        self._connect()

    # -- connection ---------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._conn_pid != os.getpid() or self._conn_obj is None:
            if self._conn_obj is not None:
                _INHERITED.append(self._conn_obj)
                self._conn_obj = None
            self._connect()
        assert self._conn_obj is not None
        return self._conn_obj

    def _connect(self) -> None:
        self._check_owner()
        try:
            conn = self._open_readonly() if self.readonly else self._open_readwrite()
        except sqlite3.DatabaseError as exc:
            if self.readonly or not any(m in str(exc) for m in _CORRUPT):
                raise StoreError(f"cannot open the cache at {self.path}: {exc}") from exc
            self._set_aside(exc)
            try:
                conn = self._open_readwrite()
            except sqlite3.Error as exc2:
                raise StoreError(f"cannot open the cache at {self.path}: {exc2}") from exc2
        except OSError as exc:
            raise StoreError(f"cannot create the cache at {self.directory}: {exc}") from exc
        self._conn_obj = conn
        self._conn_pid = os.getpid()

    def _open_readwrite(self) -> sqlite3.Connection:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        conn = sqlite3.connect(
            self.path, timeout=self._timeout, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._timeout * 1000)}")
            version = self._check_ours(conn)
            fs = network_filesystem(self.directory)
            if fs:
                log.warning(
                    "lmms-cache: %s is on a network file system (%s); SQLite's WAL mode is "
                    "unsafe there, so the cache uses a rollback journal. Several machines "
                    "writing one file can still corrupt it: give each node a local cache "
                    "directory, or share one through a server.",
                    self.directory, fs,
                )
                journal = "DELETE"
            else:
                journal = "WAL"
            if version == 0:
                # Only an empty file takes auto_vacuum, and only before the journal mode
                # writes the header; it lets compact() return freed pages without rewriting
                # the file. (On any other file setting it writes a page: not on every open.)
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            self._set_journal_mode(conn, journal)  # a read when the file has it already
            conn.execute(f"PRAGMA synchronous = {'FULL' if self._durable else 'NORMAL'}")  # per connection
            if version < SCHEMA_VERSION:
                self._create_schema(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _set_journal_mode(self, conn: sqlite3.Connection, journal: str) -> None:
        # Changing the journal mode needs an exclusive lock and SQLite reports "database is
        # locked" at once instead of calling the busy handler: this happens when several
        # processes (the ranks of one node) create the cache together. Retry until timeout.
        deadline = time.monotonic() + self._timeout
        delay = 0.001
        while True:
            try:
                if conn.execute("PRAGMA journal_mode").fetchone()[0].upper() != journal:
                    conn.execute(f"PRAGMA journal_mode = {journal}")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _open_readonly(self) -> sqlite3.Connection:
        if not os.path.exists(self.path):
            raise StoreError(f"no cache at {self.path} (read-only mode does not create one)")
        uri = "file:" + self.path.replace("?", "%3f").replace("#", "%23")
        try:
            return self._connect_checked(uri + "?mode=ro")
        except sqlite3.OperationalError as exc:
            # On read-only media SQLite cannot create the WAL index it needs even to read
            # ("unable to open database file"); nobody can be writing there, so immutable is
            # exact. Any other error (a writer holding the lock) must not be read around.
            if not any(m in str(exc) for m in ("unable to open", "readonly")):
                raise
            return self._connect_checked(uri + "?immutable=1")

    def _connect_checked(self, uri: str) -> sqlite3.Connection:
        conn = sqlite3.connect(uri, uri=True, timeout=self._timeout, isolation_level=None,
                               check_same_thread=False)
        try:
            self._check_ours(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _check_owner(self) -> None:
        """Values are pickles, and loading a pickle runs code: a cache written by another
        user is refused unless the caller trusts it."""
        try:
            owner = os.stat(self.path).st_uid
        except OSError:
            return
        if owner != os.geteuid() and not self._trust:
            raise StoreError(
                f"{self.path} belongs to another user (uid {owner}); its values are pickles and "
                "loading them would run code that user wrote. Trust it explicitly (trust=True, "
                "or --trust on the command line) to use it."
            )

    def _check_ours(self, conn: sqlite3.Connection) -> int:
        """The file's schema version (0: a new, empty file), after checking it is ours and
        not newer than this code. Reads only."""
        # One read transaction: another process may be creating the schema right now, and
        # its tables must not be seen without its application_id.
        conn.execute("BEGIN")
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        finally:
            with contextlib.suppress(sqlite3.Error):  # keep the error that ended the reads
                conn.execute("ROLLBACK")
        if app_id == 0:
            if tables:
                raise StoreError(
                    f"{self.path} is an SQLite database of another program; not touching it"
                )
        elif app_id != APPLICATION_ID:
            raise StoreError(f"{self.path} is an SQLite database of another program")
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} was written by a newer lmms-cache (schema {version}); upgrade"
            )
        return int(version)

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        """Create the schema of a new file in one transaction, which whoever gets the write
        lock first does (the ranks of a node open together)."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise

    def _set_aside(self, exc: Exception, *, quiet: bool = False) -> str:
        aside = f"{self.path}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
        n = 1
        while os.path.lexists(aside):  # never overwrite the evidence of an earlier damage
            n += 1
            aside = f"{self.path}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
        try:
            os.replace(self.path, aside)
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(self.path + suffix, aside + suffix)
        except OSError as exc2:
            raise StoreError(f"the cache at {self.path} is damaged ({exc}) and cannot be "
                             f"moved aside ({exc2})") from exc
        if not quiet:
            log.warning("lmms-cache: the cache at %s was damaged (%s); it was moved to %s and a "
                        "new one started", self.path, exc, aside)
        return aside

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            if not self.readonly and any(m in str(exc) for m in _CORRUPT):
                # Opening reads only the first page: damage further in shows up here. Set
                # the file aside now, so that one warning is all it costs and later
                # operations work on a fresh cache.
                aside = self._recover(exc)
                raise StoreError(f"{what} failed: the cache at {self.path} was damaged ({exc}); "
                                 f"it was moved to {aside} and a new one started") from exc
            raise StoreError(f"{what} failed on {self.path}: {exc}") from exc
        except OSError as exc:
            raise StoreError(f"{what} failed on {self.path}: {exc}") from exc

    def _recover(self, exc: Exception) -> str:
        if self._conn_obj is not None and self._conn_pid == os.getpid():
            with contextlib.suppress(sqlite3.Error):
                self._conn_obj.close()
        self._conn_obj = None
        try:
            aside = self._set_aside(exc, quiet=True)
            self._connect()
        except StoreError as exc2:
            return f"nowhere ({exc2})"
        return aside

    @contextlib.contextmanager
    def _transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        if self.readonly:
            raise StoreError(f"{self.path} is open read-only")
        with self._lock, self._errors(what):
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise

    # -- the interface ------------------------------------------------------------------

    def get_many(self, keys: Sequence[bytes], *, created_after: float | None = None) -> dict[bytes, bytes]:
        found: dict[bytes, bytes] = {}
        fresh = "" if created_after is None else f" AND created_at >= {float(created_after)!r}"
        with self._lock, self._errors("reading"):
            conn = self._conn()
            for start in range(0, len(keys), _LOOKUP_CHUNK):
                chunk = keys[start : start + _LOOKUP_CHUNK]
                marks = ",".join("?" * len(chunk))
                found.update(
                    conn.execute(f"SELECT key, value FROM entries WHERE key IN ({marks}){fresh}", chunk)
                )
        return found

    def put_many(self, entries: Sequence[Entry], *, replace: bool = True) -> int:
        if not entries:
            return 0
        now = time.time()
        rows = [
            (e.key, e.value, e.model, e.method, e.task, e.split, e.doc_id, e.created_at or now,
             e.model_seconds, e.raw_size, e.components, e.hits, e.used_at or e.created_at or now,
             e.prompt, len(e.value))
            for e in entries
        ]  # fmt: skip
        conflict = (
            "DO UPDATE SET value = excluded.value, model = excluded.model, method = excluded.method, "
            "task = excluded.task, split = excluded.split, doc_id = excluded.doc_id, "
            "created_at = excluded.created_at, size = excluded.size, raw_size = excluded.raw_size, "
            "model_seconds = excluded.model_seconds, components = excluded.components, "
            "used_at = excluded.used_at, prompt = excluded.prompt"
            if replace else "DO NOTHING"
        )  # fmt: skip
        count = "SELECT entries FROM totals WHERE id = 0"
        with self._transaction("writing") as conn:
            before = conn.execute(count).fetchone()[0] if not replace else 0
            conn.executemany(
                f"INSERT INTO entries ({_COLUMNS}, size) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
                f"ON CONFLICT (key) {conflict}",
                rows,
            )
            return len(rows) if replace else int(conn.execute(count).fetchone()[0] - before)

    def touch(self, hits: Mapping[bytes, int], when: float) -> None:
        if not hits or self.readonly:
            return
        with self._transaction("recording hits") as conn:
            conn.executemany(
                "UPDATE entries SET hits = hits + ?, used_at = max(used_at, ?) WHERE key = ?",
                [(n, when, k) for k, n in hits.items()],
            )

    def get(self, key: bytes) -> Entry | None:
        with self._lock, self._errors("reading"):
            row = self._conn().execute(f"SELECT {_COLUMNS} FROM entries WHERE key = ?", (key,)).fetchone()
        return Entry(*row) if row else None

    def delete(self, keys: Sequence[bytes]) -> int:
        removed = 0
        with self._transaction("deleting") as conn:
            for start in range(0, len(keys), _LOOKUP_CHUNK):
                chunk = keys[start : start + _LOOKUP_CHUNK]
                marks = ",".join("?" * len(chunk))
                removed += conn.execute(f"DELETE FROM entries WHERE key IN ({marks})", chunk).rowcount
        return removed

    def delete_where(self, where: Where) -> int:
        clause, params = _where(where)
        with self._transaction("deleting") as conn:
            return int(conn.execute(f"DELETE FROM entries WHERE {clause}", params).rowcount)

    def scan(self, where: Where | None = None, *, values: bool = True, limit: int | None = None,
             recent_first: bool = False) -> Iterator[Entry]:  # fmt: skip
        # In pages, by id or by last use: a cache of many gigabytes is never held in memory.
        clause, params = _where(where or Where())
        columns = _COLUMNS if values else _META_COLUMNS
        if recent_first:
            order, after_clause = "used_at DESC, id DESC", " AND (used_at, id) < (?, ?)"
        else:
            order, after_clause = "id", " AND id > ?"
        last: list[Any] | None = None
        left = limit
        while left is None or left > 0:
            page = _SCAN_PAGE if left is None else min(_SCAN_PAGE, left)
            after = "" if last is None else after_clause
            with self._lock, self._errors("scanning"):
                rows = self._conn().execute(
                    f"SELECT used_at, id, {columns} FROM entries WHERE {clause}{after} "
                    f"ORDER BY {order} LIMIT ?",
                    [*params, *(last or ()), page],
                ).fetchall()
            for row in rows:
                yield Entry(*row[2:])
            if len(rows) < page:
                return
            last = [rows[-1][0], rows[-1][1]] if recent_first else [rows[-1][1]]
            if left is not None:
                left -= len(rows)

    def stats(self) -> dict[str, Any]:
        with self._lock, self._errors("reading statistics"):
            count, size, raw = self._conn().execute(
                "SELECT entries, bytes, raw_bytes FROM totals WHERE id = 0"
            ).fetchone()
        on_disk = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                on_disk += os.path.getsize(self.path + suffix)
        return {"location": self.path, "entries": count, "bytes": size, "raw_bytes": raw,
                "file_bytes": on_disk}  # fmt: skip

    def summary(self) -> dict[str, Any]:
        out = self.stats()
        grouped = (
            "SELECT {col}, count(*), sum(size), sum(raw_size), sum(hits), sum(hits * model_seconds), "
            "sum(model_seconds) FROM entries GROUP BY {col} ORDER BY sum(size) DESC"
        )
        names = ("entries", "bytes", "raw_bytes", "hits", "seconds_saved", "model_seconds")
        with self._lock, self._errors("reading statistics"):
            conn = self._conn()
            for col, label in (("model", "by_model"), ("task", "by_task")):
                out[label] = [
                    {col: row[0], **dict(zip(names, row[1:], strict=True))}
                    for row in conn.execute(grouped.format(col=col))
                ]
            hits, saved = conn.execute("SELECT coalesce(sum(hits), 0), coalesce(sum(hits * model_seconds), 0) "
                                       "FROM entries").fetchone()  # fmt: skip
        out["hits"] = hits
        out["seconds_saved"] = saved
        return out

    def evict(self, max_bytes: int) -> tuple[int, int]:
        removed = freed = 0
        with self._transaction("evicting") as conn:
            total = conn.execute("SELECT bytes FROM totals WHERE id = 0").fetchone()[0]
            while total > max_bytes:
                rows = conn.execute(
                    "SELECT id, size FROM entries ORDER BY used_at, id LIMIT ?", (_EVICT_PAGE,)
                ).fetchall()
                if not rows:
                    break
                doomed = []
                for row_id, size in rows:
                    if total <= max_bytes:
                        break
                    doomed.append(row_id)
                    total -= size
                    freed += size
                marks = ",".join("?" * len(doomed))
                removed += conn.execute(f"DELETE FROM entries WHERE id IN ({marks})", doomed).rowcount
        return removed, freed

    def similar(self, method: str, *, task: str | None, doc_id: str | None, prompt: str | None,
                limit: int = 50) -> list[Entry]:  # fmt: skip
        clauses = []
        params: list[Any] = [method]
        if task is not None and doc_id is not None:
            clauses.append("(task = ? AND doc_id = ?)")
            params += [task, doc_id]
        if prompt is not None:
            clauses.append("prompt = ?")
            params.append(prompt)
        if not clauses:
            return []
        with self._lock, self._errors("reading"):
            rows = self._conn().execute(
                f"SELECT {_META_COLUMNS} FROM entries WHERE method = ? AND ({' OR '.join(clauses)}) "
                "ORDER BY used_at DESC LIMIT ?", [*params, limit],
            ).fetchall()  # fmt: skip
        return [Entry(*row) for row in rows]

    def compact(self) -> None:
        with self._lock, self._errors("compacting"):
            conn = self._conn()
            conn.executescript("PRAGMA incremental_vacuum;")  # exec steps it to the end; execute() frees one page
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def models(self) -> dict[str, str]:
        with self._lock, self._errors("reading models"):
            return dict(self._conn().execute("SELECT digest, description FROM models"))

    def file_digest(self, path: str, signature: tuple[int, ...]) -> bytes | None:
        with self._lock, self._errors("reading a file digest"):
            row = self._conn().execute(
                "SELECT digest FROM files WHERE path = ? AND signature = ?",
                (path, _signature(signature)),
            ).fetchone()
        return row[0] if row else None

    def remember_files(self, rows: Sequence[tuple[str, tuple[int, ...], bytes]]) -> None:
        if not rows or self.readonly:
            return
        with self._transaction("remembering file digests") as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO files (path, signature, digest) VALUES (?, ?, ?)",
                [(p, _signature(s), d) for p, s, d in rows],
            )

    def remember_model(self, digest: str, description: str) -> None:
        if self.readonly:
            return
        with self._transaction("recording the model identity") as conn:
            conn.execute(
                "INSERT OR IGNORE INTO models (digest, description, first_seen) VALUES (?, ?, ?)",
                (digest, description, time.time()),
            )

    def close(self) -> None:
        with self._lock:
            if self._conn_obj is not None:
                if self._conn_pid == os.getpid():
                    with contextlib.suppress(sqlite3.Error):
                        self._conn_obj.close()
                else:  # inherited through fork(): must not be closed here, not even by GC
                    _INHERITED.append(self._conn_obj)
            self._conn_obj = None

    def __getstate__(self) -> dict[str, Any]:
        return {"directory": self.directory, "readonly": self.readonly, "durable": self._durable,
                "timeout": self._timeout, "filename": self._filename, "trust": self._trust}  # fmt: skip

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state.pop("directory"), **state)  # type: ignore[misc]


def _where(where: Where) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if where.models is not None:
        clauses.append(f"model IN ({','.join('?' * len(where.models))})" if where.models else "0")
        params.extend(where.models)
    for column, value in (("task", where.task), ("method", where.method), ("doc_id", where.doc_id)):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    if where.created_before is not None:
        clauses.append("created_at < ?")
        params.append(where.created_before)
    return " AND ".join(clauses) or "1", params


def _signature(signature: tuple[int, ...]) -> str:
    return ":".join(map(str, signature))
