"""The model identity: everything about the model that can change its answers, nothing
about where or how it runs, never a secret; re-read at every call.

Model classes here copy the constructors and attribute layouts of lmms-eval 0.7.3's model
files (trimmed to what the identity reads). The real classes on tiny checkpoints are in
tests/test_real_models.py.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import fakes
from fakes import FakeModel, gen_request, task_dict
from lmms_cache import cached
from lmms_cache.identity import ModelIdentity, Tracker, differences, identify, identify_arguments

SECRET = "sk-SECRET-1234567890abcdef"


class Answering:
    """The request methods of a model whose answers depend on a few of its settings."""

    task_dict: dict[str, Any]

    def generate_until(self, requests: list[Any]) -> list[str]:
        self.served = getattr(self, "served", 0) + 1  # state: changes as it runs
        return [f"{self.answer_prefix()} {r.args[0]}" for r in requests]

    def answer_prefix(self) -> str:
        return "|".join(f"{k}={getattr(self, k)}" for k in ("system_prompt", "token_strategy") if hasattr(self, k))


class OneVision(Answering):
    """lmms-eval's llava_onevision constructor (trimmed)."""

    def __init__(self, pretrained: str = "lmms-lab/llava-onevision-qwen2-0.5b-ov", token_strategy: str = "single",
                 max_frames_num: int = 32, device: str = "cuda", batch_size: int = 1, device_map: str = "cuda:0",
                 system_prompt: str = "You are helpful.", api_key: str | None = None) -> None:  # fmt: skip
        self.pretrained = pretrained
        self.token_strategy = token_strategy
        self.max_frames_num = max_frames_num
        self._device = device
        self.batch_size_per_gpu = int(batch_size)
        self.device_map = device_map
        self.system_prompt = system_prompt
        self.api_key = api_key
        self._rank = 0
        self._world_size = 1
        self.task_dict = {}


class Bagel(Answering):
    """lmms-eval's bagel: a constructor argument kept inside a dict of another name."""

    def __init__(self, pretrained: str = "ByteDance-Seed/BAGEL-7B-MoT", max_think_token_n: int | None = None,
                 cfg_text_scale: float | None = None) -> None:  # fmt: skip
        self.pretrained = pretrained
        self.inference_params = {"max_think_token_n": 1000, "cfg_text_scale": 4.0}
        if max_think_token_n is not None:
            self.inference_params["max_think_token_n"] = max_think_token_n
        if cfg_text_scale is not None:
            self.inference_params["cfg_text_scale"] = cfg_text_scale
        self.task_dict = {}


class Counting(Answering):
    """State the model changes as it runs: a counter and a lazily loaded pipeline."""

    def __init__(self, pretrained: str = "org/counting", system_prompt: str = "Be brief.") -> None:
        self.pretrained = pretrained
        self.system_prompt = system_prompt
        self.request_count = 0
        self.pipeline: Any = None
        self.task_dict = {}

    def generate_until(self, requests: list[Any]) -> list[str]:
        self.request_count += len(requests)
        if self.pipeline is None:
            self.pipeline = object()
        return super().generate_until(requests)


class Templating(Answering):
    """llava_hf's first call: a tokenizer without a chat template gets one."""

    def __init__(self, pretrained: str = "llava-hf/llava-1.5-7b-hf") -> None:
        self.pretrained = pretrained
        self.tokenizer = FakeTokenizer()
        self.task_dict = {}

    def generate_until(self, requests: list[Any]) -> list[str]:
        if self.tokenizer.chat_template is None:
            self.tokenizer.chat_template = "{% for m in messages %}USER: {{ m['content'] }}{% endfor %}"
        return [f"[{self.tokenizer.chat_template[:8]}] {r.args[0]}" for r in requests]

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        if self.tokenizer.chat_template is None:
            self.tokenizer.chat_template = "{% for m in messages %}USER: {{ m['content'] }}{% endfor %}"
        return [(-1.0, True) for _ in requests]


class FakeTokenizer:
    """Has what the identity recognizes a tokenizer by (vocabulary, encode, decode)."""

    def __init__(self, vocab: dict[str, int] | None = None, name_or_path: str = "org/tok") -> None:
        self.vocab = vocab or {"a": 0, "b": 1}
        self.name_or_path = name_or_path
        self.chat_template: str | None = None
        self.padding_side = "right"

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.vocab.get(c, 0) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(str(i) for i in ids)

    def __len__(self) -> int:
        return len(self.vocab)


