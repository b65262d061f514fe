"""Managing a cache from Python: what the ``lmms-cache`` command does, as functions.

Every function takes an open :class:`~lmms_cache.store.Store`: :func:`opened` opens the
cache at a directory, a database file or a server URL (through
:func:`~lmms_cache.store.open_store`) for a ``with`` block, never creating a local one, and
a read leaves no ``-wal``/``-shm`` files behind. Sizes count stored value bytes
(compressed as stored), not the file, which also holds indexes and free pages;
:func:`prune` gives freed pages back to the file system. Times are Unix times; functions
that compare with the current time take ``now=``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

from . import codec
from . import trust as _trust  # (functions here take a trust= flag)
from .explain import differences
from .key import KEY_SCHEMA
from .store import Entry, SQLiteStore, Store, StoreError, Where, file_of, is_url, open_store
from .store.sqlite import APPLICATION_ID, salvage

__all__ = ["Filter", "NotAnExportError", "check_export", "copy", "count", "description", "export", "find", "import_",
           "jsonable", "label", "location", "opened", "preview", "prune", "push", "recover", "verify"]  # fmt: skip

_EXPORT_BATCH = 500


def _clock() -> float:
    """The current time, as the functions here see it when not given ``now`` (tests set it)."""
    return time.time()


@dataclass
class Filter:
    """What the command line's filters select. ``model`` matches a model identity digest
    prefix or any part of its description (``--model Qwen2.5-VL``)."""

    model: str | None = None
    task: str | None = None
    method: str | None = None
    doc_id: str | None = None
    older_than: float | None = None  # seconds

    def where(self, store: Store, *, now: float | None = None) -> Where:
        """The store filter; ``older_than`` counts back from ``now`` (default: the current time)."""
        models = None
        if self.model is not None:
            models = tuple(
                digest for digest, description in store.models().items()
                if digest.startswith(self.model) or self.model in description
            )  # fmt: skip
        now = _clock() if now is None else now
        created_before = None if self.older_than is None else now - self.older_than
        return Where(models=models, task=self.task, method=self.method, doc_id=self.doc_id,
                     created_before=created_before)  # fmt: skip

    @property
    def empty(self) -> bool:
        return all(v is None for v in (self.model, self.task, self.method, self.doc_id, self.older_than))


def label(store: Store) -> Callable[[str], str]:
    """A function naming a model identity digest for people.

    The name is the description's own ``"label"`` when it has one, else its ``model_id``,
    else its class and checkpoint (``HFLM(/ckpt)``). Identities whose names collide get the
    start of their digest appended (``HFLM(/ckpt)#1a2b3c4d``), so two rows never look alike.
    """
    base = {digest: _label_of(description) for digest, description in store.models().items()}
    taken = collections.Counter(base.values())
    names = {digest: f"{name}#{digest[:8]}" if taken[name] > 1 else name for digest, name in base.items()}
    return lambda digest: names.get(digest, digest[:12])


def _label_of(description: str) -> str:
    try:
        d = json.loads(description)
    except ValueError:
        d = None
    if not isinstance(d, dict):
        return "?"
    if isinstance(d.get("label"), str) and d["label"]:
        return str(d["label"])
    if "model_id" in d:
        return str(d["model_id"])
    cls = str(d.get("class", "?")).rsplit(".", 1)[-1]
    ckpt = [c.get("name_or_path") for c in d.get("checkpoints", ()) if isinstance(c, dict)]
    hint = [v for k, v in (d.get("settings") or {}).items()
            if isinstance(v, str) and any(h in k for h in ("pretrained", "model", "checkpoint"))]  # fmt: skip
    found = [str(c) for c in ckpt + hint if c]
    return f"{cls}({found[0]})" if found else cls


def description(store: Store, digest: str) -> Any:
    """A model identity's description as a JSON value (the text itself if it is not JSON)."""
    text = store.models().get(digest)
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def load(entry: Entry, *, trust_all: bool = False) -> Any:
    """An entry's response. Full pickle only for a value this user wrote on this machine, one
    signed with ``$LMMS_CACHE_SECRET``, or with ``trust_all``; any other loads restricted
    (plain values and known response types), so a crafted file cannot run code here.

    Raises:
        codec.CodecError: damaged, or refused (:class:`codec.UntrustedValueError`).
    """
    return codec.decode(entry.value, trusted=trust_all or trusted(entry))


def trusted(entry: Entry) -> bool:
    """Whether ``entry``'s value may load with full pickle: written here, or validly signed."""
    return _trust.is_local(entry.origin) or (
        entry.signature is not None and _trust.signature_valid(entry.key, entry.value, entry.signature))


def preview(entry: Entry, width: int = 60, *, trust_all: bool = False) -> str:
    """A one-line preview of an entry's response (see :func:`load`)."""
    try:
        value = load(entry, trust_all=trust_all)
    except codec.UntrustedValueError as exc:
        return f"<not loaded: needs {exc.needed}; written elsewhere, unsigned>"
    except codec.CodecError as exc:
        return f"<unreadable: {exc}>"
    text = getattr(value, "text", value)
    shown = text if isinstance(text, str) else repr(text)
    shown = " ".join(shown.split())
    return shown if len(shown) <= width else shown[: width - 1] + "…"


def jsonable(value: Any) -> Any:
    """A response as a JSON value: strings, finite numbers, booleans and None as they are;
    lists and tuples as lists; mappings with string keys as objects; a dataclass (lmms-eval's
    ``GenerationResult``) as an object of its fields; anything else as its ``repr``."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: jsonable(v) for k, v in value.items()}
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in fields(value)}
    return repr(value)


def find(store: Store, key_prefix: str) -> Entry:
    """The one entry whose hex key starts with ``key_prefix``.

    Raises:
        KeyError: no entry, or more than one, matches.
    """
    prefix = key_prefix.lower()
    matches = []
    for entry in store.scan(values=False):
        if entry.key.hex().startswith(prefix):
            matches.append(entry)
            if len(matches) > 1:
                raise KeyError(f"more than one entry starts with {key_prefix!r}; give more characters")
    if not matches:
        raise KeyError(f"no entry starts with {key_prefix!r}")
    whole = store.get(matches[0].key)
    assert whole is not None
    return whole


def count(store: Store, where: Where | None = None) -> int:
    """How many entries ``where`` selects (all by default)."""
    if where is None or where == Where():
        return int(store.stats()["entries"])
    return sum(1 for _ in store.scan(where, values=False))


def explain_document(store: Store, task: str, doc_id: str, method: str | None = None) -> list[dict[str, Any]]:
    """The stored entries of one document, most recent first, each with what changed from
    it to the most recent one of the same method (``old → new``, in time order)."""
    out: list[dict[str, Any]] = []
    newest: dict[str, dict[str, Any]] = {}
    for entry in store.scan(Where(task=task, doc_id=doc_id, method=method), values=False, recent_first=True):
        comps = json.loads(entry.components) if entry.components else {}
        base = newest.setdefault(entry.method, comps)
        out.append({"key": entry.key.hex(), "method": entry.method, "model": entry.model, "task": entry.task,
                    "split": entry.split, "doc_id": entry.doc_id, "created_at": entry.created_at,
                    "used_at": entry.used_at,
                    "differs": differences(base, comps) if base is not comps else []})  # fmt: skip
    return out


def foreign_unsafe(store: Store) -> list[bytes]:
    """Keys of entries written elsewhere, unsigned, whose value names a class or function
    outside the restricted loader's allow-list (found without unpickling): values a hit
    cannot load, which ``import`` refuses without ``--trust``."""
    return [e.key for e in store.scan() if not trusted(e) and codec.verify(e.value) and not codec.is_safe(e.value)]


def verify(store: Store, *, drop: bool = False, progress: Callable[[int], None] | None = None) -> list[bytes]:
    """Keys of entries whose value fails its checksum (nothing is unpickled); ``drop`` deletes them."""
    bad = []
    for entry in store.scan():
        if not codec.verify(entry.value):
            bad.append(entry.key)
        if progress is not None:
            progress(1)
    if drop and bad:
        store.delete(bad)
        store.compact()
    return bad


def prune(store: Store, *, max_size: int | None = None, older_than: float | None = None,
          old_schema: bool = False, now: float | None = None) -> tuple[int, int]:  # fmt: skip
    """Delete entries written under an older key schema (``old_schema``: the proxy never
    hits them), then those created more than ``older_than`` seconds before ``now`` (default:
    the current time), then the least recently used until the values total at most
    ``max_size`` bytes; give the space back. Returns (entries, bytes)."""
    before = store.stats()
    if old_schema:
        store.delete_where(Where(old_schema=KEY_SCHEMA.decode()))
    if older_than is not None:
        store.delete_where(Where(created_before=(_clock() if now is None else now) - older_than))
    if max_size is not None:
        store.evict(max_size)
    store.compact()
    after = store.stats()
    return before["entries"] - after["entries"], before["bytes"] - after["bytes"]


class NotAnExportError(ValueError):
    """A file given to :func:`import_` that is not an lmms-cache export (nor cache)."""


def _export_store(path: str) -> SQLiteStore:
    directory, filename = os.path.split(os.path.abspath(path))
    return SQLiteStore(directory, filename=filename)


def export(store: Store, path: str, where: Where | None = None,
           progress: Callable[[int], None] | None = None) -> int:  # fmt: skip
    """Write the entries ``where`` selects (all by default) to a portable file (an SQLite
    cache file of one's own with a rollback journal: one self-contained file, readable by
    :func:`import_`). Returns how many. A failed export leaves no file behind."""
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists; not overwriting it")
    out = _export_store(path)
    try:
        models = store.models()
        written = 0
        used: set[str] = set()
        for batch in _batches(store.scan(where)):
            out.put_many(batch)
            used.update(e.model for e in batch)
            written += len(batch)
            if progress is not None:
                progress(len(batch))
        for digest in used:
            if digest in models:
                out.remember_model(digest, models[digest])
        out.compact()
        out.close()
        # A WAL file needs -wal and -shm files beside it whenever it is opened, even to read.
        conn = sqlite3.connect(path)
        try:
            conn.execute("PRAGMA journal_mode = DELETE")
        finally:
            conn.close()
    except BaseException:
        out.close()
        for suffix in ("", "-wal", "-shm", "-journal"):
            with contextlib.suppress(OSError):
                os.remove(path + suffix)
        raise
    return written


_SQLITE_MAGIC = b"SQLite format 3\x00"


def check_export(path: str) -> None:
    """Raise :class:`NotAnExportError` unless ``path`` is an lmms-cache SQLite file
    (read from its header: nothing is opened, nothing created beside it)."""
    with open(path, "rb") as f:
        header = f.read(100)
    if not header:
        why = "it is empty"
    elif len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
        why = "it is not an SQLite database"
    elif int.from_bytes(header[68:72], "big") != APPLICATION_ID:
        why = "it is an SQLite database of another program"
    else:
        return
    raise NotAnExportError(f"{path} is not an lmms-cache export ({why})")


def import_(store: Store, path: str, *, trust: bool = False, progress: Callable[[int], None] | None = None,
            now: float | None = None) -> dict[str, int]:  # fmt: skip
    """Merge the entries of an export file into ``store``: an entry whose key is already
    there keeps the existing value and is counted as a conflict; a damaged value is skipped.
    Imported entries start with no hits, last used ``now`` (default: the current time), as
    if just written; their creation time (what ``--older-than`` and expiry read) is kept.

    An imported entry's origin is never the file's (anyone crafting a file can write any):
    with ``trust`` the entries count as yours; a validly signed entry keeps its signature;
    another whose value would need a class outside the restricted loader's allow-list is
    refused (counted in ``refused``), found without unpickling it.

    ``trust`` also accepts a file owned by another user.
    Returns counts: ``added``, ``conflicts``, ``damaged``, ``refused``.

    Raises:
        FileNotFoundError: no such file.
        NotAnExportError: the file is not an lmms-cache export.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    check_export(path)
    with opened(path, readonly=True, trust=trust) as source:
        return _transfer(source, store, None, trust=trust, progress=progress, now=now)


def copy(source: Store, target: Store, where: Where | None = None, *, trust: bool = False,
         progress: Callable[[int], None] | None = None, now: float | None = None) -> dict[str, int]:
    """Copy the entries ``where`` selects (all by default) from ``source`` to ``target``,
    any two locations (a team's server to a laptop's directory, or back): what :func:`import_`
    does with a file. Entries already in ``target`` keep their value (``conflicts``);
    copies start with no hits, last used ``now``; the model descriptions come along.

    Origins, as :func:`import_` treats them: a copy's origin is never the source's claim
    (a cache file may have been crafted, a server is written by many), so every entry
    becomes an import, keeping only a valid signature; one whose value needs classes
    outside the restricted loader's allow-list is refused unless ``trust`` (then it counts
    as the user's). Returns ``added``, ``conflicts``, ``damaged``, ``refused``.
    """
    return _transfer(source, target, where, trust=trust, progress=progress, now=now)


def _transfer(source: Store, target: Store, where: Where | None, *, trust: bool,
              progress: Callable[[int], None] | None, now: float | None) -> dict[str, int]:  # fmt: skip
    now = _clock() if now is None else now
    counts = {"added": 0, "conflicts": 0, "damaged": 0, "refused": 0}
    local = _trust.local_origin()
    models = source.models()
    used: set[str] = set()
    for batch in _batches(source.scan(where)):
        good = []
        for e in batch:
            if not codec.verify(e.value):
                counts["damaged"] += 1
            elif trust:
                good.append(e._replace(hits=0, used_at=now, origin=local))
            elif e.signature is not None and _trust.signature_valid(e.key, e.value, e.signature):
                good.append(e._replace(hits=0, used_at=now, origin=_trust.imported_origin(e.origin)))
            elif codec.is_safe(e.value):
                good.append(e._replace(hits=0, used_at=now, origin=_trust.imported_origin(e.origin),
                                       signature=None))  # fmt: skip
            else:
                counts["refused"] += 1
        for digest in {e.model for e in good} - used:
            if digest in models:
                target.remember_model(digest, models[digest])
                used.add(digest)
        added = target.put_many(good, replace=False) if good else 0
        counts["added"] += added
        counts["conflicts"] += len(good) - added
        if progress is not None:
            progress(len(batch))
    return counts


def push(local: SQLiteStore, shared: Store, *, target: str | None = None, batch: int = _EXPORT_BATCH,
         progress: Callable[[int], None] | None = None) -> dict[str, int]:  # fmt: skip
    """Send what the local cache's outbox holds for ``shared`` (queued by a proxy with a
    shared tier that could not reach it) and take it off the queue. ``target`` names the
    queue (default: ``shared.location``). Returns ``pushed``, ``missing`` (queued entries no
    longer in the local cache, taken off the queue) and ``left`` (still queued).

    Raises:
        StoreError: either store fails (what was sent before stays sent).
    """
    target = shared.location if target is None else target
    counts = {"pushed": 0, "missing": 0, "left": 0}
    while True:
        keys = local.queued(target, batch)
        if not keys:
            break
        entries = local.entries(keys)
        if entries:
            shared.put_many(entries)
        local.dequeue(target, keys)
        counts["pushed"] += len(entries)
        counts["missing"] += len(keys) - len(entries)
        if progress is not None:
            progress(len(keys))
    counts["left"] = local.outboxes().get(target, 0)
    return counts


def recover(store: Store, path: str, *, trust: bool = False) -> dict[str, int]:
    """Copy every entry of a damaged cache file (``cache.db.corrupt-*``, set aside earlier)
    that still reads and whose value verifies into ``store``; existing entries keep their
    value. The file is only read. ``trust`` accepts a file owned by another user.
    Returns counts: ``kept``, ``lost``, ``total`` (and ``unsaved``: refused by ``store``).

    Raises:
        StoreError: no such file, another user's (without ``trust``), the cache itself, or
            nothing of it can be read.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc}") from exc
    if st.st_uid != os.geteuid() and not trust:
        raise StoreError(f"{path} belongs to another user (uid {st.st_uid}); its values are pickles and loading "
                         "them would run code that user wrote. Trust it explicitly (--trust) to recover it.")  # fmt: skip
    with contextlib.suppress(OSError):
        if os.path.samefile(path, store.location):
            raise StoreError(f"{path} is the cache itself; give the damaged file that was set aside")
    return salvage(path, store)


def _batches(entries: Iterator[Entry]) -> Iterator[list[Entry]]:
    batch: list[Entry] = []
    for entry in entries:
        batch.append(entry)
        if len(batch) >= _EXPORT_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def location(path: str | os.PathLike[str] | None) -> tuple[str, str]:
    """(directory, file name) of a local cache given as its directory (holding ``cache.db``)
    or as the database file itself (``runs/cache/cache.db``, an export file); None: the default."""
    return file_of(path)


@contextlib.contextmanager
def opened(path: str | os.PathLike[str] | None, *, readonly: bool, trust: bool = False,
           create: bool = False) -> Iterator[Store]:  # fmt: skip
    """The cache at ``path`` (a directory, a database file, see :func:`location`, or a
    server URL), open for the duration of a ``with``.

    Never creates a local cache unless ``create``. Reading leaves no trace: SQLite creates
    the ``-wal`` and ``-shm`` files of a WAL database even to read it, and a read-only
    connection cannot remove them; when there were none before, they are removed on the
    way out (by a brief read-write open, which SQLite's last connection closes and cleans
    up; a file that another process has open keeps them).

    Raises:
        StoreError: no cache there, or one that cannot be opened (a server that does not answer).
    """
    if is_url(path):
        store = open_store(path, readonly=readonly, trust=trust)
        try:
            yield store
        finally:
            store.close()
        return
    directory, filename = location(path)
    db = os.path.join(directory, filename)
    if not create and not os.path.exists(db):
        raise StoreError(f"no cache at {db}")
    untouched = readonly and not any(os.path.exists(db + s) for s in ("-wal", "-shm"))
    opened_store = None
    try:
        opened_store = open_store(db if os.path.isfile(db) else directory, readonly=readonly, trust=trust)
        yield opened_store
    finally:
        if opened_store is not None:
            opened_store.close()
        if untouched and any(os.path.exists(db + s) for s in ("-wal", "-shm")):
            _tidy(db)


def _tidy(db: str) -> None:
    with contextlib.suppress(sqlite3.Error, OSError):
        conn = sqlite3.connect(db, timeout=1.0)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            conn.close()


def open_for_cli(path: str | None, *, readonly: bool, trust: bool = False) -> Store:
    """Open a cache for a management command (never creating a local one where there is
    none). Prefer :func:`opened`, which also leaves no ``-wal``/``-shm`` files behind a read."""
    return open_store(path, readonly=readonly, trust=trust, create=False)
