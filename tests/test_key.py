"""Request keys: what the model is asked decides the key, never where the request came from."""

from __future__ import annotations

import copy
import functools
import io
import logging
import random
from typing import Any

import numpy as np
import pytest
from lmms_eval.api.instance import Instance
from PIL import Image

from fakes import FakeModel, gen_request, image, ll_request, task_dict, visuals
from lmms_cache.fingerprint import Encoder
from lmms_cache.identity import identify
from lmms_cache.key import KeyBuilder, is_sampling

# -- helpers ------------------------------------------------------------------------------


def model_with_docs(n: int = 4) -> FakeModel:
    model = FakeModel()
    model.task_dict = task_dict(n)
    return model


def builder(model: Any = None, model_id: str = "key-tests", warnings: list | None = None, **kw: Any) -> KeyBuilder:
    model = model_with_docs() if model is None else model
    warn = None if warnings is None else (lambda kind, message: warnings.append((kind, message)))
    return KeyBuilder(identify(model, model_id=model_id), model, Encoder(), warn=warn, **kw)


def key_of(kb: KeyBuilder, method: str, request: Any) -> bytes | None:
    return kb.keys(method, [request])[0].key


def instance(request_type: str, args: tuple, doc_id: int = 0, task: str = "t", split: str = "test",
             repeats: int = 1) -> Instance:  # fmt: skip
    return Instance(request_type=request_type, arguments=args, idx=0,
                    metadata={"task": task, "doc_id": doc_id, "repeats": repeats, "split": split})  # fmt: skip


def messages(doc: dict) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "url": doc["image"]},
                                         {"type": "text", "text": doc["question"]}]}]  # fmt: skip


def chat_request(doc_id: int, gen: dict | None = None, context: str = "ctx", task: str = "t") -> Instance:
    gen = {"max_new_tokens": 16} if gen is None else gen
    return instance("generate_until", (context, messages, gen, doc_id, task, "test"), doc_id=doc_id, task=task)


def doc_to_text(doc, round_idx=0, lmms_eval_specific_kwargs=None):
    return f"{doc['question']} (round {round_idx})"


def multi_round_request(doc_id: int, step: Any = None) -> Instance:
    step = functools.partial(doc_to_text, lmms_eval_specific_kwargs={"pre": ""}) if step is None else step
    args = ("ctx", {"max_new_tokens": 8}, visuals, step, doc_id, "t", "test")
    return instance("generate_until_multi_round", args, doc_id=doc_id)


def target(doc: dict) -> str:
    return " " + doc["question"]


def recolor(model: FakeModel, doc_id: int, color=(1, 2, 3)) -> None:
    model.task_dict["t"]["test"][doc_id]["image"] = image(color)


# -- request layouts ----------------------------------------------------------------------


def test_simple_request_is_keyed_by_content():
    kb = builder()
    k = key_of(kb, "generate_until", gen_request(0))
    assert isinstance(k, bytes) and len(k) == 16
    assert key_of(kb, "generate_until", gen_request(0)) == k
    assert key_of(kb, "generate_until", gen_request(0, context="other")) != k


def test_chat_request_keys_the_messages_content():
    model = model_with_docs()
    kb = builder(model)
    k = key_of(kb, "generate_until", chat_request(0))
    assert key_of(kb, "generate_until", chat_request(0)) == k
    assert key_of(kb, "generate_until", chat_request(0, gen={"max_new_tokens": 17})) != k
    recolor(model, 0)
    assert key_of(kb, "generate_until", chat_request(0)) != k


def test_chat_message_text_is_the_question():
    model = model_with_docs()
    kb = builder(model)
    k = key_of(kb, "generate_until", chat_request(0))
    model.task_dict["t"]["test"][0]["question"] = "another question"
    assert key_of(kb, "generate_until", chat_request(0)) != k


def test_multi_round_request_keys_document_and_step():
    model = model_with_docs()
    kb = builder(model)
    method = "generate_until_multi_round"
    k = key_of(kb, method, multi_round_request(0))
    assert key_of(kb, method, multi_round_request(0)) == k
    other_step = functools.partial(doc_to_text, lmms_eval_specific_kwargs={"pre": "Q: "})
    assert key_of(kb, method, multi_round_request(0, step=other_step)) != k
    # the step function reads the whole document: a field no visual shows still counts
    model.task_dict["t"]["test"][0]["question"] = "changed"
    assert key_of(kb, method, multi_round_request(0)) != k


