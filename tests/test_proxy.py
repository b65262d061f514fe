"""The caching proxy, in process: it behaves like the model, answers hits, sends only misses,
never caches failures and never breaks the evaluation."""

from __future__ import annotations

import copy
import functools
import logging
import math
import pickle
import sqlite3
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import dill
import pytest
from lmms_eval.api.instance import GenerationResult, Instance

from fakes import FakeModel, gen_request, ll_request, task_dict, visuals
from lmms_cache import CachedModel, cached, default_is_failure, is_cached
from lmms_cache.proxy import DEFAULT_BATCH_SIZE, METHODS, MODES
from lmms_cache.store import NullStore, StoreError

# -- helpers ------------------------------------------------------------------------------


@dataclass
class LmRequest:
    """An lm-eval-style request: anything with ``.args``."""

    args: tuple[Any, ...]


def lm_req(context: str, **gen: Any) -> LmRequest:
    return LmRequest((context, gen or {"until": ["\n"]}))


def fresh(n: int = 6, **settings: Any) -> FakeModel:
    """A new FakeModel with documents, as a new run would build it."""
    model = FakeModel(**settings)
    model.task_dict = task_dict(n)
    return model


class Scripted:
    """A text model answering ``answer(request)``; records each batch's contexts.

    The records live in a non-plain object so they do not enter the model identity.
    """

    def __init__(self, answer: Any = None, name: str = "scripted/model") -> None:
        self.pretrained = name
        self.answer = answer or (lambda r: f"answer to {r.args[0]}")
        self.log = SimpleNamespace(batches=[])

    def generate_until(self, requests: list[Any]) -> list[Any]:
        self.log.batches.append([r.args[0] for r in requests])
        return [self.answer(r) for r in requests]

    def loglikelihood(self, requests: list[Any]) -> list[Any]:
        self.log.batches.append([r.args[0] for r in requests])
        return [self.answer(r) for r in requests]

    def generate_until_multi_round(self, requests: list[Any]) -> list[Any]:
        self.log.batches.append([r.args[0] for r in requests])
        return [self.answer(r) for r in requests]


class Sampler(FakeModel):
    """Answers ``sample <n>`` with a counter that runs across calls."""

    def __init__(self, start: int = 0) -> None:
        super().__init__()
        self.task_dict = task_dict(4)
        self.counter = SimpleNamespace(n=start)

    def generate_until(self, requests: list[Any]) -> list[Any]:
        self._record("generate_until", requests)
        out = []
        for _ in requests:
            self.counter.n += 1
            out.append(f"sample {self.counter.n}")
        return out


def step_text(doc: dict[str, Any], round_idx: int = 0) -> str:
    return f"{doc['question']} round {round_idx}"


def multi_round_request(doc_id: int) -> Instance:
    args = (f"q{doc_id}", {"max_new_tokens": 8}, visuals, functools.partial(step_text), doc_id, "t", "test")
    return Instance(
        request_type="generate_until_multi_round",
        arguments=args,
        idx=0,
        metadata={"task": "t", "doc_id": doc_id, "repeats": 1, "split": "test"},
    )


def entry_count(path: Any) -> int:
    with sqlite3.connect(f"{path}/cache.db") as conn:
        return int(conn.execute("SELECT count(*) FROM entries").fetchone()[0])


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "lmms_cache" and r.levelno == logging.WARNING]


def texts(results: list[Any]) -> list[str]:
    return [r.text if isinstance(r, GenerationResult) else r for r in results]


# -- 1. the proxy behaves like the model ----------------------------------------------------


def test_proxy_is_an_instance_of_the_model_class_and_named_like_it(tmp_path):
    model = fresh()
    lm = cached(model, tmp_path)
    assert isinstance(lm, FakeModel)
    assert isinstance(lm, CachedModel)
    assert type(lm).__name__ == "FakeModel"
    assert type(lm).__module__ == FakeModel.__module__
    assert type(lm).__qualname__ == FakeModel.__qualname__
    assert lm.__wrapped__ is model


def test_attribute_reads_and_writes_reach_the_model(tmp_path):
    model = fresh()
    lm = cached(model, tmp_path)
    docs = task_dict(2, task="other")
    lm.task_dict = docs
    lm._rank = 3
    lm.new_setting = "x"
    assert model.task_dict is docs
    assert model._rank == 3
    assert model.new_setting == "x"
    model.pretrained = "changed"
    assert lm.pretrained == "changed"


