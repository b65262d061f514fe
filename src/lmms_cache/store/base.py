"""The small interface every backend implements, and the null store."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = ["Entry", "NullStore", "Store", "StoreError", "Where"]


class StoreError(Exception):
    """A store that cannot serve a request right now (locked, full, unwritable, damaged).

    The proxy turns it into misses plus one warning; it never reaches the evaluation.
    """


class Entry(NamedTuple):
    """One stored response and what management needs to know about it.

    ``value`` is the encoded envelope (see :mod:`lmms_cache.codec`). A named tuple: every
    miss builds one, and a frozen dataclass costs several times more to construct.
    """

    key: bytes
    value: bytes
    model: str
    method: str
    task: str | None = None
    split: str | None = None
    doc_id: str | None = None
    created_at: float = 0.0
    model_seconds: float = 0.0
    raw_size: int = 0  # the value's payload before compression (0: not known)
    components: str | None = None  # JSON {key component: hex digest}, for explaining misses
    hits: int = 0
    used_at: float = 0.0  # the last hit, else the creation: what LRU eviction orders by
    prompt: str | None = None  # prompt digest of a request without a document: explains its misses

    @property
    def size(self) -> int:
        return len(self.value)


@dataclass(frozen=True)
class Where:
    """A filter over entries: every given field must match (nothing given: everything).

    ``models`` are model identity digests; ``created_before`` is a Unix time.
    """

    models: tuple[str, ...] | None = None
    task: str | None = None
    method: str | None = None
    doc_id: str | None = None
    created_before: float | None = None

    def matches(self, e: Entry) -> bool:
        return (
            (self.models is None or e.model in self.models)
            and (self.task is None or e.task == self.task)
            and (self.method is None or e.method == self.method)
            and (self.doc_id is None or e.doc_id == self.doc_id)
            and (self.created_before is None or e.created_at < self.created_before)
        )


class Store(ABC):
    """Key-value storage of encoded responses.

    Keys are 16-byte digests. Every method may raise :class:`StoreError`.
    """

    location: str = ""
    readonly: bool = False

    @abstractmethod
    def get_many(self, keys: Sequence[bytes], *, created_after: float | None = None) -> dict[bytes, bytes]:
        """The stored values of those ``keys`` that are present (and not older than
        ``created_after``), in one round trip."""

    @abstractmethod
    def put_many(self, entries: Sequence[Entry], *, replace: bool = True) -> int:
        """Write all ``entries`` in one transaction: all become durable, or none.

        With ``replace=False`` an existing key keeps its value. Returns how many were written.
        """

    @abstractmethod
    def touch(self, hits: Mapping[bytes, int], when: float) -> None:
        """Record hits (count per key) at time ``when``: hit counts and LRU order."""

    @abstractmethod
    def get(self, key: bytes) -> Entry | None:
        """One whole entry, value and metadata."""

    @abstractmethod
    def evict(self, max_bytes: int) -> tuple[int, int]:
        """Remove least recently used entries until the values total at most ``max_bytes``;
        returns (entries, bytes) removed."""

    @abstractmethod
    def summary(self) -> dict[str, Any]:
        """Totals and the same by model and by task (entries, bytes, hits, model time saved)."""

    @abstractmethod
    def models(self) -> dict[str, str]:
        """Model identity digest -> its description (JSON without secrets)."""

    @abstractmethod
    def similar(self, method: str, *, task: str | None, doc_id: str | None, prompt: str | None,
                limit: int = 50) -> list[Entry]:  # fmt: skip
        """Entries (metadata only) of ``method`` for the same document or the same prompt
        digest, most recently used first: the candidates to explain a miss against."""

    def compact(self) -> None:
        """Give the space of deleted entries back to the file system."""

    @abstractmethod
    def delete(self, keys: Sequence[bytes]) -> int:
        """Remove entries; returns how many were there."""

    @abstractmethod
    def delete_where(self, where: Where) -> int:
        """Remove every entry ``where`` matches; returns how many."""

    @abstractmethod
    def scan(self, where: Where | None = None, *, values: bool = True, limit: int | None = None,
             recent_first: bool = False) -> Iterator[Entry]:  # fmt: skip
        """The entries ``where`` matches (all by default), oldest first or most recently
        used first; ``values=False`` leaves ``value`` empty (metadata only, cheaper)."""

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """Counts and sizes: at least ``entries`` and ``bytes``."""

    def file_digest(self, path: str, signature: tuple[int, ...]) -> bytes | None:
        """A remembered content digest of a file with this stat signature."""
        return None

    def remember_files(self, rows: Sequence[tuple[str, tuple[int, ...], bytes]]) -> None:
        """Remember file content digests (path, stat signature, digest)."""

    def remember_model(self, digest: str, description: str) -> None:
        """Record what a model identity digest stands for (a JSON text without secrets)."""

    def close(self) -> None:
        """Release connections; the store reopens on next use."""


class NullStore(Store):
    """A store that never hits and keeps nothing: the shape of a disabled cache."""

    def __init__(self, location: str = "", reason: str = "") -> None:
        self.location = location
        self.reason = reason

    def get_many(self, keys: Sequence[bytes], *, created_after: float | None = None) -> dict[bytes, bytes]:
        return {}

    def put_many(self, entries: Sequence[Entry], *, replace: bool = True) -> int:
        return 0

    def touch(self, hits: Mapping[bytes, int], when: float) -> None:
        return None

    def get(self, key: bytes) -> Entry | None:
        return None

    def evict(self, max_bytes: int) -> tuple[int, int]:
        return (0, 0)

    def summary(self) -> dict[str, Any]:
        return {"entries": 0, "bytes": 0, "by_model": [], "by_task": []}

    def models(self) -> dict[str, str]:
        return {}

    def similar(self, method: str, *, task: str | None, doc_id: str | None, prompt: str | None,
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
