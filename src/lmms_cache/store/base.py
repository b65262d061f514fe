"""The small interface every backend implements, and the null store."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Entry", "NullStore", "Store", "StoreError"]


class StoreError(Exception):
    """A store that cannot serve a request right now (locked, full, unwritable, damaged).

    The proxy turns it into misses plus one warning; it never reaches the evaluation.
    """


@dataclass(frozen=True)
class Entry:
    """One stored response and what management needs to know about it.

    ``value`` is the encoded envelope (see :mod:`lmms_cache.codec`).
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

    @property
    def size(self) -> int:
        return len(self.value)


class Store(ABC):
    """Key-value storage of encoded responses.

    Keys are 16-byte digests. Every method may raise :class:`StoreError`.
    """

    location: str = ""
    readonly: bool = False

    @abstractmethod
    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, bytes]:
        """The stored values of those ``keys`` that are present, in one round trip."""

    @abstractmethod
    def put_many(self, entries: Sequence[Entry]) -> None:
        """Write all ``entries`` in one transaction: all become durable, or none."""

    @abstractmethod
    def delete(self, keys: Sequence[bytes]) -> int:
        """Remove entries; returns how many were there."""

    @abstractmethod
    def delete_where(self, *, model: str | None = None, task: str | None = None,
                     method: str | None = None) -> int:  # fmt: skip
        """Remove every entry matching all the given fields (all entries when none given)."""

    @abstractmethod
    def scan(self) -> Iterator[Entry]:
        """Every entry, in no particular order."""

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

    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, bytes]:
        return {}

    def put_many(self, entries: Sequence[Entry]) -> None:
        return None

    def delete(self, keys: Sequence[bytes]) -> int:
        return 0

    def delete_where(self, *, model: str | None = None, task: str | None = None,
                     method: str | None = None) -> int:  # fmt: skip
        return 0

    def scan(self) -> Iterator[Entry]:
        return iter(())

    def stats(self) -> dict[str, Any]:
        return {"entries": 0, "bytes": 0}
