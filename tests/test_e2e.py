"""End to end: whole evaluations in separate interpreters sharing one cache directory.

Each test runs tests/e2e_worker.py (a fake lmms-eval evaluation sending all its requests in
one call) as real subprocesses; processes are synchronised through pipes, never by sleeping.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

WORKER = Path(__file__).with_name("e2e_worker.py")
TIMEOUT = 60
WARNING = "WARNING:lmms_cache:"


@dataclass
class Run:
    returncode: int
    stderr: str
    report: dict[str, Any] | None

    @property
    def warnings(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith(WARNING)]

    def ok(self) -> dict[str, Any]:
        assert self.returncode == 0, self.stderr
        assert self.report is not None, self.stderr
        return self.report


def docs(spec: str) -> list[int]:
    ids = []
    for part in spec.removeprefix("r:").split(","):
        lo, _, hi = part.partition("-")
        ids.extend(range(int(lo), int(hi or lo) + 1))
    return ids[::-1] if spec.startswith("r:") else ids


def contexts(spec: str) -> list[str]:
    return [f"<image> q{i}?" for i in docs(spec)]


def answers(spec: str) -> list[str]:
    return [f"answer to {c}" for c in contexts(spec)]


class Workers:
    """Starts workers in one test's directory; kills any left running at teardown."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.media = root / "media"
        self.started: list[subprocess.Popen[str]] = []
        self.n = 0

    def argv(self, cache: Path, spec: str, batch_size: int, extra: tuple[str, ...]) -> tuple[list[str], Path]:
        self.n += 1
        report = self.root / f"report{self.n}.json"
        return [
            sys.executable,
            "-X",
            "faulthandler",
            str(WORKER),
            str(report),
            "--cache",
            str(cache),
            "--media",
            str(self.media),
            "--docs",
            spec,
            "--batch-size",
            str(batch_size),
            *extra,
        ], report

    @staticmethod
    def env(seed: int, extra: dict[str, str] | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "LMMS_CACHE_MODE"}
        env["PYTHONHASHSEED"] = str(seed)
        env.update(extra or {})
        return env

    def start(
        self,
        cache: Path,
        spec: str = "0-19",
        *extra: str,
        batch_size: int = 4,
        seed: int = 1,
        env: dict[str, str] | None = None,
    ) -> tuple[subprocess.Popen[str], Path]:
        argv, report = self.argv(cache, spec, batch_size, extra)
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env(seed, env),
            cwd=self.root,
        )
        self.started.append(proc)
        return proc, report

    def finish(self, proc: subprocess.Popen[str], report: Path) -> Run:
        _, err = proc.communicate(timeout=TIMEOUT)
        data = json.loads(report.read_text()) if report.exists() else None
        return Run(proc.returncode, err, data)

    def run(self, cache: Path, spec: str = "0-19", *extra: str, **kw: Any) -> Run:
        proc, report = self.start(cache, spec, *extra, **kw)
        return self.finish(proc, report)

    def close(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


@pytest.fixture
def workers(tmp_path):
    w = Workers(tmp_path)
    yield w
    w.close()


def read_line(proc: subprocess.Popen[str]) -> str:
    """The worker's next stdout line; fails (rather than hangs) if it never comes."""
    ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT)
    assert ready, "the worker said nothing"
    return proc.stdout.readline().strip()  # type: ignore[union-attr]


def db_keys(cache: Path) -> set[str]:
    with sqlite3.connect(cache / "cache.db") as conn:
        return {k for (k,) in conn.execute("SELECT hex(key) FROM entries")}


def test_second_process_answers_everything_from_the_cache(workers, tmp_path):
    cache = tmp_path / "cache"
    first = workers.run(cache, seed=1).ok()
    assert first["received"] == contexts("0-19")
    assert first["model_calls"] == 5
    assert first["responses"] == answers("0-19")

    second_run = workers.run(cache, seed=2)
    second = second_run.ok()
    assert second["model_calls"] == 0 and second["received"] == []
    assert second["responses"] == first["responses"]
    assert second["types"] == first["types"] == ["GenerationResult"] * 20
    assert second["stats"]["hits"] == 20
    assert second_run.warnings == []


def test_sigkill_inside_a_batch_loses_only_that_batch(workers, tmp_path):
    cache = tmp_path / "cache"
    victim, _ = workers.start(cache, "0-19", "--block-at", "3", batch_size=4)
    assert read_line(victim) == "BLOCKED 3", victim.stderr.read()  # type: ignore[union-attr]
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=TIMEOUT)
    assert victim.returncode == -signal.SIGKILL

    assert len(db_keys(cache)) == 12  # batches 0, 1, 2 were committed
    resumed = workers.run(cache, "0-19", batch_size=4).ok()
    assert resumed["received"] == contexts("12-19")
    assert resumed["model_calls"] == 2
    assert resumed["responses"] == answers("0-19")
    assert resumed["stats"]["hits"] == 12


