"""One call through the cache: key, look up, send the misses in batches, write, merge.

:class:`Engine` does the work of ``lm.generate_until(requests)`` once the proxy has
decided the call goes through the cache (mode, identity, weights):

1. key the requests a chunk at a time (before the model sees them: models mutate
   ``gen_kwargs``) and look each chunk up in one round trip (:class:`~lmms_cache.tiers.Tiers`);
2. de-duplicate the misses and send them to the model in batches of ``batch_size``
   (lock-stepped ranks pad to the same number of model calls), writing each batch's
   responses in one transaction as soon as it returns (failures are never written);
3. merge hits and fresh responses back into request order.

Hits are recorded in batches (:class:`HitLog`). Observers (:class:`Observer`) watch the
call without taking part: what explains misses, what counts hits for a summary.
"""

from __future__ import annotations

import copy
import gc
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from . import codec, trust
from .documents import Recording, encode_deps
from .explain import describe
from .guard import Warnings
from .identity import ModelIdentity
from .key import KEY_SCHEMA, KeyBuilder, RequestKey
from .store import Entry
from .tiers import Tiers, unique

__all__ = ["KEY_CHUNK", "TOUCH_EVERY", "TOUCH_MAX", "CacheStats", "Clock", "Engine", "HitLog", "Observer",
           "SystemClock"]  # fmt: skip

log = logging.getLogger("lmms_cache")

# Requests keyed and looked up at a time within a call (one SELECT of the SQLite store).
KEY_CHUNK = 900
# Hit bookkeeping (counts and last use, for stats and LRU eviction) is written at most every
# TOUCH_EVERY seconds or TOUCH_MAX distinct keys, and when the proxy closes or the process
# exits: one statement per flush, never a write per hit.
TOUCH_EVERY = 10.0
TOUCH_MAX = 50_000
_KEY_SCHEMA = KEY_SCHEMA.decode()
_wall = time.time
_monotonic = time.monotonic


class Clock(Protocol):
    """What the proxy reads the time from: wall-clock seconds (creation, last use, expiry)
    and monotonic seconds (how often hits are recorded). Tests pass one they move by hand."""

    def time(self) -> float: ...

    def monotonic(self) -> float: ...


class SystemClock:
    """The system's clocks."""

    def time(self) -> float:
        return _wall()

    def monotonic(self) -> float:
        return _monotonic()

    def __reduce__(self) -> tuple[Any, ...]:
        return (SystemClock, ())


@dataclass
class CacheStats:
    """Cumulative counts of a proxy (``lm.cache_stats``)."""

    calls: int = 0
    requests: int = 0
    hits: int = 0
    misses: int = 0  # requests answered by the model (duplicates of one request count once)
    written: int = 0  # responses made durable
    failures: int = 0  # responses the failure rule kept out of the cache
    bypassed: int = 0  # requests that could not be keyed and went to the model uncached
    refused: int = 0  # misses refused with on_miss="error"
    model_calls: int = 0
    model_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Observer:
    """Watches calls without taking part in them (every method does nothing by default)."""

    def hits(self, counts: Mapping[bytes, int]) -> None:
        """Hits recorded since the last time (key -> count), as they go to the store."""

    def misses(self, method: str, missed: Sequence[RequestKey], described: Mapping[bytes, tuple[str, str | None]]) -> None:
        """A call's distinct keyed misses, before the model answers them (``described``:
        key -> what the entry will store to explain later misses)."""


