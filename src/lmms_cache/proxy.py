"""The caching proxy: intercept the request methods, answer hits, batch the misses.

One call (``lm.generate_until(requests)``):

1. key every request (before the model sees it: models mutate ``gen_kwargs``);
2. look all keys up in one round trip;
3. send the misses, de-duplicated, to the model in batches of ``batch_size``; write each
   batch's responses in one transaction as soon as it returns (failures are never
   written);
4. merge hits and fresh responses back into request order.

Store problems never reach the evaluation: they become misses (or unsaved responses)
plus one warning per kind of problem.
"""

from __future__ import annotations

import copy
import datetime
import gc
import json
import logging
import math
import os
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import wrapt

from . import codec, trust
from .documents import Derivations, Recording, deps_hold, encode_deps
from .explain import describe, explain_against
from .fingerprint import Encoder, FileDigests
from .identity import ModelIdentity, Tracker
from .identity import differences as identity_differences
from .key import KEY_SCHEMA, KeyBuilder, RequestKey
from .store import Entry, NullStore, Store, StoreError, default_location, open_store
from .units import parse_duration, parse_size

__all__ = ["DEFAULT_BATCH_SIZE", "METHODS", "MODES", "CacheMissError", "CacheStats", "CachedModel", "cached",
           "default_is_failure", "is_cached"]  # fmt: skip

log = logging.getLogger("lmms_cache")

METHODS = ("generate_until", "loglikelihood", "loglikelihood_rolling", "generate_until_multi_round")
MODES = ("readwrite", "readonly", "refresh", "off")
# 64 misses per model call and per durable write: a crash loses at most 64 paid responses,
# while a model that batches or runs requests concurrently inside one call (vLLM, API
# wrappers with num_concurrent) still gets enough work per call to stay efficient.
DEFAULT_BATCH_SIZE = 64
# Requests keyed and looked up at a time within a call (one SELECT of the SQLite store).
_KEY_CHUNK = 900
_MAX_PENDING = 100_000  # unsaved entries kept for a retry while the store refuses writes
# Hit bookkeeping (counts and last use, for stats and LRU eviction) is written at most every
# _TOUCH_EVERY seconds or _TOUCH_MAX distinct keys, and when the proxy closes or the process
# exits: one statement per flush, never a write per hit.
_TOUCH_EVERY = 10.0
_TOUCH_MAX = 50_000

_FAILURE_MARKERS = ("[LMMS_EVAL_REQUEST_FAILED", "[LMMS_EVAL_BUDGET_EXCEEDED]")
_KEY_SCHEMA = KEY_SCHEMA.decode()


def default_is_failure(response: Any) -> bool:
    """The default rule for responses that must never be cached.

    A failure is ``None``; empty or whitespace text (API wrappers return ``""`` when they
    give up); text starting with lmms-eval's markers ``[LMMS_EVAL_REQUEST_FAILED`` or
    ``[LMMS_EVAL_BUDGET_EXCEEDED]``; a NaN score (also as the first item of a
    ``(logprob, is_greedy)`` pair); an object with a ``.text`` (``GenerationResult``)
    whose text is a failure; and a multi-round answer (a list) with any failed round.

    Example:
        >>> default_is_failure(""), default_is_failure("cat"), default_is_failure((float("nan"), False))
        (True, False, True)
    """
    if response is None:
        return True
    if isinstance(response, str):
        text = response.strip()
        return not text or text.startswith(_FAILURE_MARKERS)
    if isinstance(response, float):
        return math.isnan(response)
    if isinstance(response, tuple) and response and isinstance(response[0], float):
        return math.isnan(response[0])
    if isinstance(response, list):
        return not response or any(default_is_failure(r) for r in response)
    inner = getattr(response, "text", None)
    if inner is not None or hasattr(response, "text"):
        return default_is_failure(inner)
    return False


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


class CacheMissError(LookupError):
    """Raised with ``on_miss="error"`` when a call has requests the cache cannot answer.

    ``missing`` lists one line per distinct missing request (method, document, prompt).
    """

    def __init__(self, method: str, keys: Sequence[RequestKey], requests: Sequence[Any]) -> None:
        self.missing = [_describe(method, rk, r) for rk, r in zip(keys, requests, strict=True)]
        shown = "\n  ".join(self.missing[:20])
        more = f"\n  ... and {len(self.missing) - 20} more" if len(self.missing) > 20 else ""
        super().__init__(
            f"{len(self.missing)} {method} request(s) are not in the cache "
            f"(on_miss='error'):\n  {shown}{more}"
        )


