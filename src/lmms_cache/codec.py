"""Responses to bytes and back, in a small versioned, checksummed envelope.

Layout: ``b"LMC"``, a format version byte, a flags byte (serializer; zstd), the 8-byte
xxh3-64 of the stored payload, the 4-byte size of the payload before compression, then the
payload. Payloads of at least :data:`COMPRESS_MIN` bytes are stored zstd-compressed when
that saves space (long generations, multi-round transcripts); the checksum covers the
stored bytes, so verifying never decompresses or unpickles. Plain pickle (protocol 5) serializes what it can, which is
nearly every response (``str``, ``(float, bool)``, dataclasses such as lmms-eval's
``GenerationResult``) and is much faster; dill takes what pickle refuses (lambdas, classes
and functions defined inside functions). A hit returns the very type the model returned.
Values of classes defined in a script's ``__main__`` pickle by reference, as pickle does:
they decode where that script is ``__main__`` again (a rerun), not from another program.

**Loading a pickle can run code**, so :func:`decode` is restricted by default: it loads only
values built from an allow-list (:data:`ALLOWED_GLOBALS`: plain Python values, containers,
``OrderedDict``, ``datetime`` values and the harnesses' response types) and refuses anything
else with :class:`UntrustedValueError`, before any of it runs. ``decode(blob, trusted=True)``
loads anything (dill included): pass it only for values you wrote yourself or whose
signature checks (see :mod:`lmms_cache.trust`). :func:`scan` and :func:`is_safe` tell what a
value would import without loading it.
"""

from __future__ import annotations

import collections
import datetime
import importlib
import io
import pickle
import pickletools
import struct
import threading
from typing import Any, NoReturn

import xxhash
import zstandard

__all__ = [
    "ALLOWED_GLOBALS",
    "COMPRESS_MIN",
    "CodecError",
    "UntrustedValueError",
    "decode",
    "encode",
    "is_safe",
    "raw_size",
    "scan",
    "verify",
]

_MAGIC = b"LMC"
FORMAT_VERSION = 1
_PICKLE = 0
_DILL = 1
_SERIALIZER = 0x0F
_ZSTD = 0x10
_HEADER = struct.Struct(">3sBBQI")
COMPRESS_MIN = 512  # below this, zstd's frame overhead eats most of what it saves
_ZSTD_LEVEL = 3
# zstd (de)compressor objects are reused, one per thread: they are not thread-safe, and
# creating one per value costs more than compressing a typical response.
_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    c = getattr(_local, "compressor", None)
    if c is None:
        c = _local.compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor()
    return d


class CodecError(ValueError):
    """A stored value that cannot be decoded: wrong format, bad checksum, failed unpickle."""


_WHY_REFUSED = (
    "the value was not written by you on this machine and is not signed; load it only if you "
    "trust whoever wrote it (import it with --trust, or share $LMMS_CACHE_SECRET with them so "
    "their values are signed)"
)


class UntrustedValueError(CodecError):
    """:func:`decode` (untrusted) refused a value: loading it needs ``needed`` (a
    ``"module.name"`` outside :data:`ALLOWED_GLOBALS`, or ``"dill"``), which could run code.

    Nothing of the value ran. A :class:`CodecError`, so callers that treat an unreadable value
    as a miss keep doing so; catch this subclass to tell "not trusted" from "damaged".
    """

    def __init__(self, needed: str) -> None:
        self.needed = needed
        what = "a dill payload (dill values carry code)" if needed == "dill" else needed
        super().__init__(f"refused to load {what}: {_WHY_REFUSED}")


def encode(value: Any) -> bytes:
    """Serialize ``value`` into an envelope.

    Example:
        >>> decode(encode(("yes", 0.5)))
        ('yes', 0.5)
    """
    try:
        payload = pickle.dumps(value, protocol=5)
        kind = _PICKLE
    except Exception:  # pickle raises several types (PicklingError, AttributeError, TypeError)
        import dill

        payload = dill.dumps(value, protocol=5, recurse=True)
        kind = _DILL
    size = len(payload)
    if size >= COMPRESS_MIN:
        packed = _compressor().compress(payload)
        if len(packed) < size:
            payload, kind = packed, kind | _ZSTD
    return _HEADER.pack(_MAGIC, FORMAT_VERSION, kind, xxhash.xxh3_64_intdigest(payload), size) + payload


