"""The lmms-cache command as users run it: ``python -m lmms_cache`` in a new process (the
in-process tests of every command are in test_manage_cli.py and test_cli_*.py)."""

import json

from cli_run import run_module
from fakes import FakeModel, gen_request, task_dict
from lmms_cache import cached


def test_stats_counts_what_the_proxy_wrote(tmp_path):
    model = FakeModel()
    model.task_dict = task_dict(3)
    lm = cached(model, tmp_path)
    lm.generate_until([gen_request(i) for i in range(3)])
    lm.cache_close()
    done = run_module("stats", tmp_path, "--json")
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    assert stats["entries"] == 3
    assert stats["bytes"] > 0


def test_stats_of_a_missing_cache_fails_clearly(tmp_path):
    done = run_module("stats", tmp_path / "nowhere")
    assert done.returncode == 1
    assert "no cache at" in done.stderr


def test_version_runs_as_a_module():
    done = run_module("--version")
    assert done.returncode == 0 and done.stdout.startswith("lmms-cache ")
