"""Documents, and the media derived from them, keyed without decoding twice.

Every key holds the whole document a request came from and the media the model sees.
Both would mean decoding (an image column decodes on every row access); this module keeps
the decoding to what the model does anyway:

* **Row digests.** A row of a ``datasets`` dataset counts by its *stored* bytes, the Arrow
  row as written, undecoded. The digests of all rows are computed in bulk, once per dataset,
  and memoized in the store under the dataset's id (its fingerprint, features, format and
  the signatures of its files) and split. Digests read back from the store are checked
  against the first row needed, digested again from the table, and rebuilt on a mismatch
  (an Arrow table in memory never changes: once per process is enough).
* **Derived media.** What ``doc_to_visual`` / ``doc_to_messages`` / ``doc_to_target`` give
  for a row is memoized as ``(function fingerprint, row digest) -> media digest``, filled
  when a document is derived for keying (the decode the model would make anyway). The
  fingerprint holds the function's code, the source of its module and of the modules of
  the task configuration's functions, the configuration itself (``lmms_eval_specific_kwargs``
  included), and the versions of the libraries that decode media. Files and directories a
  derivation read are recorded with it and re-checked by their stat signatures on every
  use. Once per call, the first document of each function is derived again and the
  function's memo is dropped on a mismatch (a helper in another module changed); calls
  that follow each other within a second (a loop of one-request calls) share a check. A
  function that moved the global random state is never memoized.

The memo is a shortcut to the digest of what the model sees, never a replacement for it:
whatever doubt there is rebuilds it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
import time
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import xxhash

from .fingerprint import Encoder, FileDigests, Unfingerprintable, source_digest
from .store.base import StoreError

__all__ = ["Derivations", "MemoStore", "Recording", "dataset_id", "deps_hold", "encode_deps", "row_digests"]

log = logging.getLogger("lmms_cache")

_ROW_BATCH = 1024  # Arrow rows converted at a time when digesting a dataset in bulk
_CHECK_EVERY = 1.0  # seconds: calls closer than this share one re-derivation per function
# Libraries that decode what a derivation returns: a new version may decode differently.
_DECODERS = ("lmms_eval", "datasets", "pyarrow", "PIL", "decord", "av", "cv2", "numpy", "torch",
             "torchvision", "torchaudio", "librosa", "soundfile", "qwen_vl_utils", "imageio")  # fmt: skip


class MemoStore(Protocol):
    """The store's memo tables (see :class:`lmms_cache.store.Store`)."""

    def row_digests(self, dataset: str, split: str) -> bytes | None: ...
    def remember_row_digests(self, dataset: str, split: str, digests: bytes) -> None: ...
    def derived_many(self, function: bytes, rows: Sequence[bytes]) -> dict[bytes, tuple[bytes, bytes | None]]: ...
    def remember_derived(self, items: Sequence[tuple[bytes, bytes, bytes, bytes | None]]) -> None: ...
    def forget_derived(self, function: bytes) -> int: ...


# -- datasets ----------------------------------------------------------------------------------


def dataset_id(collection: Any) -> str | None:
    """A stable id of a ``datasets.Dataset`` whose rows are stored (None for anything else,
    and for a dataset with a custom transform, whose rows are not what the model reads):
    its fingerprint, features, format and the signatures of its Arrow files."""
    module = sys.modules.get("datasets")
    if module is None or not isinstance(collection, module.Dataset):
        return None
    fingerprint = getattr(collection, "_fingerprint", None)
    if not isinstance(fingerprint, str):
        return None
    form = collection.format
    if form.get("type") == "custom" or any(callable(v) for v in (form.get("format_kwargs") or {}).values()):
        return None
    h = xxhash.xxh3_128(fingerprint.encode())
    try:
        h.update(json.dumps(collection.features.to_dict(), sort_keys=True, default=str).encode())
        h.update(json.dumps(form, sort_keys=True, default=str).encode())
        for f in collection.cache_files:
            st = os.stat(f["filename"])
            h.update(f"{f['filename']}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}".encode())
    except (OSError, TypeError, ValueError):
        return None
    return f"{fingerprint}-{h.hexdigest()[:16]}"


