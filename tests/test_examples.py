"""The examples the README points to run as documented."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_second_run_is_served_from_the_cache(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    first, second = (re.search(rf"{name} run: .* (\d+) hits, +(\d+) misses, model asked (\d+) times", out)
                     for name in ("first", "second"))
    assert first and second, out
    assert first.groups() == ("0", "50", "50")
    assert second.groups() == ("50", "0", "0")


def test_quickstart_without_a_directory_leaves_none_behind(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True, text=True,
                         timeout=120, check=True, env=env).stdout  # fmt: skip
    assert "second run:" in out and "now removed" in out
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("lmms-cache")] == []
