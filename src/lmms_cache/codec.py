"""Responses to bytes and back, in a small versioned, checksummed envelope.

Layout: ``b"LMC"``, a format version byte, a serializer byte, the 8-byte xxh3-64 of the
payload, then the payload. Plain pickle (protocol 5) serializes what it can, which is
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
from typing import Any

import xxhash

__all__ = ["CodecError", "decode", "encode", "verify"]

_MAGIC = b"LMC"
FORMAT_VERSION = 1
_PICKLE = 0
_DILL = 1
_HEADER = struct.Struct(">3sBBQ")


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
    return _HEADER.pack(_MAGIC, FORMAT_VERSION, kind, xxhash.xxh3_64_intdigest(payload)) + payload


def decode(blob: bytes) -> Any:
    """Deserialize an envelope written by :func:`encode`.

    Raises:
        CodecError: the blob is not ours, from a newer format, damaged, or does not unpickle.
    """
    if len(blob) < _HEADER.size:
        raise CodecError("value too short to be an lmms-cache envelope")
    magic, version, kind, checksum = _HEADER.unpack_from(blob)
    if magic != _MAGIC:
        raise CodecError("value is not an lmms-cache envelope")
    if version != FORMAT_VERSION:
        raise CodecError(f"value format {version} is not supported (this version reads {FORMAT_VERSION})")
    payload = memoryview(blob)[_HEADER.size :]
    if xxhash.xxh3_64_intdigest(payload) != checksum:
        raise CodecError("value checksum mismatch: the stored bytes are damaged")
    try:
        if kind == _PICKLE:
            return pickle.loads(payload)
        if kind == _DILL:
            import dill

            return dill.loads(payload)
    except Exception as exc:  # unpickling can raise anything the pickled code raises
        raise CodecError(f"value does not unpickle: {type(exc).__name__}: {exc}") from exc
    raise CodecError(f"unknown serializer {kind}")


def verify(blob: bytes) -> bool:
    """True when the envelope is well formed and its checksum matches (nothing is unpickled)."""
    if len(blob) < _HEADER.size:
        return False
    magic, version, kind, checksum = _HEADER.unpack_from(blob)
    return (
        magic == _MAGIC
        and version == FORMAT_VERSION
        and kind in (_PICKLE, _DILL)
        and xxhash.xxh3_64_intdigest(memoryview(blob)[_HEADER.size :]) == checksum
    )