def _describe(method: str, rk: RequestKey, request: Any) -> str:
    view = rk.view
    where = ""
    if view is not None and view.task is not None:
        where = f"{view.task}/{view.split}/{view.doc_id} "
    args = getattr(request, "args", request)
    prompt = args[0] if isinstance(args, tuple) and args and isinstance(args[0], str) else ""
    prompt = " ".join(prompt.split())
    prompt = prompt if len(prompt) <= 60 else prompt[:57] + "..."
    status = "" if rk.key is not None else f" (uncacheable: {rk.bypass_reason})"
    if rk.occurrence is not None:
        status += f" (sample #{rk.occurrence + 1})"
    return f"{method} {where}{prompt!r}{status}"


def is_cached(obj: Any) -> bool:
    """True for a proxy made by :func:`cached`, False for anything else (a model)."""
    return isinstance(type(obj), type) and issubclass(type(obj), CachedModel)


def cached(
    model: Any,
    path: str | os.PathLike[str] | None = None,
    *,
    model_id: str | None = None,
    settings: Sequence[str] = (),
    batch_size: int | None = None,
    mode: str | None = None,
    is_failure: Callable[[Any], bool] | None = None,
    sampling: bool | None = None,
    progress: bool | None = None,
    durable: bool = True,
    lockstep: bool | Callable[[int], int] = False,
    on_miss: str = "compute",
    max_size: str | int | None = None,
    expire_after: str | float | datetime.timedelta | None = None,
    trust: bool = False,
) -> CachedModel:
    """Wrap ``model`` so that every response it has given once is answered from disk.

    Args:
        model: an lmms-eval or lm-eval model (anything with one of :data:`METHODS`).
        path: the cache directory; default ``$LMMS_CACHE_DIR``, else the per-user cache
            directory (``~/.cache/lmms-cache`` on Linux).
        model_id: names *which model* it is, replacing what the identity derives from the
            class, its code, its checkpoint, tokenizer and endpoint. Its settings still
            count (a prompt sweep with a model_id misses as it should).
        settings: more attribute names that change the model's answers, for a setting
            the model stores under a name its constructor does not take.
        batch_size: misses per model call and per durable write (default
            :data:`DEFAULT_BATCH_SIZE`). Smaller loses less on a crash; larger keeps models
            that batch or run requests concurrently inside one call efficient.
        mode: ``"readwrite"`` (default), ``"readonly"`` (serve hits, never write; the store
            is opened read-only), ``"refresh"`` (recompute everything and overwrite) or
            ``"off"`` (pass-through); default ``$LMMS_CACHE_MODE``.
        is_failure: ``response -> bool``; True keeps a response out of the cache. Replaces
            :func:`default_is_failure`.
        sampling: force every request to be treated as sampled (True: the k-th
            occurrence of a request is its own entry) or deterministic (False); None
            guesses from ``do_sample``, ``temperature > 0``, ``n > 1`` and ``repeats > 1``.
        progress: a progress bar over the misses; default: when stderr is a terminal.
        durable: fsync every batch's commit (survives power loss); False survives only a
            killed process, with fewer fsyncs.
        lockstep: for models that must step together across ranks (collectives inside
            ``generate_until``): every rank then calls the model equally often, padding
            with calls whose results are discarded. True agrees on the count through
            ``torch.distributed``; a callable ``local_count -> max_count`` does it otherwise.
        on_miss: ``"compute"`` (default) sends misses to the model; ``"error"`` raises
            :class:`CacheMissError` listing them instead (replay-only runs).
        max_size: a limit on the stored values (``"20GB"``, ``"512MiB"`` or bytes): writing
            past it evicts the least recently used entries.
        expire_after: entries older than this (``"30d"``, ``"12h"``, seconds or a
            ``timedelta``) count as misses and are recomputed.
        trust: use a cache file owned by another user. Values are pickles and loading one
            runs code, so such a file is refused (with a warning, running uncached) unless
            trusted.

    Returns:
        A proxy that behaves like ``model``: ``isinstance(proxy, type(model))`` holds,
        attribute reads and writes reach the model, ``proxy.__wrapped__`` is the model.

    Raises:
        TypeError: ``model`` has none of the request methods.
        ValueError: an unknown ``mode`` or ``on_miss``, a ``batch_size`` below 1, an empty
            ``model_id``, a bad size or duration; every option is checked before the
            cache directory is touched.

    Example:
        >>> class Echo:
        ...     model_name = "echo-1"
        ...     def generate_until(self, requests):
        ...         return [r.args[0].upper() for r in requests]
        >>> import tempfile; from types import SimpleNamespace as R
        >>> directory = tempfile.TemporaryDirectory()
        >>> lm = cached(Echo(), directory.name)
        >>> lm.generate_until([R(args=("hi", {}))]), lm.generate_until([R(args=("hi", {}))])
        (['HI'], ['HI'])
        >>> lm.cache_stats.hits
        1
        >>> lm.cache_close(); directory.cleanup()
    """
    options = Options.make(
        path=path, model_id=model_id, settings=settings, batch_size=batch_size, mode=mode,
        is_failure=is_failure, sampling=sampling, progress=progress, durable=durable,
        lockstep=lockstep, on_miss=on_miss, max_size=max_size, expire_after=expire_after, trust=trust,
    )  # fmt: skip
    return wrap(model, options)


