"""lm-eval 0.4.13 end to end: real ``simple_evaluate`` and the real ``lm-eval`` command line
over local YAML tasks, a fake ``LM`` subclass wrapped by ``cached``, each run in its own
process (tests/lm_eval_worker.py).

The tasks are built here at run time: two ``generate_until`` tasks, a multiple-choice task
(``loglikelihood`` requests) and a ``loglikelihood_rolling`` task, over JSON-lines files
loaded with ``dataset_path: json`` (works offline).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lmms_cache.store import open_store

pytestmark = pytest.mark.e2e

pytest.importorskip("lm_eval")

WORKER = Path(__file__).with_name("lm_eval_worker.py")
MODEL = "lmms_cache_fake_lm"
TASKS = ["lmc_gen", "lmc_gen_b", "lmc_mc", "lmc_roll"]
GEN_DOCS = [("2+3", "5"), ("10+4", "14"), ("7+8", "15"), ("1+1", "2"), ("20+22", "42")]
MC_DOCS = [("Sky colour?", 0), ("Grass colour?", 1), ("Blood colour?", 2), ("Night colour?", 3)]
CHOICES = ["blue", "green", "red", "black"]
N_GEN, N_MC = len(GEN_DOCS), len(MC_DOCS)
N_LL = N_MC * len(CHOICES)  # one loglikelihood request per (document, choice)


def write_tasks(root: Path, gen_settings: str = "until: [\"\\n\"]\n  max_gen_toks: 32") -> Path:
    """A directory of lm-eval task YAMLs over local JSON-lines data; ``gen_settings`` is the
    body of lmc_gen's ``generation_kwargs`` (lmc_gen_b's stays as it is)."""
    root.mkdir(parents=True, exist_ok=True)
    gen = root / "gen.jsonl"
    gen.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in GEN_DOCS))
    mc = root / "mc.jsonl"
    mc.write_text("".join(json.dumps({"question": q, "choices": CHOICES, "label": y}) + "\n"
                          for q, y in MC_DOCS))  # fmt: skip

    def data(path: Path) -> str:
        return f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"

    (root / "gen.yaml").write_text(
        f"task: lmc_gen\n{data(gen)}output_type: generate_until\n"
        'doc_to_text: "Q: {{question}}?\\nA:"\ndoc_to_target: "{{answer}}"\n'
        f"generation_kwargs:\n  {gen_settings}\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    (root / "gen_b.yaml").write_text(
        f"task: lmc_gen_b\n{data(gen)}output_type: generate_until\n"
        'doc_to_text: "Answer briefly.\\nQ: {{question}}?\\nA:"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 32\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    (root / "mc.yaml").write_text(
        f"task: lmc_mc\n{data(mc)}output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n'
    )
    (root / "roll.yaml").write_text(
        f"task: lmc_roll\n{data(mc)}output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{question}}"\nmetric_list:\n  - metric: word_perplexity\n'
    )
    return root


def harness_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               TOKENIZERS_PARALLELISM="false", **extra)  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join([str(WORKER.parent), env.get("PYTHONPATH", "")])
    return env


def evaluate(tmp_path: Path, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run ``runs`` (include_path, cache or None) one after another in ONE new process."""
    spec = tmp_path / f"spec{len(list(tmp_path.glob('spec*.json')))}.json"
    for i, run in enumerate(runs):
        run.setdefault("tasks", TASKS)
        run["out"] = str(spec.with_suffix(f".{i}.report.json"))
        run["include_path"] = str(run["include_path"])
        run["cache"] = str(run["cache"]) if run.get("cache") else None
    spec.write_text(json.dumps({"runs": runs}))
    proc = subprocess.run([sys.executable, str(WORKER), "run", str(spec)], env=harness_env(tmp_path),
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(Path(run["out"]).read_text()) for run in runs]


def entries(cache: Path) -> list[Any]:
    store = open_store(cache, readonly=True)
    try:
        return list(store.scan(values=False))
    finally:
        store.close()


