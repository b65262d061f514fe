"""The store interfaces, and the null store.

Three users, three interfaces:

* :class:`Backend`: what a response backend must implement for the proxy (get many, put
  many, touch, evict, close);
* :class:`Catalogue`: what management needs (whole entries, scan, stats, summary, delete,
  similar entries, the models);
* :class:`Memos`: file digests and derived media, always in the local SQLite file.

A :class:`Store` is a backend with its catalogue (SQLite, Redis, :class:`NullStore`).
"""

from __future__ import annotations

import operator
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, SupportsIndex

__all__ = ["LEGACY_KEY_SCHEMA", "Backend", "Catalogue", "Entry", "Memos", "NullStore", "Store", "StoreError", "Stored", "Where", "doc_id_forms",
           "storable_doc_id"]

# The key format of every entry written before store schema 2, and of an entry whose writer
# names none (``Entry.key_schema`` None).
LEGACY_KEY_SCHEMA = "lmms-cache/key/1"


class StoreError(Exception):
    """A store that cannot serve a request right now (locked, full, unwritable, damaged).

    The proxy turns it into misses plus one warning; it never reaches the evaluation.
    """


class Entry(NamedTuple):
    """One stored response and what management needs to know about it.

    ``value`` is the encoded envelope (see :mod:`lmms_cache.codec`). A named tuple: every
    miss builds one, and a frozen dataclass costs several times more to construct.

    ``doc_id`` keeps its type (an int stays an int, a str a str); an integer of another type
    (numpy's) is stored as an int, anything else as its ``str()``. ``key_schema`` names the
    key format the key was computed under (None: :data:`LEGACY_KEY_SCHEMA`). ``deps``,
    ``origin`` and ``signature`` are opaque to the store: the proxy's dependencies checked
    on a hit, who wrote the entry, and an HMAC.
    """

    key: bytes
    value: bytes
    model: str
    method: str
    task: str | None = None
    split: str | None = None
    doc_id: int | str | None = None
    created_at: float = 0.0
    model_seconds: float = 0.0
    raw_size: int = 0  # the value's payload before compression (0: not known)
    components: str | None = None  # JSON {key component: hex digest}, for explaining misses
    hits: int = 0
    used_at: float = 0.0  # the last hit, else the creation: what LRU eviction orders by
    prompt: str | None = None  # prompt digest of a request without a document: explains its misses
    key_schema: str | None = None
    deps: bytes | None = None
    origin: str | None = None
    signature: bytes | None = None

    @property
    def size(self) -> int:
        return len(self.value)


class Stored(NamedTuple):
    """What a lookup returns of a present key: the value and what the proxy checks on a hit."""

    value: bytes
    deps: bytes | None
    origin: str | None
    signature: bytes | None


_INT64 = (-(2**63), 2**63 - 1)  # what SQLite's INTEGER holds
_CANONICAL_INT = re.compile(r"0|-?[1-9][0-9]{0,18}")  # str(int(s)) == s: ASCII, no sign of 0


def doc_id_forms(doc_id: object) -> tuple[int | str, ...]:
    """The stored values a document id given as ``doc_id`` matches: ``"17"`` and ``17`` match
    each other (a command line passes text; a harness's ids are ints). Only the canonical
    decimal form counts: ``"017"`` and ``" 17"`` match themselves only."""
    if isinstance(doc_id, str):
        if _CANONICAL_INT.fullmatch(doc_id) and _INT64[0] <= int(doc_id) <= _INT64[1]:
            return (doc_id, int(doc_id))
        return (doc_id,)
    stored = storable_doc_id(doc_id)
    if stored is None:
        return ()
    return (stored, str(stored)) if isinstance(stored, int) else (stored,)


def storable_doc_id(doc_id: object) -> int | str | None:
    """``doc_id`` as the store keeps it: None, a str, an int in SQLite's 64-bit range, or
    else its text (a bigger int, or a value of another type)."""
    if doc_id is None or type(doc_id) is str:
        return doc_id
    if type(doc_id) is int:
        n = doc_id
    elif isinstance(doc_id, SupportsIndex):  # numpy's integers
        n = operator.index(doc_id)
    else:
        return str(doc_id)
    return n if _INT64[0] <= n <= _INT64[1] else str(n)


