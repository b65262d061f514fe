"""``lmms-cache eval`` in this process, over a stand-in harness (``cli._harness`` replaced):
a missing harness, the summary line, forgetting ``--``, and ``--fix-request-cache``.
(tests/test_cli_eval.py runs the real lmms-eval command line in subprocesses.)"""

from __future__ import annotations

import re
import sqlite3
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from cli_run import run_cli
from fakes import gen_request, task_dict
from lmms_cache import cli, harness_cache

SUMMARY = re.compile(r"^lmms-cache: (\d+) hits?, (\d+) miss(?:es)?, (\d+) written; model (built|never built); "
                     r"model time saved ([\d.]+) s; cache (.+)$", re.M)  # fmt: skip


class HarnessBase:
    """Stands in for the harness's model base class (lmms-eval's ``lmms``, lm-eval's ``LM``)."""

    def __init__(self) -> None:
        self.task_dict: dict[str, Any] = {}

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None) -> Any:
        return cls(**dict(kv.split("=", 1) for kv in arg_string.split(",")))


class HarnessModel(HarnessBase):
    """A model class as a harness registry returns it."""

    constructed = 0

    def __init__(self, pretrained: str = "fake/m", **kwargs: Any) -> None:
        super().__init__()
        HarnessModel.constructed += 1
        self.pretrained = pretrained
        self.task_dict: dict[str, Any] = {}

    def generate_until(self, requests: list[Any]) -> list[str]:
        return [f"answer to {r.args[0]}" for r in requests]