def raw_size(blob: bytes) -> int:
    """The envelope's size had it not been compressed (0 if not ours): the size of an
    uncompressed value is its own, so stored/raw is the compression ratio."""
    if len(blob) < _HEADER.size or blob[:3] != _MAGIC:
        return 0
    return int(_HEADER.unpack_from(blob)[4]) + _HEADER.size


def _open(blob: bytes) -> tuple[int, Any]:
    """The serializer and the (decompressed) payload of a checked envelope."""
    if len(blob) < _HEADER.size:
        raise CodecError("value too short to be an lmms-cache envelope")
    magic, version, flags, checksum, size = _HEADER.unpack_from(blob)
    if magic != _MAGIC:
        raise CodecError("value is not an lmms-cache envelope")
    if version != FORMAT_VERSION:
        raise CodecError(f"value format {version} is not supported (this version reads {FORMAT_VERSION})")
    payload: Any = memoryview(blob)[_HEADER.size :]
    if xxhash.xxh3_64_intdigest(payload) != checksum:
        raise CodecError("value checksum mismatch: the stored bytes are damaged")
    kind = flags & _SERIALIZER
    if flags & ~(_SERIALIZER | _ZSTD):
        raise CodecError(f"unknown envelope flags {flags:#x}")
    if kind not in (_PICKLE, _DILL):
        raise CodecError(f"unknown serializer {kind}")
    if flags & _ZSTD:
        try:
            payload = _decompressor().decompress(payload, max_output_size=size)
        except zstandard.ZstdError as exc:
            raise CodecError(f"value does not decompress: {exc}") from exc
    return kind, payload


def decode(blob: bytes, *, trusted: bool = False) -> Any:
    """Deserialize an envelope written by :func:`encode`.

    Untrusted (the default), only values made of :data:`ALLOWED_GLOBALS` load: ``str``,
    numbers, ``None``, containers, ``GenerationResult``... Any other class or function the
    value names (``os.system``, a model's own response class, a dill lambda) is refused
    before it is imported or called. ``trusted=True`` loads whatever the value holds,
    running its pickle code: pass it only for values this user wrote on this machine or whose
    signature checks (:mod:`lmms_cache.trust`).

    Example:
        >>> decode(encode(["round 1", "round 2"]))
        ['round 1', 'round 2']

    Raises:
        UntrustedValueError: untrusted, and the value needs something off the allow-list.
        CodecError: the blob is not ours, from a newer format, damaged, or does not unpickle.
    """
    # _open, inlined: decode runs on every hit.
    if len(blob) < _HEADER.size:
        raise CodecError("value too short to be an lmms-cache envelope")
    magic, version, flags, checksum, size = _HEADER.unpack_from(blob)
    payload: Any = memoryview(blob)[_HEADER.size :]
    kind = flags & _SERIALIZER
    if (magic != _MAGIC or version != FORMAT_VERSION or flags & ~(_SERIALIZER | _ZSTD) or kind > _DILL
            or xxhash.xxh3_64_intdigest(payload) != checksum):  # fmt: skip
        _open(blob)  # raises the precise error
        raise CodecError("value is not a valid envelope")  # (not reached)
    if flags & _ZSTD:
        try:
            payload = _decompressor().decompress(payload, max_output_size=size)
        except zstandard.ZstdError as exc:
            raise CodecError(f"value does not decompress: {exc}") from exc
    if trusted:
        try:
            if kind == _PICKLE:
                return pickle.loads(payload)
            import dill

            return dill.loads(payload)
        except Exception as exc:  # unpickling can raise anything the pickled code raises
            raise CodecError(f"value does not decode: {type(exc).__name__}: {exc}") from exc
    if kind != _PICKLE:
        raise UntrustedValueError("dill")  # dill payloads carry code by design
    try:
        if _plain(payload):  # no opcode that can name a class or function: plain loads is safe
            return pickle.loads(payload)
        return _Restricted(io.BytesIO(payload)).load()
    except _Refused as exc:
        raise UntrustedValueError(exc.needed) from None
    except Exception as exc:  # a malformed pickle, a refused constructor argument
        raise CodecError(f"value does not decode: {type(exc).__name__}: {exc}") from exc


