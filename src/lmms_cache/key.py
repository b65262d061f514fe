"""The key of a request: what the model is asked, never where it came from.

``key = xxh3-128(schema, model identity, method, each argument by its role[, occurrence])``

* computed before the model sees the request (models mutate ``gen_kwargs`` in place);
* callables the model calls on the document are called here and their result keyed by
  content, so the document's address (task, split, doc_id) is left out: content decides.
  When no document can be found (no ``task_dict``) the address joins the key instead;
* a sampled request's k-th occurrence over the proxy's lifetime is its own entry, so
  ``repeats`` stay independent samples and a rerun replays them in order.

``KEY_SCHEMA`` names this format. Changing any rule here or in :mod:`fingerprint` changes
keys: it must come with a new schema name and a migration (the golden tests pin it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from types import MethodType
from typing import Any, NamedTuple

import xxhash

from .fingerprint import Encoder, Unfingerprintable, digest_bytes
from .identity import ModelIdentity
from .requests import (
    DOC,
    MEDIA,
    NEEDS_DOCUMENT,
    RESOLVE,
    VALUE,
    DocumentUnavailable,
    RequestView,
    Resolver,
    document_free_result,
    view,
)

__all__ = ["KEY_SCHEMA", "KeyBuilder", "RequestKey", "is_sampling"]

log = logging.getLogger("lmms_cache")

KEY_SCHEMA = b"lmms-cache/key/2"


class RequestKey(NamedTuple):
    """A request's key, or why it has none (``key is None``: it bypasses the cache).

    ``material`` and ``spans`` are the bytes the key was hashed from and where each
    component lies in them: :meth:`components` digests them only when needed (a miss being
    stored or explained), so a hit pays nothing for it.
    """

    key: bytes | None
    view: RequestView | None
    bypass_reason: str | None = None
    material: bytes | bytearray = b""
    spans: tuple[tuple[str, int, int], ...] = ()
    occurrence: int | None = None

    def components(self) -> dict[str, str]:
        """Component name -> short hex digest (model, method, each argument and setting)."""
        out = {name: xxhash.xxh3_64_hexdigest(self.material[a:b]) for name, a, b in self.spans}
        if self.occurrence is not None:
            out["occurrence"] = str(self.occurrence)
        return out


def is_sampling(gen_kwargs: Mapping[str, Any] | None, repeats: int) -> bool:
    """Whether a request asks for a sample rather than the one deterministic answer."""
    if repeats > 1:
        return True
    if not gen_kwargs:
        return False
    if gen_kwargs.get("do_sample") is True:
        return True
    for name, limit in (("temperature", 0), ("n", 1), ("num_return_sequences", 1), ("best_of", 1)):
        value = gen_kwargs.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > limit:
            return True
    return False


class KeyBuilder:
    """Keys for one proxy: holds the model identity and the sampled-occurrence counts.

    Args:
        identity: the wrapped model's identity.
        model: the model, whose ``task_dict`` holds the documents.
        encoder: the value encoder (its file digests may be persisted by the store).
        sampling: True/False forces every request sampled/deterministic; None guesses.
        warn: called once per kind of problem with a message.
    """

    def __init__(
        self,
        identity: ModelIdentity,
        model: Any,
        encoder: Encoder,
        sampling: bool | None = None,
        warn: Callable[[str, str], None] | None = None,
    ) -> None:
        self.set_identity(identity)
        self._resolver = Resolver(model)
        self._encoder = encoder
        self._sampling = sampling
        self._warn_to = warn or (lambda kind, message: log.warning(message))
        self._warned: set[str] = set()
        self._occurrences: dict[bytes, int] = {}

    def set_identity(self, identity: ModelIdentity) -> None:
        """Key the next requests under ``identity`` (the model changed between calls)."""
        self._prefix = KEY_SCHEMA + b"\0" + bytes.fromhex(identity.digest) + b"\0"

    def _warn(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            self._warn_to(kind, message)

    def keys(self, method: str, requests: Sequence[Any], *, count: bool = True,
             resolved: dict[Any, bytes] | None = None) -> list[RequestKey]:  # fmt: skip
        """One key per request, in order; the same object listed k times is k occurrences.

        ``count=False`` computes the keys the next call would get without using up sampled
        occurrences (for explaining). ``resolved`` shares the resolved callables' digests
        between the parts of one call keyed separately (a new dict per call).
        """
        # (callable, document) -> digest, and callable -> digest when it needs no document;
        # for this call only: a document or a task's configuration may change between calls.
        if resolved is None:
            resolved = {}
        out = []
        occurrences = self._occurrences if count else dict(self._occurrences)
        prefix = self._prefix + method.encode() + b"\0"
        base = self._base
        for request in requests:
            rk = base(prefix, method, request, resolved)
            key = rk.key
            if rk.occurrence is not None and key is not None:
                # Sampled: the k-th identical request over the proxy's lifetime is its own entry.
                k = occurrences.get(key, 0)
                occurrences[key] = k + 1
                rk = rk._replace(key=digest_bytes(key + b"#%d" % k), occurrence=k)
            out.append(rk)
        return out

    def _base(self, prefix: bytes, method: str, request: Any, resolved: dict[Any, bytes]) -> RequestKey:
        """The request's key before sampling: ``occurrence`` is 0 for a sampled request (the
        caller numbers it), None otherwise."""
        try:
            rview = view(method, request)
        except TypeError as exc:
            raise TypeError(f"{method}: {exc}") from None
        out = bytearray(prefix)
        put = self._encoder.put
        need_address = False
        n = len(KEY_SCHEMA) + 1
        spans = [("model", n, n + 16), ("method", n + 17, len(out))]
        try:
            for name, value, role in rview.parts:
                out += _LABELS.get(name) or _label(name)
                start = len(out)
                if role is VALUE:
                    put(out, value, False)
                elif role is RESOLVE and value is not None:
                    d = self._resolved(value, rview, resolved)
                    if d is None:
                        need_address = True
                        put(out, value, False)  # the callable's code identity
                    else:
                        out += d
                elif role is DOC:
                    d = self._document(rview, resolved)
                    if d is None:
                        need_address = True
                    else:
                        out += d
                else:
                    put(out, value, role is MEDIA)
                spans.append((name, start, len(out)))
            if need_address:
                for part in rview.address_args:
                    out += _label(part.name)
                    start = len(out)
                    put(out, part.value, False)
                    spans.append((part.name, start, len(out)))
        except RecursionError:
            reason = "the value is nested too deeply (or contains itself)"
            self._warn("unfingerprintable", f"lmms-cache: a {method} request bypasses the cache: {reason}")
            return _request_key((None, rview, reason, b"", (), None))
        except Unfingerprintable as exc:
            self._warn("unfingerprintable", f"lmms-cache: a {method} request bypasses the cache: {exc}")
            return _request_key((None, rview, str(exc), b"", (), None))
        except _ResolveFailed as exc:
            return _request_key((None, rview, str(exc), b"", (), None))
        except Exception as exc:  # a value that breaks a fingerprint rule must not break the run
            self._warn(
                "fingerprint-error",
                f"lmms-cache: a {method} request bypasses the cache: fingerprinting it raised "
                f"{type(exc).__name__}: {exc}",
            )
            return _request_key((None, rview, f"{type(exc).__name__}: {exc}", b"", (), None))
        sampled = self._sampling if self._sampling is not None else is_sampling(rview.gen_kwargs, rview.repeats)
        material = out  # the bytearray itself: a miss digests slices of it, a hit drops it
        return _request_key((digest_bytes(material), rview, None, material, tuple(spans), 0 if sampled else None))

    def _resolved(self, fn: Any, rview: RequestView, memo: dict[Any, bytes]) -> bytes | None:
        cid = _callable_id(fn)
        # A callable whose result needs no document (a text task's doc_to_visual) is
        # called once per call, whatever the document.
        found = memo.get(cid)
        if found is not None:
            return found
        free = document_free_result(fn)
        if free is not NEEDS_DOCUMENT:
            d = self._encoder.digest(free, media=True)
            memo[cid] = d
            return d
        address = rview.address
        if address is None:
            return None
        memo_key = (cid, address)
        found = memo.get(memo_key)
        if found is not None:
            return found
        try:
            value = self._resolver.resolve(fn, address)
        except DocumentUnavailable as exc:
            self._warn(
                "no-document",
                f"lmms-cache: cannot call {getattr(fn, '__qualname__', 'the request callable')} on "
                f"its document ({exc}); keying such requests by task, split and doc_id instead of "
                "by their media content. Set model.task_dict as lmms-eval does to key by content.",
            )
            return None
        except Exception as exc:  # the model will call it too and meet the error itself
            self._warn(
                "resolve-failed",
                f"lmms-cache: {getattr(fn, '__qualname__', 'a request callable')} raised "
                f"{type(exc).__name__} on {address}; such requests go to the model uncached.",
            )
            raise _ResolveFailed(
                f"{getattr(fn, '__qualname__', 'callable')} raised {type(exc).__name__}: {exc}"
            ) from exc
        d = self._encoder.digest(value, media=True)
        memo[memo_key] = d
        return d

    def _document(self, rview: RequestView, memo: dict[Any, bytes]) -> bytes | None:
        address = rview.address
        if address is None:
            return None
        memo_key = (0, address)
        found = memo.get(memo_key)
        if found is None:
            try:
                found = self._encoder.digest(self._resolver.document(address))
            except DocumentUnavailable:
                return None
            memo[memo_key] = found
        return found


class _ResolveFailed(Exception):
    pass


_LABELS: dict[str, bytes] = {}


def _label(name: str) -> bytes:
    """``b"name="``: the few part names, encoded once."""
    label = name.encode() + b"="
    if len(_LABELS) < 1024:
        _LABELS[name] = label
    return label


def _request_key(fields: tuple[Any, ...]) -> RequestKey:
    """``RequestKey(*fields)`` without the namedtuple's Python-level constructor."""
    return tuple.__new__(RequestKey, fields)


def _callable_id(fn: Any) -> Any:
    """The identity of a callable for one call's memo.

    lmms-eval puts ``self.doc_to_visual`` in every Instance, and each attribute access makes
    a new bound-method object: the pair (object, function) is what stays the same.
    """
    if isinstance(fn, MethodType):
        return (id(fn.__self__), id(fn.__func__))
    return id(fn)
