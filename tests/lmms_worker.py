"""Real lmms-eval evaluations in their own process, for tests/test_lmms_eval_e2e.py and
tests/test_cli_eval.py (built by tests/lmms_harness.py).

Also the home of the fake models: ``FakeVLM`` (simple layout) and ``FakeChatVLM``
(``is_simple = False``: chat layout, images read out of ``doc_to_messages(doc)``). The
plugin package the harness writes re-exports ``FakeVLM`` for ``--model fake_vlm``.

The models answer from the content they are given, so that a changed image or video shows
in the answer: the dominant colour of an image, the colour written inside a "video" file.
Sampled requests (``do_sample``) get the colour plus a per-model counter, so repeats differ.
Like lmms-eval's own models, ``generate_until`` logs its throughput (``log_metrics``: the
results' ``throughput`` block), with a stand-in time of ``SECONDS_PER_ANSWER`` per request,
never a measured one, so that two runs computing the same requests log the same totals; and,
like its API models, the tokens of each answer (``log_usage``: the ``usage`` block).
Every model call is recorded before the model changes ``gen_kwargs`` in place (as real
models do: it then adds ``max_new_tokens`` and pops ``until``): in memory for the report,
and one JSON line per call appended to the log file, which survives a SIGKILL.

Run as ``python lmms_worker.py SPEC.json``; SPEC names the include path, the log and report
files and a list of runs, each ``simple_evaluate``-d in order with a new model::

    {"name": "cached", "model": "simple" | "chat", "tasks": [...],
     "cache": DIR | null (null: the model unwrapped), "batch_size": N | null,
     "block_at": K | null, "signal": FILE}

``block_at``: the model, starting its K-th call (0-based), writes FILE and waits for stdin
to close (the test SIGKILLs it meanwhile). Control never goes through model attributes:
those are part of the model's identity.

For the CLI, the same control comes from the environment: ``LMMS_FAKE_LOG`` (the call log).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
from typing import Any

from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from lmms_eval.models.model_utils.usage_metrics import log_usage

COLORS = ("red", "green", "blue")
CONTROL: dict[str, Any] = {"log": os.environ.get("LMMS_FAKE_LOG"), "run": os.environ.get("LMMS_FAKE_RUN", "cli"),
                           "block_at": None, "signal": None}  # fmt: skip
CALLS: list[dict[str, Any]] = []  # this run's model calls


# -- what the models see ------------------------------------------------------------------


def image_color(img: Any) -> str:
    r, g, b = img.convert("RGB").resize((1, 1)).getpixel((0, 0))
    return COLORS[max(range(3), key=(r, g, b).__getitem__)]


def video_color(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    return data.split(b":")[1].decode()


def describe_visual(v: Any) -> str:
    """A content digest of one visual, for the call log."""
    if isinstance(v, str):
        with open(v, "rb") as f:
            return f"file {os.path.basename(v)} {hashlib.sha256(f.read()).hexdigest()[:12]}"
    return f"image {hashlib.sha256(v.convert('RGB').tobytes()).hexdigest()[:12]}"


def visual_color(v: Any) -> str:
    return video_color(v) if isinstance(v, str) else image_color(v)


def mutate(gen_kwargs: dict[str, Any]) -> None:
    """What real models do to the caller's dict."""
    gen_kwargs.setdefault("max_new_tokens", 1024)
    gen_kwargs.pop("until", None)


SECONDS_PER_ANSWER = 0.25  # the time the fakes say a generation took (see the docstring)


class _Recorder:
    """Shared by both fake models: counts calls, records them, blocks on request."""

    def _log_metrics(self, requests: list[Any], answers: list[GenerationResult]) -> None:
        for r, a in zip(requests, answers, strict=True):
            log_usage(self.pretrained, task_name=r.args[4], input_tokens=a.token_counts.input_tokens,
                      output_tokens=a.token_counts.output_tokens)  # fmt: skip
        if not answers:
            return
        tokens = sum(a.token_counts.output_tokens for a in answers)
        seconds = SECONDS_PER_ANSWER * len(answers)
        log_metrics(total_elapsed_time=seconds, total_gen_tokens=tokens, avg_speed=tokens / seconds)

    def _enter(self, method: str, records: list[dict[str, Any]]) -> None:
        batch = self._batch_counter
        self._batch_counter += 1
        call = {"run": CONTROL["run"], "batch": batch, "method": method, "requests": records}
        CALLS.append(call)
        if CONTROL["log"]:
            with open(CONTROL["log"], "a") as f:
                f.write(json.dumps(call) + "\n")
        if batch == CONTROL["block_at"]:
            tmp = CONTROL["signal"] + ".tmp"
            with open(tmp, "w") as f:
                f.write(f"blocked at batch {batch}\n")
            os.replace(tmp, CONTROL["signal"])
            sys.stdin.read()  # until the test kills us (or goes away and closes the pipe)
            os._exit(3)

    def _answer(self, gen_kwargs: dict[str, Any], color: str, context: str) -> GenerationResult:
        text = color
        if gen_kwargs.get("do_sample"):
            text = f"{color} #{self._sample_counter}"
            self._sample_counter += 1
        return GenerationResult(text=text, token_counts=TokenCounts(input_tokens=len(context.split()),
                                                                    output_tokens=len(text.split())))  # fmt: skip