def test_chat_layout_multi_round_keys_the_document_content():
    model = model_with_docs()
    kb = builder(model)
    method = "generate_until_multi_round"
    first = key_of(kb, method, chat_request(0))
    assert key_of(kb, method, chat_request(0)) == first
    recolor(model, 0)
    assert key_of(kb, method, chat_request(0)) != first


def test_loglikelihood_with_target_callable():
    model = model_with_docs()
    kb = builder(model)

    def request(doc_id, fn=target):
        return instance("loglikelihood", ("q", fn, visuals, doc_id, "t", "test"), doc_id=doc_id)

    k = key_of(kb, "loglikelihood", request(0))
    assert key_of(kb, "loglikelihood", request(0)) == k
    model.task_dict["t"]["test"][0]["question"] = "another answer"
    assert key_of(kb, "loglikelihood", request(0)) != k


def test_loglikelihood_with_string_continuation():
    kb = builder()
    k = key_of(kb, "loglikelihood", ll_request(0, " A"))
    assert key_of(kb, "loglikelihood", ll_request(0, " A")) == k
    assert key_of(kb, "loglikelihood", ll_request(0, " B")) != k


def test_lm_eval_tuples():
    kb = builder()
    gen = {"until": ["\n"], "do_sample": False}
    k_gen = key_of(kb, "generate_until", ("hi", gen))
    assert key_of(kb, "generate_until", ("hi", dict(gen))) == k_gen
    assert key_of(kb, "generate_until", ("hi", {**gen, "until": ["."]})) != k_gen
    k_ll = key_of(kb, "loglikelihood", ("hi", " there"))
    assert key_of(kb, "loglikelihood", ("hi", " where")) != k_ll
    k_roll = key_of(kb, "loglikelihood_rolling", ("some text",))
    assert key_of(kb, "loglikelihood_rolling", ("other text",)) != k_roll
    # acc_mutual_info's unconditional requests
    assert key_of(kb, "loglikelihood", ("", " A")) != key_of(kb, "loglikelihood", ("", " B"))


def test_lm_eval_multimodal_tuple_keys_pixels():
    kb = builder()
    gen = {"until": ["\n"]}
    k = key_of(kb, "generate_until", ("describe", gen, {"visual": [image((9, 9, 9))]}))
    assert key_of(kb, "generate_until", ("describe", gen, {"visual": [image((9, 9, 9))]})) == k
    assert key_of(kb, "generate_until", ("describe", gen, {"visual": [image((9, 9, 8))]})) != k
    assert key_of(kb, "generate_until", ("describe", gen, {"visual": []})) != k


def test_lm_eval_visual_files_hashed_by_content(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    buf = io.BytesIO()
    image((5, 6, 7)).save(buf, format="PNG")
    a.write_bytes(buf.getvalue())
    b.write_bytes(buf.getvalue())
    kb = builder()
    gen = {"until": ["\n"]}
    assert key_of(kb, "generate_until", ("d", gen, {"visual": [str(a)]})) == key_of(
        kb, "generate_until", ("d", gen, {"visual": [str(b)]})
    )


# -- gen_kwargs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"system_prompt": "You are terse."},
        {"image_aspect_ratio": "pad"},
        {"max_new_tokens": 17},
        {"until": ["\n\n"]},
        {"temperature": 0, "num_beams": 2},
    ],
)
def test_every_gen_kwargs_entry_counts(change):
    kb = builder()
    base = {"max_new_tokens": 16, "temperature": 0}
    assert key_of(kb, "generate_until", gen_request(0, gen_kwargs=base)) != key_of(
        kb, "generate_until", gen_request(0, gen_kwargs={**base, **change})
    )


def test_equal_settings_in_another_spelling_share_a_key():
    kb = builder()
    a = gen_request(0, gen_kwargs={"temperature": 0, "max_new_tokens": 16})
    b = gen_request(0, gen_kwargs={"max_new_tokens": 16, "temperature": 0.0})
    assert key_of(kb, "generate_until", a) == key_of(kb, "generate_until", b)


def test_key_is_computed_before_the_model_mutates_gen_kwargs():
    model = model_with_docs()
    kb = builder(model)
    gen = {"temperature": 0}
    request = gen_request(0, gen_kwargs=gen)
    stored = kb.keys("generate_until", [request])[0]
    before = stored.key
    model.generate_until([request])  # the model adds max_new_tokens to the caller's dict
    assert gen == {"temperature": 0, "max_new_tokens": 128}
    assert stored.key == before
    assert key_of(kb, "generate_until", request) != before
    del gen["max_new_tokens"]
    assert key_of(kb, "generate_until", request) == before