def wrap(model: Any, options: Options) -> CachedModel:
    """:func:`cached` with options made already (``Options.make``); ``options.identity``
    fixes the identity of a model whose attributes must not be read (one built on its
    first miss, whose identity comes from the arguments it will be built with)."""
    if is_cached(model):
        raise TypeError("the model is already wrapped by lmms-cache")
    methods = tuple(m for m in METHODS if callable(getattr(model, m, None)))
    if not methods:
        raise TypeError(
            f"{type(model).__name__} has none of the request methods {', '.join(METHODS)}; "
            "cached() wraps lmms-eval / lm-eval models"
        )
    return _proxy_class(type(model), methods)(model, options)


@dataclass(frozen=True)
class Options:
    """The options of one proxy, checked once (:meth:`make`) before anything touches the disk."""

    path: str | None = None
    model_id: str | None = None
    settings: tuple[str, ...] = ()
    batch_size: int = DEFAULT_BATCH_SIZE
    mode: str = "readwrite"
    is_failure: Callable[[Any], bool] | None = None
    sampling: bool | None = None
    progress: bool | None = None
    durable: bool = True
    lockstep: bool | Callable[[int], int] = False
    on_miss: str = "compute"
    max_size: int | None = None  # bytes
    expire_after: float | None = None  # seconds
    trust: bool = False
    identity: ModelIdentity | None = field(default=None, compare=False)  # fixed (lmms-cache eval)

    @classmethod
    def make(cls, *, path: str | os.PathLike[str] | None = None, model_id: str | None = None,
             settings: Sequence[str] = (), batch_size: int | None = None, mode: str | None = None,
             is_failure: Callable[[Any], bool] | None = None, sampling: bool | None = None,
             progress: bool | None = None, durable: bool = True,
             lockstep: bool | Callable[[int], int] = False, on_miss: str = "compute",
             max_size: str | int | None = None,
             expire_after: str | float | datetime.timedelta | None = None, trust: bool = False,
             identity: ModelIdentity | None = None) -> Options:  # fmt: skip
        """Validated options.

        Raises:
            ValueError, TypeError: naming the bad value.
        """
        if mode is None:
            env = os.environ.get("LMMS_CACHE_MODE")
            if env and env not in MODES:
                raise ValueError(f"$LMMS_CACHE_MODE must be one of {', '.join(MODES)}, not {env!r}")
            mode = env or "readwrite"
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        if batch_size is None:
            batch_size = DEFAULT_BATCH_SIZE
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer of at least 1, not {batch_size!r}")
        if model_id is not None and (not isinstance(model_id, str) or not model_id):
            raise ValueError(f"model_id must be a non-empty string, not {model_id!r}")
        if isinstance(settings, str) or not all(isinstance(s, str) and s for s in settings):
            raise ValueError(f"settings must be a list of attribute names, not {settings!r}")
        if is_failure is not None and not callable(is_failure):
            raise TypeError(f"is_failure must be callable, not {is_failure!r}")
        if on_miss not in ("compute", "error"):
            raise ValueError(f"on_miss must be 'compute' or 'error', not {on_miss!r}")
        if sampling not in (None, True, False):
            raise ValueError(f"sampling must be True, False or None, not {sampling!r}")
        if not (isinstance(lockstep, bool) or callable(lockstep)):
            raise TypeError(f"lockstep must be True, False or a callable, not {lockstep!r}")
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a directory path, not {path!r}")
        return cls(
            path=os.fspath(path) if path is not None else None, model_id=model_id,
            settings=tuple(settings), batch_size=batch_size, mode=mode, is_failure=is_failure,
            sampling=sampling, progress=progress, durable=bool(durable), lockstep=lockstep,
            on_miss=on_miss, max_size=parse_size(max_size) if max_size is not None else None,
            expire_after=parse_duration(expire_after) if expire_after is not None else None,
            trust=bool(trust), identity=identity,
        )  # fmt: skip


