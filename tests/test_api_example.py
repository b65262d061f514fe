"""examples/api_model.py runs offline as documented: the second run sends no request and
reports the tokens and money the first run paid for."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_api_example_second_run_sends_nothing_and_reports_the_savings(tmp_path):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "api_model.py"), "--cache-dir", str(tmp_path / "cache"),
         "--price-per-1k-tokens", "0.01", "--latency", "0.05", "--docs", "12"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    runs = {name: re.search(rf"^{name} run: +(\d+) requests sent to the API, +[\d.]+ s, +([\d,]+) tokens billed, "
                            rf"(\d+) answers from the cache$", out, re.M)
            for name in ("first", "second")}  # fmt: skip
    assert runs["first"] and runs["second"], out
    assert runs["first"].group(1, 3) == ("12", "0")
    assert runs["second"].group(1, 2, 3) == ("0", "0", "12")
    billed = int(runs["first"].group(2).replace(",", ""))
    assert billed > 0
    saved = re.search(r"^saved by the second run: -?[\d.]+ s and ([\d,]+) tokens$", out, re.M)
    # the token counts came back from the cache with the answers
    assert saved and int(saved.group(1).replace(",", "")) == billed, out
    money = re.search(r"^money saved: \$([\d.]+) at \$0.01 per 1k tokens$", out, re.M)
    assert money and abs(float(money.group(1)) - billed / 1000 * 0.01) < 1e-4, out
    assert (tmp_path / "cache" / "cache.db").is_file()