# -- the document address -----------------------------------------------------------------


def test_identical_documents_at_other_addresses_never_share_a_key():
    # videochat2 appends "Best Option:(" for mvbench tasks: a model can branch on the task
    # name, the split or the doc id, so each is part of the key (issue 10)
    model = model_with_docs()
    model.task_dict["t"]["test"][3] = copy.deepcopy(model.task_dict["t"]["test"][0])
    model.task_dict["other_task"] = {"test": [copy.deepcopy(model.task_dict["t"]["test"][0])],
                                     "val": [copy.deepcopy(model.task_dict["t"]["test"][0])]}  # fmt: skip
    kb = builder(model)
    k = key_of(kb, "generate_until", gen_request(0))
    assert key_of(kb, "generate_until", gen_request(0)) == k
    assert key_of(kb, "generate_until", gen_request(3, context="q0")) != k
    assert key_of(kb, "generate_until", gen_request(0, task="other_task")) != k
    assert key_of(kb, "generate_until", gen_request(0, task="other_task", split="val")) != \
        key_of(kb, "generate_until", gen_request(0, task="other_task"))  # fmt: skip


def test_a_document_field_no_argument_carries_counts():
    # lmms-eval's DiffusersWMBase reads doc["seed"] and doc["sample_index"] itself
    model = model_with_docs()
    for i, doc in enumerate(model.task_dict["t"]["test"]):
        doc["seed"] = 1000 + i
    kb = builder(model)
    k = key_of(kb, "generate_until", gen_request(0))
    model.task_dict["t"]["test"][0]["seed"] = 7
    assert key_of(kb, "generate_until", gen_request(0)) != k


def test_changed_image_in_document_changes_the_key():
    model = model_with_docs()
    kb = builder(model)
    k = key_of(kb, "generate_until", gen_request(2))
    recolor(model, 2)
    assert key_of(kb, "generate_until", gen_request(2)) != k


def test_without_task_dict_the_address_joins_the_key_and_one_warning():
    warnings: list = []
    kb = builder(FakeModel(), warnings=warnings)
    requests = [gen_request(i, context="same") for i in range(3)]
    keys = [rk.key for rk in kb.keys("generate_until", requests)]
    keys += [rk.key for rk in kb.keys("generate_until", [gen_request(0, context="same")])]
    assert None not in keys
    assert len(set(keys[:3])) == 3
    assert keys[3] == keys[0]
    assert [kind for kind, _ in warnings] == ["no-document"]


def test_without_task_dict_the_default_warning_is_logged_once(caplog):
    kb = builder(FakeModel())
    with caplog.at_level(logging.WARNING, logger="lmms_cache"):
        kb.keys("generate_until", [gen_request(i) for i in range(4)])
        kb.keys("generate_until", [gen_request(9)])
    assert len([r for r in caplog.records if "task_dict" in r.getMessage()]) == 1


# -- callables on the document ------------------------------------------------------------


def test_doc_to_visual_that_raises_bypasses():
    def broken(doc):
        raise KeyError("image")

    warnings: list = []
    kb = builder(warnings=warnings)
    rk = kb.keys("generate_until", [gen_request(0, doc_to_visual=broken), gen_request(1)])
    assert rk[0].key is None and "KeyError" in rk[0].bypass_reason
    assert rk[1].key is not None
    assert [kind for kind, _ in warnings] == ["resolve-failed"]


def test_unreadable_image_bypasses_instead_of_failing_the_call(monkeypatch):
    from PIL import ImageFile

    # lmms-eval sets this globally on import; a truncated image then decodes padded, and is
    # keyed as the model would see it. Here: the strict default, where decoding raises.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    buf = io.BytesIO()
    image((1, 2, 3), size=(64, 64)).save(buf, format="PNG")
    truncated = buf.getvalue()[:60]

    def lazy_visual(doc):
        return [Image.open(io.BytesIO(truncated))]  # decodes only when read

    kb = builder(warnings=[])
    rk = kb.keys("generate_until", [gen_request(0, doc_to_visual=lazy_visual), gen_request(1)])
    assert rk[0].key is None
    assert rk[1].key is not None