def test_model_exception_propagates_and_rerun_resumes_at_that_batch(workers, tmp_path):
    cache = tmp_path / "cache"
    failed = workers.run(cache, "0-19", "--raise-at", "2", batch_size=4)
    assert failed.returncode != 0
    assert failed.report is None
    assert "RuntimeError: model failed in batch 2" in failed.stderr

    rerun = workers.run(cache, "0-19", batch_size=4).ok()
    assert rerun["received"] == contexts("8-19")
    assert rerun["responses"] == answers("0-19")


def test_two_processes_writing_one_cache_at_once(workers, tmp_path):
    cache = tmp_path / "cache"
    # Overlapping (6-13) and disjoint parts, in opposite orders, small batches: many
    # interleaved transactions, and both processes create the database together.
    a = workers.start(cache, "0-13", "--gate", batch_size=2, seed=1)
    b = workers.start(cache, "r:6-19", "--gate", batch_size=2, seed=2)
    for proc, _ in (a, b):
        assert read_line(proc) == "READY"
    for proc, _ in (a, b):  # the barrier: both are waiting; release them together
        proc.stdin.write("go\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
    run_a, run_b = workers.finish(*a), workers.finish(*b)
    for run, spec in ((run_a, "0-13"), (run_b, "r:6-19")):
        assert run.ok()["responses"] == answers(spec)
        assert "database is locked" not in run.stderr
        assert run.warnings == []

    third = workers.run(cache, "0-19").ok()
    assert third["model_calls"] == 0
    assert third["responses"] == answers("0-19")


def garbage_file(db: Path) -> bytes:
    """The whole file overwritten: not an SQLite database any more."""
    garbage = bytes(range(256)) * 64
    db.write_bytes(garbage)
    return garbage


def damaged_pages(db: Path) -> bytes:
    """Header and schema (page 1) intact, every later page overwritten: opens fine, and
    the damage shows only when the entries are read or written."""
    data = bytearray(db.read_bytes())
    page_size = int.from_bytes(data[16:18], "big")
    assert len(data) > page_size
    data[page_size:] = bytes((i * 31 + 7) % 256 for i in range(len(data) - page_size))
    db.write_bytes(bytes(data))
    return bytes(data)


@pytest.mark.parametrize("corrupt", [garbage_file, damaged_pages])
def test_corrupted_cache_file_is_replaced_with_one_warning(workers, tmp_path, corrupt):
    cache = tmp_path / "cache"
    workers.run(cache).ok()
    damaged = corrupt(cache / "cache.db")

    run = workers.run(cache)
    report = run.ok()
    assert report["responses"] == answers("0-19")
    assert report["model_calls"] == 5
    assert len(run.warnings) == 1, run.stderr
    assert str(cache / "cache.db") in run.warnings[0]
    aside = [
        p
        for p in cache.iterdir()
        if p.name.startswith("cache.db.corrupt-") and not p.name.endswith(("-wal", "-shm"))
    ]
    assert len(aside) == 1
    assert aside[0].read_bytes()[100:] == damaged[100:]  # the evidence is kept (past the header's counters)

    after = workers.run(cache)
    assert after.ok()["model_calls"] == 0
    assert after.ok()["responses"] == answers("0-19")
    assert after.warnings == []


def test_unwritable_cache_location_runs_uncached_with_one_warning(workers, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a regular file, not a directory")
    location = blocker / "cache"

    run = workers.run(location)
    report = run.ok()
    assert report["responses"] == answers("0-19")
    assert report["received"] == contexts("0-19")
    assert len(run.warnings) == 1, run.stderr
    assert str(location) in run.warnings[0]
    assert blocker.read_text() == "a regular file, not a directory"


def test_keys_are_identical_across_processes_and_directories(workers, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    workers.run(one, "0-19", batch_size=4, seed=1).ok()
    workers.run(two, "r:0-19", batch_size=3, seed=12345).ok()
    keys = db_keys(one)
    assert len(keys) == 20
    assert db_keys(two) == keys


def test_readonly_mode_from_the_environment_never_writes(workers, tmp_path):
    cache = tmp_path / "cache"
    workers.run(cache, "0-9").ok()
    db = cache / "cache.db"
    before, stat_before = db.read_bytes(), db.stat()

    run = workers.run(cache, "0-14", env={"LMMS_CACHE_MODE": "readonly"})
    report = run.ok()
    assert report["responses"] == answers("0-14")
    assert report["received"] == contexts("10-14")  # hits served, misses computed
    assert report["stats"]["hits"] == 10 and report["stats"]["written"] == 0
    assert run.warnings == []
    assert db.read_bytes() == before
    assert db.stat().st_mtime_ns == stat_before.st_mtime_ns
    wal = cache / "cache.db-wal"  # SQLite may leave an empty one behind a read-only reader
    assert not wal.exists() or wal.stat().st_size == 0
    assert len(db_keys(cache)) == 10

    again = workers.run(cache, "10-14", env={"LMMS_CACHE_MODE": "readonly"}).ok()
    assert again["received"] == contexts("10-14")  # they were not cached
