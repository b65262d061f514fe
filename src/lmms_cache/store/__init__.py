"""Storage backends behind one small interface (:class:`Store`)."""

from __future__ import annotations

import os

from .base import LEGACY_KEY_SCHEMA, Entry, NullStore, Store, Stored, StoreError, Where
from .sqlite import SQLiteStore

__all__ = ["LEGACY_KEY_SCHEMA", "Entry", "NullStore", "SQLiteStore", "Store", "StoreError", "Stored", "Where",
           "default_location", "open_store"]


def default_location() -> str:
    """``$LMMS_CACHE_DIR``, else the per-user cache directory (``~/.cache/lmms-cache``)."""
    env = os.environ.get("LMMS_CACHE_DIR")
    if env:
        return env
    import platformdirs

    return platformdirs.user_cache_dir("lmms-cache", appauthor=False)


def open_store(location: str | os.PathLike[str] | None = None, *, readonly: bool = False,
               durable: bool = True, trust: bool = False) -> Store:  # fmt: skip
    """Open the store at ``location`` (a directory; the default when None).

    ``trust`` accepts a cache file owned by another user (its values are pickles).

    Raises:
        StoreError: the location cannot hold a cache, or belongs to another user.
    """
    path = os.fspath(location) if location is not None else default_location()
    return SQLiteStore(path, readonly=readonly, durable=durable, trust=trust)
