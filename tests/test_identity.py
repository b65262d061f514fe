"""The model identity: what the model is (class, settings, checkpoint), never where or how it
runs, and never a secret."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import fakes
from fakes import FakeModel, gen_request, task_dict
from lmms_cache import cached
from lmms_cache.identity import ModelIdentity, identify

SECRET = "sk-SECRET-1234567890"


def digest(**settings: Any) -> str:
    return identify(FakeModel(**settings)).digest


def hf_model(name: str = "org/vlm-7b", commit: str = "abc123", dtype: str = "torch.bfloat16") -> Any:
    """Looks like a transformers model: ``.config._name_or_path``, ``._commit_hash``, ``.dtype``."""
    return SimpleNamespace(config=SimpleNamespace(_name_or_path=name, _commit_hash=commit), dtype=dtype)


class Anonymous:
    """A model with nothing that names it."""

    def __init__(self) -> None:
        self.temperature = 0.0

    def generate_until(self, requests: list[Any]) -> list[str]:
        return ["x" for _ in requests]


class Hosted:
    """An API model holding a client with a ``base_url``."""

    def __init__(self, base_url: str = "https://api.example.com/v1/", model_version: str = "gpt-x") -> None:
        self.model_version = model_version
        self.client = SimpleNamespace(base_url=base_url, api_key=SECRET)

    def generate_until(self, requests: list[Any]) -> list[str]:
        return ["x" for _ in requests]


def test_model_id_replaces_the_derived_identity():
    a = identify(FakeModel("org/a"), "my-model")
    b = identify(FakeModel("org/b", temperature=1), "my-model")
    assert a.description == {"model_id": "my-model"}
    assert a.digest == b.digest
    assert identify(FakeModel("org/a"), "other").digest != a.digest
    assert identify(FakeModel("org/a")).digest != a.digest


@pytest.mark.parametrize("bad", ["", 3])
def test_a_bad_model_id_is_refused(bad):
    with pytest.raises(ValueError, match="model_id"):
        identify(FakeModel(), bad)


def test_two_proxies_with_one_model_id_share_entries(tmp_path):
    first = FakeModel("org/a")
    first.task_dict = task_dict(2)
    cached(first, tmp_path, model_id="shared").generate_until([gen_request(0)])
    second = FakeModel("org/b")
    second.task_dict = task_dict(2)
    cached(second, tmp_path, model_id="shared").generate_until([gen_request(0)])
    assert second.calls == 0


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
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == identify(FakeModel("org/m", temperature=0.2)).digest


@pytest.mark.parametrize(
    ("name", "a", "b"),
    [
        ("pretrained", "org/a", "org/b"),
        ("temperature", 0.0, 0.7),
        ("max_new_tokens", 16, 1024),
        ("max_frames_num", 8, 32),
        ("author", "x", "y"),
        ("conv_template", "qwen", "llava"),
        ("generation_config", {"top_p": 0.9}, {"top_p": 1.0}),
    ],
)
def test_a_setting_that_changes_outputs_changes_the_digest(name, a, b):
    assert digest(**{name: a}) != digest(**{name: b})


@pytest.mark.parametrize(
    ("name", "a", "b"),
    [
        ("rank", 0, 7),
        ("_world_size", 1, 8),
        ("device", "cuda:0", "cuda:7"),
        ("device_map", "auto", {"": 3}),
        ("batch_size", 1, 32),
        ("timeout", 10, 600),
        ("max_retries", 3, 10),
        ("num_concurrent", 1, 64),
        ("_url_counter", 0, 42),
    ],
)
def test_where_and_how_it_runs_does_not_change_the_digest(name, a, b):
    assert digest(**{name: a}) == digest(**{name: b})


@pytest.mark.parametrize(
    "name", ["api_key", "token", "password", "hf_token", "_api_key", "apiKey", "client_secret"]
)
def test_secret_attributes_are_left_out(name):
    with_secret = identify(FakeModel(**{name: SECRET}))
    assert SECRET not in with_secret.json()
    assert "SECRET" not in with_secret.json()
    assert with_secret.digest == identify(FakeModel()).digest


def test_secrets_inside_a_settings_mapping_are_left_out():
    ident = identify(FakeModel(options={"api_key": SECRET, "top_p": 0.9}))
    assert SECRET not in ident.json()
    assert ident.description["settings"]["options"] == {"top_p": 0.9}


def test_credentials_in_a_url_are_scrubbed():
    url = f"https://user:hunter2@api.example.com:8443/v1/?api_key={SECRET}&region=eu"
    ident = identify(FakeModel(endpoint=url))
    assert ident.description["settings"]["endpoint"] == "https://api.example.com:8443/v1?region=eu"
    text = ident.json()
    assert "hunter2" not in text and SECRET not in text and "user" not in text
    other = identify(FakeModel(endpoint="https://bob:pw@api.example.com:8443/v1/?region=eu&token=zzz"))
    assert other.digest == ident.digest


@pytest.mark.parametrize(
    "text",
    [
        "server: http://user:hunter2@10.0.0.1:8000/v1 (local)",
        "http://user:hunter2@host:notaport/v1",
        "http://user:hunter2@[::1]:8000/v1",
    ],
)
def test_credentials_in_any_url_text_are_scrubbed(text):
    ident = identify(FakeModel(endpoint=text))
    assert "hunter2" not in ident.json()
    assert "user" not in ident.description["settings"]["endpoint"]


def test_a_secret_in_a_text_setting_is_masked():
    ident = identify(FakeModel(launch_args=f"--port 8000 --hf_token={SECRET}"))
    assert SECRET not in ident.json()
    assert "--port 8000" in ident.description["settings"]["launch_args"]


def test_a_wrapped_hf_model_contributes_its_checkpoint():
    model = FakeModel()
    model._model = hf_model()
    ident = identify(model)
    assert ident.description["checkpoints"] == [
        {"name_or_path": "org/vlm-7b", "commit": "abc123", "dtype": "torch.bfloat16"}
    ]
    base = ident.digest

    def with_model(**kw: Any) -> str:
        m = FakeModel()
        m._model = hf_model(**kw)
        return identify(m).digest

    assert with_model() == base
    assert with_model(commit="def456") != base
    assert with_model(dtype="torch.float16") != base
    assert with_model(name="org/vlm-13b") != base


def test_an_api_client_contributes_its_base_url():
    ident = identify(Hosted())
    assert ident.description["clients"] == ["https://api.example.com/v1"]
    assert SECRET not in ident.json()
    assert identify(Hosted("https://other.example.com/v1")).digest != ident.digest
    assert identify(Hosted("https://key:pw@api.example.com/v1")).digest == ident.digest


def test_an_attribute_that_raises_on_access_is_ignored():
    class Lazy:
        @property
        def config(self) -> Any:
            raise RuntimeError("not loaded yet")

    model = FakeModel()
    model.engine_handle = Lazy()
    assert identify(model).digest == identify(FakeModel()).digest


def test_a_model_with_nothing_naming_it_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="lmms_cache"):
        identify(Anonymous())
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 1
    assert "Anonymous" in messages[0] and "model_id" in messages[0]


@pytest.mark.parametrize(
    "model",
    [FakeModel(), Hosted(), SimpleNamespace(_model=hf_model()), Anonymous()],
    ids=["named", "api", "checkpoint", "model_id"],
)
def test_a_named_model_does_not_warn(caplog, model):
    with caplog.at_level(logging.WARNING, logger="lmms_cache"):
        identify(model, "given" if isinstance(model, Anonymous) else None)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_label_names_the_model():
    assert identify(FakeModel("org/m")).label == "FakeModel(org/m)"
    assert identify(FakeModel("org/m"), "my-model").label == "my-model"
    assert identify(Anonymous()).label == "Anonymous"
    assert identify(SimpleNamespace(_model=hf_model("org/ckpt"))).label == "SimpleNamespace(org/ckpt)"


def test_identity_is_a_frozen_value():
    ident = identify(FakeModel())
    assert isinstance(ident, ModelIdentity)
    with pytest.raises(AttributeError):
        ident.digest = "0" * 32  # type: ignore[misc]
    assert ident.json() == identify(FakeModel()).json()


def test_the_proxy_keeps_the_identity_it_was_wrapped_with(tmp_path):
    model = FakeModel("org/m")
    model.task_dict = task_dict(2)
    lm = cached(model, tmp_path)
    before = lm.cache_identity
    lm.generate_until([gen_request(0)])  # FakeModel's plain state (calls, seen) changes
    assert lm.cache_identity == before
    lm.generate_until([gen_request(0)])
    assert lm.cache_stats.hits == 1
