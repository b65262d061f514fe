"""The responses a proxy sees: a local tier, and optionally a shared one behind it.

``cached(model, path="runs/cache", shared="redis://cache.lan/0?prefix=team-a")``:

* **Reads** go to the local tier first, then, for what it lacks, one ``MGET`` per batch
  to the shared tier. A shared hit is used only after its value passes the loader
  (:meth:`Tiers.lookup`), and is then copied into the local tier, never as "ours": its
  origin becomes an import's (see :func:`lmms_cache.trust.imported_origin`) and only a
  valid signature is kept.
* **Writes** commit locally first (durable), and queue the keys in the local file's
  outbox in the same transaction; then they go to the shared tier. What the shared tier
  does not acknowledge waits in the outbox (:data:`OUTBOX_MAX` entries; past it the
  oldest leave the queue, staying in the local tier, with one warning), drains with later
  batches, for at most :data:`CLOSE_DRAIN` seconds at close, and by hand with
  ``lmms-cache push``. A crash loses nothing the shared tier has not received: the queue
  is a table of the local file.
* ``readonly`` reads both tiers and writes neither (no copies either); ``refresh`` writes
  both. Hits are recorded, and ``max_size`` applies, in each tier on its own: the local
  tier's limit is the proxy's ``max_size``, the shared tier's is its owners' (``lmms-cache
  prune URL --max-size``).

Without a shared tier this is the local tier alone, whatever its backend (a directory, or
a server given as the path).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any

from . import codec, trust
from .guard import Guarded
from .store import Entry, SQLiteStore, Stored

__all__ = ["CLOSE_DRAIN", "OUTBOX_MAX", "PUSH_BATCH", "Tiers"]

log = logging.getLogger("lmms_cache")

OUTBOX_MAX = 100_000  # entries queued for the shared tier; the oldest leave the queue past it
PUSH_BATCH = 500  # entries per write to the shared tier when draining a backlog
DRAIN_PER_SAVE = 4  # backlog batches sent with each new batch
CLOSE_DRAIN = 5.0  # seconds spent draining the outbox at close, at most


class Tiers:
    """The local tier (``local``) and the shared tier (``shared``, or None).

    Args:
        local, shared: the tiers' stores, guarded.
        origin: this user on this machine (:func:`lmms_cache.trust.local_origin`).
        trust: load every value with full pickle (the user trusts whoever wrote them).
        deps_hold: whether the files a stored multi-round answer depends on still hold.
        copy: copy shared hits into the local tier (not in readonly mode).
        clock: wall-clock seconds (for copies' last use) and monotonic seconds (the drain).
    """

    def __init__(self, local: Guarded, shared: Guarded | None = None, *, origin: str, trust: bool = False,
                 deps_hold: Callable[[bytes], bool] = lambda deps: True, copy: bool = True,
                 wall: Callable[[], float], monotonic: Callable[[], float]) -> None:  # fmt: skip
        self.local = local
        self.shared = shared
        self.origin = origin
        self.trust = trust
        self.deps_hold = deps_hold
        self.copy = copy and local.writable
        self.wall = wall
        self.monotonic = monotonic
        # The outbox: key -> the entry (None: read it back from the local tier), oldest first.
        self.outbox: dict[bytes, Entry | None] = {}
        self.acked: list[bytes] = []  # acknowledged by the shared tier, still queued in the local file
        self.loaded = False
        self.served_shared: set[bytes] = set()  # hits the shared tier served since the last touch
        sqlite = local.store
        self.queue = sqlite if shared is not None and isinstance(sqlite, SQLiteStore) and local.writable else None
        self.target = shared.location if shared is not None else ""

    @property
    def writable(self) -> bool:
        return self.local.writable or (self.shared is not None and self.shared.writable)

    # -- reading ----------------------------------------------------------------------------

    def lookup(self, keys: list[bytes], created_after: float | None) -> dict[bytes, Any]:
        """The responses of those ``keys`` the tiers hold, decoded."""
        found = self.decode(self.local.get_many(keys, created_after), self.local)
        shared = self.shared
        if shared is None or len(found) == len(keys):
            return found
        blobs = shared.get_many([k for k in keys if k not in found], created_after)
        if blobs:
            more = self.decode(blobs, shared)
            if more:
                found.update(more)
                if self.copy:
                    self.copy_local(list(more), blobs)
                if shared.writable:
                    self.served_shared.update(more)
        return found

    def decode(self, blobs: Mapping[bytes, Stored], tier: Guarded) -> dict[bytes, Any]:
        """The values of ``blobs`` that load. Full pickle only for what this user wrote in a
        store where that is proven, for what the team signed, or with ``trust``; anything
        else loads restricted (plain values and known response types)."""
        found = {}
        # An origin proves who wrote a value only in the user's own local file; a shared
        # tier is written by others, who may claim any origin.
        origin = self.origin if tier is self.local and tier.store.origins_proven else None
        trusted = self.trust
        deps_hold = self.deps_hold
        decode = codec.decode
        for key, stored in blobs.items():
            value = stored.value
            if stored.deps is not None and not deps_hold(stored.deps):
                continue  # a file a later round read has changed since: a miss
            try:
                found[key] = decode(value, trusted=trusted or (origin is not None and stored.origin == origin) or (
                    stored.signature is not None and trust.signature_valid(key, value, stored.signature)))
            except codec.UntrustedValueError as exc:
                tier.warnings.warn(
                    "untrusted",
                    f"lmms-cache: a stored value in {tier.location} needs {exc.needed} to load, and was not "
                    "written by you in this cache nor signed ($LMMS_CACHE_SECRET); it is recomputed and "
                    "overwritten. Pass trust=True to load such values from a cache you trust.",
                    again=False,
                )
            except codec.CodecError as exc:
                tier.warn(f"lmms-cache: a stored value in {tier.location} cannot be read ({exc}); it is "
                          "recomputed and overwritten")  # fmt: skip
        return found

    def copy_local(self, keys: list[bytes], blobs: Mapping[bytes, Stored]) -> None:
        """Copy shared hits (their values loaded) into the local tier, as imports: never with
        this user's origin, a signature only when it is valid."""
        shared = self.shared
        assert shared is not None
        whole = shared.call("reading the shared cache", lambda: shared.store.entries(keys)) or []
        now = self.wall()
        copies = []
        for e in whole:
            stored = blobs.get(e.key)
            if stored is None or stored.value != e.value:
                continue  # replaced between the two reads: not the value that was loaded
            signed = e.signature is not None and trust.signature_valid(e.key, e.value, e.signature)
            copies.append(e._replace(hits=0, used_at=now, origin=trust.imported_origin(e.origin),
                                     signature=e.signature if signed else None))  # fmt: skip
        if copies:
            self.local.put(copies, what="copying shared entries into the local cache")

    def present(self, keys: list[bytes], created_after: float | None) -> set[bytes]:
        """Which ``keys`` either tier holds (values not loaded)."""
        found = set(self.local.get_many(keys, created_after))
        if self.shared is not None and len(found) < len(keys):
            found.update(self.shared.get_many([k for k in keys if k not in found], created_after))
        return found

    def stores(self) -> list[Guarded]:
        return [self.local] if self.shared is None else [self.local, self.shared]

    def similar(self, method: str, *, task: str | None, doc_id: str | None, prompt: str | None) -> list[Entry]:
        """The stored entries to explain a miss against, from both tiers."""
        out: dict[bytes, Entry] = {}
        for tier in self.stores():
            store = tier.store
            found = tier.call("reading the cache", partial(store.similar, method, task=task, doc_id=doc_id, prompt=prompt))
            for e in found or ():
                out.setdefault(e.key, e)
        return sorted(out.values(), key=lambda e: e.used_at, reverse=True)

    def models(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for tier in reversed(self.stores()):
            out.update(tier.call("reading the cache", tier.store.models) or {})
        return out

    def remember_model(self, digest: str, description: str) -> None:
        for tier in self.stores():
            if tier.writable:
                tier.call("recording the model", partial(tier.store.remember_model, digest, description), kind="write")

    # -- writing ----------------------------------------------------------------------------

    def save(self, entries: Sequence[Entry]) -> int:
        """Make ``entries`` durable: locally (queued for the shared tier in the same
        transaction), then on the shared tier. Returns how many were made durable here (the
        shared tier's when there is no usable local one)."""
        shared = self.shared
        if shared is None or not shared.writable:
            return self.local.save(entries)
        self.load_outbox()
        written = self.local.save(entries, self.write_local) if self.queue is not None else self.local.save(entries)
        outbox = self.outbox
        for e in entries:
            outbox.pop(e.key, None)  # (a key queued again goes to the end)
            outbox[e.key] = e
        self.trim()
        pushed = self.drain(max_batches=DRAIN_PER_SAVE)
        if self.queue is not None and entries and entries[-1].key in outbox:
            self.release(entries)
        return written if self.local.writable else pushed

    def release(self, entries: Sequence[Entry]) -> None:
        """Keep only the keys of waiting entries that are durable in the local file (read
        back when sent): an outage of hours holds keys in memory, not responses."""
        unsaved = {e.key for e in self.local.pending}
        outbox = self.outbox
        for e in entries:
            if e.key in outbox and e.key not in unsaved:
                outbox[e.key] = None

    def write_local(self, batch: list[Entry]) -> None:
        """One local transaction: the entries, their keys queued, and the keys the shared tier
        has acknowledged since the last one taken off the queue."""
        assert self.queue is not None
        sent = self.acked[:]
        self.queue.put_many(batch, outbox=self.target, sent=sent)
        del self.acked[: len(sent)]

    def load_outbox(self) -> None:
        """Once: what earlier runs left queued (read back from the local file when sent)."""
        if self.loaded or self.queue is None:
            return
        self.loaded = True
        queue = self.queue
        keys = self.local.call("reading the outbox", lambda: queue.queued(self.target, OUTBOX_MAX)) or []
        for k in keys:
            self.outbox.setdefault(k, None)
        if keys:
            log.info("lmms-cache: %d responses of an earlier run wait for the shared cache at %s; sending them",
                     len(keys), self.target)  # fmt: skip

    def trim(self) -> None:
        outbox = self.outbox
        if len(outbox) <= OUTBOX_MAX:
            return
        over = len(outbox) - OUTBOX_MAX
        dropped = [k for k, _ in zip(outbox, range(over), strict=False)]
        for k in dropped:
            del outbox[k]
        self.acked.extend(dropped)  # off the local queue too; the entries stay in the local tier
        assert self.shared is not None
        self.local.warnings.warn(
            "outbox",
            f"lmms-cache: more than {OUTBOX_MAX:,} responses wait for the shared cache at {self.target}; the "
            f"oldest no longer wait (they stay in the local cache at {self.local.location}: `lmms-cache copy "
            f"{self.local.location} URL` sends them)",
            again=False,
        )

    def drain(self, *, max_batches: int | None = None, deadline: float | None = None) -> int:
        """Send what the outbox holds to the shared tier, oldest first, in batches of
        :data:`PUSH_BATCH` (a new batch alone: in one); stops at the first failure. Returns
        how many the shared tier acknowledged."""
        shared = self.shared
        if shared is None or not self.outbox:
            return 0
        outbox = self.outbox
        pushed = batches = 0
        while outbox and (max_batches is None or batches < max_batches):
            if deadline is not None and self.monotonic() >= deadline:
                break
            keys = [k for k, _ in zip(outbox, range(PUSH_BATCH), strict=False)]
            batch = self.resolve(keys)
            if batch is None:
                break
            if batch and not shared.put(batch, what=f"writing to the shared cache at {shared.location}"):
                break
            for k in keys:
                del outbox[k]
            if self.queue is not None:
                self.acked.extend(keys)
            pushed += len(batch)
            batches += 1
        return pushed

    def resolve(self, keys: list[bytes]) -> list[Entry] | None:
        """The entries of queued ``keys``: kept in memory, else read back from the local tier
        (an entry evicted meanwhile is left out); None when that read fails."""
        entries = [self.outbox[k] for k in keys]
        unknown = [k for k, e in zip(keys, entries, strict=True) if e is None]
        if not unknown:
            return entries  # type: ignore[return-value]
        local = self.local
        read = local.call("reading the outbox", lambda: local.store.entries(unknown))
        if read is None:
            return None
        by_key = {e.key: e for e in read}
        out = []
        for k, e in zip(keys, entries, strict=True):
            e = e if e is not None else by_key.get(k)
            if e is not None:
                out.append(e)
        return out

    def flush(self) -> None:
        """Retry what waits: the local backlog, the outbox, the acknowledged keys."""
        self.local.save([])
        if self.shared is not None and self.shared.writable:
            self.load_outbox()
            self.drain()
            self.settle()

    def settle(self) -> None:
        """Take the acknowledged keys off the local queue now."""
        queue = self.queue
        if queue is not None and self.acked:
            sent = self.acked[:]
            if self.local.call("updating the outbox", lambda: queue.dequeue(self.target, sent), kind="write") is not None:
                del self.acked[: len(sent)]

    def touch(self, counts: Mapping[bytes, int], when: float) -> None:
        """Record hits in the tier that served each."""
        served = self.served_shared
        if not served or self.shared is None:
            self.local.touch(counts, when)
            return
        local = {k: n for k, n in counts.items() if k not in served}
        shared = {k: n for k, n in counts.items() if k in served}
        served.clear()
        self.local.touch(local, when)
        self.shared.touch(shared, when)

    def waiting(self) -> int:
        return len(self.outbox)

    def close(self, *, drain_seconds: float = CLOSE_DRAIN) -> None:
        """Save what waits (the outbox for at most ``drain_seconds``), then release the stores."""
        self.local.save([])
        shared = self.shared
        if shared is not None and shared.writable:
            self.load_outbox()
            self.drain(deadline=self.monotonic() + drain_seconds)
            self.settle()
            if self.outbox:
                where = (f"queued in {self.local.location}; `lmms-cache push {self.local.location}` sends them"
                         if self.queue is not None else "they are lost: the local cache is unusable")  # fmt: skip
                log.warning("lmms-cache: %d responses could not be sent to the shared cache at %s (%s)",
                            len(self.outbox), self.target, where)  # fmt: skip
        if self.local.pending:
            log.info("lmms-cache: %d responses could not be written to %s", len(self.local.pending),
                     self.local.location)  # fmt: skip
        for tier in self.stores():
            tier.close()


def unique(keys: Iterable[bytes | None]) -> list[bytes]:
    """The distinct keys, in order, without None."""
    return [k for k in dict.fromkeys(keys) if k is not None]
