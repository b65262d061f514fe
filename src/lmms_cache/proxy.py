"""The caching proxy: intercept the request methods, answer hits, batch the misses.

One call (``lm.generate_until(requests)``) is the engine's (:mod:`lmms_cache.engine`): key
every request, look them up in one round trip per chunk, send the de-duplicated misses to
the model in batches of ``batch_size``, write each batch as soon as it returns, merge.
Here: the options, the wiring of stores (:mod:`lmms_cache.tiers`, each behind the fault
wrapper of :mod:`lmms_cache.guard`), key builder, engine and observers, and the model
identity checked at every call.

Store problems never reach the evaluation: they become misses (or unsaved responses)
plus one warning per outage.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import wrapt

from . import trust
from .documents import Derivations, deps_hold
from .engine import KEY_CHUNK, CacheStats, Clock, Engine, HitLog, Observer, SystemClock
from .fingerprint import Encoder, FileDigests
from .guard import MAX_PENDING, Guarded, Warnings
from .identity import ModelIdentity, Tracker
from .key import KeyBuilder, RequestKey
from .observe import Explainer
from .store import (
    Entry,
    Memos,
    NullStore,
    SQLiteStore,
    Store,
    StoreError,
    default_location,
    is_url,
    open_memos,
    open_store,
)
from .store.redis import redact
from .tiers import Tiers
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
_KEY_CHUNK = KEY_CHUNK  # (requests keyed and looked up at a time: see lmms_cache.engine)
_MAX_PENDING = MAX_PENDING  # unsaved entries kept for a retry while the store refuses writes (read at wrapping)

_FAILURE_MARKERS = ("[LMMS_EVAL_REQUEST_FAILED", "[LMMS_EVAL_BUDGET_EXCEEDED]")


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
    shared: str | None = None,
    memo: str | os.PathLike[str] | None = None,
) -> CachedModel:
    """Wrap ``model`` so that every response it has given once is answered from disk.

    Args:
        model: an lmms-eval or lm-eval model (anything with one of :data:`METHODS`).
        path: the cache: a directory (default ``$LMMS_CACHE_DIR``, else the per-user cache
            directory, ``~/.cache/lmms-cache`` on Linux), its database file, or a server
            (``redis://host:6379/0?prefix=team-a``, ``rediss://``, ``unix:///path.sock``;
            the password from the URL or ``$LMMS_CACHE_REDIS_PASSWORD``).
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
        trust: use a cache file owned by another user, and load every value with full
            pickle. Values are pickles and loading one runs code, so such a file is refused
            (with a warning, running uncached) unless trusted; without it, values this user
            did not write in a local cache (or that a server holds) load only when signed
            (``$LMMS_CACHE_SECRET``) or made of plain types.
        shared: a second, shared tier behind ``path`` (a server URL, usually): hits missing
            locally are read from it and copied locally; responses are written locally
            first, then to it, and wait in a durable outbox in the local file while it
            cannot be reached (see :mod:`lmms_cache.tiers`).
        memo: where the memos (file digests, dataset row digests, derived media) live when
            ``path`` is a server: a local cache directory (default: the default local
            directory). They describe this machine's files, so they never go to a server.

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
        shared=shared, memo=memo,
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

    path: str | None = field(default=None, repr=False)  # (a URL may hold a password)
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
    shared: str | None = field(default=None, repr=False)
    memo: str | None = None
    clock: Clock | None = field(default=None, compare=False)  # the system's when None (tests move their own)
    observers: tuple[Observer, ...] = field(default=(), compare=False)

    @classmethod
    def make(cls, *, path: str | os.PathLike[str] | None = None, model_id: str | None = None,
             settings: Sequence[str] = (), batch_size: int | None = None, mode: str | None = None,
             is_failure: Callable[[Any], bool] | None = None, sampling: bool | None = None,
             progress: bool | None = None, durable: bool = True,
             lockstep: bool | Callable[[int], int] = False, on_miss: str = "compute",
             max_size: str | int | None = None,
             expire_after: str | float | datetime.timedelta | None = None, trust: bool = False,
             identity: ModelIdentity | None = None, shared: str | None = None,
             memo: str | os.PathLike[str] | None = None, clock: Clock | None = None,
             observers: Sequence[Observer] = ()) -> Options:  # fmt: skip
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
            raise TypeError(f"path must be a directory path or a server URL, not {path!r}")
        if shared is not None and not isinstance(shared, (str, os.PathLike)):
            raise TypeError("shared must be a server URL or a directory path")
        if memo is not None and (not isinstance(memo, (str, os.PathLike)) or is_url(memo)):
            raise ValueError("memo must be a local directory (the memos never go to a server)")
        if clock is not None and not (callable(getattr(clock, "time", None)) and
                                      callable(getattr(clock, "monotonic", None))):  # fmt: skip
            raise TypeError("clock must have time() and monotonic()")
        return cls(
            path=os.fspath(path) if path is not None else None, model_id=model_id,
            settings=tuple(settings), batch_size=batch_size, mode=mode, is_failure=is_failure,
            sampling=sampling, progress=progress, durable=bool(durable), lockstep=lockstep,
            on_miss=on_miss, max_size=parse_size(max_size) if max_size is not None else None,
            expire_after=parse_duration(expire_after) if expire_after is not None else None,
            trust=bool(trust), identity=identity, shared=os.fspath(shared) if shared is not None else None,
            memo=os.fspath(memo) if memo is not None else None, clock=clock, observers=tuple(observers),
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
            weakref.finalize(self, cache.hits.flush)

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
        """The store of the local tier (a :class:`NullStore` when the cache is unusable or
        off). To manage a cache, open it yourself: ``lmms_cache.store.open_store(location)``."""
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
        """Retry unsaved entries once more (and send what waits for a shared tier, for a few
        seconds at most), record the last hits and release the stores' connections."""
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
        return f"<lmms_cache {cache.mode} proxy of {self.__wrapped__!r} at {redact(cache.location)}>"


class _Cache:
    """The cache behind one proxy: its options, wired to the stores (:class:`Tiers`), the
    key builder, the call engine (:class:`Engine`) and the observers; the model identity
    checked at every call."""

    def __init__(self, model: Any, options: Options, state: Any) -> None:
        self.model = model
        self.options = options
        self.mode = options.mode
        self.batch_size = options.batch_size
        self.clock: Clock = options.clock or SystemClock()
        self.stats = CacheStats()
        self.warnings = Warnings()
        self.location = _location(options.path if options.path is not None else default_location())
        writable = self.mode not in ("readonly", "off")
        self.tiers = self.open_tiers()
        self.memos = self.open_memos()
        self.new_files: list[tuple[str, tuple[int, ...], bytes]] = []
        self.remembered: set[str] = set()  # model identities recorded in the store
        files = self.files = FileDigests(lookup=self.file_lookup, remember=self.file_remember)
        self.tiers.deps_hold = lambda deps: deps_hold(deps, files)
        self.tracker = Tracker(model, model_id=options.model_id, settings=options.settings, files=files,
                               fixed=options.identity)  # fmt: skip
        if state is not None:
            self.tracker.adopt(*state)
        identity = self.tracker.identity
        log.info("lmms-cache: %s at %s%s, model %s (identity %s)", self.mode, redact(self.location),
                 f" (shared: {self.tiers.target})" if self.tiers.shared is not None else "", identity.label,
                 identity.digest[:12])  # fmt: skip
        log.debug("lmms-cache: model identity %s = %s", identity.digest, identity.json())
        derivations = Derivations(self.memos, files, writable=writable)
        self.keys = KeyBuilder(identity, model, Encoder(files), sampling=options.sampling, warn=self.warn,
                               derivations=derivations)  # fmt: skip
        self.hits = HitLog(self.tiers, self.clock, options.observers, enabled=writable)
        self.explainer = Explainer(self.tiers, self.keys, lambda: self.tracker.identity, self.clock,
                                   options.expire_after)  # fmt: skip
        self.engine = Engine(
            model, self.keys, self.tiers, self.hits, identity=identity, warnings=self.warnings, clock=self.clock,
            stats=self.stats, batch_size=options.batch_size, is_failure=options.is_failure or default_is_failure,
            lockstep=options.lockstep, progress=options.progress, on_miss=options.on_miss,
            max_age=options.expire_after, refresh=self.mode == "refresh", settle=self.tracker.settle,
            observers=(self.explainer, *options.observers), error=CacheMissError,
        )  # fmt: skip
        self.remember_model(identity)

    # -- opening ----------------------------------------------------------------------------

    def open_tiers(self) -> Tiers:
        o = self.options
        writable = self.mode not in ("readonly", "off")
        clock = self.clock
        if self.mode == "off":
            local = Guarded(NullStore(self.location, "mode off"), self.warnings, writable=False)
            return Tiers(local, origin=trust.local_origin(), wall=clock.time, monotonic=clock.monotonic)
        local = Guarded(self.open(self.location, "the cache"), self.warnings, writable=writable,
                        batch_size=o.batch_size, max_size=o.max_size, max_pending=_MAX_PENDING)  # fmt: skip
        shared = None
        if o.shared is not None:
            shared = Guarded(self.open(_location(o.shared), "the shared cache", slot="shared"), self.warnings,
                             slot="shared", what="the shared cache", writable=writable,
                             batch_size=o.batch_size, max_pending=_MAX_PENDING)  # fmt: skip
        return Tiers(local, shared, origin=trust.local_origin(), trust=o.trust, copy=writable, wall=clock.time,
                     monotonic=clock.monotonic)  # fmt: skip

    def open(self, location: str, what: str, slot: str = "store") -> Store:
        """The store at ``location``, or a null store (with a warning) where there is none."""
        try:
            return open_store(location, readonly=self.mode == "readonly", durable=self.options.durable,
                              trust=self.options.trust, lazy=True)  # fmt: skip
        except StoreError as exc:
            tail = ("The model's responses are returned as usual but not saved." if slot == "store" else
                    "Running with the local cache alone.")  # fmt: skip
            self.warnings.warn(slot, f"lmms-cache: {what} is unusable ({exc}); running without it. {tail}")
            return NullStore(redact(location), str(exc))

    def open_memos(self) -> Memos | None:
        """The local SQLite file of the memos: the local tier's, or for a server alone the
        ``memo`` directory (default: the local default cache directory)."""
        if self.mode == "off":
            return None
        local = self.tiers.local.store
        if isinstance(local, SQLiteStore):
            return local
        if isinstance(local, NullStore):
            return None
        where = self.options.memo if self.options.memo is not None else default_location()
        try:
            return open_memos(where, readonly=self.mode == "readonly", durable=self.options.durable)
        except StoreError as exc:
            log.info("lmms-cache: the memos (file digests, derived media) stay in memory: %s", exc)
            return None

    @property
    def store(self) -> Store:
        """The local tier's store (a null store when the cache is unusable or off)."""
        return self.tiers.local.store

    @property
    def identity(self) -> ModelIdentity:
        return self.tracker.identity

    # -- the model identity -------------------------------------------------------------------

    def remember_model(self, identity: ModelIdentity) -> None:
        if self.mode in ("off", "readonly") or identity.digest in self.remembered:
            return
        self.remembered.add(identity.digest)
        self.tiers.remember_model(identity.digest, identity.json())

    def check_identity(self) -> None:
        """Once per call, before keying: has the user changed the model since the last call?"""
        changes = self.tracker.refresh()
        if changes:
            identity = self.tracker.identity
            log.info("lmms-cache: the model changed since the last call (%s); its requests are now keyed "
                     "under identity %s", "; ".join(changes), identity.digest[:12])  # fmt: skip
            self.keys.set_identity(identity)
            self.engine.identity = identity
            self.remember_model(identity)

    # -- calls ------------------------------------------------------------------------------

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
                if self.options.lockstep:
                    # The other ranks agree on a count and may call the model: join the
                    # agreement (a collective) and step with them, with nothing to ask.
                    for _ in range(self.engine.padding(0)):
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
        try:
            return self.engine.run(method, model_method, requests, args, kwargs)
        finally:
            self.flush_files()

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

    def explain(self, method: str, requests: Sequence[Any]) -> list[str]:
        """See :meth:`CachedModel.cache_explain`."""
        self.check_identity()
        return self.explainer.explain(method, requests)

    def close(self) -> None:
        self.stats.written += self.tiers.local.save([])
        self.flush_files()
        self.hits.flush()
        self.tiers.close()
        if self.memos is not None and self.memos is not cast(Any, self.store):
            self.memos.close()

    # -- what benchmarks and older callers reach for --------------------------------------------

    def record_hits(self, keys: list[RequestKey], found: dict[bytes, Any]) -> None:
        self.hits.record(keys, found)

    def entry(self, *args: Any, **kwargs: Any) -> Entry | None:
        return self.engine.entry(*args, **kwargs)

    @property
    def pending(self) -> list[Entry]:
        """Responses the local tier has not written yet (kept for a retry)."""
        return self.tiers.local.pending

    # -- the memos --------------------------------------------------------------------------

    def memo_call(self, what: str, action: Callable[[Memos], Any], default: Any, kind: str = "read") -> Any:
        memos = self.memos
        if memos is None:
            return default
        if memos is cast(Any, self.tiers.local.store):  # the cache's own file: its trouble is the cache's
            found = self.tiers.local.call(what, lambda: action(memos), kind=kind)
            return default if found is None else found
        try:
            return action(memos)
        except StoreError as exc:
            log.debug("lmms-cache: %s failed: %s", what, exc)
            return default

    def file_lookup(self, path: str, signature: tuple[int, ...]) -> bytes | None:
        return self.memo_call("reading a file digest", lambda m: m.file_digest(path, signature), None)  # type: ignore[no-any-return]

    def file_remember(self, path: str, signature: tuple[int, ...], digest: bytes) -> None:
        self.new_files.append((path, signature, digest))

    def flush_files(self) -> None:
        if self.new_files and self.mode not in ("readonly", "off"):
            rows, self.new_files = self.new_files, []
            self.memo_call("remembering file digests", lambda m: m.remember_files(rows), None, kind="write")

    def warn(self, kind: str, message: str) -> None:
        # The store's trouble is one warning until the store recovers; other kinds once.
        self.warnings.warn(kind, message, again=kind == "store")


def _location(path: str | os.PathLike[str]) -> str:
    """A location as the proxy names it: a URL as given, a path absolute."""
    text = os.fspath(path)
    return text if is_url(text) else os.path.abspath(os.path.expanduser(text))