def request(i: int = 0, context: str | None = None) -> Any:
    return gen_request(i, context=context, doc_to_visual=None)


def with_docs(model: Any) -> Any:
    model.task_dict = task_dict(4)
    return model


# -- 1. settings are kept by exact names, never dropped by a pattern ----------------------------


@pytest.mark.parametrize(
    ("cls", "name", "a", "b"),
    [
        (OneVision, "token_strategy", "single", "multiple"),  # llava_onevision, egogpt
        (OneVision, "system_prompt", "a", "b"),
        (OneVision, "max_frames_num", 8, 32),
    ],
)
def test_a_constructor_setting_counts_whatever_words_its_name_has(cls, name, a, b):
    assert identify(cls(**{name: a})).digest != identify(cls(**{name: b})).digest


@pytest.mark.parametrize(
    "name", ["token_merge_ratio", "max_think_token_n", "reasoning_token_budget", "progressive_resize",
             "adaptive_max_frames", "log_probs", "image_token", "token_strategy"],
)  # fmt: skip
def test_names_that_look_like_secrets_or_logging_are_settings(name):
    # auroracap's token_merge_ratio, bagel_unig2u's max_think_token_n, ...: a number or a word
    assert identify(FakeModel(**{name: 1})).digest != identify(FakeModel(**{name: 2})).digest
    assert name in identify(FakeModel(**{name: 1})).json()


def test_a_setting_kept_in_a_dict_of_another_name_counts():
    # bagel.py: max_think_token_n goes into self.inference_params, cfg_text_scale too
    base = identify(Bagel()).digest
    assert identify(Bagel(max_think_token_n=64)).digest != base
    assert identify(Bagel(cfg_text_scale=1.5)).digest != base


def test_text_settings_are_keyed_as_they_are_and_only_shown_scrubbed():
    pad = "{% set image_token = '<image>' %}{{ image_token }}"
    other = "{% set image_token = '<img>' %}{{ image_token }}"
    a, b = identify(FakeModel(chat_template=pad)), identify(FakeModel(chat_template=other))
    assert a.digest != b.digest
    shown = identify(FakeModel(launch_args=f"--port 8000 --api_key={SECRET}")).json()
    assert SECRET not in shown and "--port 8000" in shown


@pytest.mark.parametrize(
    ("name", "a", "b"),
    [("rank", 0, 7), ("device", "cuda:0", "cuda:7"), ("device_map", "auto", {"": 3}), ("batch_size", 1, 32)],
)
def test_where_and_how_it_runs_never_counts(name, a, b):
    # OneVision's constructor takes and stores each of these
    kwargs = {"device": "cuda", "batch_size": 1, "device_map": "cuda:0"}
    if name in kwargs:
        assert identify(OneVision(**{name: a})).digest == identify(OneVision(**{name: b})).digest
    else:
        one, seven = OneVision(), OneVision()
        one._rank, seven._rank = a, b
        assert identify(one).digest == identify(seven).digest


@pytest.mark.parametrize(("name", "a", "b"), [("timeout", 10, 600), ("max_retries", 3, 10),
                                              ("num_concurrent", 1, 64), ("_world_size", 1, 8)])  # fmt: skip
def test_operational_names_never_count_on_any_model(name, a, b):
    assert identify(FakeModel(**{name: a})).digest == identify(FakeModel(**{name: b})).digest


@pytest.mark.parametrize("name", ["api_key", "hf_token", "access_token", "password", "_api_key", "apiKey",
                                  "client_secret", "token"])  # fmt: skip
def test_secrets_by_exact_name_reach_neither_key_nor_description(name):
    with_secret = identify(FakeModel(**{name: SECRET}))
    assert SECRET not in with_secret.json()
    assert with_secret.digest == identify(FakeModel(**{name: "sk-rotated-0987654321abcdef"})).digest
    assert with_secret.digest == identify(FakeModel()).digest


def test_a_value_that_is_a_credential_is_a_secret_whatever_its_name():
    a = identify(FakeModel(service_credential_value=SECRET))
    b = identify(FakeModel(service_credential_value="hf_" + "x" * 30))
    assert a.digest == b.digest == identify(FakeModel()).digest
    assert SECRET not in a.json()
    bearer = identify(FakeModel(header="Bearer abc.def.ghi"))
    assert "abc.def" not in bearer.json()