def verify(blob: bytes) -> bool:
    """True when the envelope is well formed and its checksum matches (nothing is unpickled)."""
    if len(blob) < _HEADER.size:
        return False
    magic, version, flags, checksum, _size = _HEADER.unpack_from(blob)
    return (
        magic == _MAGIC
        and version == FORMAT_VERSION
        and flags & _SERIALIZER in (_PICKLE, _DILL)
        and not flags & ~(_SERIALIZER | _ZSTD)
        and xxhash.xxh3_64_intdigest(memoryview(blob)[_HEADER.size :]) == checksum
    )


# -- what an untrusted value may name ---------------------------------------------------------
#
# A pickle can only run code through a callable it names: GLOBAL / STACK_GLOBAL / INST /
# EXT* all go through ``find_class``, and REDUCE, NEWOBJ, OBJ and BUILD act on what it
# returned. So ``find_class`` returns only objects that are harmless to call with any
# arguments a pickle can build (plain values), and harmless as BUILD's target (BUILD on a
# class object would ``setattr`` on it, changing it for the whole process): immutable C
# types, or sealed stand-ins and helper objects without a ``__dict__``.


class _Refused(pickle.UnpicklingError):
    def __init__(self, needed: str) -> None:
        super().__init__(needed)
        self.needed = needed


def _refuse(what: str) -> NoReturn:
    raise _Refused(what)


class _Latin1Encode:
    """``_codecs.encode`` as protocols 0-2 use it to carry bytes: ``(str, "latin1")`` only."""

    __slots__ = ()

    def __call__(self, text: object, encoding: object = "utf-8", errors: object = "strict") -> bytes:
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
            _refuse(f"_codecs.encode with encoding {encoding!r}")
        return text.encode("latin-1")


class _Bytes:
    """``bytes`` as protocols 0-2 call it (``bytes()`` for b""), never ``bytes(n)``: that
    would allocate n bytes from a few in the pickle."""

    __slots__ = ()

    def __call__(self, *args: object) -> bytes:
        if not args:
            return b""
        if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):  # not a subclass: pickle
            return bytes(args[0])  # cannot make one without naming it, and names are checked
        _refuse("builtins.bytes with arguments other than bytes")


class _Bytearray:
    """``bytearray`` as protocols 0-4 call it: from bytes, or (protocol 2) ``(str, "latin-1")``."""

    __slots__ = ()

    def __call__(self, *args: object) -> bytearray:
        if not args:
            return bytearray()
        if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
            return bytearray(args[0])
        if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
            return bytearray(args[0].encode("latin-1"))
        _refuse("builtins.bytearray with arguments other than bytes")


class _Sealed(type):
    """The metaclass of a response class's stand-in: a pickle cannot change a stand-in
    (BUILD's ``setattr`` raises), and calling one builds the real class."""

    _real: type

    def __setattr__(cls, name: str, value: object) -> None:
        _refuse(f"setting {name!r} on {cls._real.__module__}.{cls._real.__qualname__}")

    def __delattr__(cls, name: str) -> None:
        _refuse(f"deleting {name!r} of {cls._real.__module__}.{cls._real.__qualname__}")

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return cls._real(*args, **kwargs)


def _stand_in(real: type) -> type:
    """What ``find_class`` returns for an allowed response class: NEWOBJ and
    ``copyreg._reconstructor`` make a real instance (then BUILD fills its ``__dict__``, as for
    the real class), and the real class itself never reaches the pickle machine."""

    def __new__(cls: type, *args: object, **kwargs: object) -> object:
        return object.__new__(real)

    return _Sealed(real.__name__, (), {"__slots__": (), "__new__": __new__, "_real": real,
                                       "__module__": real.__module__, "__qualname__": real.__qualname__})  # fmt: skip


class _Reconstructor:
    """``copyreg._reconstructor`` as protocols 0-1 call it for a plain class:
    ``(allowed class, object, None)`` only."""

    __slots__ = ()

    def __call__(self, cls: object, base: object, state: object) -> object:
        if not isinstance(cls, _Sealed) or base is not object or state is not None:
            _refuse(f"copyreg._reconstructor of {getattr(cls, '__qualname__', type(cls).__name__)}")
        return object.__new__(cls._real)


