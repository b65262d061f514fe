import logging
import sys
from pathlib import Path

import pytest

# tests import their shared fakes as a plain module
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _isolated_cache_env(monkeypatch, tmp_path_factory):
    """No test may touch the user's real cache or inherit a mode from the environment."""
    monkeypatch.setenv("LMMS_CACHE_DIR", str(tmp_path_factory.mktemp("default-cache")))
    monkeypatch.delenv("LMMS_CACHE_MODE", raising=False)
    logging.getLogger("lmms_cache").setLevel(logging.INFO)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a fault-injection test that skips (no root, unshare or mount: see
    tests/faults.py) fails instead: CI has the means, and a skip would hide an untested fault."""
    import os

    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI") == "true":
        from faults import SKIP_MARK

        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if SKIP_MARK in reason:
            report.outcome = "failed"
            report.longrepr = f"{reason} -- under CI=true this fault must be tested, not skipped"