def test_secrets_inside_a_settings_mapping_are_left_out():
    ident = identify(FakeModel(options={"api_key": SECRET, "top_p": 0.9}))
    assert SECRET not in ident.json()
    assert ident.description["settings/options"] == {"top_p": 0.9}
    assert ident.digest == identify(FakeModel(options={"api_key": "other", "top_p": 0.9})).digest
    assert ident.digest != identify(FakeModel(options={"api_key": SECRET, "top_p": 1.0})).digest


def test_credentials_in_a_url_never_count_and_are_never_shown():
    url = f"https://user:hunter2@api.example.com:8443/v1/?api_key={SECRET}&region=eu"
    ident = identify(FakeModel(endpoint=url))
    assert "hunter2" not in ident.json() and SECRET not in ident.json()
    assert ident.description["settings/endpoint"] == "https://api.example.com:8443/v1?region=eu"


def test_the_harness_path_uses_the_same_rules(tmp_path):
    def ident(**args: Any) -> ModelIdentity:
        return identify_arguments(OneVision, "lmms-eval", "llava_onevision", args)

    base = ident(pretrained="org/m", token_strategy="single", api_key=SECRET, device="cuda:0")
    assert ident(pretrained="org/m", token_strategy="multiple").digest != base.digest
    assert ident(pretrained="org/m", token_strategy="single", api_key="sk-rotated-0987654321abcdef",
                 device="cuda:7", batch_size=8).digest == base.digest  # fmt: skip
    assert SECRET not in base.json()


# -- 2. settings changed after wrapping, state the model changes ------------------------------


def test_a_prompt_sweep_on_one_proxy_answers_each_prompt(tmp_path, caplog):
    lm = cached(with_docs(OneVision()), tmp_path)
    answers = {}
    with caplog.at_level(logging.INFO, logger="lmms_cache"):
        for prompt in ("Be brief.", "Think step by step.", "Be brief."):
            lm.system_prompt = prompt
            answers[prompt] = lm.generate_until([request(0)])[0]
    assert answers["Be brief."].startswith("system_prompt=Be brief.")
    assert answers["Think step by step."].startswith("system_prompt=Think step by step.")
    assert lm.cache_stats.misses == 2 and lm.cache_stats.hits == 1
    changed = [r.getMessage() for r in caplog.records if "changed since the last call" in r.getMessage()]
    assert len(changed) == 3  # the default, then each prompt
    assert "settings/system_prompt: 'Be brief.' → 'Think step by step.'" in changed[1]


def test_an_attribute_set_through_the_proxy_counts_even_if_the_constructor_does_not_take_it(tmp_path):
    model = with_docs(Counting())
    lm = cached(model, tmp_path)
    lm.generate_until([request(0)])
    lm.token_strategy = "multiple"  # not a constructor argument; the user set it
    assert lm.generate_until([request(0)])[0].startswith("system_prompt=Be brief.|token_strategy=multiple")
    assert lm.cache_stats.misses == 2


def test_a_dict_setting_mutated_in_place_misses(tmp_path):
    model = with_docs(Bagel())
    lm = cached(model, tmp_path)
    lm.generate_until([request(0)])
    model.inference_params["max_think_token_n"] = 8  # in place, not even through the proxy
    lm.generate_until([request(0)])
    assert lm.cache_stats.misses == 2


def test_a_secret_changed_between_calls_is_no_new_identity(tmp_path, caplog):
    lm = cached(with_docs(OneVision(api_key=SECRET)), tmp_path)
    lm.generate_until([request(0)])
    with caplog.at_level(logging.INFO, logger="lmms_cache"):
        lm.api_key = "sk-rotated-0987654321abcdef"
        lm.generate_until([request(0)])
    assert lm.cache_stats.hits == 1
    assert SECRET not in caplog.text


def test_a_change_is_logged_scrubbed(tmp_path, caplog):
    lm = cached(with_docs(OneVision(system_prompt="a")), tmp_path)
    lm.generate_until([request(0)])
    with caplog.at_level(logging.INFO, logger="lmms_cache"):
        lm.system_prompt = f"use api_key={SECRET}"
        lm.generate_until([request(0)])
    assert "settings/system_prompt: 'a' → 'use api_key=***'" in caplog.text
    assert SECRET not in caplog.text


def test_wrapping_a_model_that_already_served_requests_still_hits(tmp_path):
    cached(with_docs(Counting()), tmp_path).generate_until([request(i) for i in range(3)])
    used = with_docs(Counting())
    used.generate_until([request(9)])  # its counter moved and its pipeline loaded
    assert used.request_count == 1 and used.pipeline is not None
    lm = cached(used, tmp_path)
    lm.generate_until([request(i) for i in range(3)])
    assert lm.cache_stats.hits == 3