@dataclass(frozen=True)
class Where:
    """A filter over entries: every given field must match (nothing given: everything).

    ``models`` are model identity digests; ``created_before`` is a Unix time. ``doc_id``
    matches the stored id as an int or as text (``"17"`` finds 17 and ``"17"``; see
    :func:`doc_id_forms`). ``key_schema`` selects the entries written under that key schema;
    ``old_schema`` those written under any other one (what ``prune --old-schema`` deletes:
    pass the current schema).
    """

    models: tuple[str, ...] | None = None
    task: str | None = None
    method: str | None = None
    doc_id: int | str | None = None
    created_before: float | None = None
    key_schema: str | None = None
    old_schema: str | None = None

    def matches(self, e: Entry) -> bool:
        schema = e.key_schema or LEGACY_KEY_SCHEMA
        return (
            (self.models is None or e.model in self.models)
            and (self.task is None or e.task == self.task)
            and (self.method is None or e.method == self.method)
            and (self.doc_id is None or storable_doc_id(e.doc_id) in doc_id_forms(self.doc_id))
            and (self.created_before is None or e.created_at < self.created_before)
            and (self.key_schema is None or schema == self.key_schema)
            and (self.old_schema is None or schema != self.old_schema)
        )


class Backend(ABC):
    """What a response backend implements: the proxy's whole use of it on the hot path.

    Keys are 16-byte digests. Every method may raise :class:`StoreError`; the proxy never
    calls a backend directly but through :class:`lmms_cache.guard.Guarded`, which turns
    those errors into misses (or unsaved responses) and one warning per outage.
    """

    location: str = ""
    readonly: bool = False
    # Why a store opened for writing can only read for now (a full disk, a read-only
    # location), None when it writes: its writes raise StoreError, and it tries writing
    # again by itself from time to time.
    degraded: str | None = None
    # Whether an entry's ``origin`` column proves who wrote it. True only for a file in a
    # directory that is the user's alone (SQLite): nobody else can have written a row there.
    # A server is written by everyone who can reach it, and any of them can claim any origin,
    # so its values load with full pickle only when signed (or with ``trust``).
    origins_proven: bool = False
    # Set by whoever reports this store's failures itself (the proxy's fault wrapper): the
    # store then logs an outage at INFO instead of warning, so that an outage is one warning.
    quiet: bool = False

    @abstractmethod
    def get_many(self, keys: Sequence[bytes], *, created_after: float | None = None) -> dict[bytes, Stored]:
        """The stored values (with their deps, origin and signature) of those ``keys`` that
        are present (and not older than ``created_after``), in one round trip."""

    @abstractmethod
    def put_many(self, entries: Sequence[Entry], *, replace: bool = True) -> int:
        """Write all ``entries`` in one transaction: all become durable, or none.

        With ``replace=False`` an existing key keeps its value. Returns how many were written.
        """

    @abstractmethod
    def touch(self, hits: Mapping[bytes, int], when: float) -> None:
        """Record hits (count per key) at time ``when``: hit counts and LRU order."""

    @abstractmethod
    def evict(self, max_bytes: int) -> tuple[int, int]:
        """Remove least recently used entries until the values total at most ``max_bytes``;
        returns (entries, bytes) removed."""

    def close(self) -> None:
        """Release connections; the store reopens on next use."""


class Catalogue(ABC):
    """What management needs of a store: whole entries, filters, totals, the models."""

    @abstractmethod
    def entries(self, keys: Sequence[bytes], *, values: bool = True) -> list[Entry]:
        """The whole entries of those ``keys`` that are present, in the order given (one
        round trip per chunk); ``values=False`` leaves ``value`` empty."""

    def get(self, key: bytes) -> Entry | None:
        """One whole entry, value and metadata."""
        found = self.entries([key])
        return found[0] if found else None

    @abstractmethod
    def scan(self, where: Where | None = None, *, values: bool = True, limit: int | None = None,
             recent_first: bool = False) -> Iterator[Entry]:  # fmt: skip
        """The entries ``where`` matches (all by default), oldest first or most recently
        used first; ``values=False`` leaves ``value`` empty (metadata only, cheaper)."""

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """Counts and sizes: at least ``location``, ``entries`` and ``bytes``; a file's
        ``file_bytes`` (on disk), a server's ``server_bytes`` (its whole memory)."""

    @abstractmethod
    def summary(self) -> dict[str, Any]:
        """Totals and the same by model and by task (entries, bytes, hits, model time saved),
        and ``by_schema``: ``[{key_schema, entries, bytes}]``."""

    @abstractmethod
    def delete(self, keys: Sequence[bytes]) -> int:
        """Remove entries; returns how many were there."""

    @abstractmethod
    def delete_where(self, where: Where) -> int:
        """Remove every entry ``where`` matches; returns how many."""

    @abstractmethod
    def similar(self, method: str, *, task: str | None, doc_id: int | str | None, prompt: str | None,
                limit: int = 50) -> list[Entry]:  # fmt: skip
        """Entries (metadata only) of ``method`` for the same document (``doc_id`` matched as
        :class:`Where` matches it) or the same prompt digest, most recently used first: the
        candidates to explain a miss against."""

    @abstractmethod
    def models(self) -> dict[str, str]:
        """Model identity digest -> its description (JSON without secrets)."""

    def remember_model(self, digest: str, description: str) -> None:
        """Record what a model identity digest stands for (a JSON text without secrets)."""

    def compact(self) -> None:
        """Give the space of deleted entries back (a file to the file system)."""