def test_hasattr_answers_as_for_the_model(tmp_path):
    lm = cached(fresh(), tmp_path)
    assert not hasattr(FakeModel(), "loglikelihood_rolling")
    assert not hasattr(lm, "loglikelihood_rolling")
    assert hasattr(lm, "loglikelihood")
    assert hasattr(lm, "generate_until_multi_round")


def test_is_cached_tells_a_proxy_from_a_model(tmp_path):
    model = fresh()
    lm = cached(model, tmp_path)
    assert is_cached(lm)
    assert not is_cached(model)
    assert not is_cached(object())


@pytest.mark.parametrize("serializer", [pickle, dill], ids=["pickle", "dill"])
def test_a_pickled_proxy_works_on_the_same_cache(tmp_path, serializer):
    lm = cached(fresh(), tmp_path, batch_size=7)
    first = lm.generate_until([gen_request(i) for i in range(3)])  # the model's state changes here
    copy_ = serializer.loads(serializer.dumps(lm))
    assert is_cached(copy_) and isinstance(copy_, FakeModel)
    assert copy_.cache_identity == lm.cache_identity
    again = copy_.generate_until([gen_request(i) for i in range(3)])
    assert again == first
    assert copy_.cache_stats.hits == 3
    assert copy_.cache_stats.model_calls == 0
    assert copy_._self_cache.batch_size == 7


def test_copy_and_deepcopy_give_working_proxies(tmp_path):
    model = fresh()
    lm = cached(model, tmp_path)
    first = lm.generate_until([gen_request(0)])
    shallow = copy.copy(lm)
    deep = copy.deepcopy(lm)
    assert shallow.__wrapped__ is model
    assert deep.__wrapped__ is not model and isinstance(deep, FakeModel)
    assert shallow.generate_until([gen_request(0)]) == first
    assert deep.generate_until([gen_request(0)]) == first
    assert shallow.cache_stats.hits == deep.cache_stats.hits == 1


def test_repr_names_the_mode_the_model_and_the_location(tmp_path):
    lm = cached(fresh(), tmp_path, mode="refresh")
    text = repr(lm)
    assert "refresh" in text
    assert "FakeModel" in text
    assert str(tmp_path) in text


def test_public_constants():
    assert DEFAULT_BATCH_SIZE >= 1
    assert set(METHODS) == {
        "generate_until",
        "loglikelihood",
        "loglikelihood_rolling",
        "generate_until_multi_round",
    }
    assert MODES == ("readwrite", "readonly", "refresh", "off")


# -- 2. misuse raises at once, naming the value ---------------------------------------------


def test_an_object_without_request_methods_is_refused(tmp_path):
    class NotAModel:
        pass

    with pytest.raises(TypeError, match="NotAModel"):
        cached(NotAModel(), tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("bad", [0, -1, True, "8", 2.0])
def test_a_bad_batch_size_is_refused(tmp_path, bad):
    with pytest.raises(ValueError, match=f"not {bad!r}"):
        cached(fresh(), tmp_path, batch_size=bad)


def test_an_unknown_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="'bogus'"):
        cached(fresh(), tmp_path, mode="bogus")


def test_the_mode_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LMMS_CACHE_MODE", "off")
    lm = cached(fresh(), tmp_path / "c")
    lm.generate_until([gen_request(0)])
    assert not (tmp_path / "c").exists()
    assert cached(fresh(), tmp_path / "d", mode="readwrite").cache_store.location.startswith(
        str(tmp_path / "d")
    )
    monkeypatch.setenv("LMMS_CACHE_MODE", "bogus")
    with pytest.raises(ValueError, match="'bogus'"):
        cached(fresh(), tmp_path / "e")


def test_wrapping_a_proxy_again_is_refused(tmp_path):
    lm = cached(fresh(), tmp_path)
    with pytest.raises(TypeError, match="already wrapped"):
        cached(lm, tmp_path)


def test_a_non_callable_failure_rule_is_refused(tmp_path):
    with pytest.raises(TypeError, match="is_failure"):
        cached(fresh(), tmp_path, is_failure="yes")


# -- 3. calls -------------------------------------------------------------------------------