def row_digests(collection: Any, rows: Iterable[int] | None = None) -> bytes:
    """The 16-byte digests of a dataset's rows (all of them, or ``rows``), concatenated in
    order, from the rows' stored values: image and audio bytes hashed as stored."""
    table = collection.data.table
    indices = collection._indices
    order = None if indices is None else indices.column(0).to_numpy()
    if rows is not None:  # one slice per row: zero-copy (take() copies whole chunks)
        wanted = [int(order[i]) if order is not None else int(i) for i in rows]
        return b"".join(d for i in wanted for d in _digest_rows(table.slice(i, 1)))
    physical = b"".join(_digest_rows(table))
    if order is None:
        return physical
    return b"".join(physical[16 * int(i) : 16 * int(i) + 16] for i in order)


def _digest_rows(table: Any) -> Iterable[bytes]:
    """Each row's digest: its column names (the same for every row, encoded once) and its
    values as stored, canonically encoded."""
    encoder = Encoder()
    names = encoder.encode(list(table.schema.names))
    put = encoder.put
    for batch in table.to_batches(max_chunksize=_ROW_BATCH):
        columns = [batch.column(i).to_pylist() for i in range(batch.num_columns)]
        for values in zip(*columns, strict=True):
            out = bytearray(names)
            for v in values:
                put(out, v, False)
            yield xxhash.xxh3_128_digest(out)


# -- functions ---------------------------------------------------------------------------------


def function_fingerprint(fn: Any) -> bytes | None:
    """What a derivation's result depends on besides the document: the callable's code
    identity, its module's source, a bound object's configuration (a task's config and
    kwargs, with the sources of the functions in it), and the decoders' versions. None when
    the callable cannot be fingerprinted (it is then never memoized)."""
    h = xxhash.xxh3_128(b"lmms-cache/derive/1\0")
    try:
        h.update(Encoder().encode(fn))
        for code in _functions_in(fn):
            h.update(_source(code))
        owner = getattr(fn, "__self__", None)
        if owner is not None and not isinstance(owner, (type, types.ModuleType)):
            state, functions = _bound_state(owner)
            h.update(state)
            for code in functions:
                h.update(_source(code))
    except (Unfingerprintable, RecursionError, TypeError, ValueError):
        return None
    h.update(_decoder_versions())
    return h.digest()


def _functions_in(fn: Any) -> list[Any]:
    out = []
    while True:
        if hasattr(fn, "func") and hasattr(fn, "args"):  # functools.partial
            fn = fn.func
            continue
        out.append(getattr(fn, "__func__", fn))
        return out


def _source(fn: Any) -> bytes:
    module = getattr(fn, "__module__", None)
    digest = source_digest(module) if isinstance(module, str) else None
    return (module or "?").encode() + b"=" + (digest or b"?")


def _bound_state(owner: Any) -> tuple[bytes, list[Any]]:
    """A bound object's configuration (plain values, small containers, dataclasses such as
    lmms-eval's TaskConfig; functions by code), and the functions found in it. Datasets,
    instances and other large objects are left out: their content is keyed on its own."""
    functions: list[Any] = []

    def plain(v: Any, depth: int) -> Any:
        if v is None or isinstance(v, (str, int, float, bool)):
            return v
        if depth > 4:
            return f"<{type(v).__qualname__}>"
        if isinstance(v, (list, tuple)):
            return [plain(x, depth + 1) for x in v] if len(v) <= 10_000 else f"<{len(v)} items>"
        if isinstance(v, Mapping):
            return {str(k): plain(x, depth + 1) for k, x in v.items()} if len(v) <= 10_000 else f"<{len(v)} items>"
        if isinstance(v, (types.FunctionType, types.MethodType)) or (callable(v) and hasattr(v, "func")):
            functions.extend(_functions_in(v))
            return "code:" + Encoder().digest(v).hex()
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name, None), depth + 1) for f in dataclasses.fields(v)}
        return f"<{type(v).__module__}.{type(v).__qualname__}>"

    state = {}
    for name, value in sorted(getattr(owner, "__dict__", {}).items()):
        if name.startswith("__") or name in _NOT_CONFIGURATION:
            continue
        state[name] = plain(value, 0)
    return json.dumps(state, sort_keys=True, default=str).encode(), functions


# A task's attributes that are not configuration: its data and what it built from it.
_NOT_CONFIGURATION = frozenset({"dataset", "_instances", "_training_docs", "_fewshot_docs", "sampler",
                                "task_docs", "_sample_metric_fns"})  # fmt: skip


def _decoder_versions() -> bytes:
    parts = []
    for name in _DECODERS:
        module = sys.modules.get(name)
        if module is not None:
            parts.append(f"{name}={getattr(module, '__version__', '?')}")
    return ";".join(parts).encode()