_classes: dict[tuple[type, tuple[str, ...]], type] = {}


def _proxy_class(model_cls: type, methods: tuple[str, ...]) -> type[CachedModel]:
    """A proxy subclass per model class, named like it.

    Harnesses name the model in their results by ``type(lm).__name__``/``__module__``,
    which a proxy cannot forward; a subclass carrying the model class's names can. Only
    the methods the model has are intercepted, so ``hasattr`` answers as for the model.
    """
    cls = _classes.get((model_cls, methods))
    if cls is None:
        namespace: dict[str, Any] = {"__qualname__": model_cls.__qualname__}
        for name in methods:
            namespace[name] = _interceptor(name)
        cls = type(model_cls.__name__, (CachedModel,), namespace)
        cls.__module__ = model_cls.__module__
        _classes[(model_cls, methods)] = cls
    return cls


def _interceptor(method: str) -> Callable[..., Any]:
    def intercept(self: CachedModel, requests: Sequence[Any], *args: Any, **kwargs: Any) -> Any:
        return self._self_cache.run(method, requests, args, kwargs)

    intercept.__name__ = intercept.__qualname__ = method
    intercept.__doc__ = f"``{method}`` answered from the cache where possible."
    return intercept


def _rebuild(model: Any, options: Options, state: Any) -> CachedModel:
    """A proxy like the pickled (or copied) one, keying as it did.

    The keyed identity is carried over rather than derived again: the model changes
    itself as it runs, and a copy made mid-run must still find the entries its original
    wrote.
    """
    methods = tuple(m for m in METHODS if callable(getattr(model, m, None)))
    return _proxy_class(type(model), methods)(model, options, state)


class CachedModel(wrapt.ObjectProxy):  # type: ignore[type-arg]
    """The proxy :func:`cached` returns (one subclass per model class).

    Everything not defined here is the model's. The cache itself is a plain object in
    ``_self_cache`` (wrapt keeps ``_self_*`` attributes on the proxy; each costs a lookup
    through the proxy, so the work happens on the plain object).
    """

    def __init__(self, model: Any, options: Options, state: Any = None) -> None:
        super().__init__(model)
        self._self_cache = cache = _Cache(model, options, state)
        if cache.mode not in ("off", "readonly"):
            # Hit counts gathered since the last flush are written when the proxy goes away.
            weakref.finalize(self, _flush_touched, cache.store, cache.touched)

    # -- public, proxy-owned surface ------------------------------------------------------

    @property
    def cache_stats(self) -> CacheStats:
        """Cumulative counts since wrapping."""
        return self._self_cache.stats

    @property
    def cache_identity(self) -> ModelIdentity:
        """The model identity that is part of every key (as of the last call)."""
        return self._self_cache.tracker.identity

    def __setattr__(self, name: str, value: Any) -> None:
        # An attribute assigned through the proxy is a setting from now on (a prompt sweep:
        # ``lm.system_prompt = p``), whether or not the constructor takes it.
        super().__setattr__(name, value)
        if not name.startswith("_self_"):
            cache = getattr(self, "_self_cache", None)  # (a proxy's __dict__ is the model's)
            if cache is not None:
                cache.tracker.note_set(name)

    @property
    def cache_store(self) -> Store:
        """The store behind the proxy (a :class:`NullStore` when the cache is unusable)."""
        return self._self_cache.store

    def cache_explain(self, method: str, requests: Sequence[Any]) -> list[str]:
        """Why each request would hit or miss, without calling the model or using up samples.

        Returns one line per request: ``"hit"``, ``"uncacheable: …"`` or ``"miss: …"``
        naming what differs from the nearest stored entry of the same document or prompt
        (``gen_kwargs.max_new_tokens: 16 → 32``, ``visual: content changed``,
        ``model identity changed``).
        """
        return self._self_cache.explain(method, requests)

    def cache_close(self) -> None:
        """Retry unsaved entries once more and release the store's connection."""
        self._self_cache.close()

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return _rebuild, (self.__wrapped__, self._self_cache.options, self._self_cache.tracker.state())

    def __copy__(self) -> CachedModel:
        return _rebuild(self.__wrapped__, self._self_cache.options, self._self_cache.tracker.state())

    def __deepcopy__(self, memo: dict[int, Any]) -> CachedModel:
        import copy

        cache = self._self_cache
        return _rebuild(copy.deepcopy(self.__wrapped__, memo), cache.options, cache.tracker.state())

    def __repr__(self) -> str:
        cache = self._self_cache
        return f"<lmms_cache {cache.mode} proxy of {self.__wrapped__!r} at {cache.location}>"


