"""``lmms-cache eval``: lmms-eval's own command line, run as users run it, with a plugin model
(``fake_vlm`` from a plugin package registered through ``LMMS_EVAL_PLUGINS``).

The runs are shared by the tests below (each process imports lmms-eval and indexes its task
registry: ~10 s); independent ones run at once:

1. at once: ``first`` (cache D), ``nocache`` (``--no-cache``, cache E) and ``onmiss``
   (``--on-miss error`` on the empty cache F);
2. ``rerun`` (cache D again);
3. ``clear`` (cache D, ``--clear-cache``).
"""

from __future__ import annotations

import collections
import sqlite3
from pathlib import Path
from typing import Any

import pytest

import lmms_harness
from lmms_harness import CHOICES, REPEATS, SIMPLE_TASKS, Cli, Project, comparable

pytestmark = pytest.mark.e2e

N_REQUESTS = 5 + 5 * CHOICES + 5 * REPEATS + 4  # tiny_img, tiny_mc, tiny_sample, tiny_video


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("lmms-cli")
    # ``python -m lmms_cache``, never whichever lmms-cache is first on PATH
    unpatch = pytest.MonkeyPatch()
    unpatch.setattr(lmms_harness.shutil, "which", lambda name, *a, **k: None)
    project = Project(root)
    caches = {name: root / f"cache-{name}" for name in ("D", "E", "F")}
    markers = {name: root / f"constructed-{name}" for name in caches}
    runs: dict[str, Any] = {"caches": caches}

    def on(name: str) -> dict[str, Any]:
        return {"cache": caches[name], "marker": markers[name], "tasks": SIMPLE_TASKS}

    started: list[Cli] = []
    try:
        started.append(Cli(project, "first", **on("D"), write_results=True))
        started.append(Cli(project, "nocache", "--no-cache", **on("E")))
        started.append(Cli(project, "onmiss", "--on-miss", "error", **on("F")))
        for run in started:
            runs[run.name] = run.wait()
        runs["entries_after_first"] = entries(caches["D"])
        runs["rerun"] = Cli(project, "rerun", **on("D"), write_results=True).wait()
        runs["clear"] = Cli(project, "clear", "--clear-cache", **on("D")).wait()
    finally:
        unpatch.undo()
        for run in started:
            run.close()
    return runs


def entries(cache: Path) -> int:
    with sqlite3.connect(cache / "cache.db") as conn:
        return int(conn.execute("SELECT count(*) FROM entries").fetchone()[0])


def ok(run: Cli) -> Cli:
    assert run.returncode == 0, run.stderr[-6000:]
    return run


def test_first_run_constructs_the_model_once_and_caches_every_response(cli):
    first = ok(cli["first"])
    assert first.constructions == 1
    assert len(first.requests()) == N_REQUESTS
    assert cli["entries_after_first"] == N_REQUESTS
    assert first.header[0].startswith("fake_vlm (pretrained=fake/vlm-1b,")
    assert {row.split("|")[1].strip() for row in first.table[2:]} == set(SIMPLE_TASKS)


def test_fully_cached_rerun_never_constructs_the_model_and_prints_the_same_table(cli):
    first, rerun = ok(cli["first"]), ok(cli["rerun"])
    assert rerun.constructions == 1  # still only the first run's
    assert rerun.requests() == []
    assert f"lmms-cache: {N_REQUESTS} hits, 0 misses, 0 written; model never built;" in rerun.stderr
    assert f"0 hits, {N_REQUESTS} misses, {N_REQUESTS} written; model built;" in first.stderr
    assert rerun.header == first.header
    assert rerun.table == first.table


def test_fully_cached_rerun_writes_the_same_results_file_without_throughput_or_usage(cli):
    """lmms-eval's ``throughput`` and ``usage`` blocks are what the model logged while
    generating in this run: a rerun that never built the model has none to report (reporting
    the first run's would present another run's timings and spending as this one's).
    Everything else is the same."""
    from lmms_worker import SECONDS_PER_ANSWER

    first, rerun = ok(cli["first"]), ok(cli["rerun"])
    generations = sum(r["method"] == "generate_until" for r in first.requests())
    assert first.results_file()["throughput"]["total_elapsed_time"] == SECONDS_PER_ANSWER * generations
    assert first.results_file()["usage"]["total"]["n_api_calls"] == generations
    assert first.throughput_table[2] == "|total_gen_tokens  | 39.0|tokens  |"  # 9 one-word answers, 15 "red #n"
    assert "throughput" not in rerun.results_file() and rerun.throughput_table == []
    assert rerun.results_file()["usage"] == {}
    assert same_run(rerun.results_file()) == same_run(first.results_file())


def same_run(results: dict[str, Any]) -> dict[str, Any]:
    """A results file without the clocks, what the model logged (throughput, usage) and the
    command line (which names each run's output directory)."""
    out = {k: v for k, v in comparable(results).items() if k not in ("throughput", "usage")}
    out["config"].pop("resolved_cli_args")
    return out


def test_clear_cache_makes_the_model_compute_again(cli):
    clear = ok(cli["clear"])
    assert clear.constructions == 2  # the first run's and this one
    assert f"lmms-cache: cleared {N_REQUESTS} entries of fake_vlm(fake/vlm-1b)" in clear.stderr
    assert collections.Counter(r["task"] for r in clear.requests()) == \
        collections.Counter(r["task"] for r in cli["first"].requests())  # fmt: skip
    assert clear.table == cli["first"].table
    assert entries(cli["caches"]["D"]) == N_REQUESTS


def test_no_cache_runs_the_model_and_never_writes_a_cache(cli):
    nocache = ok(cli["nocache"])
    assert nocache.constructions == 1
    assert len(nocache.requests()) == N_REQUESTS
    assert not cli["caches"]["E"].exists()
    assert nocache.table == cli["first"].table


def test_on_miss_error_on_an_empty_cache_exits_3_naming_the_misses_without_loading_the_model(cli):
    onmiss = cli["onmiss"]
    assert onmiss.returncode == 3, onmiss.stderr[-6000:]
    assert onmiss.constructions == 0 and onmiss.requests() == []
    assert "request(s) were not in the cache (--on-miss error)" in onmiss.stderr
    assert "request(s) are not in the cache (on_miss='error')" in onmiss.stderr
    assert "generate_until tiny_video/test/0 'What colour is clip 0?'" in onmiss.stderr
    assert "generate_until tiny_sample/test/4 'What colour is picture 4?'" in onmiss.stderr
    assert not (cli["caches"]["F"] / "cache.db").exists() or entries(cli["caches"]["F"]) == 0
