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

Decoding runs pickle/dill code: only open caches you (or people you trust) wrote.
"""

from __future__ import annotations

import pickle
import struct
import threading
from typing import Any

import xxhash
import zstandard

__all__ = ["COMPRESS_MIN", "CodecError", "decode", "encode", "raw_size", "verify"]

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


def decode(blob: bytes) -> Any:
    """Deserialize an envelope written by :func:`encode`.

    Raises:
        CodecError: the blob is not ours, from a newer format, damaged, or does not unpickle.
    """
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
    try:
        if flags & _ZSTD:
            payload = _decompressor().decompress(payload, max_output_size=size)
        if kind == _PICKLE:
            return pickle.loads(payload)
        if kind == _DILL:
            import dill

            return dill.loads(payload)
    except Exception as exc:  # unpickling can raise anything the pickled code raises
        raise CodecError(f"value does not decode: {type(exc).__name__}: {exc}") from exc
    raise CodecError(f"unknown serializer {kind}")


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
