"""End to end with the real lmms-eval 0.7.3 ``simple_evaluate``: tiny local tasks (images,
multiple choice, sampled repeats, videos by path, a chat-layout model) evaluated in separate
processes, unwrapped and through ``cached(model, path)``.

lmms-eval picks the request layout from the model object it is given: ``"simple" if
lm.is_simple else "chat"`` (evaluator.py); through the proxy that reads the model class's
``is_simple``. (Plugins registered through ``LMMS_EVAL_PLUGINS`` are always resolved as
simple models: a plugin class with ``is_simple = False`` is refused by lmms-eval.)

One scenario (importing lmms-eval costs seconds per process, so the processes are shared
and independent ones run at once), in a module fixture:

1. at once: ``first`` (every task unwrapped, then wrapped into cache A), and three runs
   with ``batch_size=2`` whose model blocks at its k-th batch and is SIGKILLed there
   (generation tasks, the multiple-choice task and the chat model; caches B, C, D);
2. at once: ``second`` (cache A again, a new process) and ``resumed`` (B, C, D again);
3. one image of the image dataset and one video file are replaced (same questions, same
   ids; the dataset re-saved), then ``changed`` (cache A again).
"""

from __future__ import annotations

import collections
import re
from typing import Any

import pytest

from lmms_harness import (
    CHAT_TASKS,
    CHOICES,
    GREEDY,
    REPEATS,
    SAMPLED,
    SIMPLE_TASKS,
    Project,
    Worker,
    comparable,
    docs_computed,
    multiset,
    requests_of,
    run_spec,
)

pytestmark = pytest.mark.e2e

GEN_TASKS = ["tiny_img", "tiny_sample", "tiny_video"]
# (name, evaluation, the batch (0-based) at which the model blocks and is killed)
KILLED = {
    # 8 of 24 done; lmms-eval 0.7.3 sends tiny_video, tiny_sample, tiny_img (the reverse of the
    # list): 4 videos, then 4 of 15 sampled requests: one document's repeats are split.
    "gen": (dict(model="simple", tasks=GEN_TASKS), 4),
    "mc": (dict(model="simple", tasks=["tiny_mc"]), 3),  # 6 of 15 loglikelihood requests done
    "chat": (dict(model="chat", tasks=CHAT_TASKS), 1),  # 2 of 5 done
}
CHANGED_IMAGE, NEW_RGB, NEW_IMAGE_COLOR = 2, (30, 220, 40), "green"  # was blue
CHANGED_VIDEO, NEW_VIDEO_COLOR = 2, "red"  # was green


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("lmms-e2e")
    project = Project(root)
    cache = {name: root / f"cache-{name}" for name in ("A", "gen", "mc", "chat")}
    first = Worker(project, "first", [
        run_spec("plain"), run_spec("plain_chat", "chat"),
        run_spec("cached", cache=cache["A"]), run_spec("cached_chat", "chat", cache=cache["A"]),
    ])  # fmt: skip
    workers = [first]
    try:
        killed = {}
        for name, (spec, k) in KILLED.items():
            killed[name] = Worker(project, f"killed_{name}",
                                  [run_spec(name, **spec, cache=cache[name], batch_size=2, block_at=k)])  # fmt: skip
            workers.append(killed[name])
        for w in killed.values():
            w.wait_blocked()
            w.kill()
        out: dict[str, Any] = {
            "first": first.result(),
            "killed": {n: w.calls_logged() for n, w in killed.items()},
        }

        second = Worker(project, "second", [run_spec("cached", cache=cache["A"]),
                                            run_spec("cached_chat", "chat", cache=cache["A"])])  # fmt: skip
        workers.append(second)
        resumed = Worker(project, "resumed", [run_spec(name, **spec, cache=cache[name], batch_size=2)
                                              for name, (spec, _) in KILLED.items()])  # fmt: skip
        workers.append(resumed)
        out["second"], out["resumed"] = second.result(), resumed.result()

        project.set_image(CHANGED_IMAGE, NEW_RGB)
        project.set_video(CHANGED_VIDEO, NEW_VIDEO_COLOR)
        changed = Worker(project, "changed", [run_spec("cached", cache=cache["A"]),
                                              run_spec("cached_chat", "chat", cache=cache["A"])])  # fmt: skip
        workers.append(changed)
        out["changed"] = changed.result()
    finally:
        for w in workers:
            w.close()
    return out


def samples(report: dict[str, Any], task: str) -> dict[int, dict[str, Any]]:
    return {s["doc_id"]: s for s in report["samples"][task]}


def metric(report: dict[str, Any], task: str) -> float:
    values = report["results"]["results"][task]
    return values["acc,none"] if "acc,none" in values else values["exact,none"]


def n_requests(report: dict[str, Any]) -> int:
    return sum(len(c["requests"]) for c in report["calls"])


# -- 3. wrapped == unwrapped ------------------------------------------------------------------