def test_state_changed_during_the_models_own_call_is_no_new_identity(tmp_path):
    first = cached(with_docs(Templating()), tmp_path)
    first.generate_until([request(0)])  # sets the chat template on the model's first call
    first.loglikelihood([fakes.ll_request(0, " yes")])
    rerun = cached(with_docs(Templating()), tmp_path)
    rerun.generate_until([request(0)])
    rerun.loglikelihood([fakes.ll_request(0, " yes")])
    assert rerun.cache_stats.misses == 0 and rerun.cache_stats.hits == 2
    assert rerun.tokenizer.chat_template is None  # a rerun of hits never calls the model


def test_the_user_changing_what_the_model_changed_itself_is_a_new_identity(tmp_path):
    lm = cached(with_docs(Templating()), tmp_path)
    lm.generate_until([request(0)])
    lm.tokenizer.chat_template = "{{ other }}"
    assert lm.generate_until([request(0)]) == ["[{{ other] q0"]
    assert lm.cache_stats.misses == 2


def test_the_escape_hatch_names_a_setting_stored_under_another_name():
    class Renaming(Answering):
        def __init__(self, pretrained: str = "org/r") -> None:
            self.pretrained = pretrained
            self.task_dict = {}

        def configure(self, style: str) -> None:  # a method, not the constructor, stores it
            self.decoding_style = style

    a, b = Renaming(), Renaming()
    a.configure("beam")
    b.configure("greedy")
    assert identify(a).digest == identify(b).digest  # state, by the rule
    assert identify(a, settings=["decoding_style"]).digest != identify(b, settings=["decoding_style"]).digest


# -- 3. checkpoints, tokenizers, weights, code --------------------------------------------------


def test_a_local_checkpoint_resaved_in_place_is_another_model(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"hidden_size": 32}')
    (ckpt / "model.safetensors").write_bytes(b"\0" * 100)
    before = identify(FakeModel(pretrained=str(ckpt))).digest
    assert identify(FakeModel(pretrained=str(ckpt))).digest == before
    (ckpt / "model.safetensors").write_bytes(b"\1" * 120)  # new weights, same name
    assert identify(FakeModel(pretrained=str(ckpt))).digest != before
    weights = identify(FakeModel(pretrained=str(ckpt))).digest
    (ckpt / "config.json").write_text('{"hidden_size": 64}')
    assert identify(FakeModel(pretrained=str(ckpt))).digest != weights


def test_a_system_prompt_read_from_a_file_counts_by_content(tmp_path):
    prompt = tmp_path / "system.txt"
    prompt.write_text("Be brief.")
    before = identify(OneVision(system_prompt=str(prompt))).digest
    prompt.write_text("Be verbose.")
    assert identify(OneVision(system_prompt=str(prompt))).digest != before


def test_a_tokenizer_counts_by_vocabulary_template_and_size():
    def with_tokenizer(**kw: Any) -> str:
        model = Templating()
        model.tokenizer = FakeTokenizer(**kw)
        return identify(model).digest

    base = with_tokenizer()
    assert with_tokenizer(vocab={"a": 0, "c": 1}) != base
    assert with_tokenizer(name_or_path="org/other-tok") == base  # the name alone says nothing
    model = Templating()
    model.tokenizer.chat_template = "x"
    assert identify(model).digest != base


def hf_model(name: str = "org/vlm-7b", commit: str = "abc123", **config: Any) -> Any:
    """Looks like a transformers model to the identity: a torch module with a config."""
    torch = pytest.importorskip("torch")

    class Config:
        def __init__(self) -> None:
            self._name_or_path = name
            self._commit_hash = commit
            self.image_aspect_ratio = "pad"
            self.__dict__.update(config)

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = Config()
            self.linear = torch.nn.Linear(2, 2)

    torch.manual_seed(0)
    return Tiny()


def test_a_config_field_that_changes_outputs_counts(monkeypatch):
    import lmms_cache.identity as identity_module

    monkeypatch.setattr(identity_module, "_component_kind", _kind_with_fake_configs(identity_module._component_kind))

    def ident(**config: Any) -> str:
        model = FakeModel()
        model._model = hf_model(**config)
        return identify(model).digest

    assert ident() == ident()
    assert ident(image_aspect_ratio="anyres") != ident()
    assert ident(commit="def456") != ident()
    assert ident(name="org/other") != ident()


