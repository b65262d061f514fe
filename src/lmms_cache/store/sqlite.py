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
  WAL. Only a new file is set up, and a schema-1 file upgraded, each in one transaction.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import pwd
import re
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

from .base import LEGACY_KEY_SCHEMA, Entry, Store, Stored, StoreError, Where, doc_id_forms, storable_doc_id

__all__ = ["SQLiteStore", "network_filesystem", "salvage"]

log = logging.getLogger("lmms_cache")

FILENAME = "cache.db"
SCHEMA_VERSION = 2
APPLICATION_ID = 0x4C4D4331  # "LMC1": tells our file from any other SQLite database
_LOOKUP_CHUNK = 900  # bound parameters per SELECT ... IN (...)
_DIGEST = 16  # bytes of one row digest in row_digests
_SCAN_PAGE = 256  # rows per query of scan()
_EVICT_PAGE = 1000  # least recently used rows looked at per eviction query
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_TRUST_HINT = "use a directory of your own, or pass trust=True (--trust) if you trust the other users"
_REOPEN_EVERY = 10.0  # seconds between attempts of a degraded store to open for writing
_FULL_BELOW = 1 << 20  # free bytes under which a failing write is put down to a full disk
_BEGIN_STEP_MS = 50  # SQLite's busy wait per attempt of BEGIN IMMEDIATE (see _begin)

_NETWORK_FS = frozenset(
    {
        "nfs", "nfs3", "nfs4", "cifs", "smbfs", "smb2", "smb3", "lustre", "gpfs", "beegfs",
        "ceph", "fuse.ceph", "panfs", "pvfs2", "orangefs", "fuse.sshfs", "fuse.rclone",
        "fuse.s3fs", "fuse.goofys", "fuse.gcsfuse", "afs", "9p", "glusterfs", "fuse.glusterfs",
        "wekafs", "fuse.juicefs",
    }
)  # fmt: skip

# The memo tables: derived digests that let a hit skip decoding media (schema 2).
_ROW_DIGESTS = """CREATE TABLE IF NOT EXISTS row_digests (
        dataset TEXT,
        split TEXT,
        count INTEGER,
        digests BLOB,
        PRIMARY KEY (dataset, split)
    )"""
_DERIVED = """CREATE TABLE IF NOT EXISTS derived (
        function BLOB,
        row BLOB,
        digest BLOB NOT NULL,
        deps BLOB,
        PRIMARY KEY (function, row)
    ) WITHOUT ROWID"""