def test_hits_and_misses_come_back_in_request_order(tmp_path):
    model = fresh()
    lm = cached(model, tmp_path)
    lm.generate_until([gen_request(1), gen_request(3)])
    model.seen.clear()
    results = lm.generate_until([gen_request(i) for i in range(5)])
    assert texts(results) == [f"answer to q{i}" for i in range(5)]
    assert [args[0] for _, args in model.seen] == ["q0", "q2", "q4"]
    assert lm.cache_stats.hits == 2


@pytest.mark.parametrize(
    ("method", "make", "kind"),
    [
        ("generate_until", gen_request, GenerationResult),
        ("loglikelihood", lambda i: ll_request(i, f" choice{i}"), tuple),
        ("generate_until_multi_round", multi_round_request, list),
    ],
)
def test_a_hit_has_the_type_the_model_returned(tmp_path, method, make, kind):
    first = getattr(cached(fresh(), tmp_path), method)([make(0), make(1)])
    model = fresh()
    again = getattr(cached(model, tmp_path), method)([make(0), make(1)])
    assert model.calls == 0
    assert again == first
    assert all(type(r) is kind for r in again)
    if method == "loglikelihood":
        assert all(isinstance(r[0], float) and r[1] is True for r in again)


def test_the_model_gets_only_misses_in_batches_of_batch_size(tmp_path):
    model = Scripted()
    lm = cached(model, tmp_path, batch_size=3)
    lm.generate_until([lm_req(f"c{i}") for i in range(8)])
    assert [len(b) for b in model.log.batches] == [3, 3, 2]
    model.log.batches.clear()
    results = lm.generate_until([lm_req(f"c{i}") for i in range(12)])
    assert model.log.batches == [["c8", "c9", "c10"], ["c11"]]
    assert results == [f"answer to c{i}" for i in range(12)]


def test_identical_requests_reach_the_model_once(tmp_path):
    model = fresh()
    lm = cached(model, tmp_path)
    requests = [gen_request(2), gen_request(2), gen_request(1), gen_request(2)]
    results = lm.generate_until(requests)
    assert [args[0] for _, args in model.seen] == ["q2", "q1"]
    assert texts(results) == ["answer to q2", "answer to q2", "answer to q1", "answer to q2"]
    assert lm.cache_stats.misses == 2
    assert entry_count(tmp_path) == 2


def test_gen_kwargs_mutated_by_the_model_do_not_break_a_rerun(tmp_path):
    def run() -> tuple[FakeModel, list[Instance]]:
        model = fresh()
        requests = [gen_request(i, gen_kwargs={"temperature": 0}) for i in range(3)]
        cached(model, tmp_path).generate_until(requests)
        return model, requests

    model, requests = run()
    assert model.calls == 1
    assert requests[0].args[1] == {"temperature": 0, "max_new_tokens": 128}  # the model's doing
    model, _ = run()
    assert model.calls == 0


def test_the_model_receives_the_requests_as_the_caller_made_them(tmp_path):
    model = fresh()
    lm = cached(model, tmp_path)
    requests = [gen_request(0, gen_kwargs={"temperature": 0, "until": ["\n"]}), gen_request(1)]
    expected = [copy.deepcopy(tuple(a for a in r.args if not callable(a))) for r in requests]
    lm.generate_until(requests)
    assert model.seen == [("generate_until", e) for e in expected]


FAILURES = [
    ("generate_until", ""),
    ("generate_until", "  "),
    ("generate_until", None),
    ("generate_until", "[LMMS_EVAL_REQUEST_FAILED after 3 retries] x"),
    ("generate_until", "[LMMS_EVAL_BUDGET_EXCEEDED]"),
    ("generate_until", GenerationResult(text="")),
    ("loglikelihood", (math.nan, False)),
    ("generate_until_multi_round", ["round one", ""]),
]


@pytest.mark.parametrize(("method", "response"), FAILURES)
def test_failures_are_never_cached(tmp_path, method, response):
    assert default_is_failure(response)
    model = Scripted(answer=lambda r: response)
    lm = cached(model, tmp_path)
    out = getattr(lm, method)([lm_req("a")])
    assert out[0] is response
    assert lm.cache_stats.failures == 1 and lm.cache_stats.written == 0
    again = Scripted(answer=lambda r: response)
    getattr(cached(again, tmp_path), method)([lm_req("a")])
    assert len(again.log.batches) == 1


