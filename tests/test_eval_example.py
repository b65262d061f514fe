"""examples/eval_offline.py runs offline as documented: ``lmms-cache eval`` twice over a tiny
local task and a model plugin; the second run is all hits and never builds the model."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]


def test_eval_example_second_run_is_all_hits_without_building_the_model(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "eval_offline.py"), str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    out = done.stdout
    first = re.search(r"^first run: .*\n  lmms-cache: 0 hits, 6 misses, 6 written; model built;", out, re.M)
    second = re.search(r"^second run: .*\n  lmms-cache: 6 hits, 0 misses, 0 written; model never built; "
                       r"model time saved ([\d.]+) s", out, re.M)  # fmt: skip
    assert first and second, out
    assert float(second.group(1)) >= 6 * 0.2  # what the model spent on those answers
    assert re.search(r"^\|tiny_colors\|none +\| +0\|exact +\|↑ +\| +1\|", out, re.M), out
    assert (tmp_path / "work" / "cache" / "cache.db").is_file()