@pytest.mark.parametrize("plain, wrapped", [("plain", "cached"), ("plain_chat", "cached_chat")])
def test_wrapped_run_has_the_unwrapped_runs_results_and_requests(scenario, plain, wrapped):
    a, b = scenario["first"][plain], scenario["first"][wrapped]
    assert not a["wrapped"] and b["wrapped"]
    assert comparable(b["results"]) == comparable(a["results"])
    assert b["samples"] == a["samples"]
    # The model is asked the same things, in the same order, with the same gen_kwargs.
    assert requests_of(b["calls"]) == requests_of(a["calls"])


def test_model_gets_the_tasks_gen_kwargs_unmutated(scenario):
    for name in ("plain", "cached", "plain_chat", "cached_chat"):
        for r in requests_of(scenario["first"][name]["calls"]):
            if r["method"] == "generate_until":
                expected = SAMPLED if r["task"] == "tiny_sample" else GREEDY
                assert r["gen_kwargs"] == expected, (name, r)


def test_results_name_the_wrapped_model_class_not_the_proxy(scenario):
    first = scenario["first"]
    for name, cls, layout in [("cached", "FakeVLM", "simple"), ("cached_chat", "FakeChatVLM", "chat")]:
        config = first[name]["results"]["config"]
        assert config["model"] == cls
        assert config["model_backend"] == f"lmms_worker.{cls} ({layout})"


def test_chat_model_reads_images_out_of_doc_to_messages(scenario):
    chat = scenario["first"]["cached_chat"]
    simple = scenario["first"]["cached"]
    seen = {r["doc_id"]: r for r in requests_of(chat["calls"])}
    img = {r["doc_id"]: r for r in requests_of(simple["calls"], "tiny_img")}
    assert sorted(seen) == sorted(img) == [0, 1, 2, 3, 4]
    for doc_id, r in seen.items():
        assert r["media"] == img[doc_id]["media"]  # the same pixels, reached through the messages
        assert r["text"] == r["context"]
    assert [s["filtered_resps"] for s in chat["samples"]["tiny_chat"]] == \
        [s["filtered_resps"] for s in simple["samples"]["tiny_img"]]  # fmt: skip


# -- 2. the first run computes, a second process replays ---------------------------------------


def test_first_run_computes_every_request(scenario):
    cached = scenario["first"]["cached"]
    stats = cached["stats"]
    assert stats["hits"] == 0 and stats["failures"] == 0
    assert stats["misses"] == stats["written"] == stats["requests"] == n_requests(cached)
    per_task = collections.Counter(r["task"] for r in requests_of(cached["calls"]))
    assert per_task == {"tiny_img": 5, "tiny_mc": 5 * CHOICES, "tiny_sample": 5 * REPEATS, "tiny_video": 4}


@pytest.mark.parametrize("name", ["cached", "cached_chat"])
def test_second_process_makes_no_model_calls_and_replays_everything(scenario, name):
    first, second = scenario["first"][name], scenario["second"][name]
    assert second["calls"] == []
    assert second["stats"]["model_calls"] == 0 and second["stats"]["misses"] == 0
    assert second["stats"]["hits"] == second["stats"]["requests"] == n_requests(first)
    assert second["samples"] == first["samples"]  # resps, filtered_resps, token counts, per-sample scores
    assert without_model_time(second["results"]) == without_model_time(first["results"])


def without_model_time(results: dict[str, Any]) -> dict[str, Any]:
    """Results without what the model logged while computing (throughput, API usage)."""
    return {k: v for k, v in comparable(results).items() if k not in ("throughput", "usage")}


def generations_computed(report: dict[str, Any]) -> int:
    return sum(r["method"] == "generate_until" for r in requests_of(report["calls"]))


def test_throughput_and_usage_report_only_what_the_model_computed_in_the_run(scenario):
    """lmms-eval's ``throughput`` and ``usage`` blocks sum what the model logged while
    generating in this run: a fully cached replay has none (no model time or tokens spent; the
    earlier run's would be another run's numbers), a partial one only its misses'."""
    from lmms_worker import SECONDS_PER_ANSWER

    first, second, changed = (scenario[run]["cached"] for run in ("first", "second", "changed"))
    for block in ("throughput", "usage"):
        assert first["results"][block] == scenario["first"]["plain"]["results"][block]
    for run in (first, changed):
        n = generations_computed(run)
        assert run["results"]["throughput"]["total_elapsed_time"] == SECONDS_PER_ANSWER * n
        assert run["results"]["usage"]["total"]["n_api_calls"] == n
    assert 0 < generations_computed(changed) < generations_computed(first)
    assert generations_computed(second) == 0
    assert "throughput" not in second["results"] and second["results"]["usage"] == {}


