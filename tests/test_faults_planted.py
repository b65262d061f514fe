"""Issue 11, fault 2: files planted in a shared directory are never written through.

The victim runs as ``nobody`` in a forked child; what "another user" planted belongs to
another uid. The cache directory must be the user's and writable by nobody else (unless
trusted); a symbolic link at the database, ``-wal`` or ``-shm`` path is refused even then;
the files are always 0600. Each refusal is one warning, and the evaluation runs uncached.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from faults import NOBODY, STRANGER, Echo, in_child, need_root, shared_tmp, warnings_during
from lmms_cache import cached
from lmms_cache.store import NullStore, SQLiteStore, StoreError


def run_cached(directory: str, trust: bool = False, mode: str = "readwrite") -> dict[str, Any]:
    """What a victim's evaluation gets: its answers, the warnings, whether the cache was used."""
    with warnings_during() as warnings:
        lm = cached(Echo(), directory, model_id="echo", trust=trust, mode=mode)
        answers = lm.generate_until([("q1", {}), ("q2", {})])
        store = lm.cache_store
        lm.cache_close()
    return {"answers": answers, "warnings": warnings, "uncached": isinstance(store, NullStore),
            "written": lm.cache_stats.written}  # fmt: skip


def as_victim(directory: Path, trust: bool = False, mode: str = "readwrite") -> dict[str, Any]:
    return in_child(run_cached, str(directory), trust, mode, uid=NOBODY, gid=NOBODY)  # type: ignore[no-any-return]


@pytest.fixture
def shared() -> Iterator[Path]:
    need_root()
    with shared_tmp() as base:
        yield base


def planted_dir(base: Path) -> Path:
    """A world-writable directory (sticky, like /tmp) that another user made."""
    d = base / "shared-cache"
    d.mkdir()
    os.chown(d, STRANGER, STRANGER)
    d.chmod(0o1777)
    return d


def victim_file(base: Path, content: bytes = b"", mode: int = 0o644) -> Path:
    """A file of the victim's own, in a directory of the victim's own."""
    home = base / "victim"
    home.mkdir(exist_ok=True)
    os.chown(home, NOBODY, NOBODY)
    f = home / "notes.txt"
    f.write_bytes(content)
    os.chown(f, NOBODY, NOBODY)
    f.chmod(mode)
    return f


def assert_refused_once(out: dict[str, Any], *words: str) -> None:
    assert out["answers"] == ["answer to q1", "answer to q2"]  # the evaluation goes on
    assert out["uncached"] and out["written"] == 0
    assert len(out["warnings"]) == 1, out["warnings"]
    for word in words:
        assert word in out["warnings"][0], out["warnings"][0]


def test_a_world_writable_directory_of_another_user_is_refused(shared: Path) -> None:
    d = planted_dir(shared)
    out = as_victim(d)
    assert_refused_once(out, str(d), "another user")
    assert list(d.iterdir()) == []  # nothing of the victim's left there


@pytest.mark.parametrize("mode", [0o777, 0o757, 0o1777])
def test_an_own_directory_that_others_can_write_is_refused(shared: Path, mode: int) -> None:
    d = shared / "mine"
    d.mkdir()
    os.chown(d, NOBODY, NOBODY)
    d.chmod(mode)
    out = as_victim(d)
    assert_refused_once(out, str(d), "writable by other users", "trust=True")
    assert list(d.iterdir()) == []


def test_a_planted_database_symlink_is_not_followed_even_when_trusted(shared: Path) -> None:
    d = planted_dir(shared)
    target = victim_file(shared)
    (d / "cache.db").symlink_to(target)
    os.lchown(d / "cache.db", STRANGER, STRANGER)
    out = as_victim(d, trust=True)
    assert_refused_once(out, "symbolic link")
    assert target.read_bytes() == b""  # not overwritten with a cache
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_a_planted_dangling_symlink_creates_nothing_where_it_points(shared: Path) -> None:
    d = planted_dir(shared)
    home = victim_file(shared).parent
    target = home / "chosen-by-the-other-user.db"
    (d / "cache.db").symlink_to(target)
    os.lchown(d / "cache.db", STRANGER, STRANGER)
    out = as_victim(d, trust=True)
    assert_refused_once(out, "symbolic link")
    assert not target.exists()