class FakeVLM(_Recorder, lmms):
    """A simple-layout model: ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``."""

    def __init__(self, pretrained: str = "fake/vlm-1b", marker: str | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.pretrained = pretrained
        self._batch_counter = 0
        self._sample_counter = 0
        if marker:  # the CLI tests count constructions
            with open(marker, "a") as f:
                f.write(f"constructed {os.getpid()}\n")

    def _visuals(self, r: Any) -> list[Any]:
        _, _, doc_to_visual, doc_id, task, split = r.args
        return list(doc_to_visual(self.task_dict[task][split][doc_id]) or [])

    def generate_until(self, requests: list[Any]) -> list[Any]:
        visuals = [self._visuals(r) for r in requests]
        self._enter("generate_until", [
            {"task": r.args[4], "doc_id": r.args[3], "split": r.args[5], "context": r.args[0],
             "gen_kwargs": copy.deepcopy(r.args[1]), "media": [describe_visual(v) for v in vs]}
            for r, vs in zip(requests, visuals, strict=True)
        ])  # fmt: skip
        out = []
        for r, vs in zip(requests, visuals, strict=True):
            gen_kwargs = r.args[1]
            answer = self._answer(gen_kwargs, visual_color(vs[0]), r.args[0])
            mutate(gen_kwargs)
            out.append(answer)
        self._log_metrics(requests, out)
        return out

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        visuals = [self._visuals(r) for r in requests]
        self._enter("loglikelihood", [
            {"task": r.args[4], "doc_id": r.args[3], "split": r.args[5], "context": r.args[0],
             "continuation": r.args[1], "media": [describe_visual(v) for v in vs]}
            for r, vs in zip(requests, visuals, strict=True)
        ])  # fmt: skip
        out = []
        for r, vs in zip(requests, visuals, strict=True):
            rgb = vs[0].convert("RGB").resize((1, 1)).getpixel((0, 0))
            choice = r.args[1].strip()
            loss = 1.0 - rgb[COLORS.index(choice)] / 255  # lmms-eval picks the lowest
            out.append((loss, choice == image_color(vs[0])))
        return out

    def generate_until_multi_round(self, requests: list[Any]) -> list[Any]:
        raise NotImplementedError


class FakeChatVLM(_Recorder, lmms):
    """A chat-layout model: ``(context, doc_to_messages, gen_kwargs, doc_id, task, split)``."""

    is_simple = False

    def __init__(self, pretrained: str = "fake/chat-vlm-1b", **kwargs: Any) -> None:
        super().__init__()
        self.pretrained = pretrained
        self._batch_counter = 0
        self._sample_counter = 0

    def generate_until(self, requests: list[Any]) -> list[Any]:
        messages = [r.args[1](self.task_dict[r.args[4]][r.args[5]][r.args[3]]) for r in requests]
        parts = [[c for m in ms for c in m["content"]] for ms in messages]
        images = [[c["url"] for c in ps if c["type"] == "image"] for ps in parts]
        texts = [" ".join(c["text"] for c in ps if c["type"] == "text") for ps in parts]
        self._enter("generate_until", [
            {"task": r.args[4], "doc_id": r.args[3], "split": r.args[5], "context": r.args[0],
             "gen_kwargs": copy.deepcopy(r.args[2]), "media": [describe_visual(v) for v in vs], "text": t}
            for r, vs, t in zip(requests, images, texts, strict=True)
        ])  # fmt: skip
        out = []
        for r, vs in zip(requests, images, strict=True):
            answer = self._answer(r.args[2], image_color(vs[0]), r.args[0])
            mutate(r.args[2])
            out.append(answer)
        self._log_metrics(requests, out)
        return out

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        raise NotImplementedError

    def generate_until_multi_round(self, requests: list[Any]) -> list[Any]:
        raise NotImplementedError


# -- one evaluation -------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """JSON-safe, without object addresses (so two processes' reports compare)."""
    return json.loads(json.dumps(value, default=lambda v: type(v).__name__, sort_keys=True))


def run(spec: dict[str, Any], r: dict[str, Any]) -> dict[str, Any]:
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    from lmms_cache import cached, is_cached

    CONTROL.update(run=r["name"], block_at=r.get("block_at"), signal=r.get("signal"))
    CALLS.clear()
    model = FakeVLM() if r["model"] == "simple" else FakeChatVLM()
    lm = model if r.get("cache") is None else cached(model, r["cache"], batch_size=r.get("batch_size"))
    tm = TaskManager(include_path=spec["include_path"], include_defaults=False)
    res = evaluator.simple_evaluate(model=lm, tasks=r["tasks"], task_manager=tm, log_samples=True)
    samples = {
        task: sorted(({k: v for k, v in s.items() if k not in ("doc", "arguments")} for s in rows),
                     key=lambda s: s["doc_id"])
        for task, rows in res.pop("samples").items()
    }  # fmt: skip
    report = {
        "name": r["name"],
        "samples": plain(samples),
        "results": plain(res),
        "calls": copy.deepcopy(CALLS),
        "wrapped": is_cached(lm),
        "stats": lm.cache_stats.as_dict() if is_cached(lm) else None,
    }
    if is_cached(lm):
        lm.cache_close()
    return report


def main() -> int:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    CONTROL["log"] = spec.get("log")
    reports = [run(spec, r) for r in spec["runs"]]
    tmp = spec["report"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(reports, f)
    os.replace(tmp, spec["report"])
    return 0


if __name__ == "__main__":
    # The models must be lmms_worker.FakeVLM (as the plugin imports them), not __main__.*.
    import lmms_worker

    sys.exit(lmms_worker.main())