# (module, name) -> what find_class returns. Immutable C types whose constructors build plain
# values from plain values, and the helpers above. Module names are Python 3's
# (``__builtin__`` and ``copy_reg`` in protocols 0-2 are mapped first).
_LOADABLE: dict[tuple[str, str], object] = {
    ("builtins", "set"): set,  # protocols 0-3: set([...])
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,  # complex(real, imag)
    ("builtins", "object"): object,  # the base argument of copyreg._reconstructor
    ("builtins", "bytes"): _Bytes(),
    ("builtins", "bytearray"): _Bytearray(),
    ("_codecs", "encode"): _Latin1Encode(),
    ("copyreg", "_reconstructor"): _Reconstructor(),
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("datetime", "datetime"): datetime.datetime,
    ("datetime", "date"): datetime.date,
    ("datetime", "time"): datetime.time,
    ("datetime", "timedelta"): datetime.timedelta,
    ("datetime", "timezone"): datetime.timezone,
}
# Response classes, imported on first use (their module is the harness's own). Each must be a
# plain class: object's __new__, no __setstate__ / __reduce__ / __post_init__ / __getattr__
# (tests/test_codec_safety.py checks this against the installed harness).
_RESPONSE_CLASSES: frozenset[tuple[str, str]] = frozenset({
    ("lmms_eval.api.instance", "GenerationResult"),
    ("lmms_eval.api.instance", "TokenCounts"),
})  # fmt: skip
_ALIASES = {"__builtin__": "builtins", "copy_reg": "copyreg"}

ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(_LOADABLE) | _RESPONSE_CLASSES
"""Every (module, name) an untrusted value may name. Values with no global at all (``str``,
``bytes``, ``int``, ``float``, ``bool``, ``None``, ``list``, ``tuple``, ``dict``, ``set``,
``frozenset``, ``bytearray`` in protocol 5) need none of them."""

_stand_ins: dict[tuple[str, str], type] = {}
_stand_ins_lock = threading.Lock()


def _response_class(module: str, name: str) -> type:
    key = (module, name)
    found = _stand_ins.get(key)
    if found is None:
        try:
            real = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            _refuse(f"{module}.{name} (not installed here)")
        with _stand_ins_lock:
            found = _stand_ins.setdefault(key, _stand_in(real))
    return found


class _Restricted(pickle.Unpickler):
    """The C unpickler, every global it meets checked against the allow-list."""

    def find_class(self, module: str, name: str) -> Any:
        module = _ALIASES.get(module, module)
        found = _LOADABLE.get((module, name))
        if found is not None:
            return found
        if (module, name) in _RESPONSE_CLASSES:
            return _response_class(module, name)
        _refuse(f"{module}.{name}")


# -- the fast path: a pickle that names nothing --------------------------------------------------
#
# Without GLOBAL, STACK_GLOBAL, INST, EXT*, PERSID, the unpickler only ever holds plain values
# (no callable reaches REDUCE / NEWOBJ / BUILD), so the C ``pickle.loads`` is safe, and cheaper
# than building an Unpickler (~0.6-1 µs: a Python subclass instance, a file object, one read
# call per opcode outside frames). _plain proves it for the commonest shapes: one str (a
# generation), checked in O(1), and tiny pickles ((float, bool), a float, None, a short list)
# by walking at most _FAST_MAX_OPS opcodes. Anything else takes the restricted path, never a
# wrong answer: _plain only ever says True for pickles made of the opcodes listed below.

_FAST_MAX_SIZE = 64  # bytes: longer pickles have more opcodes than the walk saves
_FAST_MAX_OPS = 10
_STOP = 0x2E
_MEMOIZE = 0x94
_u32 = struct.Struct("<I").unpack_from
_u64 = struct.Struct("<Q").unpack_from