def _kind_with_fake_configs(original: Any) -> Any:
    def kind(value: Any) -> str | None:
        if type(value).__name__ == "Config":
            return "config"
        return original(value)

    return kind


def test_weights_changed_in_memory_bypass_the_cache_with_one_warning(tmp_path, caplog):
    torch = pytest.importorskip("torch")
    model = with_docs(FakeModel())
    model._model = hf_model()
    lm = cached(model, tmp_path)
    lm.generate_until([request(0)])
    with torch.no_grad():
        model._model.linear.weight.add_(1.0)  # an optimizer step
    with caplog.at_level(logging.WARNING, logger="lmms_cache"):
        lm.generate_until([request(0)])
        lm.generate_until([request(1)])
    assert lm.cache_stats.bypassed == 2 and lm.cache_stats.hits == 0
    assert model.calls == 3  # computed every time
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "model_id" in warnings[0]
    assert lm.cache_stats.written == 1  # only the first call's response was stored


def test_rank_0_and_rank_7_share_entries_whatever_their_tensors_history(tmp_path):
    torch = pytest.importorskip("torch")
    zero, seven = with_docs(FakeModel()), with_docs(FakeModel())
    zero._model, seven._model = hf_model(), hf_model()
    with torch.no_grad():
        seven._model.linear.weight.mul_(1.0)  # moved its version counter before wrapping
    zero._rank, seven._rank = 0, 7
    cached(zero, tmp_path).generate_until([request(0)])
    lm = cached(seven, tmp_path)
    lm.generate_until([request(0)])
    assert lm.cache_stats.hits == 1


def test_the_models_code_counts_and_a_miss_names_the_file(tmp_path, monkeypatch):
    module = tmp_path / "mymodels.py"
    source = textwrap.dedent('''
        class Wrapper:
            def __init__(self, pretrained="org/w"):
                self.pretrained = pretrained
                self.task_dict = {}

            def generate_until(self, requests):
                return ["v1 " + r.args[0] for r in requests]
    ''')
    module.write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    mymodels = importlib.import_module("mymodels")
    lm = cached(with_docs(mymodels.Wrapper()), tmp_path / "cache")
    lm.generate_until([request(0)])
    module.write_text(source.replace("v1 ", "v2.0 "))  # another size: no stale bytecode
    mymodels = importlib.reload(mymodels)
    lm = cached(with_docs(mymodels.Wrapper()), tmp_path / "cache")
    assert lm.cache_explain("generate_until", [request(0)]) == ["miss: model code changed: mymodels.py"]
    assert lm.generate_until([request(0)]) == ["v2.0 q0"]


def test_a_class_in_a_script_counts_by_its_own_source(tmp_path):
    script = tmp_path / "script.py"
    body = textwrap.dedent('''
        import sys
        from lmms_cache.identity import identify
        class Local:
            def __init__(self):
                self.pretrained = "org/local"
            def generate_until(self, requests):
                return ["x"]
        print(identify(Local()).digest)
    ''')
    script.write_text(body)

    def run() -> str:
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1]

    first = run()
    script.write_text("# an edit elsewhere in the script\n" + body)
    assert run() == first
    script.write_text(body.replace('["x"]', '["y"]'))
    assert run() != first


# -- 4. model_id --------------------------------------------------------------------------------


def test_model_id_names_the_model_and_settings_still_count():
    a = identify(FakeModel("org/a"), "my-model")
    assert a.label == "my-model"
    assert identify(FakeModel("org/b"), "my-model").digest == a.digest  # naming settings replaced
    assert identify(FakeModel("org/a", temperature=1), "my-model").digest != a.digest
    assert identify(FakeModel("org/a"), "other").digest != a.digest
    assert identify(FakeModel("org/a")).digest != a.digest


def test_a_prompt_sweep_with_a_model_id_misses_as_it_should(tmp_path):
    lm = cached(with_docs(OneVision()), tmp_path, model_id="onevision-ov-7b")
    for prompt in ("a", "b"):
        lm.system_prompt = prompt
        lm.generate_until([request(0)])
    assert lm.cache_stats.misses == 2


@pytest.mark.parametrize("bad", ["", 3])
def test_a_bad_model_id_is_refused_before_the_disk_is_touched(tmp_path, bad):
    with pytest.raises(ValueError, match="model_id"):
        cached(FakeModel(), tmp_path / "cache", model_id=bad)
    assert not (tmp_path / "cache").exists()