@pytest.mark.parametrize(
    ("method", "response"),
    [
        ("generate_until", "fine"),
        ("loglikelihood", (-1.5, False)),
        ("generate_until_multi_round", ["a", "b"]),
    ],
)
def test_good_responses_of_each_kind_are_cached(tmp_path, method, response):
    assert not default_is_failure(response)
    getattr(cached(Scripted(answer=lambda r: response), tmp_path), method)([lm_req("a")])
    again = Scripted(answer=lambda r: response)
    assert getattr(cached(again, tmp_path), method)([lm_req("a")]) == [response]
    assert again.log.batches == []


def test_is_failure_replaces_the_default_rule(tmp_path):
    def rule(response: Any) -> bool:
        return "bad" in response

    answers = {"a": "", "b": "bad answer"}
    lm = cached(Scripted(answer=lambda r: answers[r.args[0]]), tmp_path, is_failure=rule)
    lm.generate_until([lm_req("a"), lm_req("b")])
    again = Scripted(answer=lambda r: answers[r.args[0]])
    assert cached(again, tmp_path, is_failure=rule).generate_until([lm_req("a"), lm_req("b")]) == [
        "",
        "bad answer",
    ]
    assert again.log.batches == [["b"]]  # "" was cached under the new rule, "bad answer" was not


def test_a_model_exception_propagates_and_earlier_batches_are_kept(tmp_path):
    error = RuntimeError("out of memory in batch 3")

    class Failing(Scripted):
        def generate_until(self, requests):
            if len(self.log.batches) == 2:
                raise error
            return super().generate_until(requests)

    lm = cached(Failing(), tmp_path, batch_size=2, model_id="m")
    with pytest.raises(RuntimeError) as raised:
        lm.generate_until([lm_req(f"c{i}") for i in range(6)])
    assert raised.value is error
    model = Scripted()
    results = cached(model, tmp_path, batch_size=2, model_id="m").generate_until(
        [lm_req(f"c{i}") for i in range(6)]
    )
    assert results == [f"answer to c{i}" for i in range(6)]
    assert model.log.batches == [["c4", "c5"]]


def test_readonly_serves_hits_and_never_writes(tmp_path):
    cached(fresh(), tmp_path).generate_until([gen_request(0), gen_request(1)])
    before = (tmp_path / "cache.db").read_bytes()
    model = fresh()
    lm = cached(model, tmp_path, mode="readonly")
    results = lm.generate_until([gen_request(i) for i in range(4)])
    assert texts(results) == [f"answer to q{i}" for i in range(4)]
    assert [args[0] for _, args in model.seen] == ["q2", "q3"]
    assert lm.cache_stats.written == 0
    lm.cache_close()
    assert entry_count(tmp_path) == 2
    assert (tmp_path / "cache.db").read_bytes() == before


def test_readonly_without_a_cache_runs_uncached_with_one_warning(tmp_path, caplog):
    where = tmp_path / "nothing-here"
    model = fresh()
    lm = cached(model, where, mode="readonly")
    for _ in range(2):
        assert texts(lm.generate_until([gen_request(0), gen_request(1)])) == ["answer to q0", "answer to q1"]
    assert model.calls == 2
    warnings = warnings_of(caplog)
    assert len(warnings) == 1 and str(where) in warnings[0]
    assert not where.exists()


_ANSWER = {"text": "old"}


def _current_answer(request: Any) -> str:
    return _ANSWER["text"]  # a global: what the model answers changes behind the cache's back


def test_refresh_recomputes_and_overwrites(tmp_path, monkeypatch):
    monkeypatch.setitem(_ANSWER, "text", "old")
    cached(Scripted(answer=_current_answer), tmp_path).generate_until([lm_req("a"), lm_req("b")])
    _ANSWER["text"] = "new"
    model = Scripted(answer=_current_answer)
    assert cached(model, tmp_path, mode="refresh").generate_until([lm_req("a"), lm_req("b")]) == [
        "new",
        "new",
    ]
    assert model.log.batches == [["a", "b"]]
    _ANSWER["text"] = "never asked"
    later = Scripted(answer=_current_answer)
    assert cached(later, tmp_path).generate_until([lm_req("a"), lm_req("b")]) == ["new", "new"]
    assert later.log.batches == []
    assert entry_count(tmp_path) == 2


