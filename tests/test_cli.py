"""The lmms-cache command, run as users run it (a subprocess)."""

import json
import shutil
import subprocess
import sys

from fakes import FakeModel, gen_request, task_dict
from lmms_cache import cached


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("lmms-cache")
    cmd = [exe] if exe else [sys.executable, "-m", "lmms_cache"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60)


def test_stats_counts_what_the_proxy_wrote(tmp_path):
    model = FakeModel()
    model.task_dict = task_dict(3)
    lm = cached(model, tmp_path)
    lm.generate_until([gen_request(i) for i in range(3)])
    lm.cache_close()
    done = run_cli("stats", str(tmp_path), "--json")
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    assert stats["entries"] == 3
    assert stats["bytes"] > 0


def test_stats_of_a_missing_cache_fails_clearly(tmp_path):
    done = run_cli("stats", str(tmp_path / "nowhere"))
    assert done.returncode == 1
    assert "no cache at" in done.stderr


def test_version_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "lmms_cache", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("lmms-cache ")