def test_two_proxies_with_one_model_id_share_entries(tmp_path):
    first = with_docs(FakeModel("org/a"))
    cached(first, tmp_path, model_id="shared").generate_until([gen_request(0)])
    second = with_docs(FakeModel("org/b"))
    cached(second, tmp_path, model_id="shared").generate_until([gen_request(0)])
    assert second.calls == 0


# -- stability, labels, descriptions -----------------------------------------------------------


def test_same_class_and_settings_give_the_same_digest():
    one = identify(FakeModel("org/m", temperature=0.2, max_new_tokens=64))
    two = identify(FakeModel("org/m", max_new_tokens=64, temperature=0.2))
    assert one == two
    assert len(one.digest) == 32 and int(one.digest, 16) >= 0


def test_the_digest_is_the_same_in_another_process():
    module = FakeModel.__module__
    root = Path(fakes.__file__).resolve().parents[module.count(".")]
    code = (
        f"import sys; sys.path.insert(0, {str(root)!r})\n"
        f"from {module} import FakeModel\n"
        "from lmms_cache.identity import identify\n"
        "print(identify(FakeModel('org/m', temperature=0.2)).digest)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONHASHSEED": "123"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == identify(FakeModel("org/m", temperature=0.2)).digest


def test_an_api_client_contributes_its_base_url():
    class Hosted(Answering):
        def __init__(self, base_url: str = "https://api.example.com/v1/", model_version: str = "gpt-x") -> None:
            self.model_version = model_version
            self.client = SimpleNamespace(base_url=base_url, api_key=SECRET)

    ident = identify(Hosted())
    assert ident.description["client/client"] == "https://api.example.com/v1"
    assert SECRET not in ident.json()
    assert identify(Hosted("https://other.example.com/v1")).digest != ident.digest
    assert identify(Hosted("https://key:pw@api.example.com/v1")).digest == ident.digest


def test_an_attribute_that_raises_on_access_is_ignored():
    class Lazy:
        @property
        def config(self) -> Any:
            raise RuntimeError("not loaded yet")

    def model() -> FakeModel:
        m = FakeModel()
        m.engine_handle = Lazy()  # a half-built component: its config raises
        return m

    assert identify(model()).digest == identify(model()).digest


def test_a_model_with_nothing_naming_it_warns(caplog):
    class Anonymous(Answering):
        def __init__(self) -> None:
            self.temperature = 0.0

    with caplog.at_level(logging.WARNING, logger="lmms_cache"):
        identify(Anonymous())
        identify(Anonymous(), "given")
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 1
    assert "Anonymous" in messages[0] and "model_id" in messages[0]


def test_label_names_the_model():
    assert identify(FakeModel("org/m")).label == "FakeModel(org/m)"
    assert identify(FakeModel("org/m"), "my-model").label == "my-model"


def test_differences_name_what_changed():
    old = identify(OneVision(system_prompt="a")).description
    new = identify(OneVision(system_prompt="b", token_strategy="multiple")).description
    assert differences(old, new) == ["settings/system_prompt: 'a' → 'b'",
                                     "settings/token_strategy: 'single' → 'multiple'"]  # fmt: skip


def test_refresh_before_any_change_reports_nothing():
    tracker = Tracker(OneVision())
    assert tracker.refresh() == []
    tracker.settle()
    assert tracker.refresh() == []


def test_identity_is_a_frozen_value():
    ident = identify(FakeModel())
    assert isinstance(ident, ModelIdentity)
    with pytest.raises(AttributeError):
        ident.digest = "0" * 32  # type: ignore[misc]


def test_an_unknown_object_setting_counts_by_its_class_and_scalar_options_not_its_inner_state():
    class Engine:
        """What a serving wrapper might keep as a constructor argument: options, and state."""

        def __init__(self, quantization: str) -> None:
            self.quantization = quantization
            self.workers = [SimpleNamespace(pid=os.getpid() + 1, started=12345.6)]  # per process

    class Served(Answering):
        def __init__(self, engine: Engine, pretrained: str = "org/served") -> None:
            self.engine = engine
            self.pretrained = pretrained

    a = identify(Served(Engine("awq")))
    other_process = Engine("awq")
    other_process.workers[0].pid += 7
    assert identify(Served(other_process)).digest == a.digest
    assert identify(Served(Engine("gptq"))).digest != a.digest
