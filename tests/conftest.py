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
