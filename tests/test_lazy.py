"""Models constructed on their first miss."""

from __future__ import annotations

from typing import Any

import pytest

from fakes import gen_request, task_dict
from lmms_cache import cached
from lmms_cache.lazy import is_constructed, lazy_model, tokenizer_without_weights


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


# -- what a model never built reports (lm-eval's get_model_info) ------------------------------


def write_safetensors(path: Any, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A safetensors file with these (dtype, shape) tensors, all zeros."""
    import json
    import math
    import struct

    width = {"F32": 4, "BF16": 2, "F16": 2, "I64": 8}
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = math.prod(shape) * width[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


class InfoModel(Base):
    """An lm-eval-like model with get_model_info (HFLM's shape)."""

    def __init__(self, pretrained: str = "", **kwargs: Any) -> None:
        super().__init__()
        raise AssertionError("never built in these tests")

    def get_model_info(self) -> dict[str, Any]:
        return {"built": True}

    def generate_until(self, requests: list[Any]) -> list[str]:
        return []


def test_model_info_of_an_unbuilt_model_comes_from_the_checkpoint_files(tmp_path):
    import json

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    write_safetensors(ckpt / "model-00001-of-00002.safetensors", {"a.weight": ("BF16", [4, 8]), "a.bias": ("BF16", [4])})
    write_safetensors(ckpt / "model-00002-of-00002.safetensors", {"b.weight": ("BF16", [3, 5, 2])})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a.weight": "model-00001-of-00002.safetensors", "a.bias": "model-00001-of-00002.safetensors",
        "b.weight": "model-00002-of-00002.safetensors"}}))  # fmt: skip
    m = lazy_model(InfoModel, {"pretrained": str(ckpt)})
    assert m.get_model_info() == {"model_num_parameters": 32 + 4 + 30, "model_dtype": "torch.bfloat16",
                                  "model_revision": "main", "model_sha": ""}  # fmt: skip
    assert not is_constructed(m)
    explicit = lazy_model(InfoModel, {"pretrained": str(ckpt), "dtype": "float16", "revision": "v2"})
    assert explicit.get_model_info()["model_dtype"] == "torch.float16"
    assert explicit.get_model_info()["model_revision"] == "v2"


def test_model_info_without_config_dtype_takes_the_first_float_tensor_and_without_files_says_unknown(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    write_safetensors(ckpt / "model.safetensors", {"ids": ("I64", [3]), "w": ("F16", [2, 2])})
    info = lazy_model(InfoModel, {"pretrained": str(ckpt)}).get_model_info()
    assert info["model_dtype"] == "torch.float16" and info["model_num_parameters"] == 7
    empty = tmp_path / "empty"
    empty.mkdir()
    assert lazy_model(InfoModel, {"pretrained": str(empty)}).get_model_info() == {
        "model_num_parameters": -1, "model_dtype": "", "model_revision": "main", "model_sha": ""}  # fmt: skip
    assert lazy_model(InfoModel, {"model": "gpt-4o"}).get_model_info() == {}


def test_model_info_of_a_hub_name_reads_the_local_hub_cache(tmp_path, monkeypatch):
    import json

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"dtype": "float32"}))
    write_safetensors(snapshot / "model.safetensors", {"w": ("F32", [10, 10])})
    info = lazy_model(InfoModel, {"pretrained": "org/tiny", "peft": "org/adapter"}).get_model_info()
    assert info == {"model_num_parameters": 100, "model_dtype": "torch.float32", "model_revision": "main",
                    "model_sha": commit, "peft_sha": ""}  # fmt: skip