# -- file dependencies -------------------------------------------------------------------------


def encode_deps(deps: Sequence[tuple[str, tuple[int, ...], bytes]]) -> bytes | None:
    """Files a derived digest read: (path, stat signature, content digest) each."""
    if not deps:
        return None
    return json.dumps([[p, list(s), d.hex()] for p, s, d in deps]).encode()


def deps_hold(deps: bytes | None, files: FileDigests) -> bool:
    """Whether the files a derived digest read are still what they were."""
    if not deps:
        return True
    try:
        items = json.loads(deps)
    except ValueError:
        return False
    for path, signature, digest in items:
        if files.signature(path) == tuple(signature):
            continue
        current = files.get(path) if not os.path.isdir(path) else files.directory(path)
        if current is None or current.hex() != digest:
            return False
    return True


class Recording:
    """A multi-round step function handed to the model in place of the request's own: it
    passes every call through and records the files and directories the media each round
    returns name (``read``), so that a hit can check them (a rewritten later-round video
    chunk is a miss). ``complete`` is False when a round's media could not be read."""

    def __init__(self, fn: Any, encoder: Encoder) -> None:
        functools.update_wrapper(self, fn)  # name, docs and signature (through __wrapped__)
        self._fn = fn
        self._encoder = encoder
        self.read: list[tuple[str, tuple[int, ...], bytes]] = []
        self.complete = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = self._fn(*args, **kwargs)
        with self._encoder.files.recording() as read:
            try:
                self._encoder.digest(result, media=True)
            except (Unfingerprintable, RecursionError, OSError, ValueError, TypeError):
                self.complete = False
        self.read.extend(read)
        return result


# -- the memo, per proxy -------------------------------------------------------------------------


class Rows:
    """One stored dataset's row digests, for the requests of one call."""

    __slots__ = ("_collection", "_dataset", "_owner")

    def __init__(self, owner: Derivations, collection: Any, dataset: _Dataset) -> None:
        self._owner = owner
        self._collection = collection
        self._dataset = dataset

    def digest(self, index: Any) -> bytes | None:
        """Row ``index``'s digest (None for an index that is not a row's)."""
        if type(index) is not int or index < 0:
            return None
        dataset = self._dataset
        if not dataset.checked:
            self._owner._recheck(self._collection, dataset, index)
        digests = dataset.digests
        if digests is None or 16 * index + 16 > len(digests):
            return None
        return digests[16 * index : 16 * index + 16]


@dataclasses.dataclass
class _Dataset:
    id: str | None
    split: str
    digests: bytes | None = None
    checked: bool = False  # this call