def test_off_is_a_pass_through(tmp_path):
    where = tmp_path / "c"
    model = fresh()
    lm = cached(model, where, mode="off")
    for _ in range(2):
        assert texts(lm.generate_until([gen_request(0)])) == ["answer to q0"]
    assert model.calls == 2
    assert lm.cache_stats.calls == 0
    assert isinstance(lm.cache_store, NullStore)
    assert not where.exists()


def test_repeats_are_independent_samples_replayed_in_order(tmp_path):
    request = gen_request(0, repeats=3)
    model = Sampler()
    first = cached(model, tmp_path).generate_until([request, request, request])
    assert first == ["sample 1", "sample 2", "sample 3"]
    assert len(model.seen) == 3
    request = gen_request(0, repeats=3)
    replay = Sampler(start=100)
    assert cached(replay, tmp_path).generate_until([request, request, request]) == first
    assert replay.calls == 0


def test_samples_asked_one_call_at_a_time_are_replayed_in_order(tmp_path):
    def ask(model: Sampler) -> list[str]:
        lm = cached(model, tmp_path)
        return [lm.generate_until([gen_request(0, gen_kwargs={"temperature": 0.7})])[0] for _ in range(3)]

    first = ask(Sampler())
    assert first == ["sample 1", "sample 2", "sample 3"]
    replay = Sampler(start=100)
    assert ask(replay) == first
    assert replay.calls == 0


def test_cache_stats_count_requests_hits_misses_and_writes(tmp_path):
    lm = cached(Scripted(answer=lambda r: "" if r.args[0] == "bad" else "ok"), tmp_path, batch_size=2)
    lm.generate_until([lm_req("a"), lm_req("b"), lm_req("bad")])
    lm.generate_until([lm_req("a"), lm_req("a"), lm_req("c")])
    stats = lm.cache_stats.as_dict()
    assert {k: v for k, v in stats.items() if k != "model_seconds"} == {
        "calls": 2, "requests": 6, "hits": 2, "misses": 4, "written": 3, "failures": 1,
        "bypassed": 0, "refused": 0, "model_calls": 3,
    }  # fmt: skip


def test_one_info_line_per_call(tmp_path, caplog):
    lm = cached(Scripted(), tmp_path)
    lm.generate_until([lm_req("a")])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lmms_cache"):
        lm.generate_until([lm_req("a"), lm_req("b"), lm_req("c")])
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(lines) == 1
    assert "3 requests, 1 hits, 2 misses, 2 written" in lines[0]


def test_progress_bar_only_when_asked(tmp_path, capsys):
    cached(Scripted(), tmp_path / "a", progress=False).generate_until([lm_req("a")])
    assert "misses" not in capsys.readouterr().err
    cached(Scripted(), tmp_path / "b", progress=True).generate_until([lm_req("a")])
    assert "lmms-cache generate_until misses" in capsys.readouterr().err


def test_an_lm_eval_style_request_works(tmp_path):
    lm = cached(Scripted(), tmp_path)
    assert lm.generate_until([lm_req("x", until=["\n"]), lm_req("x", until=["."])]) == ["answer to x"] * 2
    model = Scripted()
    cached(model, tmp_path).generate_until([lm_req("x", until=["."])])
    assert model.log.batches == []


def test_a_call_larger_than_a_key_chunk(tmp_path):
    """A big call is keyed and looked up in chunks: documents shared across a chunk boundary
    are still resolved once per call, duplicates still reach the model once, and the
    results come back in the order of the requests."""
    from lmms_cache.proxy import _KEY_CHUNK

    docs = _KEY_CHUNK // 2 + 3
    calls = []

    def counted(doc: dict[str, Any]) -> Any:
        calls.append(doc["question"])
        return visuals(doc)

    def requests() -> list[Instance]:
        out = [ll_request(d, f" {c}") for d in range(docs) for c in "ABCD"]
        for r in out:
            r.arguments = (r.args[0], r.args[1], counted, *r.args[3:])
        # Two duplicates first shift the documents off the chunk edges; five at the end.
        return out[-2:] + out + out[:5]

    def model() -> Scripted:
        m = Scripted(answer=lambda r: (-float(r.args[3]), r.args[1] == " A"))
        m.task_dict = task_dict(docs)  # type: ignore[attr-defined]
        return m

    first_model = model()
    expected = [(-float(r.args[3]), r.args[1] == " A") for r in requests()]
    calls.clear()
    assert cached(first_model, tmp_path).loglikelihood(requests()) == expected
    assert len(calls) == docs
    assert sum(len(b) for b in first_model.log.batches) == 4 * docs  # the duplicates were not sent
    again = cached(model(), tmp_path)
    assert again.loglikelihood(requests()) == expected
    assert again.cache_stats.hits == len(expected)