@pytest.mark.parametrize("suffix", ["-wal", "-shm"])
def test_a_planted_wal_or_shm_symlink_is_refused(shared: Path, suffix: str) -> None:
    d = planted_dir(shared)
    first = as_victim(d, trust=True)  # the victim's own cache, used once and closed
    assert not first["uncached"] and first["written"] == 2
    target = victim_file(shared, b"precious")
    (d / f"cache.db{suffix}").symlink_to(target)
    os.lchown(d / f"cache.db{suffix}", STRANGER, STRANGER)
    out = as_victim(d, trust=True)
    assert_refused_once(out, "symbolic link")
    assert target.read_bytes() == b"precious"


def test_a_planted_symlink_is_refused_in_readonly_mode_too(shared: Path) -> None:
    d = planted_dir(shared)
    (d / "cache.db").symlink_to(victim_file(shared, b"precious"))
    out = as_victim(d, trust=True, mode="readonly")
    assert_refused_once(out, "symbolic link")


def test_a_database_of_another_user_is_refused_unless_trusted(shared: Path) -> None:
    d = shared / "mine"
    d.mkdir(mode=0o700)
    SQLiteStore(str(d)).close()  # a real cache, of another user (made by root, then given away)
    os.chown(d / "cache.db", STRANGER, STRANGER)
    os.chown(d, NOBODY, NOBODY)
    assert_refused_once(as_victim(d), "another user")
    (d / "cache.db").chmod(0o666)  # trusted, it is used (as another user's: written, not chmod-ed)
    out = as_victim(d, trust=True)
    assert not out["uncached"] and out["written"] == 2 and out["warnings"] == []


# -- in process: the same rules without changing user -------------------------------------------


def test_a_database_symlink_is_refused_in_the_users_own_directory(tmp_path: Path) -> None:
    d = tmp_path / "c"
    d.mkdir(mode=0o700)
    target = tmp_path / "elsewhere.db"
    SQLiteStore(str(tmp_path / "real")).close()
    os.replace(tmp_path / "real" / "cache.db", target)
    (d / "cache.db").symlink_to(target)
    for readonly in (False, True):
        with pytest.raises(StoreError, match="symbolic link"):
            SQLiteStore(str(d), readonly=readonly)


def test_wider_modes_of_the_users_own_files_are_narrowed_to_0600(tmp_path: Path) -> None:
    d = tmp_path / "c"
    store = SQLiteStore(str(d))
    store.put_many([])
    store.close()
    (d / "cache.db").chmod(0o644)
    store = SQLiteStore(str(d))
    try:
        store.get_many([b"k" * 16])
        for name in ("cache.db", "cache.db-wal", "cache.db-shm"):
            assert stat.S_IMODE((d / name).stat().st_mode) == 0o600, name
    finally:
        store.close()


def test_a_group_writable_directory_is_accepted_only_for_the_users_private_group(tmp_path: Path) -> None:
    need_root()  # root's group 0 is named like root: its private group
    d = tmp_path / "c"
    d.mkdir()
    d.chmod(0o770)
    os.chown(d, 0, 0)
    SQLiteStore(str(d)).close()
    os.chown(d, 0, NOBODY)  # a group with other members, potentially
    with pytest.raises(StoreError, match="writable by other users"):
        SQLiteStore(str(d))
    SQLiteStore(str(d), trust=True).close()


def test_a_file_that_is_not_regular_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "c"
    d.mkdir(mode=0o700)
    os.mkfifo(d / "cache.db-wal")
    with pytest.raises(StoreError, match="not a regular file"):
        SQLiteStore(str(d))


def test_nothing_of_ours_is_created_through_a_refused_directory(tmp_path: Path) -> None:
    d = tmp_path / "c"
    d.mkdir()
    d.chmod(0o777)
    with pytest.raises(StoreError):
        SQLiteStore(str(d))
    assert list(d.iterdir()) == []
    with sqlite3.connect(":memory:"):
        pass
