"""Fake models and request builders shared by the tests (real lmms-eval Instances)."""

from __future__ import annotations

import copy
from typing import Any

from lmms_eval.api.instance import GenerationResult, Instance
from PIL import Image


class FakeModel:
    """An lmms-eval-style model that records what it was asked, and mutates gen_kwargs as
    real models do (adding defaults) so that tests can see keys are computed before."""

    def __init__(self, pretrained: str = "fake/tiny-vlm", **settings: Any) -> None:
        self.pretrained = pretrained
        self._rank = 0
        self._world_size = 1
        self.batch_size_per_gpu = 1
        self.task_dict: dict[str, Any] = {}
        self.seen: list[tuple[str, tuple[Any, ...]]] = []  # (method, args as received)
        self.calls = 0
        for k, v in settings.items():
            setattr(self, k, v)

    def _record(self, method: str, requests: list[Any]) -> None:
        self.calls += 1
        for r in requests:
            self.seen.append((method, copy.deepcopy(tuple(a for a in r.args if not callable(a)))))

    def generate_until(self, requests: list[Any]) -> list[Any]:
        self._record("generate_until", requests)
        out = []
        for r in requests:
            gen = r.args[1] if isinstance(r.args[1], dict) else r.args[2]
            gen.setdefault("max_new_tokens", 128)  # what real models do to the caller's dict
            out.append(GenerationResult(text=f"answer to {r.args[0]}"))
        return out

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        self._record("loglikelihood", requests)
        return [(-float(len(str(r.args[0]))), True) for r in requests]

    def generate_until_multi_round(self, requests: list[Any]) -> list[Any]:
        self._record("generate_until_multi_round", requests)
        return [[f"round1 {r.args[0]}", f"round2 {r.args[0]}"] for r in requests]


def visuals(doc: dict[str, Any]) -> list[Any]:
    return [doc["image"]]


def image(color: tuple[int, int, int], size: tuple[int, int] = (16, 16)) -> Image.Image:
    return Image.new("RGB", size, color)


def task_dict(n: int = 4, task: str = "t", split: str = "test") -> dict[str, Any]:
    return {task: {split: [{"image": image((i * 40 % 256, 10, 200)), "question": f"q{i}"} for i in range(n)]}}


def gen_request(doc_id: int, context: str | None = None, gen_kwargs: dict[str, Any] | None = None,
                task: str = "t", split: str = "test", repeats: int = 1, doc_to_visual: Any = visuals) -> Instance:
    """An lmms-eval simple-layout generate_until Instance."""
    gen = {"max_new_tokens": 16, "temperature": 0} if gen_kwargs is None else gen_kwargs
    args = (context if context is not None else f"q{doc_id}", gen, doc_to_visual, doc_id, task, split)
    return Instance(request_type="generate_until", arguments=args, idx=0,
                    metadata={"task": task, "doc_id": doc_id, "repeats": repeats, "split": split})


def ll_request(doc_id: int, continuation: str, task: str = "t", split: str = "test") -> Instance:
    """An lmms-eval loglikelihood Instance."""
    args = (f"q{doc_id}", continuation, visuals, doc_id, task, split)
    return Instance(request_type="loglikelihood", arguments=args, idx=0,
                    metadata={"task": task, "doc_id": doc_id, "repeats": 1, "split": split})