# One statement per item (the triggers contain semicolons). ``doc_id`` has no declared type,
# hence no affinity: an int stays an INTEGER and a str TEXT. The columns after ``prompt``
# came with schema 2, in the order and form that upgrading a schema-1 file gives them
# (ALTER TABLE ADD COLUMN appends, and a NOT NULL column needs a default): a new file and
# an upgraded one have the same table.
_SCHEMA = (
    f"""CREATE TABLE IF NOT EXISTS entries (
        id INTEGER PRIMARY KEY,
        key BLOB NOT NULL UNIQUE,
        value BLOB NOT NULL,
        model TEXT NOT NULL,
        method TEXT NOT NULL,
        task TEXT,
        split TEXT,
        doc_id,
        created_at REAL NOT NULL,
        size INTEGER NOT NULL,
        raw_size INTEGER NOT NULL DEFAULT 0,
        model_seconds REAL NOT NULL DEFAULT 0,
        hits INTEGER NOT NULL DEFAULT 0,
        used_at REAL NOT NULL,
        components TEXT,
        prompt TEXT,
        key_schema TEXT NOT NULL DEFAULT '{LEGACY_KEY_SCHEMA}',
        deps BLOB,
        origin TEXT,
        signature BLOB
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
    _ROW_DIGESTS,
    _DERIVED,
)

# Schema 1 -> 2, in one transaction with the retyping of doc_id (_retype_doc_id) and the new
# user_version. Each statement changes the schema only: no row is rewritten (old rows read
# key_schema's default and NULL for the others), so it takes milliseconds on any size.
_UPGRADE_FROM_1 = (
    f"ALTER TABLE entries ADD COLUMN key_schema TEXT NOT NULL DEFAULT '{LEGACY_KEY_SCHEMA}'",
    "ALTER TABLE entries ADD COLUMN deps BLOB",
    "ALTER TABLE entries ADD COLUMN origin TEXT",
    "ALTER TABLE entries ADD COLUMN signature BLOB",
    _ROW_DIGESTS,
    _DERIVED,
)
_V1_DOC_ID = "doc_id TEXT,"
# Two tiers: keys written here that the shared store (``target``, its location without a
# password) has not acknowledged. Created on first use, in the transaction that first queues.
_OUTBOX = """CREATE TABLE IF NOT EXISTS outbox (
        target TEXT NOT NULL,
        key BLOB NOT NULL,
        queued_at REAL NOT NULL,
        PRIMARY KEY (target, key)
    ) WITHOUT ROWID"""  # how schema 1 declared it (the one occurrence in its entries table)


class _Columns(NamedTuple):
    """The SQL that reads entries, for the schema of the open file: a schema-1 file opened
    read-only has no schema-2 columns, and reads as schema 2 with their defaults."""

    entry: str  # every Entry field, in order
    meta: str  # the same with an empty value
    stored: str  # key and the Stored fields
    key_schema: str  # an entry's key schema
    memo: bool  # the memo tables exist


def _columns(extra: tuple[str, str, str, str], memo: bool) -> _Columns:
    base = ("key, value, model, method, task, split, doc_id, created_at, model_seconds, raw_size, "
            "components, hits, used_at, prompt")  # fmt: skip
    entry = f"{base}, {', '.join(extra)}"
    return _Columns(entry, entry.replace("value,", "x'',", 1), f"key, value, {', '.join(extra[1:])}",
                    extra[0], memo)  # fmt: skip


_V2 = _columns(("key_schema", "deps", "origin", "signature"), memo=True)
_V1 = _columns((f"'{LEGACY_KEY_SCHEMA}'", "NULL", "NULL", "NULL"), memo=False)
_COLUMNS = _V2.entry

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
    """Responses in ``<directory>/cache.db``, with the local memos (:class:`~.base.Memos`)
    and the outbox of two tiers.

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
        self.origins_proven = True  # the directory is the user's alone (see _check_location)
        self._filename = filename
        self._trust = trust
        self._durable = durable
        self._timeout = timeout
        self._lock = threading.RLock()
        self._conn_pid: int | None = None
        self._conn_obj: sqlite3.Connection | None = None
        self._cols = _V2
        self.degraded: str | None = None  # why a store opened for writing only reads for now
        self._retry_at = 0.0  # when (monotonic) a degraded store next tries to open for writing
        self._immutable: tuple[Any, ...] | None = None  # the files' stat when read without locks
        self._creating = False  # opening got as far as creating or upgrading the schema
        self._inode: int | None = None  # the database file the connection opened
        self._connect()

    # -- connection ---------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._conn_pid != os.getpid() or self._conn_obj is None:
            if self._conn_obj is not None:
                _INHERITED.append(self._conn_obj)
                self._conn_obj = None
            self._connect()
        else:
            if self.degraded is not None or self._immutable is not None:
                self._refresh()
            if self._cols is not _V2 and self._conn_obj is not None:
                self._follow_upgrade(self._conn_obj)
        assert self._conn_obj is not None
        return self._conn_obj

    def _refresh(self) -> None:
        """A degraded store tries to open for writing again, at most every ``_REOPEN_EVERY``
        seconds; a connection reading without locks (``immutable``) is replaced as soon as
        the files change: its reads are exact only while nobody writes."""
        if self.degraded is not None and time.monotonic() >= self._retry_at:
            self._retry_at = time.monotonic() + _REOPEN_EVERY
            try:
                self._check_location()
                conn, version = self._open_readwrite()
            except (sqlite3.Error, OSError, StoreError):
                pass
            else:
                if self._conn_obj is not None:
                    self._discard(self._conn_obj)
                self._conn_obj, self._conn_pid = conn, os.getpid()
                self._cols, self.degraded, self._immutable = _V1 if version == 1 else _V2, None, None
                log.info("lmms-cache: the cache at %s can be written again", self.path)
                return
        if self._immutable is not None and self._immutable != _file_state(self.path):
            if self._conn_obj is not None:
                self._discard(self._conn_obj)
            self._connect()

    def _connect(self) -> None:
        if not self.readonly:
            try:
                os.makedirs(self.directory, mode=0o700, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create the cache at {self.directory}: {exc}") from exc
        self._check_location()
        self._check_wal()
        self._immutable = None
        try:
            conn, version = self._open_readonly() if self.readonly else self._open_writable()
        except sqlite3.DatabaseError as exc:
            if self.readonly or not any(m in str(exc) for m in _CORRUPT):
                raise StoreError(f"cannot open the cache at {self.path}: {exc}") from exc
            aside = self._set_aside(exc)
            try:
                conn, version = self._open_readwrite()
            except sqlite3.Error as exc2:
                raise StoreError(f"cannot open the cache at {self.path}: {exc2}") from exc2
            self._adopt(conn, version)
            log.warning("lmms-cache: the cache at %s was damaged (%s); it was moved to %s and a new one "
                        "started: %s", self.path, exc, aside, self._salvage(aside))  # fmt: skip
            return
        except OSError as exc:
            raise StoreError(f"cannot create the cache at {self.directory}: {exc}") from exc
        self._adopt(conn, version)

    def _adopt(self, conn: sqlite3.Connection, version: int) -> None:
        self._cols = _V1 if version == 1 else _V2
        self._conn_obj = conn
        self._conn_pid = os.getpid()
        self._inode = _inode(self.path)

    def _salvage(self, aside: str) -> str:
        """Copy what reads and verifies of the file set aside into this (fresh) cache; says
        how many entries were kept and lost."""
        try:
            counts = salvage(aside, self)
        except StoreError as exc:
            return f"none of its entries could be read ({exc})"
        text = f"{counts['kept']} entries were kept, {counts['lost']} lost"
        if counts.get("unsaved"):
            text += (f" ({counts['unsaved']} could not be written here; `lmms-cache recover {aside}` "
                     "copies them once there is room)")  # fmt: skip
        return text

    def _open_writable(self) -> tuple[sqlite3.Connection, int]:
        """Open for writing; where that cannot be done (a full disk leaves no room for the
        WAL index, a read-only mount or directory), open the existing file to read instead:
        ``degraded`` says why, and :meth:`_refresh` tries writing again later."""
        self._creating = False
        try:
            opened = self._open_readwrite()
        except (sqlite3.OperationalError, OSError) as exc:
            # Not when creating or upgrading the schema failed: that raises, as it was.
            if self._creating or not _unwritable(exc) or not os.path.isfile(self.path):
                raise
            conn, version = opened = self._open_readonly()
            if version == 0:  # an empty file: nothing to read
                conn.close()
                raise exc from None
            self.degraded = self._why_unwritable(exc)
            self._retry_at = time.monotonic() + _REOPEN_EVERY
            return opened
        self.degraded = None
        return opened

    def _why_unwritable(self, exc: BaseException) -> str:
        why = str(exc)
        with contextlib.suppress(OSError):
            fs = os.statvfs(self.directory)
            if fs.f_flag & os.ST_RDONLY:
                why = "it is on a read-only file system"
            elif fs.f_bavail * fs.f_frsize < _FULL_BELOW:
                why = f"the disk is full: {exc}"
            elif not os.access(self.directory, os.W_OK) or not os.access(self.path, os.W_OK):
                why = f"you cannot write to it: {exc}"
        text = f"the cache at {self.path} cannot be written ({why}), so it is opened read-only"
        wal = self.path + "-wal"
        if self._immutable is not None and os.path.isfile(wal) and os.path.getsize(wal) > 0:
            text += f", without the newest entries, which are in {wal} and need it writable"
        return text

    def _open_readwrite(self) -> tuple[sqlite3.Connection, int]:
        with contextlib.suppress(FileExistsError):  # (O_EXCL never follows a link)
            os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | _NOFOLLOW, 0o600))
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
                self._creating = True
                self._create_schema(conn)
        except BaseException:
            conn.close()
            raise
        return conn, SCHEMA_VERSION

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

    def _open_readonly(self) -> tuple[sqlite3.Connection, int]:
        if not os.path.exists(self.path):
            raise StoreError(f"no cache at {self.path} (read-only mode does not create one)")
        uri = "file:" + self.path.replace("?", "%3f").replace("#", "%23")
        try:
            return self._connect_checked(uri + "?mode=ro")
        except sqlite3.OperationalError as exc:
            # On read-only media SQLite cannot create the WAL index it needs even to read
            # ("unable to open database file"); nobody can be writing there, so immutable is
            # exact. Any other error (a writer holding the lock) must not be read around.
            # A full disk answers "disk I/O error" (no room for the 32 KB WAL index). Reading
            # without locks is exact only while nobody writes: _refresh watches the files.
            if not any(m in str(exc) for m in ("unable to open", "readonly", "disk I/O error", "disk is full")):
                raise
            opened = self._connect_checked(uri + "?immutable=1")
            self._immutable = _file_state(self.path)
            return opened

    def _connect_checked(self, uri: str) -> tuple[sqlite3.Connection, int]:
        conn = sqlite3.connect(uri, uri=True, timeout=self._timeout, isolation_level=None,
                               check_same_thread=False)
        try:
            version = self._check_ours(conn)
        except BaseException:
            conn.close()
            raise
        return conn, version

    def _check_location(self) -> None:
        """Refuse a place where another user could plant or swap files that we would then
        write through or load (values are pickles, and loading a pickle runs code).

        The directory must be the user's (or root's) and writable by nobody else, unless
        ``trust``: a read-only open also accepts a sticky directory such as /tmp, where
        nobody can replace a file of ours. A symbolic link at the database, ``-wal`` or
        ``-shm`` path is refused even when trusted; a file of another user unless trusted.
        Files of ours with a wider mode than 0600 are narrowed to it.
        """
        me = os.geteuid()
        try:
            link = os.lstat(self.directory)
            st = os.stat(self.directory)
        except FileNotFoundError:
            return  # read-only: there is no cache to open (said by the open)
        except OSError as exc:
            raise StoreError(f"cannot use the cache directory {self.directory}: {exc}") from exc
        trust = self._trust
        if stat.S_ISLNK(link.st_mode) and link.st_uid not in (me, 0) and not trust:
            raise StoreError(f"the cache directory {self.directory} is a symbolic link made by another user (uid "
                             f"{link.st_uid}); {_TRUST_HINT}")  # fmt: skip
        if not trust and st.st_uid not in (me, 0):
            raise StoreError(f"the cache directory {self.directory} belongs to another user (uid {st.st_uid}): "
                             f"files they plant or swap there would be used as yours; {_TRUST_HINT}")  # fmt: skip
        others_write = st.st_mode & 0o002 or (st.st_mode & 0o020 and not _private_group(st.st_gid))
        if others_write and not trust and not (self.readonly and st.st_mode & stat.S_ISVTX):
            raise StoreError(f"the cache directory {self.directory} is writable by other users (mode "
                             f"{stat.S_IMODE(st.st_mode):o}): they could plant or swap files in it. Make it yours "
                             f"alone (chmod go-w {self.directory}), or {_TRUST_HINT}")  # fmt: skip
        for suffix in ("", "-wal", "-shm"):
            path = self.path + suffix
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StoreError(f"cannot use the cache file {path}: {exc}") from exc
            if stat.S_ISLNK(st.st_mode):
                raise StoreError(f"{path} is a symbolic link; the cache never writes through one (another user "
                                 "may have planted it to make you overwrite a file). Remove it to use this cache.")  # fmt: skip
            if not stat.S_ISREG(st.st_mode):
                raise StoreError(f"{path} is not a regular file; not touching it")
            if st.st_uid != me and not trust:
                raise StoreError(
                    f"{path} belongs to another user (uid {st.st_uid}); its values are pickles and "
                    "loading them would run code that user wrote. Trust it explicitly (trust=True, "
                    "or --trust on the command line) to use it."
                )
            if st.st_uid == me and stat.S_IMODE(st.st_mode) & 0o077:
                _narrow(path)

    def _check_wal(self) -> None:
        """Refuse a ``-wal`` older than the database beside it (a backup's, put back): SQLite
        would replay it over the newer file and roll the cache back without a word.

        Told only where it is cheap and sure: with no ``-shm`` (no connection has the files
        open, so nobody is replaying it now), from the WAL's frame headers: its last
        transaction leaves the database smaller than the file already is. Nothing is
        changed; opening fails, and the message says what to do."""
        wal = self.path + "-wal"
        try:
            if os.path.getsize(wal) <= _WAL_HEADER or os.path.lexists(self.path + "-shm"):
                return
            pages_after = _wal_last_commit(wal)
            page_size = _page_size(self.path)
            pages = os.path.getsize(self.path) // page_size if page_size else 0
        except OSError:
            return
        if pages_after and pages_after < pages:
            raise StoreError(
                f"{wal} is older than {self.path} beside it (its last transaction leaves the database at "
                f"{pages_after} pages; the file has {pages}): were the files copied or restored separately? "
                "Replaying it would roll the cache back, so the cache is not used. If cache.db is the newer "
                "copy, move cache.db-wal away; if the -wal belongs with an older cache.db, put that one back."
            )

    def _check_ours(self, conn: sqlite3.Connection) -> int:
        """The file's schema version (0: a new, empty file), after checking it is ours and
        not newer than this code. Reads only."""
        # One read transaction: another process may be creating the schema right now, and
        # its tables must not be seen without its application_id.
        try:
            conn.execute("BEGIN")
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        finally:
            _rollback(conn)  # (on failure the caller closes the connection anyway)
        if app_id == 0:
            if tables:
                raise StoreError(
                    f"{self.path} is an SQLite database of another program; not touching it"
                )
        elif app_id != APPLICATION_ID:
            raise StoreError(f"{self.path} is an SQLite database of another program")
        self._check_version(version)
        return int(version)

    def _check_version(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} was written by a newer lmms-cache (schema {version}); upgrade"
            )

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        """Create the schema of a new file, or upgrade an older one: in one transaction,
        which whoever gets the write lock first does (the ranks of a node open together)."""
        version = None
        try:  # BEGIN included: the caller closes a connection this leaves in a transaction
            conn.execute("BEGIN IMMEDIATE")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            self._check_version(version)
            if version == 0:
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            elif version == 1:
                self._upgrade_from_1(conn)
            if version < SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException as exc:
            _rollback(conn)  # (a connection left in a transaction is closed by the caller)
            if version == 1 and isinstance(exc, sqlite3.Error) and not any(m in str(exc) for m in _CORRUPT):
                raise StoreError(f"cannot upgrade the cache at {self.path} from schema 1 to {SCHEMA_VERSION} "
                                 f"(it is left as it was): {exc}") from exc  # fmt: skip
            raise  # damage is set aside by _connect, as at any open
        if version == 1:
            log.info("lmms-cache: upgraded the cache at %s to schema %d", self.path, SCHEMA_VERSION)

    def _upgrade_from_1(self, conn: sqlite3.Connection) -> None:
        for statement in _UPGRADE_FROM_1:
            conn.execute(statement)
        self._retype_doc_id(conn)

    def _retype_doc_id(self, conn: sqlite3.Connection) -> None:
        """Declare doc_id without a type, as schema 2 does: ALTER TABLE cannot change a
        column, and rebuilding the table would rewrite every value (minutes and the file's
        size again in WAL, for a large cache). Instead the table's definition is edited in
        place, by SQLite's documented procedure for schema changes that leave stored content
        valid (https://sqlite.org/lang_altertable.html#otheralter): dropping a column's
        affinity is one, as every stored value stays what it is (schema-1 ids stay text)
        and indexes hold values, not affinities. The new schema_version makes every
        connection, this one included, read the new definition."""
        (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'entries'").fetchone()
        if sql.count(_V1_DOC_ID) != 1:
            raise StoreError(f"{self.path}: unexpected schema-1 table, not upgrading it: {sql}")
        schema_version = conn.execute("PRAGMA schema_version").fetchone()[0]
        conn.execute("PRAGMA writable_schema = ON")
        try:
            conn.execute(
                "UPDATE sqlite_master SET sql = ? WHERE type = 'table' AND name = 'entries'",
                (sql.replace(_V1_DOC_ID, "doc_id,"),),
            )
            conn.execute(f"PRAGMA schema_version = {schema_version + 1}")
        finally:
            conn.execute("PRAGMA writable_schema = OFF")

    def _follow_upgrade(self, conn: sqlite3.Connection) -> None:
        """A schema-1 file open read-only: read it as schema 2 once another process has
        upgraded it (its new entries' deps and signatures must not read as NULL)."""
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version != 1:
            self._check_version(version)
            self._cols = _V2

    def _set_aside(self, exc: Exception) -> str:
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
        return aside

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
            if self._immutable is not None and self._immutable != _file_state(self.path):
                raise StoreError(f"{what} failed: {self.path} changed while it was read without locks")
        except sqlite3.Error as exc:
            if not self.readonly and self.degraded is None and any(m in str(exc) for m in _CORRUPT):
                # Opening reads only the first page: damage further in shows up here. Set
                # the file aside now, keeping what still reads, so that one warning is all it
                # costs and later operations work on a fresh cache.
                raise StoreError(f"{what} failed: {self._recover(exc)}") from exc
            raise StoreError(f"{what} failed on {self.path}: {exc}") from exc
        except OSError as exc:
            raise StoreError(f"{what} failed on {self.path}: {exc}") from exc

    def _recover(self, exc: Exception) -> str:
        """Set the damaged file aside, start a fresh one and salvage into it; what happened."""
        if self._conn_obj is not None:
            self._discard(self._conn_obj)
        try:
            if _inode(self.path) != self._inode:  # another process set it aside already
                self._connect()
                return f"the cache at {self.path} was damaged ({exc}); another process has replaced it"
            aside = self._set_aside(exc)
            self._connect()
        except StoreError as exc2:
            return f"the cache at {self.path} was damaged ({exc}) and could not be replaced ({exc2})"
        return (f"the cache at {self.path} was damaged ({exc}); it was moved to {aside} and a new one "
                f"started: {self._salvage(aside)}")  # fmt: skip

    @contextlib.contextmanager
    def _transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        if self.readonly:
            raise StoreError(f"{self.path} is open read-only")
        with self._lock, self._errors(what):
            conn = self._conn()
            if self.degraded is not None:
                raise StoreError(self.degraded)
            try:  # BEGIN included: an interrupt right after it must not keep the lock
                self._begin(conn)
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if not _rollback(conn):
                    self._discard(conn)  # closing rolls back and releases the locks
                raise

    def _begin(self, conn: sqlite3.Connection) -> None:
        """``BEGIN IMMEDIATE``, waiting for another writer up to the timeout in short steps:
        SQLite's own wait would hold a Ctrl-C until the lock came (or the timeout passed)."""
        deadline = time.monotonic() + self._timeout
        delay = 0.001
        conn.execute(f"PRAGMA busy_timeout = {_BEGIN_STEP_MS}")
        try:
            while True:
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    return
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or time.monotonic() >= deadline:
                        raise
                time.sleep(delay)  # where a Ctrl-C lands: outside any transaction
                delay = min(delay * 2, 0.05)
        finally:
            conn.execute(f"PRAGMA busy_timeout = {int(self._timeout * 1000)}")

    def _discard(self, conn: sqlite3.Connection) -> None:
        """Close a connection that cannot be trusted to be clean; the next use reconnects."""
        if conn is self._conn_obj:
            self._conn_obj = None
        if self._conn_pid == os.getpid():
            with contextlib.suppress(BaseException):
                conn.close()

    # -- the interface ------------------------------------------------------------------

    def get_many(self, keys: Sequence[bytes], *, created_after: float | None = None) -> dict[bytes, Stored]:
        found: dict[bytes, Stored] = {}
        fresh = "" if created_after is None else f" AND created_at >= {float(created_after)!r}"
        new = tuple.__new__  # Stored(...) without the Python-level __new__: the hit path
        with self._lock, self._errors("reading"):
            conn = self._conn()
            select = f"SELECT {self._cols.stored} FROM entries WHERE key IN "
            for start in range(0, len(keys), _LOOKUP_CHUNK):
                chunk = keys[start : start + _LOOKUP_CHUNK]
                marks = ",".join("?" * len(chunk))
                for row in conn.execute(f"{select}({marks}){fresh}", chunk):
                    found[row[0]] = new(Stored, row[1:])
        return found

    def put_many(self, entries: Sequence[Entry], *, replace: bool = True, outbox: str | None = None,
                 sent: Sequence[bytes] = ()) -> int:  # fmt: skip
        """See :meth:`Store.put_many`. Two tiers also keep their outbox here, in the same
        transaction: ``outbox`` queues the entries' keys for the shared store of that
        location, and ``sent`` takes keys the shared store has acknowledged off its queue."""
        if not entries:
            if sent and outbox is not None:
                self.dequeue(outbox, sent)
            return 0
        now = time.time()
        rows = [
            (e.key, e.value, e.model, e.method, e.task, e.split, storable_doc_id(e.doc_id), e.created_at or now,
             e.model_seconds, e.raw_size, e.components, e.hits, e.used_at or e.created_at or now,
             e.prompt, e.key_schema or LEGACY_KEY_SCHEMA, e.deps, e.origin, e.signature, len(e.value))
            for e in entries
        ]  # fmt: skip
        conflict = (
            "DO UPDATE SET value = excluded.value, model = excluded.model, method = excluded.method, "
            "task = excluded.task, split = excluded.split, doc_id = excluded.doc_id, "
            "created_at = excluded.created_at, size = excluded.size, raw_size = excluded.raw_size, "
            "model_seconds = excluded.model_seconds, components = excluded.components, "
            "used_at = excluded.used_at, prompt = excluded.prompt, key_schema = excluded.key_schema, "
            "deps = excluded.deps, origin = excluded.origin, signature = excluded.signature"
            if replace else "DO NOTHING"
        )  # fmt: skip
        count = "SELECT entries FROM totals WHERE id = 0"
        marks = ",".join("?" * len(rows[0]))
        with self._transaction("writing") as conn:
            before = conn.execute(count).fetchone()[0] if not replace else 0
            conn.executemany(
                f"INSERT INTO entries ({_COLUMNS}, size) VALUES ({marks}) ON CONFLICT (key) {conflict}",
                rows,
            )
            if outbox is not None:
                self._queue(conn, outbox, [e.key for e in entries], now, sent)
            return len(rows) if replace else int(conn.execute(count).fetchone()[0] - before)

    # -- the outbox of two tiers: keys written here that the shared store has not received --

    def _queue(self, conn: sqlite3.Connection, target: str, keys: Sequence[bytes], now: float,
               sent: Sequence[bytes]) -> None:  # fmt: skip
        conn.execute(_OUTBOX)  # (created on first use: files without one stay readable by older versions)
        if sent:
            self._unqueue(conn, target, sent)
            done = set(sent)  # (the shared store has these already)
            keys = [k for k in keys if k not in done]
        conn.executemany("INSERT OR REPLACE INTO outbox (target, key, queued_at) VALUES (?, ?, ?)",
                         [(target, k, now) for k in keys])  # fmt: skip

    def _unqueue(self, conn: sqlite3.Connection, target: str, keys: Sequence[bytes]) -> int:
        removed = 0
        for start in range(0, len(keys), _LOOKUP_CHUNK):
            chunk = keys[start : start + _LOOKUP_CHUNK]
            marks = ",".join("?" * len(chunk))
            removed += conn.execute(f"DELETE FROM outbox WHERE target = ? AND key IN ({marks})",
                                    (target, *chunk)).rowcount  # fmt: skip
        return removed

    def _has_outbox(self, conn: sqlite3.Connection) -> bool:
        return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'outbox'").fetchone() is not None

    def dequeue(self, target: str, keys: Sequence[bytes]) -> int:
        """Take ``keys`` off the outbox of ``target``; returns how many were queued."""
        if not keys or self.readonly:
            return 0
        with self._transaction("updating the outbox") as conn:
            return self._unqueue(conn, target, keys) if self._has_outbox(conn) else 0

    def queued(self, target: str, limit: int | None = None) -> list[bytes]:
        """The keys queued for ``target``, oldest first (at most ``limit``)."""
        with self._lock, self._errors("reading the outbox"):
            conn = self._conn()
            if not self._has_outbox(conn):
                return []
            rows = conn.execute("SELECT key FROM outbox WHERE target = ? ORDER BY queued_at, key LIMIT ?",
                                (target, -1 if limit is None else limit)).fetchall()  # fmt: skip
        return [row[0] for row in rows]

    def outboxes(self) -> dict[str, int]:
        """Shared store location -> how many keys wait for it."""
        with self._lock, self._errors("reading the outbox"):
            conn = self._conn()
            if not self._has_outbox(conn):
                return {}
            return dict(conn.execute("SELECT target, count(*) FROM outbox GROUP BY target ORDER BY target"))

    def entries(self, keys: Sequence[bytes], *, values: bool = True) -> list[Entry]:
        found: dict[bytes, Entry] = {}
        with self._lock, self._errors("reading"):
            conn = self._conn()
            columns = self._cols.entry if values else self._cols.meta
            for start in range(0, len(keys), _LOOKUP_CHUNK):
                chunk = keys[start : start + _LOOKUP_CHUNK]
                marks = ",".join("?" * len(chunk))
                for row in conn.execute(f"SELECT {columns} FROM entries WHERE key IN ({marks})", chunk):
                    found[row[0]] = Entry(*row)
        return [found[k] for k in keys if k in found]

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
            conn = self._conn()
            row = conn.execute(f"SELECT {self._cols.entry} FROM entries WHERE key = ?", (key,)).fetchone()
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
        with self._transaction("deleting") as conn:
            clause, params = _where(where, self._cols)
            return int(conn.execute(f"DELETE FROM entries WHERE {clause}", params).rowcount)

    def scan(self, where: Where | None = None, *, values: bool = True, limit: int | None = None,
             recent_first: bool = False) -> Iterator[Entry]:  # fmt: skip
        # In pages, by id or by last use: a cache of many gigabytes is never held in memory.
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
                conn = self._conn()
                clause, params = _where(where or Where(), self._cols)
                columns = self._cols.entry if values else self._cols.meta
                rows = conn.execute(
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
            out["by_schema"] = [
                {"key_schema": schema, "entries": entries, "bytes": size}
                for schema, entries, size in conn.execute(
                    f"SELECT {self._cols.key_schema} AS schema, count(*), sum(size) FROM entries "
                    "GROUP BY schema ORDER BY sum(size) DESC"
                )
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

    def similar(self, method: str, *, task: str | None, doc_id: int | str | None, prompt: str | None,
                limit: int = 50) -> list[Entry]:  # fmt: skip
        clauses = []
        params: list[Any] = [method]
        if task is not None and doc_id is not None:
            forms = doc_id_forms(doc_id)
            clauses.append(f"(task = ? AND doc_id IN ({','.join('?' * len(forms))}))")
            params += [task, *forms]
        if prompt is not None:
            clauses.append("prompt = ?")
            params.append(prompt)
        if not clauses:
            return []
        with self._lock, self._errors("reading"):
            conn = self._conn()
            rows = conn.execute(
                f"SELECT {self._cols.meta} FROM entries WHERE method = ? AND ({' OR '.join(clauses)}) "
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

    def row_digests(self, dataset: str, split: str) -> bytes | None:
        with self._lock, self._errors("reading row digests"):
            conn = self._conn()
            if not self._cols.memo:
                return None
            row = conn.execute(
                "SELECT count, digests FROM row_digests WHERE dataset = ? AND split = ?", (dataset, split)
            ).fetchone()
        if row is None or not isinstance(row[1], bytes) or len(row[1]) != row[0] * _DIGEST:
            return None  # absent, or not what was written: not to be trusted
        return row[1]

    def remember_row_digests(self, dataset: str, split: str, digests: bytes) -> None:
        if len(digests) % _DIGEST:
            raise ValueError(f"row digests are {_DIGEST} bytes each, got {len(digests)} bytes")
        if self.readonly:
            return
        with self._transaction("remembering row digests") as conn:
            conn.execute(
                "INSERT OR REPLACE INTO row_digests (dataset, split, count, digests) VALUES (?, ?, ?, ?)",
                (dataset, split, len(digests) // _DIGEST, bytes(digests)),
            )

    def derived_many(self, function: bytes, rows: Sequence[bytes]) -> dict[bytes, tuple[bytes, bytes | None]]:
        found: dict[bytes, tuple[bytes, bytes | None]] = {}
        with self._lock, self._errors("reading derived digests"):
            conn = self._conn()
            if not self._cols.memo:
                return found
            for start in range(0, len(rows), _LOOKUP_CHUNK):
                chunk = rows[start : start + _LOOKUP_CHUNK]
                marks = ",".join("?" * len(chunk))
                for row, digest, deps in conn.execute(
                    f"SELECT row, digest, deps FROM derived WHERE function = ? AND row IN ({marks})",
                    (function, *chunk),
                ):
                    found[row] = (digest, deps)
        return found

    def remember_derived(self, items: Sequence[tuple[bytes, bytes, bytes, bytes | None]]) -> None:
        if not items or self.readonly:
            return
        with self._transaction("remembering derived digests") as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO derived (function, row, digest, deps) VALUES (?, ?, ?, ?)", items
            )

    def forget_derived(self, function: bytes) -> int:
        with self._transaction("forgetting derived digests") as conn:
            return int(conn.execute("DELETE FROM derived WHERE function = ?", (function,)).rowcount)

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


_SALVAGE_BATCH = 500  # entries per transaction when salvaging
_MAX_ID = 2**63 - 1


def salvage(source: str, target: Store, *, batch: int = _SALVAGE_BATCH) -> dict[str, int]:
    """Copy every entry of the cache file ``source`` that still reads and whose value
    verifies (its checksum) into ``target``; entries already there keep their value. For a
    damaged file set aside (``cache.db.corrupt-*``): ``source`` is only read, never changed.

    Damage is stepped around: row ids are listed in order, skipping any stretch whose pages
    cannot be read, then each row is read (by ranges, row by row where a range fails).
    Returns ``kept`` (read and verified), ``lost`` (known entries that were not) and
    ``total`` (what the file counted, else kept + lost); ``unsaved`` when ``target``
    refused some (a full disk).

    Raises:
        StoreError: ``source`` cannot be read at all (no such file, not an SQLite database
            of ours, its schema unreadable).
    """
    from .. import codec

    existed = {suffix: os.path.lexists(source + suffix) for suffix in ("-wal", "-shm")}
    conn = _open_damaged(source)
    try:
        try:
            columns = {row[1] for row in conn.execute("PRAGMA table_info(entries)")}
            cols = _V2 if "signature" in columns else _V1
            if "key" not in columns:
                raise StoreError(f"{source} holds no cache entries")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{source} cannot be read: {exc}") from exc
        try:
            total: int | None = int(conn.execute("SELECT entries FROM totals WHERE id = 0").fetchone()[0])
        except (sqlite3.DatabaseError, TypeError):
            total = None
        with contextlib.suppress(sqlite3.DatabaseError):
            for digest, description in conn.execute("SELECT digest, description FROM models").fetchall():
                with contextlib.suppress(StoreError):
                    target.remember_model(digest, description)
        kept = bad = unsaved = 0
        good: list[Entry] = []

        def flush() -> None:
            nonlocal unsaved
            if good:
                try:
                    target.put_many(good, replace=False)
                except StoreError:
                    unsaved += len(good)
                good.clear()

        for row in _readable_rows(conn, cols.entry):
            if row is None:
                bad += 1
                continue
            e = Entry(*row)
            if isinstance(e.key, bytes) and len(e.key) == 16 and isinstance(e.value, bytes) and codec.verify(e.value):
                kept += 1
                good.append(e)
                if len(good) >= batch:
                    flush()
            else:
                bad += 1
        flush()
    finally:
        conn.close()
        for suffix, was in existed.items():  # what reading created beside the file
            if not was:
                with contextlib.suppress(OSError):
                    os.remove(source + suffix)
    lost = max(bad, total - kept) if total is not None else bad
    out = {"kept": kept, "lost": lost, "total": kept + lost}
    if unsaved:
        out["unsaved"] = unsaved
    return out


def _open_damaged(path: str) -> sqlite3.Connection:
    if not os.path.isfile(path):
        raise StoreError(f"no such file: {path}")
    uri = "file:" + path.replace("?", "%3f").replace("#", "%23")
    wal = path + "-wal"
    # Without WAL content there is nothing to replay: read it as it is, creating nothing
    # beside it. Otherwise read it with its WAL (immutable only where no index can be made).
    modes = ("?mode=ro", "?immutable=1") if os.path.isfile(wal) and os.path.getsize(wal) else ("?immutable=1",)
    for mode in modes:
        conn = sqlite3.connect(uri + mode, uri=True, timeout=5.0, isolation_level=None, check_same_thread=False)
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            conn.close()
            if mode == "?mode=ro" and any(m in str(exc) for m in ("unable to open", "readonly", "disk I/O error")):
                continue
            raise StoreError(f"{path} cannot be read: {exc}") from exc
        if app_id != APPLICATION_ID:
            conn.close()
            raise StoreError(f"{path} is not an lmms-cache file")
        return conn
    raise AssertionError("unreachable")


def _readable_rows(conn: sqlite3.Connection, columns: str) -> Iterator[tuple[Any, ...] | None]:
    """Each readable row of ``entries`` in id order, None for a row id whose row cannot be read."""
    for chunk in _chunks(_readable_ids(conn), _SCAN_PAGE):
        try:
            rows = conn.execute(f"SELECT {columns} FROM entries WHERE id BETWEEN ? AND ? ORDER BY id",
                                (chunk[0], chunk[-1])).fetchall()  # fmt: skip
            if len(rows) == len(chunk):
                yield from rows
                continue
        except sqlite3.DatabaseError:
            pass
        for row_id in chunk:  # the range failed: row by row
            try:
                yield conn.execute(f"SELECT {columns} FROM entries WHERE id = ?", (row_id,)).fetchone()
            except sqlite3.DatabaseError:
                yield None


def _readable_ids(conn: sqlite3.Connection) -> Iterator[int]:
    """The row ids of ``entries`` in order (the table's leaves only: values are not read),
    stepping over stretches that cannot be read."""
    start = -_MAX_ID - 1
    while True:
        try:
            for (row_id,) in conn.execute("SELECT id FROM entries WHERE id >= ? ORDER BY id", (start,)):
                yield row_id
                if row_id >= _MAX_ID:
                    return
                start = row_id + 1
            return  # read to the end
        except sqlite3.DatabaseError:
            pass
        # The cursor reads a row ahead, so the damage may be a row further on: one at a time.
        try:
            row = conn.execute("SELECT id FROM entries WHERE id >= ? ORDER BY id LIMIT 1", (start,)).fetchone()
        except sqlite3.DatabaseError:
            pass
        else:
            if row is None:
                return
            yield row[0]
            if row[0] >= _MAX_ID:
                return
            start = row[0] + 1
            continue
        # Seeking ``start`` meets the damage: find the smallest start past it that reads
        # (doubling steps, then bisecting back), and go on from there.
        bad, step = start, 1
        while True:
            probe = min(_MAX_ID, bad + step)
            if _reads_from(conn, probe):
                break
            if probe >= _MAX_ID:
                return
            bad, step = probe, step * 2
        good = probe
        while good - bad > 1:
            mid = (bad + good) // 2
            if _reads_from(conn, mid):
                good = mid
            else:
                bad = mid
        start = good


def _reads_from(conn: sqlite3.Connection, start: int) -> bool:
    try:
        conn.execute("SELECT id FROM entries WHERE id >= ? ORDER BY id LIMIT 1", (start,)).fetchall()
        return True
    except sqlite3.DatabaseError:
        return False


def _chunks(items: Iterator[int], size: int) -> Iterator[list[int]]:
    chunk: list[int] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


_WAL_HEADER = 32
_WAL_FRAME_HEADER = 24
_WAL_MAGIC = (0x377F0682, 0x377F0683)


def _wal_last_commit(wal: str) -> int:
    """The database size in pages after the last committed transaction of a WAL file (its
    frames whose salts match the header's), 0 when it holds none. Reads the headers only."""
    with open(wal, "rb") as f:
        header = f.read(_WAL_HEADER)
        if len(header) < _WAL_HEADER or int.from_bytes(header[:4], "big") not in _WAL_MAGIC:
            return 0
        page_size = int.from_bytes(header[8:12], "big")
        salts = header[16:24]
        last = 0
        offset = _WAL_HEADER
        while True:
            f.seek(offset)
            frame = f.read(_WAL_FRAME_HEADER)
            if len(frame) < _WAL_FRAME_HEADER or frame[8:16] != salts:
                return last
            commit = int.from_bytes(frame[4:8], "big")
            if commit:
                last = commit
            offset += _WAL_FRAME_HEADER + page_size


def _page_size(db: str) -> int:
    with open(db, "rb") as f:
        header = f.read(100)
    if len(header) < 100:
        return 0
    size = int.from_bytes(header[16:18], "big")
    return 65536 if size == 1 else size


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _private_group(gid: int) -> bool:
    """Whether group ``gid`` is the user's private group (named like the user, the user's
    primary group, no other listed member): group write there is write by the user alone."""
    try:
        user = pwd.getpwuid(os.geteuid())
        group = grp.getgrgid(gid)
    except (KeyError, OSError):
        return False
    return gid == user.pw_gid and group.gr_name == user.pw_name and set(group.gr_mem) <= {user.pw_name}


def _narrow(path: str) -> None:
    """Make a file of ours 0600 (through a descriptor: never through a link)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW)
    except OSError:
        return
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.fchmod(fd, 0o600)
    except OSError:
        pass  # a read-only file system: nothing to narrow it with
    finally:
        os.close(fd)


_UNWRITABLE_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT})
_UNWRITABLE = ("disk I/O error", "disk is full", "unable to open database file", "readonly database")


def _unwritable(exc: BaseException) -> bool:
    """Whether an error opening for writing says the location cannot be written (rather
    than locked, damaged or foreign)."""
    if isinstance(exc, OSError):
        return exc.errno in _UNWRITABLE_ERRNOS
    return any(m in str(exc) for m in _UNWRITABLE)


def _file_state(path: str) -> tuple[Any, ...]:
    """What changes when anybody writes the database or its WAL: inode, size and mtime."""
    state: list[Any] = []
    for suffix in ("", "-wal"):
        try:
            st = os.stat(path + suffix)
            state.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            state.append(None)
    return tuple(state)


def _rollback(conn: sqlite3.Connection) -> bool:
    """End any transaction ``conn`` is in; whether it is now outside one. Never raises an
    SQLite error: the caller re-raises the error that ended the transaction."""
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        return not conn.in_transaction
    except sqlite3.Error:
        return False


def _where(where: Where, cols: _Columns) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if where.models is not None:
        clauses.append(f"model IN ({','.join('?' * len(where.models))})" if where.models else "0")
        params.extend(where.models)
    for column, value in (("task", where.task), ("method", where.method)):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    if where.doc_id is not None:  # the stored id is an int or text: "17" finds 17 and "17"
        forms = doc_id_forms(where.doc_id)
        clauses.append(f"doc_id IN ({','.join('?' * len(forms))})")
        params.extend(forms)
    if where.created_before is not None:
        clauses.append("created_at < ?")
        params.append(where.created_before)
    if where.key_schema is not None:
        clauses.append(f"{cols.key_schema} = ?")
        params.append(where.key_schema)
    if where.old_schema is not None:
        clauses.append(f"{cols.key_schema} <> ?")
        params.append(where.old_schema)
    return " AND ".join(clauses) or "1", params


def _signature(signature: tuple[int, ...]) -> str:
    return ":".join(map(str, signature))