class _Cache:
    """The cache behind one proxy: its options, key builder, store and counters, and the
    handling of each call (:meth:`run`)."""

    def __init__(self, model: Any, options: Options, state: Any) -> None:
        self.model = model
        self.options = options
        self.mode = options.mode
        self.batch_size = options.batch_size
        self.is_failure = options.is_failure or default_is_failure
        self.progress = options.progress
        self.lockstep = options.lockstep
        self.on_miss = options.on_miss
        self.max_size = options.max_size
        self.max_age = options.expire_after
        # Hits are recorded (counts, last use) in batches, not with a write per call.
        self.touched: dict[bytes, int] = {}
        self.touched_at = time.monotonic()
        self.stats = CacheStats()
        self.warned: set[str] = set()
        self.pending: list[Entry] = []
        self.new_files: list[tuple[str, tuple[int, ...], bytes]] = []
        self.remembered: set[str] = set()  # model identities recorded in the store
        self.origin = trust.local_origin()  # who writes this proxy's entries
        location = options.path if options.path is not None else default_location()
        self.location = os.path.abspath(os.path.expanduser(location))
        self.store = self.open(options.durable)
        files = self.files = FileDigests(lookup=self.file_lookup, remember=self.file_remember)
        self.tracker = Tracker(model, model_id=options.model_id, settings=options.settings, files=files,
                               fixed=options.identity)  # fmt: skip
        if state is not None:
            self.tracker.adopt(*state)
        identity = self.tracker.identity
        log.info("lmms-cache: %s at %s, model %s (identity %s)", self.mode, self.location, identity.label,
                 identity.digest[:12])  # fmt: skip
        log.debug("lmms-cache: model identity %s = %s", identity.digest, identity.json())
        derivations = Derivations(self.store, files, writable=self.mode not in ("readonly", "off"))
        self.keys = KeyBuilder(identity, model, Encoder(files), sampling=options.sampling, warn=self.warn,
                               derivations=derivations)  # fmt: skip
        self.remember_model(identity)

    @property
    def identity(self) -> ModelIdentity:
        return self.tracker.identity

    def remember_model(self, identity: ModelIdentity) -> None:
        if self.mode in ("off", "readonly") or identity.digest in self.remembered:
            return
        self.remembered.add(identity.digest)
        self.guard(lambda: self.store.remember_model(identity.digest, identity.json()), "recording the model")

    def check_identity(self) -> None:
        """Once per call, before keying: has the user changed the model since the last call?"""
        changes = self.tracker.refresh()
        if changes:
            identity = self.tracker.identity
            log.info("lmms-cache: the model changed since the last call (%s); its requests are now keyed "
                     "under identity %s", "; ".join(changes), identity.digest[:12])  # fmt: skip
            self.keys.set_identity(identity)
            self.remember_model(identity)

    def explain(self, method: str, requests: Sequence[Any]) -> list[str]:
        """See :meth:`CachedModel.cache_explain`."""
        requests = list(requests)
        self.check_identity()
        keys = self.keys.keys(method, requests, count=False)
        wanted = [rk.key for rk in keys if rk.key is not None]
        fresh = None if self.max_age is None else time.time() - self.max_age
        stored = self.guard(lambda: self.store.get_many(wanted, created_after=fresh), "reading the cache", {})
        out = []
        for rk in keys:
            if rk.key is None:
                out.append(f"uncacheable: {rk.bypass_reason}")
            elif rk.key in stored:
                out.append("hit")
            else:
                out.append("miss: " + self.why(method, rk, describe(rk)))
        return out

    def why(self, method: str, rk: RequestKey, described: tuple[str, str | None]) -> str:
        """What differs between a missed request (``describe(rk)``) and the nearest stored entry."""
        description, prompt = described
        rv = rk.view
        candidates = self.guard(lambda: self.store.similar(
            method, task=None if rv is None or rv.task is None else str(rv.task),
            doc_id=None if rv is None or rv.doc_id is None else str(rv.doc_id), prompt=prompt,
        ), "reading the cache", [])  # fmt: skip
        return explain_against(description, candidates, self.model_change)

    def model_change(self, digest: str) -> list[str] | None:
        """What differs between the stored model identity ``digest`` and the model now."""
        descriptions = self.guard(self.store.models, "reading the cache", {})
        old = descriptions.get(digest)
        if old is None:
            return None
        try:
            return identity_differences(json.loads(old), self.identity.description) or None
        except ValueError:
            return None

    def close(self) -> None:
        self.flush()
        if self.pending:
            log.info("lmms-cache: %d responses could not be written to %s", len(self.pending), self.store.location)
        self.store.close()

    # -- one call ---------------------------------------------------------------------------

    def run(
        self, method: str, requests: Sequence[Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> list[Any]:
        model_method = getattr(self.model, method)
        if self.mode == "off":
            return model_method(requests, *args, **kwargs)  # type: ignore[no-any-return]
        requests = list(requests)
        self.check_identity()
        if not requests:
            try:
                if self.lockstep:
                    # The other ranks agree on a count and may call the model: join the
                    # agreement (a collective) and step with them, with nothing to ask.
                    for _ in range(self.padding(0)):
                        model_method(requests, *args, **kwargs)
                    return []
                return model_method(requests, *args, **kwargs)  # type: ignore[no-any-return]
            finally:
                self.tracker.settle()
        stats = self.stats
        stats.calls += 1
        stats.requests += len(requests)
        if self.tracker.weights_changed:
            return self.run_modified(method, model_method, requests, args, kwargs)
        results: list[Any] = [None] * len(requests)
        todo: dict[bytes, list[int]] = {}
        jobs: list[tuple[int, bytes | None]] = []  # (first request index, key) to compute
        missed: dict[int, RequestKey] = {}  # the keys of the requests to compute
        call = self.keys.new_call()  # what the call's keys share (document and media digests)
        hits = bypassed = 0
        with _GcPaused():
            # Keyed and looked up a chunk at a time: a hit's key (with its ~prompt-sized
            # material) is dropped as soon as it is answered, so a call of 10,000 hits holds
            # no more than a chunk of keys at once.
            for start in range(0, len(requests), _KEY_CHUNK):
                keys = self.keys.keys(method, requests[start : start + _KEY_CHUNK], call=call)
                found = self.lookup(keys) if self.mode != "refresh" else {}
                for i, rk in enumerate(keys, start):
                    key = rk.key
                    if key is None:
                        jobs.append((i, None))
                        missed[i] = rk
                        bypassed += 1
                    elif key in found:
                        results[i] = found[key]
                        hits += 1
                    elif key in todo:
                        todo[key].append(i)
                    else:
                        todo[key] = [i]
                        jobs.append((i, key))
                        missed[i] = rk
                self.record_hits(keys, found)
                del keys, found
            stats.hits += hits
            stats.bypassed += bypassed
        self.keys.end_call()  # the media digests derived for keying, memoized
        if jobs and self.on_miss == "error":
            stats.refused += len(jobs)
            raise CacheMissError(method, [missed[i] for i, _ in jobs], [requests[i] for i, _ in jobs])
        # Described now, before the model can change gen_kwargs in place.
        memo: dict[bytes, Any] = {}
        described = {key: describe(missed[i], memo) for i, key in jobs if key is not None}
        if described and log.isEnabledFor(logging.DEBUG):
            for i, key in jobs:
                if key is not None:
                    log.debug(
                        "lmms-cache %s miss %s: %s",
                        method,
                        key.hex()[:12],
                        self.why(method, missed[i], described[key]),
                    )
        try:
            written, failures, model_seconds = self.compute(
                method, model_method, requests, missed, jobs, todo, results, args, kwargs, described
            )
        finally:
            if jobs:
                self.tracker.settle()  # what the model changed in itself is not a new identity
        self.flush_files()
        log.info(
            "lmms-cache %s: %d requests, %d hits, %d misses, %d written, %d not cached, %.2fs in the model",
            method,
            len(requests),
            hits,
            len(jobs),
            written,
            failures,
            model_seconds,
        )
        return results

    def run_modified(self, method: str, model_method: Callable[..., Any], requests: list[Any],
                     args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:  # fmt: skip
        """A call to a model whose weights changed in memory since it was wrapped: its
        checkpoint no longer says what it is, so its requests are computed, not stored."""
        self.warn(
            "weights-changed",
            f"lmms-cache: the weights of {self.identity.label} changed in memory since it was "
            "wrapped (an optimizer step?); its requests now bypass the cache: computed, not "
            "stored. To cache evaluations during training, wrap the model again with "
            "cached(model, model_id=f'<run>-step-{step}') at each evaluation.",
        )
        self.stats.bypassed += len(requests)
        started = time.perf_counter()
        try:
            results = list(model_method(requests, *args, **kwargs))
        finally:
            self.tracker.settle()
        self.stats.model_calls += 1
        self.stats.model_seconds += time.perf_counter() - started
        return results

    def compute(self, method: str, model_method: Callable[..., Any], requests: list[Any],
                      keys: dict[int, RequestKey], jobs: list[tuple[int, bytes | None]],
                      todo: dict[bytes, list[int]], results: list[Any], args: tuple[Any, ...],
                      kwargs: dict[str, Any], described: dict[bytes, tuple[str, str | None]],
                      ) -> tuple[int, int, float]:  # fmt: skip
        size = self.batch_size
        batches = [jobs[s : s + size] for s in range(0, len(jobs), size)]
        padding = self.padding(len(batches))
        stats = self.stats
        written = failures = 0
        model_seconds = 0.0
        bar = self.bar(method, len(jobs))
        try:
            for batch in batches:
                # A multi-round request's step function, recording what its rounds read.
                recordings: dict[int, Recording] = {}
                asked = [self.for_model(requests[i], keys[i], recordings, i) for i, _ in batch]
                started = time.perf_counter()
                responses = model_method(asked, *args, **kwargs)
                elapsed = time.perf_counter() - started
                model_seconds += elapsed
                stats.model_calls += 1
                stats.model_seconds += elapsed
                stats.misses += len(batch)
                responses = list(responses)
                if len(responses) != len(batch):
                    raise RuntimeError(
                        f"{type(self.model).__name__}.{method} returned {len(responses)} "
                        f"responses for {len(batch)} requests"
                    )
                entries = []
                now = time.time()
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
                    entry = self.entry(method, key, keys[i], response, now, elapsed / len(batch),
                                       described[key], deps, signing)  # fmt: skip
                    if entry is not None:
                        entries.append(entry)
                written += self.save(entries)
                if bar is not None:
                    bar.update(len(batch))
            for _ in range(padding):
                # Discarded: only the number of model calls matters to a lock-stepped model.
                model_method([requests[0]], *args, **kwargs)
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
        try:
            value = codec.encode(response)
        except Exception as exc:  # anything dill cannot serialize stays uncached
            self.warn(
                "encode",
                f"lmms-cache: a {method} response of type "
                f"{type(response).__name__} cannot be stored ({exc}); it stays uncached",
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

    # -- the store, guarded -----------------------------------------------------------------

    def open(self, durable: bool) -> Store:
        if self.mode == "off":
            return NullStore(self.location, "mode off")
        try:
            store = open_store(self.location, readonly=self.mode == "readonly", durable=durable,
                               trust=self.options.trust)  # fmt: skip
        except StoreError as exc:
            self.warn(
                "store",
                f"lmms-cache: the cache is unusable ({exc}); running uncached. "
                "The model's responses are returned as usual but not saved.",
            )
            return NullStore(self.location, str(exc))
        if store.degraded is not None:
            self.warn("store", f"lmms-cache: {store.degraded}. Hits are served; new responses are kept in "
                               f"memory (up to {_MAX_PENDING:,}) and written if it becomes writable.")  # fmt: skip
        return store

    def guard(self, action: Callable[[], Any], what: str, default: Any = None) -> Any:
        try:
            return action()
        except StoreError as exc:
            self.warn("store", f"lmms-cache: {what} failed: {exc}. Continuing uncached for this step.")
            return default

    def lookup(self, keys: list[RequestKey]) -> dict[bytes, Any]:
        wanted = list({rk.key for rk in keys if rk.key is not None})
        fresh = None if self.max_age is None else time.time() - self.max_age
        blobs = self.guard(lambda: self.store.get_many(wanted, created_after=fresh),
                                 "reading the cache", {})  # fmt: skip
        found = {}
        origin, trusted = self.origin, self.options.trust
        for key, stored in blobs.items():
            value = stored.value
            if stored.deps is not None and not deps_hold(stored.deps, self.files):
                continue  # a file a later round read has changed since: a miss
            try:
                # Full pickle only for what this user wrote here, or what the team signed;
                # anything else loads restricted (plain values and known response types).
                found[key] = codec.decode(value, trusted=trusted or stored.origin == origin or (
                    stored.signature is not None and trust.signature_valid(key, value, stored.signature)))
            except codec.UntrustedValueError as exc:
                self.warn(
                    "untrusted",
                    f"lmms-cache: a stored value in {self.store.location} needs {exc.needed} to load, and "
                    "was not written by you on this machine nor signed ($LMMS_CACHE_SECRET); it is "
                    "recomputed and overwritten. Pass trust=True to load such values from a cache you trust.",
                )
            except codec.CodecError as exc:
                self.warn(
                    "decode",
                    f"lmms-cache: a stored value in {self.store.location} "
                    f"cannot be read ({exc}); it is recomputed and overwritten",
                )
        return found

    def save(self, entries: list[Entry]) -> int:
        if self.mode == "readonly" or isinstance(self.store, NullStore):
            return 0
        pending = self.pending
        backlog = bool(pending)
        pending.extend(entries)  # kept before writing: an interrupt meanwhile loses nothing
        done = 0
        try:  # in batches: a backlog bigger than the space freed still drains, part by part
            while done < len(pending):
                batch = pending[done : done + self.batch_size]
                self.store.put_many(batch)
                done += len(batch)
        except StoreError as exc:
            self.warn("store", f"lmms-cache: cannot write to the cache: {exc}. Responses are returned as "
                               "usual; unsaved ones are kept in memory and retried with the next batch.")  # fmt: skip
        finally:
            del pending[:done]
            self.stats.written += done
        if len(pending) > _MAX_PENDING:
            dropped = len(pending) - _MAX_PENDING
            del pending[:dropped]
            self.warn("dropped", f"lmms-cache: more than {_MAX_PENDING:,} responses could not be written to "
                                 f"{self.store.location}; the oldest unsaved ones were dropped (a rerun "
                                 "computes them again).")  # fmt: skip
        if done and backlog and not pending:
            log.info("lmms-cache: the cache at %s is written again; the unsaved responses are saved",
                     self.store.location)  # fmt: skip
            self.warned.discard("store")  # a new outage gets its own warning
        if done and self.max_size is not None:
            limit = self.max_size
            self.guard(lambda: self.store.evict(limit), "evicting old entries")
        return done

    def flush(self) -> None:
        self.save([])
        self.flush_files()
        self.flush_touched()

    def record_hits(self, keys: list[RequestKey], found: dict[bytes, Any]) -> None:
        if self.mode == "readonly" or not found:
            return
        touched = self.touched
        for rk in keys:
            if rk.key in found:
                touched[rk.key] = touched.get(rk.key, 0) + 1
        if len(touched) >= _TOUCH_MAX or time.monotonic() - self.touched_at >= _TOUCH_EVERY:
            self.flush_touched()

    def flush_touched(self) -> None:
        self.touched_at = time.monotonic()
        self.guard(lambda: _flush_touched(self.store, self.touched), "recording hits")

    def file_lookup(self, path: str, signature: tuple[int, ...]) -> bytes | None:
        return self.guard(  # type: ignore[no-any-return]
            lambda: self.store.file_digest(path, signature), "reading a file digest"
        )

    def file_remember(self, path: str, signature: tuple[int, ...], digest: bytes) -> None:
        self.new_files.append((path, signature, digest))

    def flush_files(self) -> None:
        if self.new_files and self.mode != "readonly":
            rows, self.new_files = self.new_files, []
            self.guard(lambda: self.store.remember_files(rows), "remembering file digests")

    # -- helpers ----------------------------------------------------------------------------

    def warn(self, kind: str, message: str) -> None:
        # The store's trouble (unusable, read-only, failing, a value damaged on disk) is one
        # warning until the store recovers (save re-arms it); what follows is logged at INFO.
        slot = "store" if kind == "decode" else kind
        if slot not in self.warned:
            self.warned.add(slot)
            log.warning(message)
        elif slot == "store":
            log.info(message)

    def padding(self, local_batches: int) -> int:
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


def _flush_touched(store: Store, touched: dict[bytes, int]) -> None:
    """Write the hit counts gathered since the last flush (also at exit, by a finalizer)."""
    if touched:
        counts = dict(touched)
        touched.clear()
        store.touch(counts, time.time())


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
