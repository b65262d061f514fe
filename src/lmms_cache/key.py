"""The key of a request: everything the model can read to answer it.

``key = xxh3-128(schema, model identity, method, each part by its role[, occurrence])``

* every argument, the document's address (task, split, doc id, idx) and the whole
  document by content (lmms-eval's ``task_dict[task][split][doc_id]``, lm-eval's
  ``Instance.doc``): models branch on the task name and read document fields themselves;
* computed before the model sees the request (models mutate ``gen_kwargs`` in place);
* callables the model calls on the document are called here and their result keyed by
  content, as the model sees it (through the derivation memo of :mod:`documents`, so a
  hit decodes nothing); a callable that draws from the global random state makes its
  request bypass the cache;
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

from .documents import Derivations, encode_deps
from .fingerprint import Encoder, Unfingerprintable, digest_bytes
from .identity import ModelIdentity
from .requests import (
    MEDIA,
    NEEDS_DOCUMENT,
    NO_DOCUMENT,
    RESOLVE,
    STEP,
    VALUE,
    DocumentUnavailable,
    RandomStateMoved,
    RequestView,
    Resolver,
    document_free_result,
    view,
)

__all__ = ["KEY_SCHEMA", "Call", "KeyBuilder", "RequestKey", "is_sampling"]

log = logging.getLogger("lmms_cache")

KEY_SCHEMA = b"lmms-cache/key/2"


class RequestKey(NamedTuple):
    """A request's key, or why it has none (``key is None``: it bypasses the cache).

    ``material`` is the bytes the key was hashed from, ``ends`` where each component ends in
    them (model, method, each argument, the address, the document): :meth:`spans` and
    :meth:`components` recover them only when needed (a miss being stored or explained), so
    a hit pays nothing for them.
    """

    key: bytes | None
    view: RequestView | None
    bypass_reason: str | None = None
    material: bytes | bytearray = b""
    ends: tuple[int, ...] = ()
    occurrence: int | None = None

    def spans(self) -> list[tuple[str, int, int]]:
        """(component name, start, end) in ``material``."""
        if not self.ends or self.view is None:
            return []
        n = len(KEY_SCHEMA) + 1
        out = [("model", n, n + 16), ("method", n + 17, self.ends[0])]
        names = [p.name for p in self.view.parts]
        if self.view.located:
            names += ["address", "doc"]
        previous = self.ends[0]
        for name, end in zip(names, self.ends[1:], strict=False):
            start = previous + len(_LABELS.get(name) or _label(name))
            out.append((name, start, end))
            previous = end
        return out

    def components(self, spans: list[tuple[str, int, int]] | None = None) -> dict[str, str]:
        """Component name -> short hex digest (model, method, each argument and setting);
        ``spans`` when the caller has them already."""
        material = self.material
        out = {name: xxhash.xxh3_64_hexdigest(material[a:b]) for name, a, b in spans or self.spans()}
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


class Call:
    """What one call's keys share: digests of the callables resolved on each document, of
    each document, and of the step functions (documents and a task's configuration may
    change between calls, never within one)."""

    __slots__ = ("collections", "documents", "free", "last_settings", "resolved", "steps")

    def __init__(self) -> None:
        self.resolved: dict[Any, bytes] = {}
        self.documents: dict[Any, tuple[bytes | None, bytes | None]] = {}  # address -> (doc, row)
        self.steps: dict[Any, bytes] = {}
        self.free: dict[Any, bool] = {}  # callable -> whether it needs the document
        self.collections: dict[tuple[Any, Any], tuple[Any, Any]] = {}  # (task, split) -> (collection, rows)
        # the previous request's plain settings and their (bytes, sampled): the next request's
        # are usually an equal copy (held for the call: nothing mutates them while keying)
        # (see _last_settings)
        self.last_settings: tuple[Any, ...] | None = None


class KeyBuilder:
    """Keys for one proxy: holds the model identity and the sampled-occurrence counts.

    Args:
        identity: the wrapped model's identity.
        model: the model, whose ``task_dict`` holds the documents.
        encoder: the value encoder (its file digests may be persisted by the store).
        sampling: True/False forces every request sampled/deterministic; None guesses.
        warn: called once per kind of problem with a message.
        derivations: row digests and derived media memoized (in the store, when given).
    """

    def __init__(
        self,
        identity: ModelIdentity,
        model: Any,
        encoder: Encoder,
        sampling: bool | None = None,
        warn: Callable[[str, str], None] | None = None,
        derivations: Derivations | None = None,
    ) -> None:
        self.set_identity(identity)
        self._resolver = Resolver(model)
        self._encoder = self.encoder = encoder
        self._sampling = sampling
        self._warn_to = warn or (lambda kind, message: log.warning(message))
        self._warned: set[str] = set()
        self._occurrences: dict[bytes, int] = {}
        self._derived = derivations if derivations is not None else Derivations(None, encoder.files)

    def set_identity(self, identity: ModelIdentity) -> None:
        """Key the next requests under ``identity`` (the model changed between calls)."""
        self._prefix = KEY_SCHEMA + b"\0" + bytes.fromhex(identity.digest) + b"\0"

    def new_call(self) -> Call:
        """What the keys of one call share (documents may change between calls)."""
        self._derived.begin_call()
        self._encoder.seen = {}
        return Call()

    def end_call(self) -> None:
        """Write what the call's keying memoized."""
        self._encoder.seen = None
        self._derived.flush()

    def _warn(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            self._warn_to(kind, message)

    def keys(self, method: str, requests: Sequence[Any], *, count: bool = True,
             call: Call | None = None, views: bool = True) -> list[RequestKey]:  # fmt: skip
        """One key per request, in order; the same object listed k times is k occurrences.

        ``count=False`` computes the keys the next call would get without using up sampled
        occurrences (for explaining). ``call`` shares the work of the parts of one call
        keyed separately (:meth:`new_call`). ``views=False`` lets the common lmms-eval
        layouts skip building their :class:`RequestView` (``view`` is then None): a hit never
        needs it, and :meth:`with_view` adds it to a miss.
        """
        own = call is None
        if call is None:
            call = self.new_call()
        out: list[Any] = []
        occurrences = self._occurrences if count else dict(self._occurrences)
        prefix = self._prefix + method.encode() + b"\0"
        lean = _FAST.get(method) if not views else None
        slow: list[int] = []
        if lean is not None:
            pending = []
            for i, request in enumerate(requests):
                rk = _fast(self, prefix, request, call, lean)
                if rk is None:
                    slow.append(i)
                elif type(rk) is _Pending:
                    pending.append(i)
                out.append(rk)
            if pending:
                self._finish_pending(pending, out, slow, call)
                slow.sort()
        else:
            slow = list(range(len(requests)))
            out = [None] * len(requests)
        if slow:
            try:
                rviews = [view(method, requests[i]) for i in slow]
            except TypeError as exc:
                raise TypeError(f"{method}: {exc}") from None
            self._prefetch(rviews, call)
            base = self._base
            for i, rview in zip(slow, rviews, strict=True):
                out[i] = base(prefix, method, rview, call)
        for i, rk in enumerate(out):
            key = rk.key
            if rk.occurrence is not None and key is not None:
                # Sampled: the k-th identical request over the proxy's lifetime is its own entry.
                k = occurrences.get(key, 0)
                occurrences[key] = k + 1
                out[i] = rk._replace(key=digest_bytes(key + b"#%d" % k), occurrence=k)
        if own:
            self.end_call()
        return out

    def _finish_pending(self, pending: list[int], out: list[Any], slow: list[int], call: Call) -> None:
        """Resolve the visuals of lean keys that need their documents (their derivation memo
        loaded in one round trip per function, as :meth:`_prefetch` does)."""
        wanted: dict[bytes, list[bytes]] = {}
        resolved = call.resolved
        seen = set()
        for i in pending:
            p = out[i]
            at = (p.cid, p.address)
            if at not in resolved and at not in seen:
                seen.add(at)
                task, split, doc_id = p.address
                self._want(p.fn, p.cid, task, split, doc_id, wanted, call)
        for fp, rows in wanted.items():
            self._derived.prefetch(fp, rows)
        for i in pending:
            p = out[i]
            try:
                visual = self._resolved_at(p.fn, p.address, call, p.cid)
            except Exception:  # the general path meets it again and says what it is
                visual = None
            if visual is None:
                out[i] = None
                slow.append(i)
            else:
                out[i] = _finish(self, p.head, visual, p.address, p.idx, p.sampled, call)

    def with_view(self, method: str, request: Any, rk: RequestKey) -> RequestKey:
        """``rk`` with the request's view (for a miss keyed with ``views=False``)."""
        return rk if rk.view is not None else rk._replace(view=view(method, request))

    def _base(self, prefix: bytes, method: str, rview: RequestView, call: Call) -> RequestKey:
        """The request's key before sampling: ``occurrence`` is 0 for a sampled request (the
        caller numbers it), None otherwise."""
        out = bytearray(prefix)
        put = self._encoder.put
        ends = [len(out)]
        sampled = self._sampling
        gen = rview.gen_kwargs
        callables = rview.callables
        resolved = 0
        try:
            for name, value, role in rview.parts:
                out += _LABELS.get(name) or _label(name)
                if role is VALUE:
                    if value is gen and type(value) is dict:
                        encoded, samples = self._settings(value, call)
                        out += encoded
                        if sampled is None:
                            sampled = samples or rview.repeats > 1
                    else:
                        put(out, value, False)
                elif role is RESOLVE:
                    if value is not None:
                        cid = callables[resolved] if callables is not None else None
                        resolved += 1
                        d = self._resolved(value, rview, call, cid)
                        if d is None:
                            put(out, value, False)  # no document to call it on: its code identity
                        else:
                            out += d
                    else:
                        out += b"N"
                elif role is STEP:
                    out += self._step(value, call)
                else:
                    put(out, value, role is MEDIA)
                ends.append(len(out))
            if rview.located:
                out += b"address="
                task, split, doc_id, idx = rview.task, rview.split, rview.doc_id, rview.idx
                if type(task) is str and type(split) is str and type(doc_id) is int and type(idx) is int:
                    # What the encoder writes for this tuple, formatted at once (the common case).
                    t, s = task.encode("utf-8", "surrogatepass"), split.encode("utf-8", "surrogatepass")
                    out += b"l4:s%d:%ss%d:%si%d;i%d;" % (len(t), t, len(s), s, doc_id, idx)
                else:
                    put(out, (task, split, doc_id, idx), False)
                ends.append(len(out))
                out += b"doc="
                d = self._document(rview, call)[0]
                out += d if d is not None else b"?"
                ends.append(len(out))
        except RecursionError:
            reason = "the value is nested too deeply (or contains itself)"
            self._warn("unfingerprintable", f"lmms-cache: a {method} request bypasses the cache: {reason}")
            return _request_key((None, rview, reason, b"", (), None))
        except Unfingerprintable as exc:
            self._warn("unfingerprintable", f"lmms-cache: a {method} request bypasses the cache: {exc}")
            return _request_key((None, rview, str(exc), b"", (), None))
        except _Bypass as exc:
            return _request_key((None, rview, str(exc), b"", (), None))
        except Exception as exc:  # a value that breaks a fingerprint rule must not break the run
            self._warn(
                "fingerprint-error",
                f"lmms-cache: a {method} request bypasses the cache: fingerprinting it raised "
                f"{type(exc).__name__}: {exc}",
            )
            return _request_key((None, rview, f"{type(exc).__name__}: {exc}", b"", (), None))
        if sampled is None:
            sampled = is_sampling(gen, rview.repeats)
        material = out  # the bytearray itself: a miss digests slices of it, a hit drops it
        return _request_key((digest_bytes(material), rview, None, material, tuple(ends), 0 if sampled else None))

    def _settings(self, gen_kwargs: dict[str, Any], call: Call) -> tuple[bytes, bool]:
        """The canonical bytes of a request's generation settings. lmms-eval deep-copies one
        task's ``generation_kwargs`` into every request: equal plain dicts are encoded once per
        call (found by their ``repr``, which for these builtin types differs whenever their
        canonical bytes do); with whether they ask for a sample."""
        last = call.last_settings
        # The previous request's settings, deep-copied: equal values; the same types too? (True
        # == 1, the key tells them apart.) Scalars are compared by their types at once, lists
        # of scalars element by element.
        if (
            last is not None
            and gen_kwargs == last[0]
            and tuple(map(type, gen_kwargs.values())) == last[2]
            and (last[3] or _same_types(gen_kwargs, last[0]))
        ):
            same: tuple[bytes, bool] = last[1]
            return same
        text = _plain_repr(gen_kwargs)
        if text is not None:
            found = _SETTINGS.get(text)
            if found is not None:
                call.last_settings = _last_settings(gen_kwargs, found)
                return found
        out = bytearray()
        self._encoder.put(out, _normalized(gen_kwargs), False)
        found = (bytes(out), is_sampling(gen_kwargs, 1))
        if text is not None:
            if len(_SETTINGS) >= 4096:
                _SETTINGS.clear()
            _SETTINGS[text] = found
            call.last_settings = _last_settings(gen_kwargs, found)
        return found

    # -- documents ------------------------------------------------------------------------------

    def _document(self, rview: RequestView, call: Call) -> tuple[bytes | None, bytes | None]:
        """(digest of the whole document, its row digest when it is a stored dataset row)."""
        doc = rview.doc
        if doc is not NO_DOCUMENT:  # lm-eval: the Instance carries it; encoded by content
            key = id(doc)
            found = call.documents.get(key)
            if found is None:
                found = call.documents[key] = (self._encoder.digest(doc, media=False), None)
            return found
        return self._document_at(rview.task, rview.split, rview.doc_id, call)

    def _document_at(self, task: Any, split: Any, doc_id: Any, call: Call) -> tuple[bytes | None, bytes | None]:
        """The document at an address, as :meth:`_document` gives it."""
        if task is None or doc_id is None:
            return None, None
        address = (task, split, doc_id)
        found = call.documents.get(address)
        if found is not None:
            return found
        where = call.collections.get((task, split))
        if where is None:
            try:
                collection = self._resolver.collection(task, split)
            except DocumentUnavailable as exc:
                self._no_document(exc)
                where = (None, None)
            else:
                where = (collection, self._derived.rows(collection, split))
            call.collections[(task, split)] = where
        rows = where[1]
        row = rows.digest(doc_id) if rows is not None else None
        if row is not None:
            found = (b"r" + row, row)
        elif where[0] is None:
            found = (None, None)
        else:
            try:
                found = (b"c" + self._encoder.digest(self._resolver.document(address)), None)
            except DocumentUnavailable as exc:
                self._no_document(exc)
                found = (None, None)
        call.documents[address] = found
        return found

    def _no_document(self, exc: Exception) -> None:
        self._warn(
            "no-document",
            f"lmms-cache: cannot read a request's document ({exc}); such requests are keyed by their "
            "arguments and address only, their media by the callables' code. Set model.task_dict as "
            "lmms-eval does to key documents and media by content.",
        )

    def _prefetch(self, views: list[RequestView], call: Call) -> None:
        """Load the derivation memo of this chunk's documents in one round trip per function."""
        wanted: dict[bytes, list[bytes]] = {}
        free = call.free
        for rview in views:
            cids = []
            for _, value, role in rview.parts:
                if role is not RESOLVE or value is None:
                    continue
                cid = _callable_id(value)
                cids.append(cid)
                needs = free.get(cid)
                if needs is None:
                    needs = free[cid] = document_free_result(value) is NEEDS_DOCUMENT
                if needs and rview.doc is NO_DOCUMENT and rview.doc_id is not None:
                    self._want(value, cid, rview.task, rview.split, rview.doc_id, wanted, call)
            rview.callables = cids
        for fp, rows in wanted.items():
            self._derived.prefetch(fp, rows)

    def _want(self, fn: Any, cid: Any, task: Any, split: Any, doc_id: Any, wanted: dict[bytes, list[bytes]],
              call: Call) -> None:  # fmt: skip
        """Note the memo row ``fn`` needs for the document at this address (see _prefetch)."""
        row = self._document_at(task, split, doc_id, call)[1]
        if row is not None:
            fp = self._derived.fingerprint(fn, cid)
            if fp is not None:
                wanted.setdefault(fp, []).append(row)

    def _resolved(self, fn: Any, rview: RequestView, call: Call, cid: Any = None) -> bytes | None:
        if cid is None:
            cid = _callable_id(fn)
        found = self._document_free(fn, cid, call)
        if found is not None:
            return found
        address = rview.address
        if address is None:
            return None
        return self._resolved_at(fn, address, call, cid, rview.doc is not NO_DOCUMENT)

    def _document_free(self, fn: Any, cid: Any, call: Call) -> bytes | None:
        """The digest of what ``fn`` gives when its result needs no document (a text task's
        ``doc_to_visual``: called once per call, whatever the document), else None."""
        found = call.resolved.get(cid)
        if found is not None or call.free.get(cid) is True:
            return found
        free = document_free_result(fn)
        if free is NEEDS_DOCUMENT:
            call.free[cid] = True
            return None
        found = call.resolved[cid] = self._encoder.digest(free, media=True)
        return found

    def _resolved_at(self, fn: Any, address: tuple[Any, Any, Any], call: Call, cid: Any, has_doc: bool = False) -> bytes | None:
        """What ``fn`` needing the document at ``address`` gives there, by the call's memo, the
        derivation memo or by calling it (``has_doc``: the request carries its document)."""
        memo = call.resolved
        memo_key = (cid, address)
        found = memo.get(memo_key)
        if found is not None:
            return found
        row = None if has_doc else self._document_at(*address, call)[1]
        fp = self._derived.fingerprint(fn, cid) if row is not None else None
        if fp is not None and row is not None:
            check = self._derived.needs_check(fp)
            if not check:
                found = self._derived.derived(fp, row)
                if found is not None:
                    memo[memo_key] = found
                    return found
            derived = self._derive(fn, address)
            if derived is None:
                return None
            digest, deps = derived
            if check:
                known = self._derived.derived(fp, row)
                if known is not None and known != digest:
                    self._derived.mismatch(fp)
            self._derived.remember(fp, row, digest, deps)
        else:
            derived = self._derive(fn, address)
            if derived is None:
                return None
            digest = derived[0]
        memo[memo_key] = digest
        return digest

    def _derive(self, fn: Any, address: tuple[Any, Any, Any]) -> tuple[bytes, bytes | None] | None:
        """(digest of what ``fn`` gives for the document, the files it read), by calling it."""
        name = getattr(fn, "__qualname__", "a request callable")
        try:
            value = self._resolver.resolve(fn, address)
        except DocumentUnavailable as exc:
            self._no_document(exc)
            return None
        except RandomStateMoved as exc:
            self._warn(
                f"random-state:{address[0]}",
                f"lmms-cache: task {address[0]}: {exc}; what it gives depends on what ran before it, so its "
                "requests bypass the cache (computed, not stored). Seed a local random.Random(doc-based "
                "seed) in the task's function to make it cacheable.",
            )
            raise _Bypass(f"{name} drew from the global random state") from exc
        except Exception as exc:  # the model will call it too and meet the error itself
            self._warn(
                "resolve-failed",
                f"lmms-cache: {name} raised {type(exc).__name__} on {address}; such requests go to the model "
                "uncached.",
            )
            raise _Bypass(f"{name} raised {type(exc).__name__}: {exc}") from exc
        with self._encoder.files.recording() as read:
            digest = self._encoder.digest(value, media=True)
        return digest, encode_deps(read)

    def _step(self, fn: Any, call: Call) -> bytes:
        """A multi-round step function: its code, module source and configuration (what it
        reads in later rounds is recorded as the model calls it)."""
        cid = _callable_id(fn)
        found = call.steps.get(cid)
        if found is None:
            fp = self._derived.fingerprint(fn, ("step", cid))
            if fp is None:
                raise Unfingerprintable(f"cannot fingerprint the step function {getattr(fn, '__qualname__', fn)!r}")
            found = call.steps[cid] = fp
        return found


class _Bypass(Exception):
    """A request that must go to the model uncached (its reason is the message)."""


_SCALARS = (str, int, float, bool, type(None))
# repr of plain generation settings -> (canonical bytes, whether they sample): a pure function,
# so shared by every call and proxy (an evaluation has a few distinct settings).
_SETTINGS: dict[str, tuple[bytes, bool]] = {}



def _plain_repr(d: dict[str, Any]) -> str | None:
    """``repr(d)`` when every value is a builtin scalar or a list/tuple of them (then equal
    reprs mean equal canonical bytes), else None."""
    for k, v in d.items():
        if type(k) is not str:
            return None
        t = type(v)
        if t is list or t is tuple:
            for x in v:
                if type(x) not in _SCALARS:
                    return None
        elif t not in _SCALARS:
            return None
    return repr(d)


def _last_settings(d: dict[str, Any], found: tuple[bytes, bool]) -> tuple[Any, ...]:
    """What :meth:`KeyBuilder._settings` compares the next request's settings with: the
    dict, its (bytes, sampled), its values' types, and whether those are all scalars."""
    types = tuple(map(type, d.values()))
    return (d, found, types, all(t in _SCALARS for t in types))


def _same_types(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """For two equal dicts of plain values: whether each value has the same type too (``==``
    takes ``True`` for ``1``; the key does not). Nested containers other than lists of
    scalars answer False (they take the slower path)."""
    for k, v in a.items():
        w = b[k]
        t = type(v)
        if t is not type(w):
            return False
        if t is list or t is tuple:
            for x, y in zip(v, w, strict=True):
                if type(x) is not type(y) or type(x) not in _SCALARS:
                    return False
        elif t not in _SCALARS:
            return False
    return True


def _normalized(gen_kwargs: Any) -> Any:
    """``until: "x"`` means ``until: ["x"]`` to both harnesses (``--gen_kwargs until=x``
    gives the string, task YAML the list): one key for both."""
    if type(gen_kwargs) is dict and type(gen_kwargs.get("until")) is str:
        return {**gen_kwargs, "until": [gen_kwargs["until"]]}
    return gen_kwargs


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


# -- the common lmms-eval layouts without a RequestView ------------------------------------------
#
# A hit needs only the key. For lmms-eval's two commonest request layouts, (context, gen_kwargs,
# doc_to_visual, doc_id, task, split) and (context, continuation, doc_to_visual, doc_id, task,
# split) with plain types, these write the very bytes KeyBuilder._base writes, part for part
# (tests/test_key.py checks they agree), without building the view and its parts. Anything
# else, or anything they do not find memoized for the call (a callable that reads the document
# before its memo is loaded), returns None and takes the general path.


_PENDING = object()  # (_visual) a callable that reads the document, not yet known for it


def _visual(kb: KeyBuilder, fn: Any, cid: Any, address: tuple[str, str, int], call: Call) -> Any:
    """What ``_resolved`` gives for ``fn`` at ``address`` when its result needs no document
    or the call knows it already; ``_PENDING`` when it needs the document."""
    found = kb._document_free(fn, cid, call)
    if found is None:
        found = call.resolved.get((cid, address))
        if found is None:
            return _PENDING
    return found


class _Pending:
    """A lean key waiting for its visual part: the parts before it, and what follows it."""

    __slots__ = ("address", "cid", "fn", "head", "idx", "sampled")

    def __init__(self, head: tuple[bytes, ...], fn: Any, cid: Any, address: tuple[str, str, int], idx: int,
                 sampled: bool) -> None:  # fmt: skip
        self.head = head
        self.fn = fn
        self.cid = cid
        self.address = address
        self.idx = idx
        self.sampled = sampled


def _finish(kb: KeyBuilder, head: tuple[bytes, ...], visual: bytes, address: tuple[str, str, int], idx: int,
            sampled: bool, call: Call) -> RequestKey:  # fmt: skip
    """The key from ``head`` (prefix, context label, context, second label, second) and the
    visual, address and document parts: the material joined in one allocation (a 2 KB prompt
    grown in a bytearray is copied at each growth) and its component ends computed."""
    prefix, label, context, label2, second = head
    task, split, doc_id = address
    t, s = task.encode("utf-8", "surrogatepass"), split.encode("utf-8", "surrogatepass")
    located = b"address=l4:s%d:%ss%d:%si%d;i%d;" % (len(t), t, len(s), s, doc_id, idx)
    d = kb._document_at(task, split, doc_id, call)[0]
    if d is None:
        d = b"?"
    material = b"".join((prefix, label, context, label2, second, b"visual=", visual, located, b"doc=", d))
    e0 = len(prefix)
    e1 = e0 + len(label) + len(context)
    e2 = e1 + len(label2) + len(second)
    e3 = e2 + 7 + len(visual)
    e4 = e3 + len(located)
    return _request_key((digest_bytes(material), None, None, material, (e0, e1, e2, e3, e4, e4 + 4 + len(d)),
                         0 if sampled else None))  # fmt: skip


def _fast(kb: KeyBuilder, prefix: bytes, request: Any, call: Call, loglikelihood: bool) -> Any:
    """The key of (context, gen_kwargs | continuation, doc_to_visual, doc_id, task, split);
    a :class:`_Pending` one when its visual needs the document; None for the general path."""
    args = getattr(request, "arguments", None)
    if type(args) is not tuple or len(args) != 6:
        return None
    context, second, fn, doc_id, task, split = args
    if type(context) is not str or type(second) is not (str if loglikelihood else dict) or type(doc_id) is not int \
            or type(task) is not str or type(split) is not str:  # fmt: skip
        return None
    meta = getattr(request, "metadata", None)
    idx = getattr(request, "idx", None)
    if type(meta) is not dict or type(idx) is not int:
        return None
    repeats = meta.get("repeats", 1)
    if type(repeats) is not int:
        return None
    if fn is None:
        cid: Any = None
    elif type(fn) is MethodType:
        cid = (id(fn.__self__), id(fn.__func__))  # (_callable_id, inlined: once per request)
    elif callable(fn):
        cid = id(fn)
    else:
        return None
    address = (task, split, doc_id)
    try:
        visual = b"N" if fn is None else _visual(kb, fn, cid, address, call)
        text = context.encode("utf-8", "surrogatepass")
        if loglikelihood:
            target = args[1].encode("utf-8", "surrogatepass")  # (args: mypy narrows second to str | dict)
            head = (prefix, b"context=s%d:" % len(text), text, b"target=s%d:" % len(target), target)
            samples = False
        else:
            encoded, samples = kb._settings(args[1], call)
            head = (prefix, b"context=s%d:" % len(text), text, b"gen_kwargs=", encoded)
        sampled = kb._sampling
        if sampled is None:
            sampled = samples or (repeats or 1) > 1
        if visual is _PENDING:
            return _Pending(head, fn, cid, address, idx, sampled)
        return _finish(kb, head, visual, address, idx, sampled, call)
    except Exception:  # the general path meets it again and says what it is
        return None


# method -> whether its second argument is a continuation (else generation settings)
_FAST = {"generate_until": False, "loglikelihood": True}
