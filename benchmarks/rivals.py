"""The systems compared, each driven the way its harness drives it.

* ``lmms-cache``: ``cached(model, path)`` on lmms-eval's request layout (documents in
  ``model.task_dict``, ``doc_to_visual`` called on them to key media by content).
* ``lmms-cache/lm-eval``: the same proxy on lm-eval's layout (``(context, gen_kwargs,
  {"visual": [...]})``, visuals already decoded inside the request): the proxy's own cost,
  without the document access.
* ``lmms-eval``: lmms-eval 0.7.3 ``ResponseCache`` as ``evaluator.py`` drives it:
  ``ResponseCache.create(...)`` per run, ``execute(lm, reqtype, requests)`` per request type,
  ``finalize(success=True)`` at the end (which merges the run's shard into ``cache.db``; a
  rerun then reads it as its shared database). Keys: task, doc_id, idx, gen_kwargs and the
  leading text; visuals are not part of the key.
* ``lm-eval``: lm-eval 0.4.13 ``CachingLM`` (a SqliteDict with autocommit) on lm-eval's
  layout; keys are sha256 of the JSON of the arguments, images by a PNG encoding.
* ``no-cache``: the model itself.

Every system gets a fresh fake model per open, as a rerun of an evaluation would.
"""

from __future__ import annotations

import os
from typing import Any

SYSTEMS = ("lmms-cache", "lmms-cache/lm-eval", "lmms-eval", "lm-eval", "no-cache")
LAYOUT = {"lmms-cache": "lmms", "lmms-cache/lm-eval": "lm", "lmms-eval": "lmms", "lm-eval": "lm", "no-cache": "lmms"}
CACHING = {"lmms-cache": True, "lmms-cache/lm-eval": True, "lmms-eval": True, "lm-eval": True, "no-cache": False}


class System:
    name = ""

    def preload(self) -> None:
        """Import what the system needs (kept out of every timing)."""

    def open(self, path: str, model: Any) -> None:
        raise NotImplementedError

    def call(self, method: str, requests: list[Any]) -> list[Any]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def written(self) -> int | None:
        return None


class LmmsCache(System):
    name = "lmms-cache"

    def preload(self) -> None:
        import lmms_cache  # noqa: F401

    durable = True  # fsync each batch's commit (the default); the miss measurement also runs without

    def open(self, path: str, model: Any) -> None:
        from lmms_cache import cached

        self.lm = cached(model, path, progress=False, durable=self.durable)

    def call(self, method: str, requests: list[Any]) -> list[Any]:
        return getattr(self.lm, method)(requests)  # type: ignore[no-any-return]

    def close(self) -> None:
        self.lm.cache_close()

    def written(self) -> int | None:
        return int(self.lm.cache_stats.written)


class LmmsCacheLmLayout(LmmsCache):
    name = "lmms-cache/lm-eval"


class LmmsEval(System):
    name = "lmms-eval"

    def preload(self) -> None:
        import lmms_eval.caching.response_cache
        import lmms_eval.utils  # noqa: F401  (ResponseCache.create imports it)

    def open(self, path: str, model: Any) -> None:
        from lmms_eval.caching.response_cache import ResponseCache

        self.model = model
        self.rc = ResponseCache.create(path, model="bench_fake", model_args="pretrained=bench/fake-model",
                                       task_dict=None, world_size=1, global_rank=0)  # fmt: skip

    def call(self, method: str, requests: list[Any]) -> list[Any]:
        return self.rc.execute(self.model, method, requests)  # type: ignore[no-any-return]

    def close(self) -> None:
        self.rc.finalize(success=True, dist_backend="accelerate", accelerator=None)


class LmEval(System):
    name = "lm-eval"

    def preload(self) -> None:
        import lm_eval.api.model  # noqa: F401

    def open(self, path: str, model: Any) -> None:
        from lm_eval.api.model import CachingLM

        os.makedirs(path, exist_ok=True)
        self.lm = CachingLM(model, os.path.join(path, "lm_cache_rank0.db"))

    def call(self, method: str, requests: list[Any]) -> list[Any]:
        return getattr(self.lm, method)(requests)  # type: ignore[no-any-return]

    def close(self) -> None:
        self.lm.dbdict.close()


class NoCache(System):
    name = "no-cache"

    def open(self, path: str, model: Any) -> None:
        self.model = model

    def call(self, method: str, requests: list[Any]) -> list[Any]:
        return getattr(self.model, method)(requests)  # type: ignore[no-any-return]


def make(name: str) -> System:
    return {"lmms-cache": LmmsCache, "lmms-cache/lm-eval": LmmsCacheLmLayout, "lmms-eval": LmmsEval,
            "lm-eval": LmEval, "no-cache": NoCache}[name]()  # fmt: skip


def quiet_harness_logs() -> None:
    """The harnesses' INFO lines go where the worker's stderr goes (a log file), at INFO as
    their CLIs default; nothing is silenced that a user would not see."""
    try:
        import sys

        from loguru import logger

        logger.remove()
        logger.add(sys.stderr, level="INFO")
    except ImportError:
        pass