def test_unfingerprintable_setting_bypasses_with_a_warning():
    class Opaque:
        pass

    warnings: list = []
    kb = builder(warnings=warnings)
    rk = kb.keys("generate_until", [gen_request(0, gen_kwargs={"stopper": Opaque()})])
    assert rk[0].key is None
    assert [kind for kind, _ in warnings] == ["unfingerprintable"]


def test_callable_resolved_once_per_document_per_call():
    calls = []

    def counted(doc):
        calls.append(doc["question"])
        return [doc["image"]]

    kb = builder()

    def request(choice):
        return instance("loglikelihood", ("q0", f" {choice}", counted, 0, "t", "test"))

    kb.keys("loglikelihood", [request(c) for c in "ABCD"])
    assert calls == ["q0"]
    kb.keys("loglikelihood", [request(c) for c in "ABCD"])
    assert calls == ["q0", "q0"]  # nothing kept across calls


def test_bound_method_resolved_once_per_document_per_call():
    """lmms-eval puts ``task.doc_to_visual`` in each Instance: a new bound method each time."""

    class Task:
        def __init__(self):
            self.calls = 0

        def doc_to_visual(self, doc):
            self.calls += 1
            return [doc["image"]]

    task = Task()
    requests = [instance("loglikelihood", ("q0", f" {c}", task.doc_to_visual, 0, "t", "test")) for c in "ABCD"]
    assert requests[0].args[2] is not requests[1].args[2]
    builder().keys("loglikelihood", requests)
    assert task.calls == 1


def test_random_state_unchanged_by_keying():
    torch = pytest.importorskip("torch")

    def noisy(doc):
        random.random()
        np.random.rand(3)
        torch.rand(3)
        return [doc["image"]]

    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    builder().keys("generate_until", [gen_request(i, doc_to_visual=noisy) for i in range(3)])
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]
    assert torch.equal(torch.get_rng_state(), torch_state)


# -- sampling -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gen", "repeats"),
    [({"do_sample": True}, 1), ({"temperature": 0.7}, 1), ({"n": 2}, 1), ({"temperature": 0}, 2)],
)
def test_sampled_occurrences_get_distinct_keys_and_replay(gen, repeats):
    def run(kb):
        first = kb.keys("generate_until", [gen_request(0, gen_kwargs=dict(gen), repeats=repeats),
                                           gen_request(0, gen_kwargs=dict(gen), repeats=repeats)])  # fmt: skip
        second = kb.keys("generate_until", [gen_request(0, gen_kwargs=dict(gen), repeats=repeats)])
        return [rk.key for rk in first + second]

    keys = run(builder())
    assert None not in keys and len(set(keys)) == 3
    assert run(builder()) == keys  # a rerun asks for the same samples in the same order


def test_is_sampling_rules():
    assert not is_sampling(None, 1)
    assert not is_sampling({"temperature": 0, "do_sample": False, "n": 1}, 1)
    assert is_sampling({"do_sample": True}, 1)
    assert is_sampling({"best_of": 3}, 1)
    assert is_sampling({}, 3)
    assert not is_sampling({"temperature": True}, 1)  # a bool is not a temperature


def test_deterministic_duplicates_share_a_key():
    kb = builder()
    keys = kb.keys("generate_until", [gen_request(0), gen_request(0)])
    assert keys[0].key == keys[1].key == key_of(kb, "generate_until", gen_request(0))


def test_sampling_override():
    forced_on = builder(sampling=True)
    keys = forced_on.keys("generate_until", [gen_request(0), gen_request(0)])
    assert keys[0].key != keys[1].key
    forced_off = builder(sampling=False)
    sampled = {"do_sample": True, "temperature": 0.9}
    keys = forced_off.keys("generate_until", [gen_request(0, gen_kwargs=sampled), gen_request(0, gen_kwargs=sampled)])
    assert keys[0].key == keys[1].key


def test_same_instance_listed_repeats_times():
    def run(kb):
        request = gen_request(0, repeats=3)
        return [rk.key for rk in kb.keys("generate_until", [request, request, request])]

    keys = run(builder())
    assert None not in keys and len(set(keys)) == 3
    assert run(builder()) == keys


# -- model and method ---------------------------------------------------------------------


def test_model_identity_is_in_the_key():
    model = model_with_docs()
    a = key_of(builder(model, model_id="model-a"), "generate_until", gen_request(0))
    b = key_of(builder(model, model_id="model-b"), "generate_until", gen_request(0))
    assert a != b
    derived_1 = KeyBuilder(identify(FakeModel("org/one")), model, Encoder())
    derived_2 = KeyBuilder(identify(FakeModel("org/two")), model, Encoder())
    assert key_of(derived_1, "generate_until", gen_request(0)) != key_of(derived_2, "generate_until", gen_request(0))