def test_rerun_in_a_new_process_replays_every_sample_and_metric_without_the_model(tmp_path):
    tasks, cache = write_tasks(tmp_path / "tasks"), tmp_path / "cache"
    plain, first = evaluate(tmp_path, [{"include_path": tasks, "cache": None},
                                       {"include_path": tasks, "cache": cache}])  # fmt: skip
    (second,) = evaluate(tmp_path, [{"include_path": tasks, "cache": cache}])

    # The first run computes everything, one model call per request type.
    total = 2 * N_GEN + N_LL + N_MC
    assert first["is_cached"] and first["calls"] == {"generate_until": 1, "loglikelihood": 1,
                                                     "loglikelihood_rolling": 1}  # fmt: skip
    assert first["stats"]["misses"] == first["stats"]["written"] == total
    assert first["seen"] == plain["seen"]  # the wrapped model is asked exactly what the bare one is
    # The rerun in a new process never calls the model and answers every request from disk.
    assert second["calls"] == {} and second["seen"] == []
    assert second["stats"]["hits"] == second["stats"]["requests"] == total
    assert second["stats"]["misses"] == second["stats"]["model_calls"] == 0
    # Per-sample outputs (with their types) and metrics: identical across runs, and equal to
    # an evaluation of the bare model.
    for run in (first, second):
        assert run["resps_repr"] == plain["resps_repr"]
        assert run["samples"] == plain["samples"]
        assert run["results"] == plain["results"]
    assert set(plain["samples"]) == set(TASKS)
    assert first["results"]["config"]["model"] == "FakeLM"  # lm-eval names the proxy as the model
    # answer() is right when the first addend is even
    assert [s["resps"] for s in plain["samples"]["lmc_gen"]] == [[[a]] for a in ["5", "14", "16", "3", "42"]]
    assert plain["results"]["results"]["lmc_gen"]["exact_match,none"] == pytest.approx(0.6)
    assert "acc,none" in plain["results"]["results"]["lmc_mc"]
    assert "word_perplexity,none" in plain["results"]["results"]["lmc_roll"]


def test_lm_eval_layouts_are_keyed_and_a_changed_generation_setting_misses_only_its_requests(tmp_path):
    tasks, cache = write_tasks(tmp_path / "tasks"), tmp_path / "cache"
    changed = write_tasks(tmp_path / "changed", gen_settings='until: ["\\n"]\n  max_gen_toks: 1')
    first, rerun = evaluate(tmp_path, [{"include_path": tasks, "cache": cache},
                                       {"include_path": changed, "cache": cache}])  # fmt: skip

    # lm-eval's layouts, as the model (and so the proxy) received them.
    by_method: dict[str, list[list[Any]]] = {}
    for method, args in first["seen"]:
        by_method.setdefault(method, []).append(args)
    gen = by_method["generate_until"]
    assert len(gen) == 2 * N_GEN and {len(a) for a in gen} == {2}
    assert ["Q: 2+3?\nA:", {"until": ["\n"], "max_gen_toks": 32, "do_sample": False}] in gen
    ll = by_method["loglikelihood"]
    assert len(ll) == N_LL and ["Question: Sky colour?\nAnswer:", " red"] in ll
    assert sorted(by_method["loglikelihood_rolling"]) == sorted([q] for q, _ in MC_DOCS)

    # ... and how the cache keyed them: by context and by each generation setting, with the
    # document address taken from lm-eval's metadata.
    stored = entries(cache)
    assert len(stored) == (2 * N_GEN + N_LL + N_MC) + N_GEN  # the first run's, then the changed task's
    assert sum('"arg1.max_gen_toks":"1"' in e.components for e in stored) == N_GEN
    for e in stored:
        parts = json.loads(e.components)
        assert e.task in TASKS and e.doc_id is not None
        if e.method == "generate_until":
            assert {"arg0", "arg1", "arg1.until", "arg1.max_gen_toks", "arg1.do_sample"} <= set(parts["d"])
        elif e.method == "loglikelihood":
            assert {"arg0", "arg1"} <= set(parts["d"]) and not parts["v"]  # (context, continuation)
        else:
            assert e.method == "loglikelihood_rolling" and "arg0" in parts["d"] and "arg1" not in parts["d"]

    # max_gen_toks changed in lmc_gen's YAML: exactly its requests go to the model.
    assert rerun["calls"] == {"generate_until": 1}
    assert sorted(a[0] for _, a in rerun["seen"]) == sorted(f"Q: {q}?\nA:" for q, _ in GEN_DOCS)
    assert all(a[1]["max_gen_toks"] == 1 for _, a in rerun["seen"])
    assert rerun["stats"]["misses"] == N_GEN
    assert rerun["stats"]["hits"] == N_GEN + N_LL + N_MC  # lmc_gen_b, lmc_mc, lmc_roll
    assert [s["resps"] for s in rerun["samples"]["lmc_gen"]] == [[["5"]], [["1"]], [["1"]], [["3"]], [["4"]]]
    assert rerun["samples"]["lmc_gen_b"] == first["samples"]["lmc_gen_b"]
    assert rerun["samples"]["lmc_mc"] == first["samples"]["lmc_mc"]


