"""The proxy's fault handling: one wrapper every backend shares (SQLite, Redis, the null store).

A store problem never reaches the evaluation. :class:`Guarded` turns every
:class:`~lmms_cache.store.StoreError` into a miss, a response kept for later, or a skipped
bookkeeping step, and says so in **one warning per outage**: the first failure warns, the
ones that follow are logged at INFO, and once every kind of operation that failed works
again the warning is re-armed for the next outage. The store itself stays quiet
(``store.quiet``): a server that goes away is one warning, not one from the store and one
from the proxy.

Writes keep what could not be written (the retry buffer, bounded by ``max_pending``: the
oldest are dropped past it, with one warning) and retry it with the next write; after a
write, least recently used entries are evicted down to ``max_size``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from .store import Entry, NullStore, Store, Stored, StoreError

__all__ = ["MAX_PENDING", "Guarded", "Warnings"]

log = logging.getLogger("lmms_cache")

MAX_PENDING = 100_000  # unsaved entries kept for a retry while the store refuses writes

T = TypeVar("T")


class Warnings:
    """One warning per slot until it is re-armed; what a slot says again goes to INFO.

    A slot is a kind of problem: a store's outage (``"store"``, ``"shared"``), an untrusted
    value, a response that cannot be encoded...
    """

    def __init__(self) -> None:
        self.warned: set[str] = set()

    def warn(self, slot: str, message: str, *, again: bool = True) -> None:
        """Warn once for ``slot``; later messages of the slot at INFO (``again``) or not at all."""
        if slot not in self.warned:
            self.warned.add(slot)
            log.warning(message)
        elif again:
            log.info(message)

    def rearm(self, slot: str) -> None:
        self.warned.discard(slot)


class Guarded:
    """One store behind the proxy, its failures turned into misses and one warning per outage.

    Args:
        store: any :class:`~lmms_cache.store.Store`; made ``quiet`` (its outages are said here).
        warnings: the proxy's warnings (one per slot).
        slot: this store's warning slot (``"store"``: the cache; ``"shared"``: the shared tier).
        what: how messages name it ("the cache", "the shared cache").
        writable: whether the proxy writes to it at all (False: readonly mode, a null store).
        batch_size: entries per write when retrying a backlog.
        max_size: evict least recently used entries down to this many bytes after a write.
        max_pending: unsaved entries kept for a retry; the oldest are dropped past it.
    """

    def __init__(self, store: Store, warnings: Warnings, *, slot: str = "store", what: str = "the cache",
                 writable: bool = True, batch_size: int = 64, max_size: int | None = None,
                 max_pending: int = MAX_PENDING) -> None:  # fmt: skip
        self.store = store
        store.quiet = True
        self.warnings = warnings
        self.slot = slot
        self.what = what
        self.location = store.location
        self.writable = writable and not isinstance(store, NullStore) and not store.readonly
        self.batch_size = batch_size
        self.max_size = max_size
        self.max_pending = max_pending
        self.pending: list[Entry] = []
        self.failing: set[str] = set()  # "read", "write": what fails in the current outage
        if self.writable and store.degraded is not None:
            self.failing.add("write")
            self.warn(f"lmms-cache: {store.degraded}. Hits are served; new responses are kept in memory (up to "
                      f"{max_pending:,}) and written if it becomes writable.")  # fmt: skip

    # -- outages ------------------------------------------------------------------------------

    def warn(self, message: str) -> None:
        """A problem of this store: the outage's one warning, else INFO."""
        self.warnings.warn(self.slot, message)

    def failed(self, kind: str, message: str) -> None:
        self.failing.add(kind)
        self.warn(message)

    def recovered(self, kind: str) -> None:
        """``kind`` works again; when nothing fails any more the outage is over."""
        if kind in self.failing:
            self.failing.discard(kind)
            if not self.failing:
                self.warnings.rearm(self.slot)  # a new outage gets its own warning
                log.info("lmms-cache: %s at %s works again", self.what, self.location)

    def call(self, what: str, action: Callable[[], T], *, kind: str = "read") -> T | None:
        """``action()``, or None when the store fails (said once per outage)."""
        try:
            result = action()
        except StoreError as exc:
            self.failed(kind, f"lmms-cache: {what} failed: {exc}. Continuing uncached for this step.")
            return None
        if self.failing:
            self.recovered(kind)
        return result

    # -- the backend, guarded -------------------------------------------------------------------

    def get_many(self, keys: Sequence[bytes], created_after: float | None = None) -> dict[bytes, Stored]:
        """The stored values of ``keys``; none when the store fails."""
        try:
            found = self.store.get_many(keys, created_after=created_after)
        except StoreError as exc:
            self.failed("read", f"lmms-cache: reading {self.what} failed: {exc}. Continuing uncached for this step.")
            return {}
        if self.failing:
            self.recovered("read")
        return found

    def save(self, entries: Sequence[Entry], write: Callable[[list[Entry]], Any] | None = None) -> int:
        """Write ``entries`` after any backlog, in batches; what cannot be written is kept for
        the next call. Returns how many were made durable (backlog included)."""
        if not self.writable:
            return 0
        write = write or self.store.put_many
        pending = self.pending
        backlog = bool(pending)
        pending.extend(entries)  # kept before writing: an interrupt meanwhile loses nothing
        done = 0
        try:  # in batches: a backlog bigger than the space freed still drains, part by part
            while done < len(pending):
                batch = pending[done : done + self.batch_size]
                write(batch)
                done += len(batch)
        except StoreError as exc:
            self.failed("write", f"lmms-cache: cannot write to {self.what}: {exc}. Responses are returned as "
                                 "usual; unsaved ones are kept in memory and retried with the next batch.")  # fmt: skip
        finally:
            del pending[:done]
        if len(pending) > self.max_pending:
            dropped = len(pending) - self.max_pending
            del pending[:dropped]
            self.warnings.warn("dropped", f"lmms-cache: more than {self.max_pending:,} responses could not be "
                                          f"written to {self.location}; the oldest unsaved ones were dropped (a "
                                          "rerun computes them again).", again=False)  # fmt: skip
        if done and backlog and not pending:
            log.info("lmms-cache: %s at %s is written again; the unsaved responses are saved", self.what, self.location)
        if done and not pending:
            self.recovered("write")
        if done:
            self.evict()
        return done

    def put(self, entries: Sequence[Entry], *, what: str) -> bool:
        """Write ``entries`` once, without keeping them on failure (they are kept elsewhere:
        an outbox, the shared tier); whether it worked."""
        if not self.writable or not entries:
            return False
        try:
            self.store.put_many(entries)
        except StoreError as exc:
            self.failed("write", f"lmms-cache: {what} failed: {exc}. Continuing without it for now.")
            return False
        if self.failing:
            self.recovered("write")
        self.evict()
        return True

    def evict(self) -> None:
        limit = self.max_size
        if limit is not None:
            self.call("evicting old entries", lambda: self.store.evict(limit), kind="write")

    def touch(self, counts: Mapping[bytes, int], when: float) -> None:
        if counts and self.writable:
            self.call("recording hits", lambda: self.store.touch(counts, when), kind="write")

    def close(self) -> None:
        self.store.close()