class Derivations:
    """Row digests and derived media of one proxy, with the store's memo tables behind.

    Args:
        memo: the store (or None: in-process only).
        files: file digests (their stat signatures make derived media re-checkable).
        writable: whether memo entries may be written.
    """

    def __init__(self, memo: MemoStore | None, files: FileDigests, writable: bool = True) -> None:
        self._memo = memo
        self._files = files
        self._writable = writable and memo is not None
        self._datasets: dict[tuple[int, str], _Dataset] = {}  # (id(collection), split)
        self._pending: list[tuple[bytes, bytes, bytes, bytes | None]] = []
        self._checked: dict[bytes, float] = {}  # function -> when a document was last re-derived
        self._clock = time.monotonic
        self._loaded: dict[bytes, dict[bytes, tuple[bytes, bytes | None]]] = {}
        self._fingerprints: dict[Any, bytes | None] = {}

    _call_started = 0.0

    def begin_call(self) -> None:
        """A new call: functions and the files behind their results may have changed."""
        self._call_started = self._clock()
        self._loaded.clear()
        self._fingerprints.clear()

    # -- rows --

    def rows(self, collection: Any, split: Any) -> Rows | None:
        """The row digests of ``collection`` when it is a stored dataset (None: its documents
        are encoded by content instead); look it up once per call."""
        dataset = self._dataset(collection, str(split))
        return None if dataset is None or dataset.digests is None else Rows(self, collection, dataset)

    def _recheck(self, collection: Any, dataset: _Dataset, index: int) -> None:
        """The first row a call needs, digested again from the table: doubt rebuilds the memo."""
        dataset.checked = True
        digests = dataset.digests
        if digests is not None and row_digests(collection, [index]) != digests[16 * index : 16 * index + 16]:
            log.info("lmms-cache: the rows of %s changed under the same fingerprint; digesting them again",
                     dataset.id)  # fmt: skip
            dataset.digests = self._digest_all(collection, dataset)

    def _dataset(self, collection: Any, split: str) -> _Dataset | None:
        slot = (id(collection), split)
        dataset = self._datasets.get(slot)
        if dataset is None:
            ident = dataset_id(collection)
            dataset = _Dataset(ident, split)
            if ident is not None:
                stored = self._memo_read(lambda m: m.row_digests(ident, split))
                if stored is not None and len(stored) == 16 * len(collection):
                    dataset.digests = stored  # checked against the first row needed
                else:
                    dataset.digests = self._digest_all(collection, dataset)
                    dataset.checked = True  # computed here from the table itself
            self._datasets[slot] = dataset
            # the collection stays referenced by the model's task_dict; a new object gets a new slot
        return dataset if dataset.id is not None else None

    def _digest_all(self, collection: Any, dataset: _Dataset) -> bytes | None:
        try:
            digests = row_digests(collection)
        except Exception as exc:  # an exotic table: documents are then encoded by content
            log.debug("lmms-cache: cannot digest the rows of %s: %s", dataset.id, exc)
            dataset.id = None
            return None
        ident = dataset.id
        if ident is not None and self._writable:
            self._memo_write(lambda m: m.remember_row_digests(ident, dataset.split, digests))
        return digests

    # -- derived media --

    def fingerprint(self, fn: Any, identity: Any) -> bytes | None:
        """The fingerprint of a derivation function (memoized for the call by ``identity``)."""
        if identity in self._fingerprints:
            return self._fingerprints[identity]
        found = function_fingerprint(fn)
        self._fingerprints[identity] = found
        return found

    def prefetch(self, function: bytes, rows: Sequence[bytes]) -> None:
        """Load the memo of ``rows`` for ``function`` in one round trip."""
        loaded = self._loaded.setdefault(function, {})
        wanted = [r for r in dict.fromkeys(rows) if r not in loaded]
        if wanted:
            loaded.update(self._memo_read(lambda m: m.derived_many(function, wanted)) or {})

    def derived(self, function: bytes, row: bytes) -> bytes | None:
        """The memoized media digest of ``row`` for ``function``, if its files still hold."""
        loaded = self._loaded.get(function)
        if loaded is None:
            self.prefetch(function, [row])
            loaded = self._loaded[function]
        found = loaded.get(row)
        if found is None:
            return None
        digest, deps = found
        return digest if deps_hold(deps, self._files) else None

    def needs_check(self, function: bytes) -> bool:
        """True once per call for each function (derive one document again, to compare),
        and no more than once a second: evaluators make a few calls of many requests, a loop
        of one-request calls would otherwise decode a document per call."""
        now = self._clock()
        last = self._checked.get(function)
        if last is not None and (last >= self._call_started or now - last < _CHECK_EVERY):
            return False
        self._checked[function] = now
        return True

    def mismatch(self, function: bytes) -> None:
        """A re-derived document disagrees with the memo: drop the function's memo."""
        log.info("lmms-cache: a memoized media digest no longer matches what its function gives "
                 "(code outside its module changed?); deriving its documents again")  # fmt: skip
        self._loaded[function] = {}
        self._pending = [p for p in self._pending if p[0] != function]
        if self._writable:
            self._memo_write(lambda m: m.forget_derived(function))

    def remember(self, function: bytes, row: bytes, digest: bytes, deps: bytes | None) -> None:
        self._loaded.setdefault(function, {})[row] = (digest, deps)
        if self._writable:
            self._pending.append((function, row, digest, deps))

    def flush(self) -> None:
        """Write the memo entries found since the last flush (best effort)."""
        if self._pending:
            items, self._pending = self._pending, []
            self._memo_write(lambda m: m.remember_derived(items))

    # -- the store, best effort: a memo that fails is a memo that misses --

    def _memo_read(self, action: Callable[[MemoStore], Any]) -> Any:
        if self._memo is None:
            return None
        try:
            return action(self._memo)
        except StoreError as exc:
            log.debug("lmms-cache: reading the derivation memo failed: %s", exc)
            return None

    def _memo_write(self, action: Callable[[MemoStore], Any]) -> None:
        if self._memo is None:
            return
        try:
            action(self._memo)
        except StoreError as exc:
            log.debug("lmms-cache: writing the derivation memo failed: %s", exc)