def test_an_empty_call_reaches_the_model(tmp_path):
    model = fresh()
    assert cached(model, tmp_path).generate_until([]) == []
    assert model.calls == 1


@pytest.mark.parametrize("enabled", [True, False])
def test_the_garbage_collector_is_left_as_it_was(tmp_path, enabled):
    """Keying pauses cyclic collection during a call; the process's setting survives it,
    also when the call raises."""
    import gc

    def broken(doc: dict[str, Any]) -> Any:
        raise ValueError("bad document")

    was = gc.isenabled()
    try:
        gc.enable() if enabled else gc.disable()
        lm = cached(fresh(), tmp_path)
        lm.generate_until([gen_request(i) for i in range(3)])  # misses
        lm.generate_until([gen_request(i) for i in range(3)])  # hits
        assert gc.isenabled() is enabled
        lm.generate_until([gen_request(0, doc_to_visual=broken)])  # bypasses: the model raises
    except ValueError:
        pass
    finally:
        assert gc.isenabled() is enabled
        gc.enable() if was else gc.disable()


# -- 4. never break the evaluation -----------------------------------------------------------


def test_an_unusable_location_warns_once_and_answers(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    where = blocker / "cache"
    model = fresh()
    lm = cached(model, where)
    for _ in range(3):
        assert texts(lm.generate_until([gen_request(0), gen_request(1)])) == ["answer to q0", "answer to q1"]
    assert model.calls == 3
    assert isinstance(lm.cache_store, NullStore)
    warnings = warnings_of(caplog)
    assert len(warnings) == 1 and str(where) in warnings[0]


def test_a_refusing_store_warns_once_and_saves_later(tmp_path, caplog, monkeypatch):
    lm = cached(Scripted(), tmp_path, batch_size=2)
    store = lm.cache_store

    def refuse(entries):
        raise StoreError("database or disk is full")

    monkeypatch.setattr(store, "put_many", refuse)
    for i in range(3):
        assert lm.generate_until([lm_req(f"a{i}"), lm_req(f"b{i}"), lm_req(f"c{i}")]) == [
            f"answer to {c}{i}" for c in "abc"
        ]
    warnings = warnings_of(caplog)
    assert len(warnings) == 1 and "disk is full" in warnings[0]
    assert lm.cache_stats.written == 0
    monkeypatch.undo()
    lm.generate_until([lm_req("late")])
    assert lm.cache_stats.written == 10
    model = Scripted()
    cached(model, tmp_path).generate_until(
        [lm_req(f"{c}{i}") for c in "abc" for i in range(3)] + [lm_req("late")]
    )
    assert model.log.batches == []


def test_a_failing_read_means_misses_and_one_warning(tmp_path, caplog, monkeypatch):
    lm = cached(Scripted(), tmp_path)
    lm.generate_until([lm_req("a"), lm_req("b")])

    def broken(keys, **kwargs):
        raise StoreError("disk I/O error")

    monkeypatch.setattr(lm.cache_store, "get_many", broken)
    for _ in range(2):
        assert lm.generate_until([lm_req("a"), lm_req("b")]) == ["answer to a", "answer to b"]
    assert lm.cache_stats.hits == 0
    assert len(lm.__wrapped__.log.batches) == 3
    warnings = warnings_of(caplog)
    assert len(warnings) == 1 and "disk I/O error" in warnings[0]


def test_a_corrupted_value_is_recomputed_and_overwritten(tmp_path, caplog):
    cached(Scripted(), tmp_path).generate_until([lm_req("a"), lm_req("b")])
    with sqlite3.connect(tmp_path / "cache.db") as conn:
        conn.execute("UPDATE entries SET value = ?", (b"LMC\x01garbage garbage",))
    model = Scripted()
    assert cached(model, tmp_path).generate_until([lm_req("a"), lm_req("b")]) == [
        "answer to a",
        "answer to b",
    ]
    assert model.log.batches == [["a", "b"]]
    assert len(warnings_of(caplog)) == 1
    later = Scripted()
    assert cached(later, tmp_path).generate_until([lm_req("a"), lm_req("b")]) == [
        "answer to a",
        "answer to b",
    ]
    assert later.log.batches == []


def broken_visual(doc: dict[str, Any]) -> list[Any]:
    raise ValueError(f"cannot decode {doc['question']}")


def test_a_failing_doc_to_visual_still_reaches_the_model(tmp_path):
    model = fresh()
    lm = cached(model, tmp_path)
    results = lm.generate_until([gen_request(0, doc_to_visual=broken_visual), gen_request(1)])
    assert texts(results) == ["answer to q0", "answer to q1"]
    assert lm.cache_stats.bypassed == 1
    again = fresh()
    cached(again, tmp_path).generate_until([gen_request(0, doc_to_visual=broken_visual), gen_request(1)])
    assert [args[0] for _, args in again.seen] == ["q0"]  # bypassed requests are never stored


def test_a_model_calling_the_failing_visual_meets_the_error_itself(tmp_path):
    class Loads(FakeModel):
        def generate_until(self, requests):
            for r in requests:
                task, split, doc_id = r.args[4], r.args[5], r.args[3]
                r.args[2](self.task_dict[task][split][doc_id])
            return super().generate_until(requests)

    model = Loads()
    model.task_dict = task_dict(2)
    with pytest.raises(ValueError, match="cannot decode q0"):
        cached(model, tmp_path).generate_until([gen_request(0, doc_to_visual=broken_visual)])


# -- 5. lockstep -----------------------------------------------------------------------------


def test_lockstep_pads_model_calls_to_the_agreed_count(tmp_path):
    cached(fresh(), tmp_path).generate_until([gen_request(0)])
    asked: list[int] = []

    def agree(n: int) -> int:
        asked.append(n)
        return 5

    model = fresh()
    lm = cached(model, tmp_path, batch_size=2, lockstep=agree)
    results = lm.generate_until([gen_request(i) for i in range(4)])
    assert texts(results) == [f"answer to q{i}" for i in range(4)]
    assert asked == [2]
    assert model.calls == 5
    assert entry_count(tmp_path) == 4
    assert lm.cache_stats.model_calls == 2


def test_lockstep_pads_a_call_that_is_all_hits(tmp_path):
    first = cached(fresh(), tmp_path).generate_until([gen_request(0), gen_request(1)])
    model = fresh()
    lm = cached(model, tmp_path, lockstep=lambda n: 3)
    assert lm.generate_until([gen_request(0), gen_request(1)]) == first
    assert model.calls == 3


def test_lockstep_joins_the_agreement_with_no_requests(tmp_path):
    asked: list[int] = []

    def agree(n: int) -> int:
        asked.append(n)
        return 2

    model = fresh()
    assert cached(model, tmp_path, lockstep=agree).generate_until([]) == []
    assert asked == [0]
    assert model.calls == 2


def test_lockstep_true_without_torch_distributed_is_plain(tmp_path):
    torch = pytest.importorskip("torch")
    assert not torch.distributed.is_initialized()
    model = fresh()
    lm = cached(model, tmp_path, batch_size=2, lockstep=True)
    assert texts(lm.generate_until([gen_request(i) for i in range(3)])) == [
        f"answer to q{i}" for i in range(3)
    ]
    assert model.calls == 2


def test_on_miss_error_lists_the_missing_requests_and_never_calls_the_model(tmp_path):
    from lmms_cache import CacheMissError

    model = FakeModel()
    model.task_dict = task_dict(4)
    cached(model, tmp_path).generate_until([gen_request(0), gen_request(1)])
    model = FakeModel()  # a fresh process's model: nothing asked yet
    model.task_dict = task_dict(4)
    calls = model.calls
    replay = cached(model, tmp_path, on_miss="error")
    assert [r.text for r in replay.generate_until([gen_request(0), gen_request(1)])] == ["answer to q0", "answer to q1"]
    with pytest.raises(CacheMissError) as err:
        replay.generate_until([gen_request(0), gen_request(2), gen_request(3, context="a new prompt")])
    assert model.calls == calls
    assert len(err.value.missing) == 2
    assert "t/test/2 'q2'" in str(err.value) and "t/test/3 'a new prompt'" in str(err.value)


def test_on_miss_must_be_known(tmp_path):
    with pytest.raises(ValueError, match="on_miss"):
        cached(FakeModel(), tmp_path, on_miss="skip")
