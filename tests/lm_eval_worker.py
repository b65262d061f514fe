"""lm-eval 0.4.13 evaluations in their own process, for tests/test_lm_eval_e2e.py.

Importing this module registers :class:`FakeLM` with lm-eval as ``lmms_cache_fake_lm``
(the CLI test imports it before running ``lmms-cache eval --harness lm-eval``).

``python lm_eval_worker.py run SPEC.json`` runs the evaluations SPEC lists, in order, in
this one process, and writes a JSON report per run::

    {"runs": [{"include_path": dir, "cache": dir | null, "tasks": [...], "out": report path}]}

A report: {"results" (without run-specific fields), "samples" (lm-eval's logged samples by
task), "resps_repr", "calls" (model calls by method), "seen" (requests the model received),
"stats" (``cache_stats``, null uncached), "is_cached"}.

``python lm_eval_worker.py cli <lmms-cache eval arguments>`` runs ``lmms_cache.cli.main``
with the fake model registered (and only --include_path tasks indexed); every FakeLM
construction and model call is appended as a line to the file named by $FAKE_LM_EVENTS.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import zlib
from collections import Counter
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

MODEL_NAME = "lmms_cache_fake_lm"
# Keys of lm-eval's results that measure the run rather than describe its outcome.
_RUN_FIELDS = {"date", "start_time", "end_time", "total_evaluation_time_seconds", "pretty_env_info",
               "transformers_version", "lm_eval_version", "upper_git_hash", "git_hash"}  # fmt: skip


def _event(line: str) -> None:
    path = os.environ.get("FAKE_LM_EVENTS")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def answer(context: str) -> str:
    """A deterministic completion of ``Q: a+b?`` prompts: right for some, wrong for others."""
    question = context.rsplit("Q: ", 1)[-1].split("?", 1)[0]
    a, b = (int(x) for x in question.split("+"))
    right = a + b
    return f"{right if a % 2 == 0 else right + 1}\nand more text"


@register_model(MODEL_NAME)
class FakeLM(LM):
    """Deterministic answers; records every request as received and counts calls."""

    def __init__(self, **harness_settings: Any) -> None:  # the CLI passes batch_size, device
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.seen: list[list[Any]] = []  # [method, args] as received
        _event("construct")

    def _record(self, method: str, requests: list[Any]) -> None:
        self.calls[method] += 1
        _event(f"call {method} {len(requests)}")
        for r in requests:
            self.seen.append([method, copy.deepcopy(list(r.args))])

    def generate_until(self, requests: list[Any]) -> list[str]:
        self._record("generate_until", requests)
        out = []
        for r in requests:
            context, gen_kwargs = r.args  # lm-eval's layout; a real model copies gen_kwargs
            text = answer(context)
            for stop in gen_kwargs.get("until", []):
                text = text.split(stop)[0]
            out.append(text[: gen_kwargs.get("max_gen_toks", 256)])
        return out

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        self._record("loglikelihood", requests)
        return [(-(zlib.crc32(f"{c}|{x}".encode()) % 1000) / 100.0, len(x) % 2 == 0) for c, x in
                (r.args for r in requests)]  # fmt: skip

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        self._record("loglikelihood_rolling", requests)
        return [-(zlib.crc32(r.args[0].encode()) % 5000) / 100.0 for r in requests]


def _outcome(results: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics and the rest of the outcome without run-specific fields, samples by task)."""
    samples = results.pop("samples", {})
    kept = {k: v for k, v in results.items() if k not in _RUN_FIELDS}
    return kept, samples


def _evaluate(include_path: str, tasks: list[str], cache: str | None) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from lmms_cache import cached, is_cached

    model = FakeLM()
    lm = cached(model, cache) if cache else model
    # include_defaults=False: indexing lm-eval's ~14,000 bundled task files takes seconds.
    manager = TaskManager(include_path=include_path, include_defaults=False)
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, log_samples=True)
    outcome, samples = _outcome(results)
    report = {
        "results": outcome,
        "samples": samples,
        # JSON turns tuples into lists: the reprs show the response types too.
        "resps_repr": {task: [repr(s["resps"]) for s in rows] for task, rows in samples.items()},
        "calls": dict(model.calls),
        "seen": model.seen,
        "stats": lm.cache_stats.as_dict() if cache else None,
        "is_cached": is_cached(lm),
    }
    if cache:
        lm.cache_close()
    return report


def _index_included_tasks_only(manager: type) -> None:
    """Speed only: the CLI's TaskManager indexes lm-eval's ~14,000 bundled task files (seconds
    per run) unless told not to, and the CLI has no option for it. Nothing else changes."""
    init = manager.__init__

    def __init__(self: Any, *args: Any, include_defaults: bool = False, **kwargs: Any) -> None:
        init(self, *args, include_defaults=include_defaults, **kwargs)

    manager.__init__ = __init__


def main(argv: list[str]) -> int:
    if argv[:1] == ["cli"]:
        from lm_eval.tasks import TaskManager

        from lmms_cache.cli import main as cli_main

        _index_included_tasks_only(TaskManager)
        return cli_main(argv[1:])
    assert argv[:1] == ["run"], argv
    with open(argv[1], encoding="utf-8") as f:
        spec = json.load(f)
    for run in spec["runs"]:
        report = _evaluate(run["include_path"], run["tasks"], run.get("cache"))
        with open(run["out"], "w", encoding="utf-8") as f:
            json.dump(report, f, default=repr, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
