"""Issue 11, fault 5: one damaged page must not throw the whole cache away.

When the file must be set aside, every row that still reads and whose value verifies is
copied into the fresh cache (one warning says how many were kept and lost), and
``lmms-cache recover FILE [CACHE]`` does the same for a file set aside earlier.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest

from faults import Echo, pages_of, reqs, warnings_during, zero_page
from lmms_cache import cached, cli
from lmms_cache.store import SQLiteStore, StoreError
from lmms_cache.store.sqlite import salvage

N = 120


def make_cache(directory: Path, size: int = 0) -> Path:
    lm = cached(Echo(size), directory, model_id="echo", batch_size=16)
    lm.generate_until(reqs("old", N))
    assert lm.cache_stats.written == N
    lm.cache_close()
    assert sorted(os.listdir(directory)) == ["cache.db"]  # closed: everything is in the file
    return directory / "cache.db"


def asked_on_rerun(directory: Path, extra: int = 0, size: int = 0) -> list[str]:
    model = Echo(size)
    lm = cached(model, directory, model_id="echo")
    assert lm.generate_until(reqs("old", N) + reqs("new", extra)) == [
        model.answer(p) for p, _ in reqs("old", N) + reqs("new", extra)
    ]
    lm.cache_close()
    return model.asked


def aside_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if ".corrupt-" in p.name and not p.name.endswith(("-wal", "-shm")))


def rows_on(db: Path, pageno: int) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT ncell FROM dbstat WHERE pageno = ?", (pageno,)).fetchone()[0])
    finally:
        conn.close()


def test_a_damaged_index_page_keeps_every_entry_when_the_file_is_set_aside(tmp_path: Path) -> None:
    db = make_cache(tmp_path)
    zero_page(db, pages_of(db, "entries_used", "leaf")[0])  # reads by key still work; a write fails
    with warnings_during() as warnings:
        asked = asked_on_rerun(tmp_path, extra=1)
    assert asked == ["new 0"]
    assert len(aside_files(tmp_path)) == 1  # the evidence is kept
    assert len(warnings) == 1, warnings
    assert f"{N} entries were kept, 0 lost" in warnings[0], warnings[0]
    assert asked_on_rerun(tmp_path, extra=1) == []  # all 120 (and the new one) survived


def all_keys(db: Path) -> list[bytes]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [k for (k,) in conn.execute("SELECT key FROM entries")]
    finally:
        conn.close()


def test_a_damaged_table_page_loses_only_its_rows(tmp_path: Path) -> None:
    db = make_cache(tmp_path, size=1500)
    keys = all_keys(db)
    page = pages_of(db, "entries", "leaf")[1]
    lost = rows_on(db, page)
    assert 0 < lost < N
    zero_page(db, page)
    store = SQLiteStore(str(tmp_path))
    try:
        with pytest.raises(StoreError) as failed:
            store.get_many(keys)  # meets the damage: the file is set aside, what reads is kept
        assert f"{N - lost} entries were kept, {lost} lost" in str(failed.value), str(failed.value)
        assert store.stats()["entries"] == N - lost
        assert len(store.get_many(keys)) == N - lost
    finally:
        store.close()
    rerun = Echo(1500)
    lm = cached(rerun, tmp_path, model_id="echo")
    lm.generate_until(reqs("old", N))
    lm.cache_close()
    assert len(rerun.asked) == lost


def test_a_damaged_overflow_page_gives_one_warning_and_keeps_the_rest(tmp_path: Path) -> None:
    db = make_cache(tmp_path, size=6000)  # each value spans overflow pages
    zero_page(db, pages_of(db, "entries", "overflow")[5])
    with warnings_during() as warnings:
        asked = asked_on_rerun(tmp_path, size=6000)
    assert len(asked) == 1  # the one damaged value is computed again
    assert len(warnings) == 1, warnings
    assert asked_on_rerun(tmp_path, size=6000) == []


# -- salvage and lmms-cache recover -------------------------------------------------------------


def damaged_aside(tmp_path: Path, size: int = 0) -> tuple[Path, Path, int]:
    """A cache file damaged and set aside by hand (as an earlier version did), beside a new
    empty cache; returns (cache directory, the file, rows on the damaged page)."""
    directory = tmp_path / "c"
    db = make_cache(directory, size)
    page = pages_of(db, "entries", "leaf")[0]
    lost = rows_on(db, page)
    zero_page(db, page)
    aside = directory / "cache.db.corrupt-20250101-000000"
    os.replace(db, aside)
    SQLiteStore(str(directory)).close()
    return directory, aside, lost


def test_salvage_copies_every_row_that_reads_and_verifies(tmp_path: Path) -> None:
    directory, aside, lost = damaged_aside(tmp_path, size=1500)
    store = SQLiteStore(str(directory))
    try:
        counts = salvage(str(aside), store)
        assert counts == {"kept": N - lost, "lost": lost, "total": N}
        assert store.stats()["entries"] == N - lost
        assert salvage(str(aside), store)["kept"] == N - lost  # again: nothing new, nothing lost
        assert store.stats()["entries"] == N - lost
    finally:
        store.close()
    assert aside.exists()  # the damaged file is never changed


def test_recover_into_the_cache_beside_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory, aside, lost = damaged_aside(tmp_path, size=1500)
    before = aside.read_bytes()
    assert cli.main(["recover", str(aside)]) == 0
    out = capsys.readouterr().out
    assert f"recovered {N - lost} entries" in out and f"{lost} lost" in out, out
    assert aside.read_bytes() == before
    assert len(asked_on_rerun(directory, size=1500)) == lost


def test_recover_into_another_cache_with_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, aside, lost = damaged_aside(tmp_path)
    other = tmp_path / "other"
    assert cli.main(["recover", str(aside), str(other), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == {"kept": N - lost, "lost": lost, "total": N, "file": str(aside), "cache": str(other / "cache.db")}
    assert len(asked_on_rerun(other)) == lost


def test_recover_of_a_file_that_is_not_a_cache_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a database at all " * 100)
    assert cli.main(["recover", str(junk), str(tmp_path / "c")]) == 1
    assert "junk" in capsys.readouterr().err
    assert cli.main(["recover", str(tmp_path / "missing"), str(tmp_path / "c")]) == 1


# -- fault 6: a stale -wal put back beside a newer database --------------------------------------


def stale_wal_beside_newer_database(directory: Path) -> bytes:
    """A -wal copied while the cache ran, put back after the cache grew and was closed."""
    lm = cached(Echo(300), directory, model_id="echo", batch_size=10)
    lm.generate_until(reqs("old", 20))
    stale = (directory / "cache.db-wal").read_bytes()  # a backup taken while running
    assert stale
    lm.generate_until(reqs("newer", 200))
    lm.cache_close()
    assert sorted(os.listdir(directory)) == ["cache.db"]  # checkpointed; the WAL is gone
    (directory / "cache.db-wal").write_bytes(stale)  # ... and put back
    return (directory / "cache.db").read_bytes()


@pytest.mark.parametrize("mode", ["readwrite", "readonly"])
def test_a_stale_wal_beside_a_newer_database_is_refused_not_replayed(tmp_path: Path, mode: str) -> None:
    before = stale_wal_beside_newer_database(tmp_path)
    with warnings_during() as warnings:
        model = Echo(300)
        lm = cached(model, tmp_path, model_id="echo", mode=mode)
        assert lm.generate_until(reqs("newer", 3)) == [model.answer(p) for p, _ in reqs("newer", 3)]
        lm.cache_close()
    assert len(warnings) == 1 and "cache.db-wal" in warnings[0] and "older than" in warnings[0], warnings
    assert (tmp_path / "cache.db").read_bytes() == before  # not replayed, not checkpointed
    os.remove(tmp_path / "cache.db-wal")  # what the warning says to do
    rerun = Echo(300)
    lm = cached(rerun, tmp_path, model_id="echo")
    lm.generate_until(reqs("old", 20) + reqs("newer", 200))
    lm.cache_close()
    assert rerun.asked == []  # nothing was rolled back


def test_a_wal_that_belongs_to_its_database_is_used(tmp_path: Path) -> None:
    """A cache copied with its -wal (no -shm: not open) keeps the entries only the WAL holds."""
    lm = cached(Echo(300), tmp_path / "a", model_id="echo", batch_size=10)
    lm.generate_until(reqs("old", 50))
    copy = tmp_path / "b"
    copy.mkdir(mode=0o700)
    for name in ("cache.db", "cache.db-wal"):
        (copy / name).write_bytes((tmp_path / "a" / name).read_bytes())
    lm.cache_close()
    with warnings_during() as warnings:
        rerun = Echo(300)
        lm = cached(rerun, copy, model_id="echo")
        lm.generate_until(reqs("old", 50))
        lm.cache_close()
    assert warnings == [] and rerun.asked == []
