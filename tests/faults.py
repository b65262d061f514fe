"""Fault injection for the tests: another user, a full disk, a read-only mount, a damaged page.

Each scenario runs in a forked child of the test process, so that the test process itself never
changes user or mount namespace: :func:`in_child` forks, optionally enters a private mount
namespace (``unshare(CLONE_NEWNS)``, every mount private: nothing leaks to the host, and the
mounts vanish with the child) and drops to another user, runs a function there, and returns what
it returned (or raises what it raised, as :class:`ChildFailed`).

Forking rather than starting a new interpreter: the interpreter may live where another user
cannot reach it (``/root``), and the child must use the very modules under test. Everything the
scenarios use is imported here, before any fork.

Tests that need root, ``unshare`` or ``mount`` call :func:`need`; its skip reason starts with
:data:`SKIP_MARK`, which ``conftest.py`` turns into a failure under ``CI=true``: CI has the means,
so a skip there would hide an untested fault.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import ctypes.util

# Imported before any fork: a child running as another user may not reach the files.
import encodings.ascii
import encodings.latin_1  # noqa: F401
import hashlib
import json
import logging
import os
import pickle
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import lmms_cache.codec
import lmms_cache.manage
import lmms_cache.proxy
import lmms_cache.store.sqlite  # noqa: F401

SKIP_MARK = "fault injection needs"
NOBODY = 65534  # the unprivileged user of every Linux system (uid and gid)
STRANGER = 65533  # another uid, owning what "another user" planted (no account needed)
CLONE_NEWNS = 0x00020000


class ChildFailed(AssertionError):
    """The scenario raised in the child; the message holds its traceback."""


def need(ok: bool, what: str) -> None:
    """Skip unless ``ok``; under ``CI=true`` conftest turns this skip into a failure."""
    if not ok:
        pytest.skip(f"{SKIP_MARK} {what}")


def need_root() -> None:
    need(sys.platform == "linux" and os.geteuid() == 0, "root on Linux (to act as other users)")


def need_mounts() -> None:
    """Root, a private mount namespace and the mount command."""
    need_root()
    need(shutil.which("mount") is not None, "the mount command")
    try:
        in_child(_probe_mount, namespace=True)
    except ChildFailed as exc:
        need(False, f"a private mount namespace with tmpfs ({exc})")


def _probe_mount() -> bool:
    with tempfile.TemporaryDirectory() as d:
        mount("-t", "tmpfs", "-o", "size=64k", "tmpfs", d)
        umount(d)
    return True


def _unshare_mounts() -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    # Nothing mounted from here on propagates to the host's namespace.
    mount("--make-rprivate", "/")


def mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise OSError(f"mount {' '.join(args)}: {done.stderr.strip()}")


def umount(path: str) -> None:
    subprocess.run(["umount", path], capture_output=True, check=True)


def in_child(fn: Callable[..., Any], *args: Any, namespace: bool = False, uid: int | None = None,
             gid: int | None = None, timeout: float = 120.0) -> Any:  # fmt: skip
    """``fn(*args)`` in a forked child: in a private mount namespace first if ``namespace``,
    then as ``uid``/``gid`` (no supplementary groups) if given. Returns its (picklable) result;
    the child's warnings on the ``lmms_cache`` logger are in the result only if ``fn`` collects
    them (see :func:`warnings_during`)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(read)
            if namespace:
                _unshare_mounts()
            if gid is not None:
                os.setgroups([])
                os.setgid(gid)
            if uid is not None:
                os.setuid(uid)
            payload = pickle.dumps(("ok", fn(*args)))
        except BaseException:
            payload = pickle.dumps(("error", traceback.format_exc()))
            code = 1
        try:
            with os.fdopen(write, "wb") as out:
                out.write(payload)
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as inp:
        data = inp.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        raise ChildFailed(f"the child died without an answer (status {status})")
    kind, value = pickle.loads(data)
    if kind == "error":
        raise ChildFailed(value)
    return value


@contextlib.contextmanager
def warnings_during() -> Iterator[list[str]]:
    """The messages of WARNING records on the ``lmms_cache`` logger while the block runs."""
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                seen.append(record.getMessage())

    handler = Collect()
    logger = logging.getLogger("lmms_cache")
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)


@contextlib.contextmanager
def shared_tmp() -> Iterator[Path]:
    """A fresh directory every user can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="lmms-faults-"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def fill(directory: Path, name: str = "filler") -> Path:
    """Fill the file system holding ``directory`` until a write fails (ENOSPC)."""
    path = directory / name
    block = b"\0" * 65536
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 512)
    return path


# -- damaging an SQLite file ------------------------------------------------------------------


def page_size(db: Path) -> int:
    with open(db, "rb") as f:
        header = f.read(100)
    size = int.from_bytes(header[16:18], "big")
    return 65536 if size == 1 else size


def pages_of(db: Path, name: str, kind: str | None = None) -> list[int]:
    """The page numbers of table or index ``name`` (dbstat), of one page type (``internal``,
    ``leaf``, ``overflow``) when given."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT pageno, pagetype FROM dbstat WHERE name = ?", (name,)).fetchall()
    finally:
        conn.close()
    return sorted(p for p, t in rows if kind is None or t == kind)


def zero_page(db: Path, pageno: int) -> None:
    """Overwrite one page of a closed database file with zeros."""
    size = page_size(db)
    with open(db, "r+b") as f:
        f.seek((pageno - 1) * size)
        f.write(b"\0" * size)


def as_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


class Echo:
    """A model answering each prompt; ``size`` > 0 makes each answer that many incompressible
    bytes (deterministic per prompt)."""

    pretrained = "echo/model"

    def __init__(self, size: int = 0) -> None:
        self.size = size
        self.asked: list[str] = []

    def generate_until(self, requests: list[Any]) -> list[str]:
        self.asked.extend(r[0] for r in requests)
        return [self.answer(r[0]) for r in requests]

    def answer(self, prompt: str) -> str:
        if not self.size:
            return f"answer to {prompt}"
        seed = hashlib.sha512(prompt.encode()).digest()
        blob = b"".join(hashlib.sha512(seed + bytes([i % 256, i // 256])).digest() for i in range(self.size // 64 + 1))
        return base64.b64encode(blob[: self.size]).decode()


def reqs(prefix: str, n: int) -> list[tuple[str, dict[str, Any]]]:
    """``n`` lm-eval-style ``(prompt, gen_kwargs)`` requests."""
    return [(f"{prefix} {i}", {}) for i in range(n)]
