"""Managing a cache from Python: what the ``lmms-cache`` command does, as functions.

Every function takes an open :class:`~lmms_cache.store.Store` (see
:func:`~lmms_cache.store.open_store`). Sizes count stored value bytes (compressed as
stored), not the file, which also holds indexes and free pages; :func:`prune` gives
freed pages back to the file system.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from . import codec
from .explain import differences
from .store import Entry, SQLiteStore, Store, StoreError, Where

__all__ = ["Filter", "export", "find", "import_", "label", "preview", "prune", "verify"]

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
    """A function naming a model identity digest for people (its model_id, or class and checkpoint)."""
    names = {}
    for digest, description in store.models().items():
        try:
            d = json.loads(description)
        except ValueError:
            d = {}
        if "model_id" in d:
            names[digest] = str(d["model_id"])
        else:
            cls = str(d.get("class", "?")).rsplit(".", 1)[-1]
            ckpt = [c.get("name_or_path") for c in d.get("checkpoints", ())]
            hint = [v for k, v in d.get("settings", {}).items()
                    if isinstance(v, str) and any(h in k for h in ("pretrained", "model", "checkpoint"))]  # fmt: skip
            names[digest] = f"{cls}({(ckpt + hint)[0]})" if ckpt + hint else cls
    return lambda digest: names.get(digest, digest[:12])


def preview(entry: Entry, width: int = 60) -> str:
    """A one-line preview of an entry's response (decodes the value: trusted caches only)."""
    try:
        value = codec.decode(entry.value)
    except codec.CodecError as exc:
        return f"<unreadable: {exc}>"
    text = getattr(value, "text", value)
    shown = text if isinstance(text, str) else repr(text)
    shown = " ".join(shown.split())
    return shown if len(shown) <= width else shown[: width - 1] + "…"


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


def explain_document(store: Store, task: str, doc_id: str, method: str | None = None) -> list[dict[str, Any]]:
    """The stored entries of one document, most recent first, each with what changed from
    it to the most recent one of the same method (``old → new``, in time order)."""
    out: list[dict[str, Any]] = []
    newest: dict[str, dict[str, Any]] = {}
    for entry in store.scan(Where(task=task, doc_id=doc_id, method=method), values=False, recent_first=True):
        comps = json.loads(entry.components) if entry.components else {}
        base = newest.setdefault(entry.method, comps)
        out.append({"key": entry.key.hex(), "method": entry.method, "model": entry.model,
                    "created_at": entry.created_at,
                    "differs": differences(base, comps) if base is not comps else []})  # fmt: skip
    return out


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
          now: float | None = None) -> tuple[int, int]:  # fmt: skip
    """Delete entries created more than ``older_than`` seconds before ``now`` (default: the
    current time), then the least recently used until the values total at most ``max_size``
    bytes; give the space back. Returns (entries, bytes)."""
    before = store.stats()
    if older_than is not None:
        store.delete_where(Where(created_before=(_clock() if now is None else now) - older_than))
    if max_size is not None:
        store.evict(max_size)
    store.compact()
    after = store.stats()
    return before["entries"] - after["entries"], before["bytes"] - after["bytes"]


def _export_store(path: str) -> SQLiteStore:
    directory, filename = os.path.split(os.path.abspath(path))
    return SQLiteStore(directory, filename=filename)


def export(store: Store, path: str, where: Where | None = None,
           progress: Callable[[int], None] | None = None) -> int:  # fmt: skip
    """Write the entries ``where`` selects (all by default) to a portable file (an SQLite
    cache file of one's own, readable by :func:`import_`). Returns how many."""
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
    finally:
        out.close()
    return written


def import_(store: Store, path: str, *, trust: bool = False,
            progress: Callable[[int], None] | None = None) -> dict[str, int]:  # fmt: skip
    """Merge the entries of an export file into ``store``: an entry whose key is already
    there keeps the existing value and is counted as a conflict; a damaged value is skipped.

    ``trust`` accepts a file owned by another user (its values are pickles).
    Returns counts: ``added``, ``conflicts``, ``damaged``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    directory, filename = os.path.split(os.path.abspath(path))
    source = SQLiteStore(directory, filename=filename, readonly=True, trust=trust)
    counts = {"added": 0, "conflicts": 0, "damaged": 0}
    try:
        for digest, description in source.models().items():
            store.remember_model(digest, description)
        for batch in _batches(source.scan()):
            good = [e for e in batch if codec.verify(e.value)]
            counts["damaged"] += len(batch) - len(good)
            added = store.put_many(good, replace=False)
            counts["added"] += added
            counts["conflicts"] += len(good) - added
            if progress is not None:
                progress(len(batch))
    finally:
        source.close()
    return counts


def _batches(entries: Iterator[Entry]) -> Iterator[list[Entry]]:
    batch: list[Entry] = []
    for entry in entries:
        batch.append(entry)
        if len(batch) >= _EXPORT_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def open_for_cli(path: str | None, *, readonly: bool, trust: bool = False) -> Store:
    """Open a cache for a management command (never creating one where there is none)."""
    from .store import default_location, open_store

    location = path if path is not None else default_location()
    if not os.path.exists(os.path.join(location, "cache.db")):
        raise StoreError(f"no cache at {os.path.join(os.path.abspath(location), 'cache.db')}")
    return open_store(location, readonly=readonly, trust=trust)