@pytest.mark.slow
def test_model_info_matches_what_lm_eval_hflm_reports_once_built(tmp_path, monkeypatch):
    """A tiny GPT-2 saved locally: HFLM built reports the same get_model_info as the
    placeholder that never loaded it."""
    pytest.importorskip("lm_eval")
    transformers = pytest.importorskip("transformers")
    from lm_eval.models.huggingface import HFLM
    from tokenizers import Tokenizer, models, pre_tokenizers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ckpt = tmp_path / "tiny-gpt2"
    words = ["[UNK]", "[EOS]", "[PAD]", "red", "green", "blue"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]",
                                         pad_token="[PAD]").save_pretrained(ckpt)  # fmt: skip
    config = transformers.GPT2Config(vocab_size=len(words), n_positions=16, n_embd=8, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(ckpt)
    for dtype in ("auto", "bfloat16"):
        args = {"pretrained": str(ckpt), "device": "cpu", "dtype": dtype, "batch_size": 1}
        built = HFLM(**args).get_model_info()
        built["model_dtype"] = str(built["model_dtype"])  # what lm-eval's results file says
        assert lazy_model(HFLM, args).get_model_info() == built


# -- the tokenizer details lm-eval logs (add_tokenizer_info) -----------------------------------


class HFLMShaped(Base):
    """Not lm-eval's HFLM: answers nothing without being built."""

    _DEFAULT_MAX_LENGTH = 2048

    def __init__(self, pretrained: str = "", **kwargs: Any) -> None:
        super().__init__()
        raise AssertionError("never built in these tests")

    @property
    def eot_token_id(self) -> int:
        return 0

    def generate_until(self, requests: list[Any]) -> list[str]:
        return []


def test_a_model_that_is_not_hflm_has_no_tokenizer_without_being_built(tmp_path):
    m = lazy_model(HFLMShaped, {"pretrained": str(tmp_path)})
    assert getattr(m, "tokenizer", False) is False and not is_constructed(m)


class ClassTokenizer(Base):
    """A class attribute the initializer sets on the instance (lm-eval's TemplateLM.tokenizer)."""

    tokenizer: Any = None

    def __init__(self) -> None:
        super().__init__()
        self.tokenizer = "built"

    def generate_until(self, requests: list[Any]) -> list[str]:
        return ["x"] * len(requests)


def test_a_class_attribute_tokenizer_is_the_class_value_until_built_then_the_instance_value():
    m = lazy_model(ClassTokenizer, {})
    assert m.tokenizer is None and not is_constructed(m)
    m.generate_until([gen_request(0)])
    assert m.tokenizer == "built"
    m.tokenizer = "changed"
    assert m.tokenizer == "changed"


def test_an_hflm_subclass_making_its_tokenizer_otherwise_answers_nothing_without_being_built(tmp_path):
    pytest.importorskip("lm_eval")
    pytest.importorskip("transformers")
    from lm_eval.models.hf_vlms import HFMultimodalLM
    from lm_eval.models.huggingface import HFLM

    class OwnMaxLength(HFLM):
        @property
        def max_length(self) -> int:
            return 7

    for cls in (HFMultimodalLM, OwnMaxLength):
        assert tokenizer_without_weights(cls, {"pretrained": str(tmp_path)}) == {}
    assert tokenizer_without_weights(HFLM, {"pretrained": str(tmp_path), "tokenizer": object()}) == {}


@pytest.mark.slow
def test_tokenizer_details_match_what_lm_eval_hflm_logs_once_built(tmp_path, monkeypatch):
    """lm-eval's add_tokenizer_info on HFLM built and on the placeholder that never loaded
    its weights: the same fields, for the checkpoint's tokenizer, another one without a pad
    token (lm-eval picks one) and an explicit max_length."""
    pytest.importorskip("lm_eval")
    transformers = pytest.importorskip("transformers")
    from lm_eval.loggers.utils import add_tokenizer_info
    from lm_eval.models.huggingface import HFLM
    from tokenizers import Tokenizer, models, pre_tokenizers

    import tiny_models as tm

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ckpt = tm.build_gpt2(tmp_path / "gpt2")
    no_pad = tmp_path / "no-pad"
    words = [tm.UNK, tm.EOS, *"abcdefghijklmnopqrstuvwxyz"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=tm.UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=tm.UNK,
                                         eos_token=tm.EOS).save_pretrained(no_pad)  # fmt: skip
    base = {"pretrained": str(ckpt), "device": "cpu", "batch_size": 1}
    for extra in ({}, {"tokenizer": str(no_pad)}, {"max_length": 64}, {"use_fast_tokenizer": False}):
        args = {**base, **extra}
        built: dict[str, Any] = {}
        add_tokenizer_info(built, HFLM(**args))
        unbuilt: dict[str, Any] = {}
        placeholder = lazy_model(HFLM, args)
        add_tokenizer_info(unbuilt, placeholder)
        assert not is_constructed(placeholder)
        assert "tokenizer_pad_token" in built and unbuilt == built, extra
    assert built["max_length"] == 256  # the config's n_positions, not the tokenizer's 512
    # Built after all (a miss): its own tokenizer and properties from then on.
    answered = placeholder.tokenizer
    assert placeholder.model is not None and is_constructed(placeholder)
    assert placeholder.tokenizer is not answered and placeholder.max_length == 256


def test_without_the_checkpoints_files_the_tokenizer_stays_absent_and_nothing_is_built(tmp_path):
    pytest.importorskip("lm_eval")
    pytest.importorskip("transformers")
    from lm_eval.loggers.utils import add_tokenizer_info
    from lm_eval.models.huggingface import HFLM

    placeholder = lazy_model(HFLM, {"pretrained": str(tmp_path / "missing"), "device": "cpu"})
    storage: dict[str, Any] = {}
    add_tokenizer_info(storage, placeholder)
    assert storage == {} and not is_constructed(placeholder)
    assert placeholder.tokenizer is None  # lm-eval's TemplateLM.tokenizer, as before