class Store(Backend, Catalogue):
    """A whole store: a response backend with its catalogue (SQLite, Redis, the null store).

    Open one with :func:`lmms_cache.store.open_store`.
    """


class Memos(Protocol):
    """The local memos: derived digests that let a hit skip reading and decoding media.

    Always in a local SQLite file (:class:`~lmms_cache.store.sqlite.SQLiteStore`), never on
    a server: file digests are keyed by stat signatures (inode, device), which mean
    something on one machine only. Best effort: a memo that fails is a memo that misses.
    """

    def file_digest(self, path: str, signature: tuple[int, ...]) -> bytes | None:
        """A remembered content digest of a file with this stat signature."""

    def remember_files(self, rows: Sequence[tuple[str, tuple[int, ...], bytes]]) -> None:
        """Remember file content digests (path, stat signature, digest)."""

    def row_digests(self, dataset: str, split: str) -> bytes | None:
        """A dataset fingerprint's row digests: ``count`` concatenated 16-byte digests."""

    def remember_row_digests(self, dataset: str, split: str, digests: bytes) -> None:
        """Remember (replace) a dataset split's row digests, a multiple of 16 bytes."""

    def derived_many(self, function: bytes, rows: Sequence[bytes]) -> dict[bytes, tuple[bytes, bytes | None]]:
        """Row digest -> (media digest, deps) remembered for a function fingerprint, for
        those ``rows`` that have one."""

    def remember_derived(self, items: Sequence[tuple[bytes, bytes, bytes, bytes | None]]) -> None:
        """Remember (replace) ``(function, row, digest, deps)`` items."""

    def forget_derived(self, function: bytes) -> int:
        """Forget everything remembered for one function fingerprint; returns how many rows."""

    def close(self) -> None:
        """Release the file."""


class NullStore(Store):
    """A store that never hits and keeps nothing: the shape of a disabled cache."""

    def __init__(self, location: str = "", reason: str = "") -> None:
        self.location = location
        self.reason = reason

    def get_many(self, keys: Sequence[bytes], *, created_after: float | None = None) -> dict[bytes, Stored]:
        return {}

    def put_many(self, entries: Sequence[Entry], *, replace: bool = True) -> int:
        return 0

    def touch(self, hits: Mapping[bytes, int], when: float) -> None:
        return None

    def entries(self, keys: Sequence[bytes], *, values: bool = True) -> list[Entry]:
        return []

    def evict(self, max_bytes: int) -> tuple[int, int]:
        return (0, 0)

    def summary(self) -> dict[str, Any]:
        return {"entries": 0, "bytes": 0, "by_model": [], "by_task": [], "by_schema": []}

    def models(self) -> dict[str, str]:
        return {}

    def similar(self, method: str, *, task: str | None, doc_id: int | str | None, prompt: str | None,
                limit: int = 50) -> list[Entry]:  # fmt: skip
        return []

    def delete(self, keys: Sequence[bytes]) -> int:
        return 0

    def delete_where(self, where: Where) -> int:
        return 0

    def scan(self, where: Where | None = None, *, values: bool = True, limit: int | None = None,
             recent_first: bool = False) -> Iterator[Entry]:  # fmt: skip
        return iter(())

    def stats(self) -> dict[str, Any]:
        return {"entries": 0, "bytes": 0}