def test_sampled_repeats_differ_and_replay_identically(scenario):
    first = samples(scenario["first"]["cached"], "tiny_sample")
    second = samples(scenario["second"]["cached"], "tiny_sample")
    for doc_id, s in first.items():
        (resps,) = s["resps"]
        assert len(resps) == REPEATS and len(set(resps)) == REPEATS, resps
        assert second[doc_id]["resps"] == s["resps"]


# -- 2. a changed image or video recomputes exactly its document -------------------------------


def test_changed_media_recompute_exactly_their_documents(scenario):
    first, changed = scenario["first"], scenario["changed"]
    assert docs_computed(changed["cached"]["calls"]) == {
        "tiny_img": [CHANGED_IMAGE], "tiny_mc": [CHANGED_IMAGE], "tiny_sample": [CHANGED_IMAGE],
        "tiny_video": [CHANGED_VIDEO],
    }  # fmt: skip
    assert n_requests(changed["cached"]) == 1 + CHOICES + REPEATS + 1
    assert docs_computed(changed["cached_chat"]["calls"]) == {"tiny_chat": [CHANGED_IMAGE]}
    assert changed["cached"]["stats"]["hits"] == n_requests(first["cached"]) - n_requests(changed["cached"])

    for name, tasks in (("cached", SIMPLE_TASKS), ("cached_chat", CHAT_TASKS)):
        for task in tasks:
            before, after = samples(first[name], task), samples(changed[name], task)
            moved = CHANGED_VIDEO if task == "tiny_video" else CHANGED_IMAGE
            for doc_id in before:
                if doc_id != moved:
                    assert after[doc_id] == before[doc_id], (task, doc_id)

    # The recomputed answers see the new content (and now match the datasets' answers).
    assert samples(changed["cached"], "tiny_img")[CHANGED_IMAGE]["filtered_resps"] == [NEW_IMAGE_COLOR]
    assert samples(changed["cached_chat"], "tiny_chat")[CHANGED_IMAGE]["filtered_resps"] == [NEW_IMAGE_COLOR]
    assert samples(changed["cached"], "tiny_video")[CHANGED_VIDEO]["filtered_resps"] == [NEW_VIDEO_COLOR]
    (resps,) = samples(changed["cached"], "tiny_sample")[CHANGED_IMAGE]["resps"]
    assert [r.split()[0] for r in resps] == [NEW_IMAGE_COLOR] * REPEATS
    assert samples(changed["cached"], "tiny_mc")[CHANGED_IMAGE]["acc"] == 1.0
    assert metric(first["cached"], "tiny_img") == pytest.approx(0.6)
    assert metric(changed["cached"], "tiny_img") == pytest.approx(0.8)
    assert metric(changed["cached"], "tiny_video") == pytest.approx(1.0)


# -- 2. a killed run resumes with what was not finished ----------------------------------------


@pytest.mark.parametrize("name", list(KILLED))
def test_killed_run_recomputes_only_what_was_not_finished(scenario, name):
    spec, k = KILLED[name]
    logged = scenario["killed"][name]
    assert [c["batch"] for c in logged] == list(range(k + 1))  # blocked in batch k
    finished = [c for c in logged if c["batch"] < k]
    done = requests_of(finished)
    assert len(done) == 2 * k  # batch_size=2

    reference = scenario["first"]["cached" if spec["model"] == "simple" else "cached_chat"]
    everything = [r for r in requests_of(reference["calls"]) if r["task"] in spec["tasks"]]
    resumed = scenario["resumed"][name]
    assert multiset(requests_of(resumed["calls"])) == multiset(everything) - multiset(done)
    assert resumed["stats"]["hits"] == 2 * k
    assert resumed["stats"]["misses"] == len(everything) - 2 * k

    for task in spec["tasks"]:
        if task == "tiny_sample":
            # Counter-based samples: only their colours are comparable across processes.
            for doc_id, s in samples(resumed, task).items():
                (resps,) = s["resps"]
                colors = {r.split()[0] for r in samples(reference, task)[doc_id]["resps"][0]}
                assert len(resps) == REPEATS and {r.split()[0] for r in resps} == colors
        else:
            assert resumed["samples"][task] == reference["samples"][task]


def test_killed_generation_run_had_split_a_documents_repeats(scenario):
    """The interesting case the gen scenario is built for: some of one document's sampled
    repeats were saved before the kill, the others were computed on resuming."""
    done = requests_of([c for c in scenario["killed"]["gen"] if c["batch"] < KILLED["gen"][1]])
    resumed = requests_of(scenario["resumed"]["gen"]["calls"])
    before = collections.Counter(r["doc_id"] for r in done if r["task"] == "tiny_sample")
    after = collections.Counter(r["doc_id"] for r in resumed if r["task"] == "tiny_sample")
    assert any(0 < before[d] < REPEATS for d in before), before
    assert all(before[d] + after[d] == REPEATS for d in range(5))
    assert all(re.fullmatch(r"\w+ #\d+", r) for s in scenario["resumed"]["gen"]["samples"]["tiny_sample"]
               for r in s["resps"][0])  # fmt: skip