@pytest.fixture
def harness(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The stand-in harness: its command line builds the model named fake and asks 3 requests."""
    seen: dict[str, Any] = {"runs": 0}
    registry = types.SimpleNamespace(get_model=lambda name: HarnessModel)

    def run() -> None:
        seen["runs"] += 1
        seen["argv"] = list(sys.argv)
        seen["installed"] = harness_cache.installed()
        lm = registry.get_model("fake").create_from_arg_string("pretrained=fake/m")
        lm.task_dict.update(task_dict(3))
        print(lm.generate_until([gen_request(i) for i in range(3)]))

    def parse(text: str) -> dict[str, Any]:
        return dict(kv.split("=", 1) for kv in text.split(","))

    monkeypatch.setattr(cli, "_harness", lambda name: (registry, parse, run))
    HarnessModel.constructed = 0
    return seen


def summary(stderr: str) -> tuple[str, ...]:
    found = SUMMARY.findall(stderr)
    assert len(found) == 1, stderr
    return tuple(found[0])


# -- item 1: the harness is not installed ----------------------------------------------------


@pytest.mark.parametrize(("harness_name", "package", "install"),
                         [("lmms-eval", "lmms_eval", "pip install lmms-eval"), ("lm-eval", "lm_eval", "pip install lm-eval")])  # fmt: skip
def test_eval_without_the_harness_installed_says_how_to_install_it_in_one_line(monkeypatch, tmp_path, harness_name,
                                                                                package, install):  # fmt: skip
    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")] + [package]:
        monkeypatch.setitem(sys.modules, name, None)  # "import lmms_eval" fails
    done = run_cli("eval", "--harness", harness_name, "--cache-dir", tmp_path, "--", "--model", "x")
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert harness_name in done.stderr and install in done.stderr
    assert not (tmp_path / "cache.db").exists()


def test_eval_with_a_dependency_of_the_harness_missing_names_it(monkeypatch, tmp_path):
    def fail(name: str) -> Any:
        raise ModuleNotFoundError("No module named 'loguru'", name="loguru")

    monkeypatch.setattr(cli.importlib, "import_module", fail)
    done = run_cli("eval", "--cache-dir", tmp_path, "--", "--model", "x")
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert "lmms-eval is installed but cannot be imported" in done.stderr and "loguru" in done.stderr


# -- item 5: the summary line; forgetting -- ------------------------------------------------


def test_eval_ends_with_one_summary_line_on_stderr(harness, tmp_path):
    first = run_cli("eval", "--cache-dir", tmp_path, "--", "--model", "fake", "--tasks", "t")
    assert first.returncode == 0, first.stderr
    assert harness["argv"] == ["lmms-eval", "--model", "fake", "--tasks", "t"]
    hits, misses, written, built, saved, where = summary(first.stderr)
    assert (hits, misses, written, built) == ("0", "3", "3", "built")
    assert where == str(tmp_path / "cache.db")
    assert HarnessModel.constructed == 1
    assert first.stderr.strip().splitlines()[-1].startswith("lmms-cache: 0 hits, 3 misses")

    with sqlite3.connect(tmp_path / "cache.db") as conn:  # what each answer cost the model
        conn.execute("UPDATE entries SET model_seconds = 2.5")
    conn.close()
    again = run_cli("eval", "--cache-dir", tmp_path, "--", "--model", "fake", "--tasks", "t")
    assert again.returncode == 0, again.stderr
    hits, misses, written, built, saved, _ = summary(again.stderr)
    assert (hits, misses, written, built) == ("3", "0", "0", "never built")
    assert float(saved) == pytest.approx(7.5)
    assert HarnessModel.constructed == 1


def test_eval_without_the_cache_prints_no_summary(harness, tmp_path):
    done = run_cli("eval", "--no-cache", "--cache-dir", tmp_path, "--", "--model", "fake")
    assert done.returncode == 0, done.stderr
    assert "lmms-cache:" not in done.stderr and HarnessModel.constructed == 1


def test_forgetting_the_double_dash_is_a_usage_error_that_shows_it(harness, tmp_path):
    done = run_cli("eval", "--cache-dir", tmp_path, "--model", "fake", "--tasks", "mme")
    assert done.returncode == 2
    assert "unrecognized arguments: --model fake --tasks mme" in done.stderr
    assert "lmms-cache eval --cache-dir DIR -- --model fake" in done.stderr
    assert harness["runs"] == 0


def test_eval_batch_size_must_be_positive(harness, tmp_path):
    done = run_cli("eval", "--batch-size", "0", "--cache-dir", tmp_path, "--", "--model", "fake")
    assert done.returncode == 2 and harness["runs"] == 0


# -- item 8: the request-building cache only when asked --------------------------------------


def test_eval_leaves_the_harness_request_cache_alone_by_default(harness, tmp_path):
    assert harness_cache.installed() == []
    done = run_cli("eval", "--cache-dir", tmp_path, "--", "--model", "fake")
    assert done.returncode == 0, done.stderr
    assert harness["installed"] == []
    assert harness_cache.installed() == []


def test_fix_request_cache_installs_it_for_the_run_only(harness, tmp_path):
    done = run_cli("eval", "--fix-request-cache", "--cache-dir", tmp_path, "--", "--model", "fake")
    assert done.returncode == 0, done.stderr
    assert harness["installed"] == ["lmms_eval", "lm_eval"]
    assert harness_cache.installed() == []
    assert "--fix-request-cache" in run_cli("eval", "--help").stdout


def test_eval_help_names_the_double_dash_and_an_example():
    text = run_cli("eval", "--help").stdout
    assert "-- HARNESS-ARGUMENTS" in text and "lmms-cache eval --cache-dir runs/cache -- --model" in text


@pytest.fixture(autouse=True)
def _restore_harness_cache() -> Any:
    yield
    harness_cache.uninstall()


def test_summary_counts_hits_of_one_run_only(harness, tmp_path: Path):
    run_cli("eval", "--cache-dir", tmp_path, "--", "--model", "fake")
    for _ in range(2):
        done = run_cli("eval", "--cache-dir", tmp_path, "--", "--model", "fake")
        assert summary(done.stderr)[:3] == ("3", "0", "0")