def _opcode_widths() -> tuple[int, ...]:
    """opcode -> its size with its argument (> 0), a length-prefixed argument (-1, -4, -8:
    the size of the length), or 0: not on the fast path."""
    widths = [0] * 256
    fixed = {
        b"N": 1, b"\x88": 1, b"\x89": 1,  # None, True, False
        b"G": 9, b"J": 5, b"K": 2, b"M": 3,  # BINFLOAT, BININT, BININT1, BININT2
        b")": 1, b"]": 1, b"}": 1, b"\x8f": 1,  # empty tuple, list, dict, set
        b"(": 1, b"t": 1, b"\x85": 1, b"\x86": 1, b"\x87": 1,  # MARK, TUPLE, TUPLE1-3
        b"l": 1, b"d": 1, b"a": 1, b"e": 1, b"s": 1, b"u": 1,  # LIST, DICT, APPEND(S), SETITEM(S)
        b"\x90": 1, b"\x91": 1,  # ADDITEMS, FROZENSET
        b"0": 1, b"1": 1, b"2": 1,  # POP, POP_MARK, DUP
        b"\x94": 1, b"q": 2, b"h": 2, b"j": 5,  # MEMOIZE, BINPUT, BINGET, LONG_BINGET (not LONG_BINPUT:
        # an index of 2**31 makes the unpickler allocate and clear a memo of that size)
        b"\x95": 9,  # FRAME
    }  # fmt: skip
    counted = {
        b"\x8c": -1, b"X": -4, b"\x8d": -8,  # SHORT_BINUNICODE, BINUNICODE, BINUNICODE8
        b"C": -1, b"B": -4, b"\x8e": -8, b"\x96": -8,  # SHORT_BINBYTES, BINBYTES, BINBYTES8, BYTEARRAY8
        b"\x8a": -1, b"\x8b": -4,  # LONG1, LONG4
    }  # fmt: skip
    for table in (fixed, counted):
        for op, width in table.items():
            widths[op[0]] = width
    return tuple(widths)


_WIDTHS = _opcode_widths()


def _plain(p: bytes | memoryview) -> bool:
    """True when the binary pickle ``p`` (bytes or memoryview) is proven to name no global."""
    n = len(p)
    if n < 4 or p[0] != 0x80:  # PROTO: every pickle encode writes starts with it
        return False
    if p[2] == 0x95 and n > 12:  # FRAME (encode's pickles of 4 bytes and more)
        op = p[11]
        # One str: PROTO, FRAME, the string, MEMOIZE, STOP, and nothing else.
        if p[n - 1] == _STOP and p[n - 2] == _MEMOIZE and (
            (op == 0x8C and n == 15 + p[12]) or (op == 0x58 and n == 18 + _u32(p, 12)[0])  # (SHORT_)BINUNICODE
        ):
            return True
        # A float (loglikelihood_rolling): BINFLOAT STOP; or (float, bool) (loglikelihood):
        # BINFLOAT NEWTRUE/NEWFALSE TUPLE2 MEMOIZE STOP.
        if op == 0x47 and p[n - 1] == _STOP and (
            n == 21 or (n == 24 and p[20] in (0x88, 0x89) and p[21] == 0x86 and p[22] == _MEMOIZE)
        ):
            return True
        i = 11
    else:
        i = 2
    return n <= _FAST_MAX_SIZE and _walk(p, i, n)


def _walk(p: bytes | memoryview, i: int, n: int) -> bool:
    """True when the opcodes from ``i`` reach STOP within _FAST_MAX_OPS, all on the fast path."""
    widths = _WIDTHS
    for _ in range(_FAST_MAX_OPS):
        if i >= n:
            return False
        op = p[i]
        if op == _STOP:
            return True  # the unpickler stops here too
        w = widths[op]
        if w > 0:
            i += w
        elif w == -1:
            if i + 1 >= n:
                return False
            i += 2 + p[i + 1]
        elif w == -4:
            if i + 5 > n:
                return False
            i += 5 + _u32(p, i + 1)[0]
        elif w == -8:
            if i + 9 > n:
                return False
            i += 9 + _u64(p, i + 1)[0]
        else:
            return False
    return False


# -- reading a pickle without loading it ---------------------------------------------------------

_UNRESOLVED = "<unresolved>"
_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE",
                         "STRING", "BINSTRING", "SHORT_BINSTRING"})  # fmt: skip
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_EXT_OPS = frozenset({"EXT1", "EXT2", "EXT4"})
_PERSID_OPS = frozenset({"PERSID", "BINPERSID"})
_MARK = object()  # a MARK on the simulated stack
_OTHER = object()  # any value that is not a known string