def test_method_is_in_the_key():
    kb = builder()
    assert key_of(kb, "loglikelihood", ("hi", " x")) != key_of(kb, "generate_until", ("hi", " x"))
    assert key_of(kb, "loglikelihood_rolling", ("hi",)) != key_of(kb, "loglikelihood", ("hi",))


def test_request_without_args_is_a_type_error():
    with pytest.raises(TypeError, match="generate_until"):
        builder().keys("generate_until", [object()])


def test_text_task_doc_to_visual_is_resolved_without_reading_the_document():
    """lmms-eval's own ConfigurableTask.doc_to_visual of a text-only task returns its
    configured None without touching the row; reading rows of a dataset is the costliest
    part of a text hit, so the key builder does not read them either."""
    task_module = pytest.importorskip("lmms_eval.api.task")
    from types import SimpleNamespace

    def task(doc_to_visual: Any, cls: type = task_module.ConfigurableTask) -> Any:
        t = cls.__new__(cls)
        t._config = SimpleNamespace(doc_to_visual=doc_to_visual)  # what the config property returns
        t.features = ["image"]
        t.lmms_eval_specific_kwargs = None
        return t

    class Rows(list):
        reads = 0

        def __getitem__(self, i):
            Rows.reads += 1
            return super().__getitem__(i)

    datasets = pytest.importorskip("datasets")
    rows = datasets.Dataset.from_dict({"image": [image((i, 0, 0)) for i in range(3)], "q": ["a", "b", "c"]})
    rows = rows.cast_column("image", datasets.Image())
    decoded = []
    original = datasets.Image.decode_example

    def counting(self, value, token_per_repo_id=None):
        decoded.append(1)
        return original(self, value, token_per_repo_id=token_per_repo_id)

    model = SimpleNamespace(task_dict={"t": {"test": rows}})
    kb = KeyBuilder(identify(None, model_id="m"), model, Encoder())
    text = task(None)
    datasets.Image.decode_example = counting
    try:
        keys = kb.keys("generate_until", [gen_request(i, context="same", doc_to_visual=text.doc_to_visual)
                                          for i in range(3)])  # fmt: skip
        assert decoded == []  # the whole document is in the key: by its stored bytes
        assert len({k.key for k in keys}) == 3
        with_column = task("image")
        kb.keys("generate_until", [gen_request(i, doc_to_visual=with_column.doc_to_visual) for i in range(3)])
        assert len(decoded) == 3  # the media the model sees: decoded once each, for keying

        class Overriding(task_module.ConfigurableTask):
            def doc_to_visual(self, doc):
                return [doc["image"]]

        decoded.clear()
        kb.keys("generate_until", [gen_request(0, doc_to_visual=task(None, Overriding).doc_to_visual)])
        assert len(decoded) == 1
    finally:
        datasets.Image.decode_example = original


@pytest.mark.parametrize(("a", "b"), [({"do_sample": 1}, {"do_sample": True}), ({"top_k": 1.5}, {"top_k": "1.5"}),
                                      ({"stop": [1, 2]}, {"stop": [True, 2]}), ({"n": 0}, {"n": False})])  # fmt: skip
def test_consecutive_settings_that_are_equal_in_python_but_not_in_type_never_share_a_key(a, b):
    # lmms-eval deep-copies one task's settings into each request, and the key builder reuses
    # the previous request's encoding for an equal dict: True == 1, but not as a setting
    kb = builder(model_with_docs())
    first, second = kb.keys("generate_until", [gen_request(0, gen_kwargs=a), gen_request(0, gen_kwargs=b)])
    assert first.key != second.key
    alone = builder(model_with_docs()).keys("generate_until", [gen_request(0, gen_kwargs=b)])[0]
    assert second.key == alone.key


def _text_task_visual() -> Any:
    """The bound doc_to_visual of a real lmms-eval text-only task (no __init__: no dataset)."""
    task_module = pytest.importorskip("lmms_eval.api.task")
    from types import SimpleNamespace

    t = task_module.ConfigurableTask.__new__(task_module.ConfigurableTask)
    t._config = SimpleNamespace(doc_to_visual=None)
    t.features = ["image"]
    t.lmms_eval_specific_kwargs = None
    return t.doc_to_visual