def run_cli(tmp_path: Path, tasks: Path, cache: Path, out: Path, events: Path, *options: str) -> str:
    """``lmms-cache eval --harness lm-eval ... -- <lm-eval CLI>`` in a new process, through a
    wrapper that registers the fake model first (``lm_eval_worker.py cli``)."""
    argv = [sys.executable, str(WORKER), "cli", "eval", "--harness", "lm-eval", "--cache-dir", str(cache),
            *options, "--", "--model", MODEL, "--tasks", "lmc_gen", "lmc_mc", "--include_path", str(tasks),
            "--output_path", str(out), "--log_samples"]  # fmt: skip
    proc = subprocess.run(argv, env=harness_env(tmp_path, FAKE_LM_EVENTS=str(events)), cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def cli_outcome(out: Path) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    (results_file,) = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    samples = {}
    for task in ("lmc_gen", "lmc_mc"):
        (f,) = glob.glob(str(out / "**" / f"samples_{task}_*.jsonl"), recursive=True)
        rows = [json.loads(line) for line in Path(f).read_text().splitlines()]
        samples[task] = [(r["doc_id"], r["resps"], r["filtered_resps"], r["arguments"]) for r in rows]
    return json.loads(Path(results_file).read_text())["results"], samples


def test_cli_rerun_never_constructs_the_model(tmp_path):
    tasks, cache = write_tasks(tmp_path / "tasks"), tmp_path / "cache"
    events = tmp_path / "events.txt"
    table = run_cli(tmp_path, tasks, cache, tmp_path / "out1", events)
    assert "lmc_gen" in table and "exact_match" in table
    assert events.read_text().splitlines() == ["construct", f"call generate_until {N_GEN}",
                                               f"call loglikelihood {N_LL}"]  # fmt: skip
    events.unlink()

    # Replay only: any miss would exit 3; the model is never even constructed.
    run_cli(tmp_path, tasks, cache, tmp_path / "out2", events, "--on-miss", "error")
    built = events.read_text().splitlines() if events.exists() else []
    assert built == [], "the fully cached rerun constructed the model"
    assert cli_outcome(tmp_path / "out2") == cli_outcome(tmp_path / "out1")


def test_what_lm_eval_probes_on_a_model_does_not_construct_a_lazy_one():
    """simple_evaluate asks ``hasattr(lm, "get_model_info")`` and ``hasattr(lm, "MULTIMODAL")``,
    and its result logger ``getattr(lm, "tokenizer", False)``: a model class without them
    (lm-eval's ``LM`` has none) must answer "absent" without being constructed."""
    from lm_eval.api.model import LM

    from lmms_cache.lazy import is_constructed, lazy_model

    class Heavy(LM):
        def __init__(self) -> None:
            raise AssertionError("constructed")

        def generate_until(self, requests):
            return ["x"] * len(requests)

        loglikelihood = loglikelihood_rolling = generate_until

    lm = lazy_model(Heavy, {})
    assert not hasattr(lm, "get_model_info")
    assert not hasattr(lm, "MULTIMODAL")
    assert getattr(lm, "tokenizer", False) is False
    assert not is_constructed(lm)