class HitLog:
    """Hit counts gathered between flushes: written every :data:`TOUCH_EVERY` seconds or
    :data:`TOUCH_MAX` keys, at close, and at exit (a finalizer holds this, not the proxy)."""

    def __init__(self, tiers: Tiers, clock: Clock, observers: Sequence[Observer] = (), *, enabled: bool = True) -> None:
        self.tiers = tiers
        self.clock = clock
        self.observers = tuple(observers)
        self.enabled = enabled
        self.touched: dict[bytes, int] = {}
        self.at = clock.monotonic()

    def record(self, keys: list[RequestKey], found: dict[bytes, Any]) -> None:
        if not self.enabled or not found:
            return
        touched = self.touched
        for rk in keys:
            if rk.key in found:
                touched[rk.key] = touched.get(rk.key, 0) + 1
        if len(touched) >= TOUCH_MAX or self.clock.monotonic() - self.at >= TOUCH_EVERY:
            self.flush()

    def flush(self) -> None:
        self.at = self.clock.monotonic()
        if self.touched:
            counts = dict(self.touched)
            self.touched.clear()
            for observer in self.observers:
                observer.hits(counts)
            self.tiers.touch(counts, self.clock.time())


class _Call:
    """The state of one call's misses."""

    __slots__ = ("args", "described", "jobs", "kwargs", "method", "missed", "model_method", "requests", "results",
                 "todo")  # fmt: skip

    def __init__(self, method: str, model_method: Callable[..., Any], requests: list[Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> None:  # fmt: skip
        self.method = method
        self.model_method = model_method
        self.requests = requests
        self.args = args
        self.kwargs = kwargs
        self.results: list[Any] = [None] * len(requests)
        self.todo: dict[bytes, list[int]] = {}  # key -> the indexes of the requests it answers
        self.jobs: list[tuple[int, bytes | None]] = []  # (first request index, key) to compute
        self.missed: dict[int, RequestKey] = {}  # the keys of the requests to compute
        self.described: dict[bytes, tuple[str, str | None]] = {}


class Engine:
    """The handling of one proxy's calls (see the module notes).

    Args:
        model: the wrapped model.
        keys: the key builder.
        tiers: where responses are looked up and written.
        hits: the hit log.
        identity: the model identity now (part of every entry).
        warnings: the proxy's warnings.
        clock: creation times and expiry.
        batch_size, is_failure, lockstep, progress, on_miss, max_age, refresh: the options.
        settle: after the model ran, what it changed in itself is not a new identity.
        observers: told about misses.
        error: raised with ``on_miss="error"`` (method, keys, requests).
    """

    def __init__(self, model: Any, keys: KeyBuilder, tiers: Tiers, hits: HitLog, *, identity: ModelIdentity,
                 warnings: Warnings, clock: Clock, stats: CacheStats, batch_size: int,
                 is_failure: Callable[[Any], bool], lockstep: bool | Callable[[int], int], progress: bool | None,
                 on_miss: str, max_age: float | None, refresh: bool, settle: Callable[[], None],
                 observers: Sequence[Observer] = (),
                 error: Callable[[str, list[RequestKey], list[Any]], Exception]) -> None:  # fmt: skip
        self.model = model
        self.keys = keys
        self.tiers = tiers
        self.hits = hits
        self.identity = identity
        self.warnings = warnings
        self.clock = clock
        self.stats = stats
        self.batch_size = batch_size
        self.is_failure = is_failure
        self.lockstep = lockstep
        self.progress = progress
        self.on_miss = on_miss
        self.max_age = max_age
        self.refresh = refresh
        self.settle = settle
        self.observers = tuple(observers)
        self.error = error
        self.origin = trust.local_origin()  # who writes this proxy's entries

    def lookup(self, keys: list[RequestKey]) -> dict[bytes, Any]:
        """The stored responses of ``keys`` (fresh enough), decoded."""
        fresh = None if self.max_age is None else self.clock.time() - self.max_age
        return self.tiers.lookup(unique(rk.key for rk in keys), fresh)

    # -- one call ---------------------------------------------------------------------------

    def run(self, method: str, model_method: Callable[..., Any], requests: list[Any], args: tuple[Any, ...],
            kwargs: dict[str, Any]) -> list[Any]:  # fmt: skip
        call = _Call(method, model_method, requests, args, kwargs)
        results, todo, jobs, missed = call.results, call.todo, call.jobs, call.missed
        shared = self.keys.new_call()  # what the call's keys share (document and media digests)
        hits = bypassed = 0
        stats = self.stats
        with_view = self.keys.with_view  # keyed without views (a hit needs none): a miss gets its own
        with _GcPaused():
            # Keyed and looked up a chunk at a time: a hit's key (with its ~prompt-sized
            # material) is dropped as soon as it is answered, so a call of 10,000 hits holds
            # no more than a chunk of keys at once.
            for start in range(0, len(requests), KEY_CHUNK):
                keys = self.keys.keys(method, requests[start : start + KEY_CHUNK], call=shared, views=False)
                found = self.lookup(keys) if not self.refresh else {}
                for i, rk in enumerate(keys, start):
                    key = rk.key
                    if key is None:
                        jobs.append((i, None))
                        missed[i] = with_view(method, requests[i], rk)
                        bypassed += 1
                    elif key in found:
                        results[i] = found[key]
                        hits += 1
                    elif key in todo:
                        todo[key].append(i)
                    else:
                        todo[key] = [i]
                        jobs.append((i, key))
                        missed[i] = with_view(method, requests[i], rk)
                self.hits.record(keys, found)
                del keys, found
            stats.hits += hits
            stats.bypassed += bypassed
        self.keys.end_call()  # the media digests derived for keying, memoized
        if jobs and self.on_miss == "error":
            stats.refused += len(jobs)
            raise self.error(method, [missed[i] for i, _ in jobs], [requests[i] for i, _ in jobs])
        # Described now, before the model can change gen_kwargs in place.
        memo: dict[bytes, Any] = {}
        call.described = {key: describe(missed[i], memo) for i, key in jobs if key is not None}
        if call.described and self.observers:
            keyed = [missed[i] for i, key in jobs if key is not None]
            for observer in self.observers:
                observer.misses(method, keyed, call.described)
        try:
            written, failures, model_seconds = self.compute(call)
        finally:
            if jobs:
                self.settle()  # what the model changed in itself is not a new identity
        log.info(
            "lmms-cache %s: %d requests, %d hits, %d misses, %d written, %d not cached, %.2fs in the model",
            method, len(requests), hits, len(jobs), written, failures, model_seconds,
        )  # fmt: skip
        return results

    def compute(self, call: _Call) -> tuple[int, int, float]:
        """Send the call's misses to the model in batches, writing each batch's responses.
        Returns (written, failures, model seconds)."""
        jobs, size = call.jobs, self.batch_size
        batches = [jobs[s : s + size] for s in range(0, len(jobs), size)]
        padding = self.padding(len(batches))
        stats = self.stats
        written = failures = 0
        model_seconds = 0.0
        bar = self.bar(call.method, len(jobs))
        requests, keys, results, todo = call.requests, call.missed, call.results, call.todo
        try:
            for batch in batches:
                # A multi-round request's step function, recording what its rounds read.
                recordings: dict[int, Recording] = {}
                asked = [self.for_model(requests[i], keys[i], recordings, i) for i, _ in batch]
                started = time.perf_counter()
                responses = call.model_method(asked, *call.args, **call.kwargs)
                elapsed = time.perf_counter() - started
                model_seconds += elapsed
                stats.model_calls += 1
                stats.model_seconds += elapsed
                stats.misses += len(batch)
                responses = list(responses)
                if len(responses) != len(batch):
                    raise RuntimeError(
                        f"{type(self.model).__name__}.{call.method} returned {len(responses)} "
                        f"responses for {len(batch)} requests"
                    )
                entries = []
                now = self.clock.time()
                signing = trust.secret()
                for (i, key), response in zip(batch, responses, strict=True):
                    if key is None:
                        results[i] = response
                        continue
                    for j in todo[key]:
                        results[j] = response
                    if self.is_failure(response):
                        failures += 1
                        continue
                    recording = recordings.get(i)
                    if recording is not None and not recording.complete:
                        continue  # a later round's media could not be read: nothing to check on a hit
                    deps = encode_deps(recording.read) if recording is not None else None
                    entry = self.entry(call.method, key, keys[i], response, now, elapsed / len(batch),
                                       call.described[key], deps, signing)  # fmt: skip
                    if entry is not None:
                        entries.append(entry)
                done = self.tiers.save(entries)
                stats.written += done
                written += done
                if bar is not None:
                    bar.update(len(batch))
            for _ in range(padding):
                # Discarded: only the number of model calls matters to a lock-stepped model.
                call.model_method([requests[0]], *call.args, **call.kwargs)
        finally:
            if bar is not None:
                bar.close()
        stats.failures += failures
        return written, failures, model_seconds

    def for_model(self, request: Any, rk: RequestKey, recordings: dict[int, Recording], i: int) -> Any:
        """``request``, or for a multi-round one a copy whose step function records what the
        model's later rounds read (their media are not known before the model asks)."""
        rview = rk.view
        if rview is None or rview.step is None or rk.key is None:
            return request
        args = list(getattr(request, "args", request))
        recording = recordings[i] = Recording(args[rview.step], self.keys.encoder)
        args[rview.step] = recording
        if isinstance(request, tuple):
            return tuple(args)
        copied = copy.copy(request)
        if hasattr(copied, "arguments"):  # lmms-eval's Instance: .args reads .arguments
            copied.arguments = tuple(args)
        else:
            copied.args = tuple(args)
        return copied

    def entry(self, method: str, key: bytes, rk: RequestKey, response: Any, now: float,
              seconds: float, described: tuple[str, str | None], deps: bytes | None = None,
              signing: bytes | None = None) -> Entry | None:  # fmt: skip
        """The entry storing ``response`` (None: it cannot be encoded; said once)."""
        try:
            value = codec.encode(response)
        except Exception as exc:  # anything dill cannot serialize stays uncached
            self.warnings.warn(
                "encode",
                f"lmms-cache: a {method} response of type "
                f"{type(response).__name__} cannot be stored ({exc}); it stays uncached",
                again=False,
            )
            return None
        rv = rk.view
        return Entry(key=key, value=value, model=self.identity.digest, method=method,
                     task=None if rv is None or rv.task is None else str(rv.task),
                     split=None if rv is None or rv.split is None else str(rv.split),
                     doc_id=None if rv is None else rv.doc_id, created_at=now, model_seconds=seconds,
                     raw_size=codec.raw_size(value), used_at=now,
                     components=described[0], prompt=described[1], key_schema=_KEY_SCHEMA,
                     deps=deps, origin=self.origin,
                     signature=trust.sign_with(signing, key, value))  # fmt: skip

    def padding(self, local_batches: int) -> int:
        """Model calls to add so that every rank makes as many (``lockstep``)."""
        lockstep = self.lockstep
        if not lockstep:
            return 0
        agree = lockstep if callable(lockstep) else _torch_distributed_max
        return max(0, int(agree(local_batches)) - local_batches)

    def bar(self, method: str, total: int) -> Any:
        show = self.progress
        if show is None:
            show = sys.stderr.isatty()
        if not show or total == 0:
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=f"lmms-cache {method} misses", unit="req", leave=False)


class _GcPaused:
    """No cyclic garbage collection while keying and answering a call.

    Keying allocates a few small containers per request and keeps them for the call: with
    10,000 requests the collector would run hundreds of times over objects that all survive
    (a quarter of a text hit's cost here, more in an evaluator's large heap). The objects
    hold no cycles; collection resumes, as it was, when the call's hits are answered.
    (A class rather than a contextmanager generator: it is entered once per call.)
    """

    __slots__ = ("enabled",)

    def __enter__(self) -> None:
        self.enabled = gc.isenabled()
        if self.enabled:
            gc.disable()

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            gc.enable()


def _torch_distributed_max(local: int) -> int:
    """The largest ``local`` over all ranks (torch.distributed), or ``local`` when single."""
    torch = sys.modules.get("torch")
    if torch is None:
        return local
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        return local
    device = "cpu"
    if dist.get_backend() == "nccl":
        device = f"cuda:{torch.cuda.current_device()}"
    t = torch.tensor([local], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
