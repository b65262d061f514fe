"""examples/api_model.py runs offline as documented: the second run sends no request and
reports the tokens and money the first run paid for; run again on the same cache
directory, it sends nothing at all."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
RUN = r"^{name} run: +(\d+) requests sent to the API, +[\d.]+ s, +([\d,]+) tokens billed, (\d+) answers from the cache$"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def example(*args: str, **env_extra: str) -> str:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", **env_extra}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "api_model.py"), *args], capture_output=True,
                          text=True, timeout=180, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_api_example_second_run_sends_nothing_and_a_rerun_on_the_same_cache_sends_nothing_at_all(tmp_path):
    options = ["--cache-dir", str(tmp_path / "cache"), "--price-per-1k-tokens", "0.01", "--latency", "0.05",
               "--docs", "12", "--port", str(free_port())]  # fmt: skip
    out = example(*options)
    runs = {name: re.search(RUN.format(name=name), out, re.M) for name in ("first", "second")}
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

    again = example(*options)  # a new process, the same cache directory and port
    for name in ("first", "second"):
        run = re.search(RUN.format(name=name), again, re.M)
        assert run and run.group(1, 2, 3) == ("0", "0", "12"), again


def test_api_example_without_a_cache_dir_leaves_no_directory(tmp_path):
    env_tmp = tmp_path / "tmp"
    env_tmp.mkdir()
    out = example("--latency", "0", "--docs", "4", "--port", str(free_port()), TMPDIR=str(env_tmp))
    assert "now removed" in out
    assert [p.name for p in env_tmp.iterdir() if p.name.startswith("lmms-cache")] == []
