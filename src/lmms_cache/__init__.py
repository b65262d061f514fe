"""lmms-cache: a transparent, durable response cache for multimodal-model evaluation.

>>> from lmms_cache import cached
>>> lm = cached(model)          # doctest: +SKIP

Everything a user needs is here; the modules below are reachable but quiet.
"""

from importlib.metadata import PackageNotFoundError, version

from .proxy import (
    DEFAULT_BATCH_SIZE,
    CachedModel,
    CacheMissError,
    CacheStats,
    cached,
    default_is_failure,
    is_cached,
)

try:
    __version__ = version("lmms-cache")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "CacheMissError",
    "CacheStats",
    "CachedModel",
    "__version__",
    "cached",
    "default_is_failure",
    "is_cached",
]
