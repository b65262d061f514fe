"""The cache in front of the real model classes: lm-eval's ``HFLM`` on a tiny GPT-2 and
lmms-eval's ``llava_hf`` on a tiny LLaVA, both with random weights and a tokenizer trained
here (tests/tiny_models.py); nothing comes from a hub.

What a user relies on: the proxy answers exactly what the model answers, and a rerun through
a new proxy of a new instance of the same checkpoint makes no forward pass at all.

The wrong hits of issue 9 are reproduced here: a checkpoint re-saved in place, another
tokenizer, a config field, weights changed in memory and a setting changed on the proxy
must each give the answers of the model as it now is. A test's preconditions (the two models
really answer differently) fail with ``pytest.fail``.

Not here: a dict setting mutated in place on a real class. The only one the constructors take
is HFLM's ``chat_template_args``, which only ``HFLM.apply_chat_template`` reads: the harness
renders prompts with it before building requests, and ``generate_until`` / ``loglikelihood``
never read it, so mutating it cannot change what the model answers to a given request (the
rendered prompt is the request's content, keyed by value). llava_hf takes no dict setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import tiny_models as tm
from lmms_cache import cached

pytestmark = pytest.mark.slow  # builds and runs real transformers models (~1 min)

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("lm_eval")

LM_METHODS = ("generate_until", "loglikelihood", "loglikelihood_rolling")
N_DOCS = 2  # llava documents per run
# Two chat templates for llava_hf's ``chat_template`` setting (a prompt sweep).
TEMPLATE_A = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }} "
    "{% else %}ASSISTANT: {{ m['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
TEMPLATE_B = (
    "{% for m in messages %}{% if m['role'] == 'user' %}Question: {{ m['content'] }}\n"
    "{% else %}Answer: {{ m['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Answer:{% endif %}"
)


def require(condition: bool, what: str) -> None:
    """A precondition of the test (that the two models really answer differently)."""
    if not condition:
        pytest.fail(f"precondition: {what}")


# -- models -----------------------------------------------------------------------------------


def hflm(path: Path, **kwargs: Any) -> Any:
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(path), device="cpu", batch_size=1, **kwargs)


def llava(path: Path, **kwargs: Any) -> Any:
    pytest.importorskip("decord")  # lmms-eval's llava_hf module imports it
    from lmms_eval.models.simple.llava_hf import LlavaHf

    model = LlavaHf(pretrained=str(path), device="cpu", device_map="cpu", **kwargs)
    model.task_dict = tm.lmms_task_dict(N_DOCS)
    return model


def run_llava(lm: Any) -> dict[str, list[Any]]:
    """generate_until then loglikelihood on fresh requests (llava_hf changes gen_kwargs in place)."""
    gen, ll = tm.lmms_requests(N_DOCS)
    return {"generate_until": list(lm.generate_until(gen)), "loglikelihood": list(lm.loglikelihood(ll))}


def n_requests(results: dict[str, list[Any]]) -> int:
    return sum(len(r) for r in results.values())


def answered(results: dict[str, list[Any]]) -> bool:
    """Every generation is non-empty text (so the cache stores it: empty text is a failure)."""
    return all(isinstance(t, str) and t.strip() for t in results["generate_until"])


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tm.build_gpt2(tmp_path_factory.mktemp("gpt2"), seed=0)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tm.build_llava(tmp_path_factory.mktemp("llava"), seed=0)


# -- what passes today ------------------------------------------------------------------------


def test_hflm_through_the_cache_answers_exactly_what_hflm_answers(tmp_path, gpt2_dir):
    model = hflm(gpt2_dir)
    plain = tm.run_lm(model)
    require(answered(plain), f"the tiny GPT-2 answers with text: {plain['generate_until']}")

    lm = cached(model, tmp_path)
    first = tm.run_lm(lm)
    assert first == plain
    assert lm.cache_stats.misses == lm.cache_stats.written == n_requests(plain)
    # The same calls again on the same proxy: answered from the cache, the same values.
    counter = tm.count_forwards(model._model)
    assert tm.run_lm(lm) == plain
    assert counter.count == 0
    assert lm.cache_stats.hits == n_requests(plain)
    assert {type(x) for x in first["loglikelihood"]} == {tuple}
    assert all(isinstance(x, float) for x in first["loglikelihood_rolling"])


def test_a_new_hflm_through_a_new_proxy_replays_every_answer_without_a_forward_pass(tmp_path, gpt2_dir):
    first_model = hflm(gpt2_dir)
    counted = tm.count_forwards(first_model._model)
    first = cached(first_model, tmp_path)
    answers = tm.run_lm(first)
    first.cache_close()
    require(counted.count > 0 and answered(answers), "the first run computes non-empty answers")

    model = hflm(gpt2_dir)  # as in a new process: a new instance of the same checkpoint
    counter = tm.count_forwards(model._model)
    lm = cached(model, tmp_path)
    assert tm.run_lm(lm) == answers
    assert counter.count == 0
    assert lm.cache_stats.hits == lm.cache_stats.requests == n_requests(answers)
    assert lm.cache_stats.misses == lm.cache_stats.model_calls == 0


def test_llava_hf_through_the_cache_answers_what_it_answers_and_a_new_proxy_replays_it(tmp_path, llava_dir):
    plain = run_llava(llava(llava_dir))
    require(answered(plain), f"the tiny LLaVA answers with text: {plain['generate_until']}")
    first = cached(llava(llava_dir), tmp_path)
    assert run_llava(first) == plain
    assert first.cache_stats.written == n_requests(plain)
    first.cache_close()

    model = llava(llava_dir)
    counter = tm.count_forwards(model._model)
    lm = cached(model, tmp_path)
    assert run_llava(lm) == plain
    assert counter.count == 0
    assert lm.cache_stats.hits == lm.cache_stats.requests == n_requests(plain)
    assert lm.cache_stats.misses == 0


def test_llava_hf_setting_its_chat_template_on_the_first_call_does_not_make_a_rerun_miss(tmp_path, llava_dir):
    from lmms_eval.models.simple.llava_hf import VICUNA_CHAT_TEMPLATE

    model = llava(llava_dir)
    require(model.tokenizer.chat_template is None, "the checkpoint has no chat template")
    first = cached(model, tmp_path)
    answers = run_llava(first)
    assert model.tokenizer.chat_template == VICUNA_CHAT_TEMPLATE  # set by generate_until's first call
    first.cache_close()

    # A rerun: a new instance (again without a template until its first call), a new proxy.
    again = llava(llava_dir)
    lm = cached(again, tmp_path)
    assert run_llava(lm) == answers
    assert lm.cache_stats.misses == 0
    assert lm.cache_stats.hits == n_requests(answers)


def test_llava_hf_with_the_llava_processor_reruns_generate_until_from_the_cache(tmp_path):
    # transformers 5's LlavaProcessor expands <image> into one token per patch (what real
    # LLaVA checkpoints ship); llava_hf's loglikelihood cannot run with it (see tiny_models).
    path = tm.build_llava(tmp_path / "llava", seed=0, processor="llava")
    model = llava(path)
    first = cached(model, tmp_path / "cache")
    answers = first.generate_until(tm.lmms_requests(N_DOCS)[0])
    require(all(a.strip() for a in answers), f"the tiny LLaVA answers with text: {answers}")
    assert first.cache_stats.misses == N_DOCS

    again = llava(path)
    counter = tm.count_forwards(again._model)
    lm = cached(again, tmp_path / "cache")
    assert lm.generate_until(tm.lmms_requests(N_DOCS)[0]) == answers
    assert counter.count == 0 and lm.cache_stats.misses == 0


# -- issue 9: what used to be wrong hits --------------------------------------------------------


def test_a_checkpoint_resaved_in_place_with_other_weights_misses(tmp_path):
    path = tmp_path / "gpt2"
    tm.build_gpt2(path, seed=0)
    old = tm.run_lm(cached(hflm(path), tmp_path / "cache"))

    tm.build_gpt2(path, seed=1)  # the same directory, other weights (a fine-tuning run saving over it)
    model = hflm(path)
    new = tm.run_lm(model)
    require(new != old, "the re-saved checkpoint answers differently")

    lm = cached(model, tmp_path / "cache")
    answers = tm.run_lm(lm)
    assert answers == new
    assert lm.cache_stats.misses > 0


def test_hflm_with_another_tokenizer_misses(tmp_path, gpt2_dir):
    other = tmp_path / "other-tokenizer"
    tokenizer = tm.train_tokenizer(other, corpus=tm.OTHER_CORPUS)
    require(len(tokenizer) == tm.VOCAB_SIZE, "the other tokenizer has the same size")
    old = tm.run_lm(cached(hflm(gpt2_dir), tmp_path / "cache"))

    model = hflm(gpt2_dir, tokenizer=str(other))
    new = tm.run_lm(model)
    require(new != old, "the model with the other tokenizer answers differently")

    lm = cached(model, tmp_path / "cache")
    answers = tm.run_lm(lm)
    assert answers == new
    assert lm.cache_stats.misses > 0


def test_a_llava_checkpoint_resaved_with_another_vision_feature_layer_misses(tmp_path):
    path = tmp_path / "llava"
    tm.build_llava(path, seed=0)
    before, weights = tm.config_of(path), (path / "model.safetensors").read_bytes()
    old = run_llava(cached(llava(path), tmp_path / "cache"))

    tm.build_llava(path, seed=0, vision_feature_layer=-1)
    after = tm.config_of(path)
    require({k for k in before.keys() | after.keys() if before.get(k) != after.get(k)} == {"vision_feature_layer"},
            "the two configs differ in vision_feature_layer only")  # fmt: skip
    require((path / "model.safetensors").read_bytes() == weights, "the weights are the same, byte for byte")
    model = llava(path)
    new = run_llava(model)
    require(new != old, "the other vision_feature_layer changes the answers")

    lm = cached(model, tmp_path / "cache")
    answers = run_llava(lm)
    assert answers == new
    assert lm.cache_stats.misses > 0


def test_weights_changed_in_memory_between_two_evaluations_on_one_proxy_miss(tmp_path, gpt2_dir):
    import torch

    model = hflm(gpt2_dir)
    lm = cached(model, tmp_path)
    old = tm.run_lm(lm)

    # One step of training on the evaluated model, between two evaluations.
    net = model._model
    batch = model.tokenizer("The cat sat on the mat and looked at the small bird.", return_tensors="pt")
    optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
    with torch.enable_grad():
        net(**batch, labels=batch["input_ids"]).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    new = tm.run_lm(model)
    require(new != old, "the trained model answers differently")

    written = lm.cache_stats.written
    answers = tm.run_lm(lm)
    assert answers == new
    # computed, not stored: the checkpoint no longer says what the weights are
    assert lm.cache_stats.bypassed == n_requests(old)
    assert lm.cache_stats.written == written


def test_a_chat_template_sweep_on_one_llava_hf_proxy_misses(tmp_path, llava_dir):
    model = llava(llava_dir)
    lm = cached(model, tmp_path)
    lm.chat_template = TEMPLATE_A
    old = run_llava(lm)
    misses = lm.cache_stats.misses

    lm.chat_template = TEMPLATE_B
    require(model.chat_template == TEMPLATE_B, "the setting reaches the model")
    new = run_llava(model)
    require(new != old, "the other template changes the answers")

    answers = run_llava(lm)
    assert answers == new
    assert lm.cache_stats.misses > misses


def test_the_tiny_checkpoints_are_reproducible_and_seeded(tmp_path):
    """Same seed, same weights; another seed, other weights (what the tests above rely on)."""
    import torch
    from transformers import GPT2LMHeadModel

    def weights(seed: int, name: str) -> dict[str, Any]:
        net = GPT2LMHeadModel.from_pretrained(str(tm.build_gpt2(tmp_path / name, seed=seed)))
        return net.state_dict()

    a, b, c = weights(0, "a"), weights(0, "b"), weights(1, "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# -- the eval path: lmms-cache eval builds the model on its first miss ---------------------------


def eval_cli(tmp_path: Path, tasks: Path, cache: Path, model_args: str, run: str, *options: str) -> int:
    """``lmms-cache eval --harness lm-eval`` with lm-eval's real ``hf`` model, in a new process;
    with ``--on-miss error`` it exits 0 when every request was a hit, 3 when one was not.
    Its results file is in ``tmp_path / run``."""
    return eval_run(tmp_path, tasks, cache, model_args, run, *options).returncode


def eval_run(tmp_path: Path, tasks: Path, cache: Path, model_args: str, run: str, *options: str) -> Any:
    """:func:`eval_cli`'s finished process (``returncode``, ``stderr``)."""
    import subprocess
    import sys

    from test_lm_eval_e2e import harness_env

    argv = [sys.executable, "-m", "lmms_cache", "eval", "--harness", "lm-eval", "--cache-dir", str(cache),
            *options, "--", "--model", "hf", "--model_args", f"{model_args},device=cpu", "--tasks", "lmc_gen",
            "--include_path", str(tasks), "--output_path", str(tmp_path / run)]  # fmt: skip
    proc = subprocess.run(argv, env=harness_env(tmp_path), cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode in (0, 3), proc.stderr[-4000:]
    return proc


@pytest.mark.e2e
def test_the_eval_path_misses_a_resaved_checkpoint_and_another_tokenizer(tmp_path):
    from test_lm_eval_e2e import write_tasks

    tasks, cache, ckpt, tok = write_tasks(tmp_path / "tasks"), tmp_path / "cache", tmp_path / "gpt2", tmp_path / "tok"
    tm.build_gpt2(ckpt, seed=0)
    tm.train_tokenizer(tok, corpus=tm.OTHER_CORPUS)
    assert eval_cli(tmp_path, tasks, cache, f"pretrained={ckpt}", "fill") == 0
    replay = ("--on-miss", "error")  # a miss exits 3 instead of computing
    assert eval_cli(tmp_path, tasks, cache, f"pretrained={ckpt}", "same", *replay) == 0
    assert eval_cli(tmp_path, tasks, cache, f"pretrained={ckpt},tokenizer={tok}", "tok", *replay) == 3
    tm.build_gpt2(ckpt, seed=1)  # "evaluate the latest checkpoint": re-saved in place
    assert eval_cli(tmp_path, tasks, cache, f"pretrained={ckpt}", "resaved", *replay) == 3


def results_file(directory: Path) -> dict[str, Any]:
    """The results JSON lm-eval wrote under its ``--output_path``."""
    import json

    (found,) = directory.rglob("results_*.json")
    return dict(json.loads(found.read_text()))


# What lm-eval writes about the model: get_model_info (in "config") and add_tokenizer_info.
MODEL_DETAILS = ("model_num_parameters", "model_dtype", "model_revision", "model_sha")
TOKENIZER_DETAILS = ("tokenizer_pad_token", "tokenizer_eos_token", "tokenizer_bos_token", "eot_token_id",
                     "max_length")  # fmt: skip
# What differs between any two runs: their clocks.
RUN_CLOCKS = ("date", "start_time", "end_time", "total_evaluation_time_seconds")


@pytest.mark.e2e
def test_a_fully_cached_eval_writes_the_model_and_tokenizer_details_the_built_model_wrote(tmp_path):
    """lm-eval's results file of a run that built HFLM and of a fully cached rerun that never
    did: the same model and tokenizer details (from the checkpoint's files), and the same
    everything else but the clocks."""
    from test_lm_eval_e2e import write_tasks

    tasks, cache, ckpt = write_tasks(tmp_path / "tasks"), tmp_path / "cache", tmp_path / "gpt2"
    tm.build_gpt2(ckpt, seed=0)
    cold = eval_run(tmp_path, tasks, cache, f"pretrained={ckpt}", "cold")
    cached = eval_run(tmp_path, tasks, cache, f"pretrained={ckpt}", "cached", "--on-miss", "error")
    assert cold.returncode == cached.returncode == 0, cached.stderr[-4000:]
    assert "model built;" in cold.stderr and "model never built;" in cached.stderr
    built, unbuilt = results_file(tmp_path / "cold"), results_file(tmp_path / "cached")

    assert {k: built["config"][k] for k in MODEL_DETAILS} == {
        "model_num_parameters": built["config"]["model_num_parameters"], "model_dtype": "torch.float32",
        "model_revision": "main", "model_sha": ""}  # fmt: skip
    assert built["config"]["model_num_parameters"] > 0
    assert {k: built[k] for k in TOKENIZER_DETAILS} == {
        "tokenizer_pad_token": [tm.PAD, "3"], "tokenizer_eos_token": [tm.EOS, "2"],
        "tokenizer_bos_token": [tm.BOS, "1"], "eot_token_id": 2, "max_length": 256}  # fmt: skip
    for name in RUN_CLOCKS:
        built.pop(name, None), unbuilt.pop(name, None)
    assert unbuilt == built