def _globals_of(payload: Any) -> list[tuple[str, str]]:
    """The globals a pickle names, in order, by a simulation of the unpickler's stack that
    tracks which items are known strings (through the memo): STACK_GLOBAL's operands must be
    two known strings, else it is reported as ``("<unresolved>", ...)``."""
    found: list[tuple[str, str]] = []
    stack: list[object] = []
    memo: dict[int, object] = {}

    def pop() -> object:
        if not stack or stack[-1] is _MARK:
            raise CodecError("value is not a well-formed pickle (stack underflow)")
        return stack.pop()

    def pop_mark() -> None:
        while stack:
            if stack.pop() is _MARK:
                return
        raise CodecError("value is not a well-formed pickle (no MARK)")

    data = bytes(payload)
    try:
        for op, raw, _pos in pickletools.genops(data):
            name = op.name
            arg: Any = raw
            if name in _STRING_OPS:
                stack.append(str(arg))
            elif name == "STACK_GLOBAL":
                gname, module = pop(), pop()
                if type(module) is str and type(gname) is str:
                    found.append((module, gname))
                else:
                    found.append((_UNRESOLVED, "STACK_GLOBAL of computed names"))
                stack.append(_OTHER)
            elif name in ("GLOBAL", "INST"):
                module, _, gname = str(arg).partition(" ")
                found.append((module, gname))
                if name == "INST":
                    pop_mark()
                stack.append(_OTHER)
            elif name in _EXT_OPS:
                found.append(("<extension>", str(arg)))  # copyreg's registry: any global
                stack.append(_OTHER)
            elif name in _PERSID_OPS:
                found.append(("<persistent id>", name))
                if name == "BINPERSID":
                    pop()
                stack.append(_OTHER)
            elif name in _PUT_OPS:
                if not stack:
                    raise CodecError("value is not a well-formed pickle (PUT on an empty stack)")
                if int(arg) > len(data):  # the unpickler would size its memo to it: gigabytes
                    raise CodecError(f"value is not a well-formed pickle (memo index {arg})")
                memo[int(arg)] = stack[-1]
            elif name == "MEMOIZE":
                if not stack:
                    raise CodecError("value is not a well-formed pickle (MEMOIZE on an empty stack)")
                memo[len(memo)] = stack[-1]
            elif name in _GET_OPS:
                stack.append(memo.get(int(arg), _OTHER))
            elif name == "MARK":
                stack.append(_MARK)
            elif name == "DUP":
                stack.append(stack[-1] if stack else _OTHER)
            else:
                before = op.stack_before
                if pickletools.markobject in before:
                    for _ in range(before.index(pickletools.markobject)):
                        pop()
                    pop_mark()
                else:
                    for _ in before:
                        pop()
                stack.extend(_OTHER for _ in op.stack_after)
    except ValueError as exc:  # genops: a truncated or unknown opcode (CodecError is one too)
        if isinstance(exc, CodecError):
            raise
        raise CodecError(f"value is not a well-formed pickle: {exc}") from exc
    return found


def scan(blob: bytes) -> list[tuple[str, str]]:
    """The ``(module, name)`` globals the value would import when loaded, in order, read from
    its pickle opcodes (after the checksum and decompression) without unpickling anything.

    Names are as the pickle spells them (``__builtin__`` in protocols 0-2). What cannot be
    named statically is listed under a module in angle brackets, never on the allow-list:
    ``("<unresolved>", ...)`` (a STACK_GLOBAL of computed strings), ``("<extension>", code)``,
    ``("<persistent id>", ...)``.

    Example:
        >>> scan(encode("plain text"))
        []

    Raises:
        CodecError: the envelope is damaged or not ours, or the payload is not a pickle.
    """
    return _globals_of(_open(blob)[1])


def is_safe(blob: bytes) -> bool:
    """True when :func:`decode` loads the value untrusted: a pickle (not dill) whose every
    global is on :data:`ALLOWED_GLOBALS`. Nothing is unpickled. A damaged or malformed value
    is not safe (False). Safe means it runs no code, not that it loads: a safe value naming
    ``GenerationResult`` where lmms-eval is not installed is refused by :func:`decode`.

    Example:
        >>> is_safe(encode({"answer": ("B", 0.9)})), is_safe(encode(lambda: 0))
        (True, False)
    """
    try:
        kind, payload = _open(blob)
        if kind != _PICKLE:
            return False
        if _plain(payload):  # a str or a tiny value, proven in O(1): no pickletools pass
            return True
        names = _globals_of(payload)
    except CodecError:
        return False
    return all((_ALIASES.get(module, module), name) in ALLOWED_GLOBALS for module, name in names)
