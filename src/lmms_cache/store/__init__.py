"""Storage backends behind small interfaces (:mod:`.base`), and :func:`open_store`, the one
way every user (the proxy, management, the command line) opens one."""

from __future__ import annotations

import os

from .base import (
    LEGACY_KEY_SCHEMA,
    Backend,
    Catalogue,
    Entry,
    Memos,
    NullStore,
    Store,
    Stored,
    StoreError,
    Where,  # fmt: skip
)
from .sqlite import FILENAME, SQLiteStore

__all__ = ["LEGACY_KEY_SCHEMA", "URL_SCHEMES", "Backend", "Catalogue", "Entry", "Memos", "NullStore", "SQLiteStore",
           "Store", "StoreError", "Stored", "Where", "default_location", "file_of", "is_url", "open_memos",
           "open_store"]  # fmt: skip

URL_SCHEMES = ("redis://", "rediss://", "unix://")


def default_location() -> str:
    """``$LMMS_CACHE_DIR``, else the per-user cache directory (``~/.cache/lmms-cache``)."""
    env = os.environ.get("LMMS_CACHE_DIR")
    if env:
        return env
    import platformdirs

    return platformdirs.user_cache_dir("lmms-cache", appauthor=False)


def is_url(location: str | os.PathLike[str] | None) -> bool:
    """Whether ``location`` names a server (``redis://``, ``rediss://``, ``unix://``)."""
    return isinstance(location, str) and location.lower().startswith(URL_SCHEMES)


def file_of(location: str | os.PathLike[str] | None) -> tuple[str, str]:
    """(directory, file name) of a local cache given as its directory (holding ``cache.db``)
    or as the database file itself (``runs/cache/cache.db``, an export file); None: the
    default location."""
    path = os.fspath(location) if location is not None else default_location()
    where = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(where):
        directory, filename = os.path.split(where)
        return directory, filename
    return where, FILENAME


def open_store(location: str | os.PathLike[str] | None = None, *, readonly: bool = False, durable: bool = True,
               trust: bool = False, create: bool = True, lazy: bool = False) -> Store:  # fmt: skip
    """Open the store at ``location``: a directory (its ``cache.db``), a database file, or a
    server URL (``redis://``, ``rediss://``, ``unix://``; see
    :func:`lmms_cache.store.redis.parse_url`). None: :func:`default_location`.

    ``trust`` accepts a cache file owned by another user (its values are pickles).
    ``create=False`` refuses a local location without a cache (management never makes one).
    ``lazy`` connects to a server at its first use instead of now (the proxy: a run started
    while the server is down finds it once it is back).

    Raises:
        StoreError: the location cannot hold a cache, belongs to another user, or (unless
            ``lazy``) the server cannot be reached.
    """
    if is_url(location):
        from .redis import RedisStore

        return RedisStore(os.fspath(location), readonly=readonly, trust=trust, durable=durable,  # type: ignore[arg-type]
                          lazy=lazy)  # fmt: skip
    directory, filename = file_of(location)
    if not create and not os.path.exists(os.path.join(directory, filename)):
        raise StoreError(f"no cache at {os.path.join(directory, filename)}")
    return SQLiteStore(directory, filename=filename, readonly=readonly, durable=durable, trust=trust)


def open_memos(location: str | os.PathLike[str] | None = None, *, readonly: bool = False,
               durable: bool = True) -> SQLiteStore:  # fmt: skip
    """The local SQLite file holding the memos (file digests, dataset row digests, derived
    media) for a cache whose responses live on a server: the cache directory ``location``
    (default :func:`default_location`, the user's own local cache).

    Raises:
        StoreError: that location cannot hold a cache (the memos then live in memory).
    """
    if is_url(location):
        raise StoreError(f"the memos live in a local directory, not on a server ({location!r})")
    directory, filename = file_of(location)
    return SQLiteStore(directory, filename=filename, readonly=readonly, durable=durable)
