"""Models constructed on their first miss."""

from __future__ import annotations

from typing import Any

from fakes import gen_request, task_dict
from lmms_cache import cached
from lmms_cache.lazy import is_constructed, lazy_model


class Base:
    """Stands in for a harness base class (lmms-eval's ``lmms``)."""

    def __init__(self) -> None:
        self._rank = 0
        self._world_size = 1
        self.task_dict: dict[str, Any] = {}


class Heavy(Base):
    constructed = 0

    def __init__(self, pretrained: str = "heavy/model", scale: int = 1) -> None:
        super().__init__()  # resets task_dict, as lmms-eval models do
        Heavy.constructed += 1
        self.pretrained = pretrained
        self.scale = scale
        self.weights = "loaded"

    def generate_until(self, requests: list[Any]) -> list[str]:
        return [f"{r.args[0]} x{self.scale}" for r in requests]


def test_placeholder_is_the_class_without_running_its_initializer():
    Heavy.constructed = 0
    m = lazy_model(Heavy, {"scale": 3})
    assert isinstance(m, Heavy) and type(m).__name__ == "Heavy"
    assert not is_constructed(m) and Heavy.constructed == 0
    assert (m._rank, m._world_size, m.task_dict) == (0, 1, {})  # the base class's own state


def test_rank_and_world_size_come_from_the_launcher(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    m = lazy_model(Heavy, {})
    assert (m._rank, m._world_size) == (3, 8)


def test_first_request_constructs_once_and_keeps_the_task_dict():
    Heavy.constructed = 0
    m = lazy_model(Heavy, {"scale": 2})
    m.task_dict["t"] = {"test": ["doc"]}  # what the evaluator does before any request
    assert m.generate_until([gen_request(0)]) == ["q0 x2"]
    assert m.generate_until([gen_request(1)]) == ["q1 x2"]
    assert Heavy.constructed == 1 and is_constructed(m)
    assert m.task_dict == {"t": {"test": ["doc"]}}


def test_reading_a_missing_attribute_constructs_but_probes_do_not():
    Heavy.constructed = 0
    m = lazy_model(Heavy, {})
    assert not hasattr(m, "accelerator") and not hasattr(m, "loglikelihood_rolling")
    assert Heavy.constructed == 0
    assert m.weights == "loaded"
    assert Heavy.constructed == 1


def test_a_fully_cached_rerun_never_constructs(tmp_path):
    Heavy.constructed = 0
    docs = task_dict(3)
    requests = [gen_request(i) for i in range(3)]
    first = cached(lazy_model(Heavy, {}), tmp_path, model_id="heavy")
    first.task_dict.update(docs)
    answers = first.generate_until(requests)
    assert Heavy.constructed == 1
    rerun = cached(lazy_model(Heavy, {}), tmp_path, model_id="heavy")
    rerun.task_dict.update(docs)
    assert rerun.generate_until(requests) == answers
    assert Heavy.constructed == 1
    assert not is_constructed(rerun.__wrapped__)


class WithTokenizer(Base):
    constructed = 0

    def __init__(self) -> None:
        super().__init__()
        WithTokenizer.constructed += 1
        self._tokenizer = "a tokenizer"

    @property
    def tokenizer(self) -> str:
        return self._tokenizer

    def generate_until(self, requests: list[Any]) -> list[str]:
        return ["x"] * len(requests)


def test_properties_the_evaluators_probe_do_not_construct():
    WithTokenizer.constructed = 0
    m = lazy_model(WithTokenizer, {})
    assert getattr(m, "tokenizer", False) is False  # lm-eval's guarded read for its logs
    assert not hasattr(m, "MULTIMODAL") and not hasattr(m, "get_model_info")
    assert WithTokenizer.constructed == 0
    m.generate_until([gen_request(0)])
    assert m.tokenizer == "a tokenizer" and WithTokenizer.constructed == 1
