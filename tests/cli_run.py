"""Running the ``lmms-cache`` command in this process (``lmms_cache.cli.main``), its output
captured, or as users run it: ``python -m lmms_cache`` in a subprocess (never the first
``lmms-cache`` on PATH, which may be another installation)."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from lmms_cache import cli


@dataclass
class Done:
    """What a command did: its exit code and output (the shape of ``CompletedProcess``)."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: Any) -> Done:
    """``lmms-cache ARGS`` in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as exc:  # argparse's errors and --help
            code = exc.code if isinstance(exc.code, int) else 1
    return Done(code, out.getvalue(), err.getvalue())


def cli_json(*args: Any) -> Any:
    """``lmms-cache ARGS --json`` in this process, its output parsed (it must succeed)."""
    done = run_cli(*args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def run_module(*args: Any, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """``python -m lmms_cache ARGS`` in a new process."""
    return subprocess.run([sys.executable, "-m", "lmms_cache", *map(str, args)], capture_output=True,
                          text=True, timeout=120, **kwargs)  # fmt: skip