def _broken_visual(doc: dict) -> list:
    raise KeyError("image_2")


def _random_visual(doc: dict) -> list:
    random.random()
    return [doc["image"]]


def _mixed_requests(text_visual: Any) -> list[tuple[str, Any]]:
    greedy = {"max_new_tokens": 16, "temperature": 0, "until": ["\n\n"]}
    odd_meta = gen_request(1, context="q", gen_kwargs=dict(greedy), doc_to_visual=None)
    odd_meta.metadata = ("t", 1, 1)  # lm-eval's metadata shape
    odd_idx = gen_request(2)
    odd_idx.idx = "0"
    return [
        ("generate_until", gen_request(0, doc_to_visual=text_visual)),
        ("generate_until", gen_request(1, doc_to_visual=text_visual, gen_kwargs=dict(greedy))),
        ("generate_until", gen_request(1, doc_to_visual=text_visual, gen_kwargs={**greedy, "until": "\n\n"})),
        ("generate_until", gen_request(0, doc_to_visual=None, context="\ud800 surrogate")),
        ("generate_until", gen_request(2)),  # reads the document: its image is keyed by content
        ("generate_until", gen_request(2)),  # the same address again: memoized for the call
        ("generate_until", gen_request(3, gen_kwargs={"do_sample": True, "temperature": 0.7})),
        ("generate_until", gen_request(3, gen_kwargs={"do_sample": True, "temperature": 0.7})),  # 2nd sample
        ("generate_until", gen_request(0, repeats=3, doc_to_visual=text_visual)),
        ("generate_until", gen_request(0, gen_kwargs={"max_new_tokens": 4, "stop": [1, True]})),
        ("generate_until", gen_request(1, task="other", split="val")),  # no such document
        ("generate_until", odd_meta),
        ("generate_until", odd_idx),
        ("generate_until", chat_request(1)),
        ("generate_until", gen_request(1, doc_to_visual=_broken_visual)),  # bypasses the cache
        ("generate_until", gen_request(2, doc_to_visual=_random_visual)),  # bypasses the cache
        ("loglikelihood", ll_request(0, " A")),
        ("loglikelihood", ll_request(0, " B")),
        ("loglikelihood", instance("loglikelihood", ("q0", " A", text_visual, 0, "t", "test"))),
        ("loglikelihood", instance("loglikelihood", ("q0", " A", None, 0, "t", "test"), repeats=2)),
        ("loglikelihood", instance("loglikelihood", ("q0", target, visuals, 0, "t", "test"))),
    ]


def test_keys_without_views_are_the_keys_with_views():
    """The proxy keys lmms-eval's common layouts without building their views (a hit needs
    none): the bytes, their components and the sampled occurrences must be the very same."""
    requests = _mixed_requests(_text_task_visual())
    for method in ("generate_until", "loglikelihood"):
        batch = [r for m, r in requests if m == method]
        lean_kb, full_kb = builder(model_with_docs()), builder(model_with_docs())
        for _ in range(2):  # the second call: sampled requests are their next occurrences
            call = lean_kb.new_call()
            lean = lean_kb.keys(method, batch[:5], call=call, views=False)
            lean += lean_kb.keys(method, batch[5:], call=call, views=False)  # one call, keyed in chunks
            lean_kb.end_call()
            full = full_kb.keys(method, batch)
            assert [rk.key for rk in lean] == [rk.key for rk in full]
            assert len({rk.key for rk in full}) >= len(batch) - 3
            assert [rk.bypass_reason for rk in lean] == [rk.bypass_reason for rk in full]
            assert sum(rk.key is None for rk in full) == (2 if method == "generate_until" else 0)
            for rk, want, request in zip(lean, full, batch, strict=True):
                assert bytes(rk.material) == bytes(want.material)
                assert rk.ends == want.ends
                assert rk.occurrence == want.occurrence
                completed = lean_kb.with_view(method, request, rk)
                assert completed.view is not None
                assert completed.components() == want.components()


def test_keys_without_views_follow_a_document_edited_between_calls():
    model = model_with_docs()
    kb = builder(model)
    before = kb.keys("generate_until", [gen_request(1, doc_to_visual=None)], views=False)[0].key
    model.task_dict["t"]["test"][1]["question"] = "edited"
    after = kb.keys("generate_until", [gen_request(1, doc_to_visual=None)], views=False)[0].key
    assert before != after
