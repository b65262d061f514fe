"""Who wrote a stored value, and whether to load it with full pickle.

A value is loaded with full pickle (:func:`lmms_cache.codec.decode` ``trusted=True``) only
when this user wrote it on this machine (its ``origin`` is :func:`local_origin`) or when its
signature checks against the team secret (:func:`signature_valid`); every other value is
loaded restricted, so a value from a file someone else crafted cannot run code.

**An origin is not proof.** It is a column of the store, and whoever crafts an export file
writes whatever origin they like there, including yours. It is only meaningful for entries
this process wrote itself; so every path that brings in entries from elsewhere (``import``,
a copied cache file) must rewrite their origin (see :func:`imported_origin`), never keep the
file's. A signature is proof, of the secret: anyone holding ``$LMMS_CACHE_SECRET`` can sign
anything, so share it only with people whose pickles you would run.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import socket
import sys

__all__ = [
    "SECRET_ENV",
    "imported_origin",
    "is_local",
    "local_origin",
    "may_load_trusted",
    "secret",
    "sign",
    "sign_with",
    "signature_valid",
]

SECRET_ENV = "LMMS_CACHE_SECRET"
"""The environment variable holding the team's signing secret (empty: unset)."""

_SIGNATURE_DOMAIN = b"lmms-cache value signature v1\0"
_ORIGIN_DOMAIN = b"lmms-cache origin v1"
_MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")


def secret() -> bytes | None:
    """The signing secret from ``$LMMS_CACHE_SECRET``, read at every call (so a test or a
    long-lived process sees a change), or None when it is unset or empty."""
    value = os.environ.get(SECRET_ENV, "")
    return value.encode("utf-8") if value else None


def _message(key: bytes, blob: bytes) -> bytes:
    # The key's length first: (key, blob) pairs map to distinct messages however they split.
    return _SIGNATURE_DOMAIN + len(key).to_bytes(4, "big") + key + blob


def sign(key: bytes, blob: bytes) -> bytes | None:
    """HMAC-SHA256 of the entry ``key`` and its encoded value ``blob`` under the secret (32
    bytes), or None when no secret is set.

    The key is signed with the value, so a signed value cannot be replayed under another key
    (another request's answer). Store the signature with the entry and keep it on export.

    Example:
        >>> from unittest import mock
        >>> with mock.patch.dict(os.environ, {SECRET_ENV: "team secret"}):
        ...     s = sign(b"key", b"value")
        ...     signature_valid(b"key", b"value", s), signature_valid(b"other key", b"value", s)
        (True, False)
    """
    return sign_with(secret(), key, blob)


def sign_with(secret_bytes: bytes | None, key: bytes, blob: bytes) -> bytes | None:
    """:func:`sign` with the secret read already (a batch of entries reads it once)."""
    if secret_bytes is None:
        return None
    return hmac.digest(secret_bytes, _message(key, blob), "sha256")


def signature_valid(key: bytes, blob: bytes, signature: bytes | None) -> bool:
    """True when ``signature`` is :func:`sign`'s for ``key`` and ``blob`` under the current
    secret (compared in constant time). False when no secret is set or no signature given."""
    if not signature:
        return False
    expected = sign(key, blob)
    return expected is not None and hmac.compare_digest(expected, bytes(signature))


def _machine_id() -> str:
    """A stable identifier of this machine, hashed: machine-id(5) asks applications not to
    expose the raw id (origins travel in export files)."""
    raw = ""
    for path in _MACHINE_ID_FILES:
        try:
            with open(path, encoding="ascii") as f:
                raw = f.read().strip()
        except (OSError, UnicodeDecodeError):
            continue
        if raw:
            break
    if not raw and sys.platform == "win32":
        try:
            import winreg

            with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, r"SOFTWARE\Microsoft\Cryptography") as k:
                raw = str(winreg.QueryValueEx(k, "MachineGuid")[0])
        except OSError:
            raw = ""
    if not raw:
        raw = "host:" + socket.gethostname()  # stable unless the machine is renamed
    return hmac.new(_ORIGIN_DOMAIN, raw.encode("utf-8"), hashlib.sha256).hexdigest()[:16]


def _user() -> str:
    getuid = getattr(os, "getuid", None)
    if getuid is not None:
        return f"uid:{getuid()}"
    import getpass

    try:
        return f"user:{getpass.getuser()}"
    except Exception:  # no USERNAME / LOGNAME / pwd entry
        return "user:?"


@functools.lru_cache(maxsize=1)
def local_origin() -> str:
    """This user on this machine, e.g. ``"uid:1000@3f9c0a1b2c3d4e5f"`` (the machine part is a
    keyed hash of ``/etc/machine-id``, else ``/var/lib/dbus/machine-id``, Windows'
    MachineGuid, else the host name). Computed once per process.

    Not proof of anything: it is stored as a plain column, and a crafted file can carry
    anyone's origin. Trust it only for entries this program wrote; rewrite it on import.
    """
    return f"{_user()}@{_machine_id()}"


def is_local(origin: str | None) -> bool:
    """True when ``origin`` is this user's on this machine (see :func:`local_origin`'s caveat)."""
    return origin == local_origin()


def imported_origin(source: str | None) -> str:
    """The origin to store for an entry brought in from a file: never the local origin,
    whatever the file said (``"import:"`` plus the file's claim, for the record). Entries the
    user explicitly vouches for (``import --trust``) take :func:`local_origin` instead."""
    claim = "".join(c if c.isascii() and c.isprintable() else "?" for c in (source or "?")[:200])
    return f"import:{claim}"


def may_load_trusted(key: bytes, blob: bytes, *, origin: str | None, signature: bytes | None) -> bool:
    """Whether a stored value may be decoded with full pickle: written here by this user, or
    validly signed for this key. Cheap for local values (a string comparison); an HMAC otherwise."""
    return origin == local_origin() or signature_valid(key, blob, signature)
