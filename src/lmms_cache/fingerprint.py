"""Canonical, content-based fingerprints of request values.

A value is turned into a canonical byte stream (every item carries a type tag and a
length, so concatenations are unambiguous) and hashed with xxh3-128. Equal content gives
equal bytes whatever the object identity, dict order, memory layout or device; anything
that could change what a model sees gives different bytes.

Rules, pinned by the golden tests (changing one is a key-format version bump):

* ``None``, ``bool`` (``True`` is not ``1``), ``int``; a ``float`` equal to an integer
  hashes as that integer (``temperature: 0`` and ``0.0`` are the same setting), other
  floats by their exact round-trip ``repr``; ``str`` as UTF-8; ``bytes`` as they are;
  ``complex``, ``slice``, ``range`` and ``...`` by value (code constants use them).
* ``list`` and ``tuple`` are both sequences; ``dict`` keys are sorted by their canonical
  bytes, so insertion order never matters; sets likewise.
* PIL images by mode, size, palette and pixels; numpy arrays and torch tensors by dtype,
  shape and values (C order; device, strides and ``requires_grad`` do not count).
* In a *media* position (a visual, a message's media part), a string or ``Path`` naming
  an existing regular file is hashed by the file's content (and suffix), not its name;
  a message's text (a ``{"type": "text"}`` part, and the ``role``, ``type``, ``text``
  and string ``content`` entries of any mapping) stays text.
* Callables by a stable code identity: module, qualified name, bytecode, constants,
  defaults, closure values and ``functools.partial`` arguments (a function in its own
  closure refers back to itself); a classmethod by its class, a builtin bound to an
  object by that object. Never ``repr`` or ``id``.
* Anything else raises :class:`Unfingerprintable`; the proxy then lets that request
  bypass the cache rather than guess.

Large buffers (images, arrays, files) are hashed on their own, at memory speed, and only
their 16-byte digest joins the stream, so nothing big is ever copied.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import math
import operator
import os
import stat
import sys
import types
import weakref
from collections.abc import Callable, Iterator, Mapping, Set
from pathlib import PurePath
from typing import Any

import xxhash

__all__ = ["Encoder", "FileDigests", "Unfingerprintable", "digest", "digest_bytes", "source_digest"]

_FILE_CHUNK = 1 << 22  # 4 MiB reads keep a 20 MB video at memory speed without a copy of it


class Unfingerprintable(TypeError):
    """A value whose content cannot be fingerprinted safely."""


def digest_bytes(data: bytes | bytearray | memoryview) -> bytes:
    """Return the 16-byte xxh3-128 digest of a buffer."""
    return xxhash.xxh3_128_digest(data)


class FileDigests:
    """Content digests of files, memoized by (path, size, mtime_ns, ctime_ns, inode, device),
    and of directories (their whole tree, from the files' memoized digests).

    ``lookup``/``remember`` let a store persist the memo across processes; by default the
    memo lives in this object only. :meth:`recording` lists the files and directories read
    meanwhile, with their signatures: what a derived digest depends on.
    """

    def __init__(
        self,
        lookup: Callable[[str, tuple[int, ...]], bytes | None] | None = None,
        remember: Callable[[str, tuple[int, ...], bytes], None] | None = None,
    ) -> None:
        self._memo: dict[tuple[str, tuple[int, ...]], bytes] = {}
        self._lookup = lookup
        self._remember = remember
        self._record: list[tuple[str, tuple[int, ...], bytes]] | None = None

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[tuple[str, tuple[int, ...], bytes]]]:
        """Collect (path, signature, digest) of each file and directory read in the block
        (a directory's signature is empty: it is re-checked by its contents)."""
        outer, self._record = self._record, []
        try:
            yield self._record
        finally:
            inner, self._record = self._record, outer
            if outer is not None and inner:
                outer.extend(inner)

    @staticmethod
    def signature(path: str) -> tuple[int, ...] | None:
        """A regular file's stat signature (None for anything else)."""
        try:
            st = os.stat(path)
        except (OSError, ValueError):
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)

    def get(self, path: str) -> bytes | None:
        """Digest of the regular file at ``path``, or None if it is not one."""
        sig = self.signature(path)
        if sig is None:
            return None
        path = os.path.abspath(path)
        found = self._memo.get((path, sig))
        if found is None and self._lookup is not None:
            found = self._lookup(path, sig)
        if found is None:
            found = _hash_file(path)
            if self._remember is not None:
                self._remember(path, sig, found)
        self._memo[(path, sig)] = found
        if self._record is not None:
            self._record.append((path, sig, found))
        return found

    def directory(self, path: str) -> bytes | None:
        """Digest of the tree under the directory ``path`` (None if it is not one): the sorted
        relative names, hidden ones included, each file by its content, each symbolic link by
        its target text (never followed), each subdirectory the same way."""
        try:
            if not stat.S_ISDIR(os.stat(path).st_mode):
                return None
        except (OSError, ValueError):
            return None
        path = os.path.abspath(path)
        h = xxhash.xxh3_128(b"dir\0")
        outer, self._record = self._record, None  # the directory is the dependency, not its files
        try:
            self._walk(path, "", h)
        finally:
            self._record = outer
        found = h.digest()
        if self._record is not None:
            self._record.append((path, (), found))
        return found

    def _walk(self, root: str, prefix: str, h: Any) -> None:
        try:
            entries = sorted(os.scandir(os.path.join(root, prefix) if prefix else root), key=lambda e: e.name)
        except OSError as exc:
            h.update(b"E" + type(exc).__name__.encode())
            return
        for entry in entries:
            name = f"{prefix}/{entry.name}" if prefix else entry.name
            label = name.encode("utf-8", "surrogateescape")
            if entry.is_symlink():
                target = os.readlink(entry.path).encode("utf-8", "surrogateescape")
                h.update(b"L%d:%s%d:%s" % (len(label), label, len(target), target))
            elif entry.is_dir(follow_symlinks=False):
                h.update(b"D%d:%s" % (len(label), label))
                self._walk(root, name, h)
            elif entry.is_file(follow_symlinks=False):
                digest = self.get(entry.path)
                h.update(b"F%d:%s" % (len(label), label) + (digest or b"?" * 16))
            else:  # a fifo, a socket, a device: its name only, never opened
                h.update(b"O%d:%s" % (len(label), label))


def _hash_file(path: str) -> bytes:
    h = xxhash.xxh3_128()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_FILE_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.digest()


class Encoder:
    """Builds the canonical byte stream of values; ``digest()`` hashes it.

    Args:
        files: where file-content digests come from (memoized); a private one by default.

    Example:
        >>> Encoder().digest({"b": 1, "a": 0.0}) == Encoder().digest({"a": 0, "b": 1.0})
        True
        >>> Encoder().digest(1) == Encoder().digest(True)
        False
    """

    def __init__(self, files: FileDigests | None = None) -> None:
        self.files = files if files is not None else FileDigests()
        # Functions being encoded, outermost first: a recursive closure (a nested function
        # that calls itself) refers back to its position here instead of recursing forever.
        self._functions: list[int] = []
        # Digests of big objects (images, arrays, tensors) by identity, while a call is keyed:
        # lm-eval's image is in the request and in its document, a document's image is what
        # doc_to_visual returns. Weak references: nothing is kept alive, a reused id is seen.
        self.seen: dict[int, tuple[Any, bytes]] | None = None

    def _once(self, v: Any, digest_of: Callable[[Any], bytes]) -> bytes:
        seen = self.seen
        if seen is not None:
            found = seen.get(id(v))
            if found is not None and found[0]() is v:
                return found[1]
        d = digest_of(v)
        if seen is not None:
            with contextlib.suppress(TypeError):  # a type without weak references: hashed each time
                seen[id(v)] = (weakref.ref(v), d)
        return d

    def digest(self, value: Any, *, media: bool = False) -> bytes:
        """The 16-byte digest of ``value``; ``media`` hashes file paths by content."""
        return digest_bytes(self.encode(value, media=media))

    def encode(self, value: Any, *, media: bool = False) -> bytes:
        """The canonical bytes of ``value``."""
        out = bytearray()
        self.write(out, value, media=media)
        return bytes(out)

    def write(self, out: bytearray, value: Any, media: bool = False) -> None:
        """Append the canonical bytes of ``value`` to ``out``.

        Raises:
            Unfingerprintable: a value of an unsupported type, or nested too deeply (a
                container that contains itself).
        """
        try:
            self._put(out, value, media)
        except RecursionError:
            raise Unfingerprintable("the value is nested too deeply (or contains itself)") from None

    # The dispatch order matters: bool before int, str before sequences, and exact
    # types first because they are by far the most common (a text request is only these).
    def _put(self, out: bytearray, v: Any, media: bool) -> None:
        t = type(v)
        if t is str:
            if media:
                d = self._file(v)
                if d is not None:
                    out += d
                    return
            b = v.encode("utf-8", "surrogatepass")
            out += b"s%d:" % len(b)
            out += b
        elif t is int:
            out += b"i%d;" % v
        elif t is bool:
            out += b"T" if v else b"F"
        elif v is None:
            out += b"N"
        elif t is float:
            _put_float(out, v)
        elif t is list or t is tuple:
            out += b"l%d:" % len(v)
            for item in v:
                self._put(out, item, media)
        elif t is dict or isinstance(v, Mapping):
            # A chat message's text part is text even inside media: "cat.jpg" as a question
            # must not be keyed by the content of a file that happens to have that name.
            self._put_mapping(out, v, media and v.get("type") != "text")
        else:
            self._put_other(out, v, media)

    # For callers that catch RecursionError themselves (the key builder): one call less.
    put = _put

    def _put_mapping(self, out: bytearray, v: Mapping[Any, Any], media: bool) -> None:
        items: list[tuple[bytes, Any, bool]] = []
        for k, item in v.items():
            if type(k) is str:  # nearly every key: the same bytes _put writes, without a call
                kb = _STR_KEYS.get(k)
                if kb is None:
                    b = k.encode("utf-8", "surrogatepass")
                    kb = b"s%d:%s" % (len(b), b)
                    if len(_STR_KEYS) < _STR_KEYS_MAX:
                        _STR_KEYS[k] = kb
                # A message's role and text are what the model reads, never file names, even
                # where the rest of the mapping is media: {"role": "user", "content": "a.jpg"}.
                if media and k in _TEXT_KEYS and isinstance(item, str):
                    items.append((kb, item, False))
                else:
                    items.append((kb, item, media))
            else:
                buf = bytearray()
                self._put(buf, k, False)
                items.append((bytes(buf), item, media))
        items.sort(key=_first)
        out += b"d%d:" % len(items)
        put = self._put
        for key_bytes, item, item_media in items:
            out += key_bytes
            # Plain settings (most of gen_kwargs) without a call; the same bytes _put writes.
            t = type(item)
            if t is int:
                out += b"i%d;" % item
            elif t is str and not item_media:
                b = item.encode("utf-8", "surrogatepass")
                out += b"s%d:" % len(b)
                out += b
            elif t is bool:
                out += b"T" if item else b"F"
            elif t is float:
                _put_float(out, item)
            else:
                put(out, item, item_media)

    def _put_other(self, out: bytearray, v: Any, media: bool) -> None:
        if isinstance(v, bool):
            out += b"T" if v else b"F"
        elif isinstance(v, enum.Enum):
            out += b"E"
            self._put(out, _qualified(type(v)), False)
            self._put(out, v.value, media)
        elif isinstance(v, int):
            out += b"i%d;" % v
        elif isinstance(v, float):
            _put_float(out, v)
        elif isinstance(v, str):
            self._put(out, str(v), media)
        elif isinstance(v, (bytes, bytearray, memoryview)):
            data: Any = v
            if isinstance(v, memoryview):
                # cast() refuses strided and empty views; those are small or rare: copy them.
                data = v.cast("B") if v.c_contiguous and v.nbytes else v.tobytes()
            out += b"b%d:" % len(data)
            out += digest_bytes(data)
        elif v is Ellipsis:
            out += b"."
        elif isinstance(v, complex):
            out += b"j"
            _put_float(out, v.real)
            _put_float(out, v.imag)
        elif isinstance(v, slice):
            out += b"x"
            self._put(out, (v.start, v.stop, v.step), media)
        elif isinstance(v, range):
            out += b"R"
            self._put(out, (v.start, v.stop, v.step), media)
        elif isinstance(v, PurePath):
            self._put(out, os.fspath(v), media)
        elif isinstance(v, (list, tuple)):
            out += b"l%d:" % len(v)
            for item in v:
                self._put(out, item, media)
        elif isinstance(v, (Set, frozenset)):
            encoded = sorted(self.encode(item, media=media) for item in v)
            out += b"S%d:" % len(encoded)
            for e in encoded:
                out += e
        elif _is_pil_image(v):
            out += b"I"
            out += self._once(v, _image_digest)
        elif _is_numpy_array(v):
            out += b"A"
            out += self._once(v, lambda a: _array_digest(a, self, media))
        elif _is_torch_tensor(v):
            out += b"A"
            out += self._once(v, _tensor_digest)
        elif _is_numpy_scalar(v):
            self._put(out, v.item(), media)
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            out += b"C"
            self._put(out, _qualified(type(v)), False)
            fields = {f.name: getattr(v, f.name) for f in dataclasses.fields(v)}
            self._put_mapping(out, fields, media)
        elif callable(v):
            out += b"K"
            self._put_callable(out, v)
        else:
            raise Unfingerprintable(
                f"cannot fingerprint a value of type {_qualified(type(v))}; "
                "pass a model_id or make the request use plain values"
            )

    def _file(self, path: str) -> bytes | None:
        # Only strings that could be paths reach the file system: a long prompt or a URL is
        # not stat()-ed, which keeps a text request free of system calls.
        if not path or len(path) > 4096 or "\n" in path or "://" in path:
            return None
        d = self.files.get(path)
        if d is None:
            # A directory of frames (llava_vid globs them; mvbench's frame subsets): by content.
            d = self.files.directory(path)
            return None if d is None else b"Q" + d
        suffix = os.path.splitext(path)[1].lower().encode()
        return b"P%d:%s" % (len(suffix), suffix) + d

    def _put_callable(self, out: bytearray, fn: Any) -> None:
        if isinstance(fn, functools.partial):
            out += b"p"
            self._put_callable(out, fn.func)
            self._put(out, fn.args, False)
            self._put(out, fn.keywords, False)
        elif isinstance(fn, types.MethodType):
            # A classmethod is bound to its class: which class it is decides what it does.
            owner = fn.__self__ if isinstance(fn.__self__, type) else type(fn.__self__)
            out += b"m"
            self._put(out, _qualified(owner), False)
            self._put_callable(out, fn.__func__)
        elif isinstance(fn, types.FunctionType):
            if id(fn) in self._functions:
                out += b"r%d;" % self._functions.index(id(fn))
                return
            self._functions.append(id(fn))
            try:
                out += b"f"
                self._put(out, f"{fn.__module__}.{fn.__qualname__}", False)
                self._put_code(out, fn.__code__)
                self._put(out, fn.__defaults__ or (), False)
                self._put(out, fn.__kwdefaults__ or {}, False)
                cells = []
                for cell in fn.__closure__ or ():
                    try:
                        cells.append(cell.cell_contents)
                    except ValueError:  # an empty cell: a name not bound yet
                        cells.append(None)
                self._put(out, cells, False)
            finally:
                self._functions.pop()
        elif isinstance(fn, (types.BuiltinFunctionType, type)):
            out += b"q"
            self._put(out, f"{getattr(fn, '__module__', None)}.{fn.__qualname__}", False)
            # A builtin bound to an object ({}.get, "x".join) depends on that object.
            bound = getattr(fn, "__self__", None)
            if (
                isinstance(fn, types.BuiltinFunctionType)
                and bound is not None
                and not isinstance(bound, types.ModuleType)
            ):
                out += b"@"
                self._put(out, bound, False)
        else:
            raise Unfingerprintable(f"cannot fingerprint the callable {_qualified(type(fn))}")

    def _put_code(self, out: bytearray, code: types.CodeType) -> None:
        out += b"c"
        self._put(out, code.co_code, False)
        self._put(out, code.co_names, False)
        consts = []
        for c in code.co_consts:
            if isinstance(c, types.CodeType):
                sub = bytearray()
                self._put_code(sub, c)
                consts.append(bytes(sub))
            else:
                consts.append(c)
        self._put(out, consts, False)


_TEXT_KEYS = frozenset({"role", "type", "text", "content"})
# Encoded mapping keys (gen_kwargs names, message fields): a few dozen distinct strings.
_STR_KEYS: dict[str, bytes] = {}
_STR_KEYS_MAX = 4096


_first = operator.itemgetter(0)


def _put_float(out: bytearray, v: float) -> None:
    if v.is_integer():
        out += b"i%d;" % int(v)
    elif math.isnan(v):
        out += b"n"
    else:
        out += b"f%s;" % repr(float(v)).encode()


def _qualified(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


def _is_pil_image(v: Any) -> bool:
    image = sys.modules.get("PIL.Image")
    return image is not None and isinstance(v, image.Image)


def _is_numpy_array(v: Any) -> bool:
    np = sys.modules.get("numpy")
    return np is not None and isinstance(v, np.ndarray)


def _is_numpy_scalar(v: Any) -> bool:
    np = sys.modules.get("numpy")
    return np is not None and isinstance(v, np.generic)


def _is_torch_tensor(v: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(v, torch.Tensor)


def _image_digest(img: Any) -> bytes:
    h = xxhash.xxh3_128()
    head = f"{img.mode}:{img.size[0]}x{img.size[1]}:".encode()
    h.update(head)
    if img.mode in ("P", "PA"):
        # The palette in its own mode: getpalette() alone gives RGB, dropping the alpha of an
        # RGBA palette.
        palette_mode = getattr(img.palette, "mode", "RGB") or "RGB"
        h.update(palette_mode.encode() + b":")
        h.update(bytes(img.getpalette(rawmode=palette_mode) or ()))
    # A transparent colour (palette index or RGB value) changes what convert("RGBA") gives.
    transparency = img.info.get("transparency")
    if transparency is not None:
        h.update(b"t" + Encoder().encode(transparency))
    _update_with_pixels(h, img)
    return h.digest()


def _update_with_pixels(h: Any, img: Any) -> None:
    """Feed ``img.tobytes()`` to ``h`` without building it: the raw encoder's chunks go to
    the hash one by one, as ``tobytes`` produces them before joining them.

    The bytes are the same (a test compares the digest with that of ``tobytes()``). A
    1024x1024 RGB image would otherwise be a 3 MB temporary per image, which the allocator
    maps and unmaps each time: that costs more than the hashing (~4 ms against ~0.4 ms).
    """
    from PIL import Image

    getencoder = getattr(Image, "_getencoder", None)
    img.load()
    if getencoder is None or img.width == 0 or img.height == 0:
        h.update(img.tobytes())
        return
    encoder = getencoder(img.mode, "raw", img.mode)
    try:
        encoder.setimage(img.im, (0, 0, *img.size))
        chunk = max(1 << 16, img.width * 4)  # tobytes' own buffer size
        while True:
            _, status, data = encoder.encode(chunk)
            h.update(data)
            if status:
                break
        if status < 0:
            raise RuntimeError(f"encoder error {status} reading the image's pixels")
    finally:
        encoder.cleanup()


def _array_digest(a: Any, enc: Encoder, media: bool) -> bytes:
    import numpy as np

    if a.dtype.hasobject:
        # Items are Python objects (ragged rows are arrays themselves): encode each one.
        h = xxhash.xxh3_128(f"O:{a.shape}:".encode())
        for item in a.ravel(order="C"):
            h.update(enc.digest(item, media=media))
        return h.digest()
    shape = a.shape  # before ascontiguousarray, which turns a 0-d array into shape (1,)
    a = np.ascontiguousarray(a)
    # dtype.str names the byte order too ("<f4"), so equal values in another byte order
    # count as another input: a model reading raw bytes would see them differently. A
    # structured dtype's str is only its size ("|V8"): its fields must be named as well.
    dtype = a.dtype.str if a.dtype.fields is None else repr(a.dtype.descr)
    h = xxhash.xxh3_128(f"{dtype}:{shape}:".encode())
    # A byte view of the contiguous buffer: no copy, and it works for every dtype
    # (datetime64 and structured arrays refuse the buffer protocol) and for empty arrays.
    h.update(a.reshape(-1).view(np.uint8).data)
    return h.digest()


def _tensor_digest(t: Any) -> bytes:
    import torch

    t = t.detach()
    if t.is_sparse:
        t = t.to_dense()
    if t.device.type != "cpu":
        t = t.cpu()
    # Lazy conjugate/negative views would otherwise hash their unresolved storage.
    t = t.resolve_conj().resolve_neg().contiguous()
    h = xxhash.xxh3_128(f"{str(t.dtype).removeprefix('torch.')}:{tuple(t.shape)}:".encode())
    if t.numel():
        # A byte view works for every dtype, bfloat16 and the float8s included, which numpy
        # cannot represent.
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.digest()


_sources: dict[tuple[str, int, int], bytes] = {}


def source_digest(module_name: str) -> bytes | None:
    """The digest of a loaded module's source file (memoized by its stat signature), or None
    when it has none (built in, compiled, or not imported)."""
    module = sys.modules.get(module_name)
    path = getattr(module, "__file__", None)
    if not path or not path.endswith(".py"):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    memo_key = (path, st.st_mtime_ns, st.st_size)
    found = _sources.get(memo_key)
    if found is None:
        try:
            with open(path, "rb") as f:
                found = xxhash.xxh3_128_digest(f.read())
        except OSError:
            return None
        _sources[memo_key] = found
    return found


def digest(value: Any, *, media: bool = False) -> bytes:
    """The 16-byte digest of ``value`` (see the module notes for the rules)."""
    return Encoder().digest(value, media=media)
