"""lmms_cache.harness_cache: the drop-in request-building cache of lmms-eval and lm-eval.

Covers both call styles, the location and names of files, atomic writes under SIGKILL,
corrupted files, callables (utils.py loaded by path, as lmms-eval's ``!function``; partials;
stale code), delete by prefix, install()/uninstall() in both harnesses, and real
``build_all_requests`` cache hits in both harnesses.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import dill
import pytest
from lmms_eval.api.instance import Instance
from PIL import Image

from lmms_cache import harness_cache as hc

UTILS = '''\
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    pre = (lmms_eval_specific_kwargs or {}).get("pre_prompt", "")
    return pre + doc["question"]
'''


@pytest.fixture(autouse=True)
def cache_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "harness-cache"
    monkeypatch.setenv(hc.ENV_VAR, str(path))
    return path


@pytest.fixture
def caplog_hc(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger=hc.__name__)
    return caplog


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == hc.__name__ and r.levelno >= logging.WARNING]


def load_by_path(path: Path, source: str = UTILS) -> types.ModuleType:
    """Write a task utils.py and load it the way lmms-eval's ``!function utils.x`` does."""
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("utils", str(path))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def docs() -> list[dict[str, Any]]:
    return [{"image": Image.new("RGB", (4, 4), (40 * i, 7, 200)), "question": f"q{i}?"} for i in range(3)]


def instances(utils: types.ModuleType) -> list[list[Instance]]:
    """lmms-eval request groups: generate_until and the multi-round layout (with a partial)."""
    groups = []
    for doc_id in range(3):
        meta = {"task": "t", "doc_id": doc_id, "repeats": 1, "split": "test"}
        gen = Instance("generate_until", (f"q{doc_id}?", {"max_new_tokens": 8}, utils.doc_to_visual, doc_id, "t", "test"), 0, meta)
        text = functools.partial(utils.doc_to_text, lmms_eval_specific_kwargs={"pre_prompt": "P: "})
        multi = Instance("generate_until_multi_round", (f"q{doc_id}?", {}, utils.doc_to_visual, text, doc_id, "t", "test"), 0, meta)
        groups.append([gen, multi])
    return groups


def pixels(images: list[Image.Image]) -> list[bytes]:
    return [im.tobytes() for im in images]


# --------------------------------------------------------------------------- API


def test_both_call_styles(caplog_hc):
    assert hc.load_from_cache(file_name="requests-absent") is None  # lmms-eval style miss
    assert hc.load_from_cache(file_name="requests-absent", cache=True) is None  # lm-eval style miss
    assert warnings_of(caplog_hc) == []  # an absent entry is an ordinary miss

    obj = [[{"ctx": "q0", "gen": {"until": ["\n"]}}], [{"ctx": "q1"}]]
    assert hc.save_to_cache(file_name="requests-t", obj=obj) is True
    assert hc.load_from_cache(file_name="requests-t") == obj
    assert hc.load_from_cache("requests-t", cache=True) == obj
    assert hc.load_from_cache("requests-t", cache=False) is None  # lm-eval: caching off => never read


def test_files_under_env_var_named_like_the_harness_and_private(cache_path, monkeypatch):
    import lm_eval.caching.cache as lm_cache

    assert hc.FILE_SUFFIX == lm_cache.FILE_SUFFIX
    nested = cache_path / "a" / "b"
    monkeypatch.setenv(hc.ENV_VAR, str(nested))
    tokenizer_key = "requests-t-0shot-rank0-world_size1-tokenizerorg/model"  # '/' must not make a subdirectory
    long_key = "requests-" + "x" * 400
    for key in (tokenizer_key, long_key):
        assert hc.save_to_cache(key, [key])
        assert hc.load_from_cache(key) == [key]

    files = sorted(p.name for p in nested.iterdir())
    assert all(n.endswith(hc.FILE_SUFFIX) for n in files) and len(files) == 2
    assert all(len(n.encode()) <= 240 for n in files)
    # the same names as lm-eval 0.4.13, so either implementation finds the other's entries by name
    monkeypatch.setattr(lm_cache, "PATH", str(nested))
    assert sorted(os.path.basename(lm_cache._cache_file_path(k)) for k in (tokenizer_key, long_key)) == files
    assert {stat.S_IMODE((nested / n).stat().st_mode) for n in files} == {0o600}
    assert stat.S_IMODE(nested.stat().st_mode) == 0o700

    monkeypatch.delenv(hc.ENV_VAR)
    assert hc.cache_dir() == hc.DEFAULT_PATH
    assert os.path.dirname(hc.cache_file_path("k")) == hc.DEFAULT_PATH


KILLED_SAVER = """
import sys
from lmms_cache import harness_cache

class Blocker:
    def __reduce__(self):  # pickled after the big bytes: the temporary file is half written
        sys.stdout.write("pickling\\n")
        sys.stdout.flush()
        sys.stdin.read()  # blocks until killed
        raise SystemExit("unreachable")

harness_cache.save_to_cache("requests-big", [b"\\x01" * (4 << 20), Blocker()])
"""


def test_sigkill_during_save_leaves_the_previous_entry(tmp_path, cache_path):
    previous = [["previous", list(range(100))]]
    assert hc.save_to_cache("requests-big", previous)
    script = tmp_path / "saver.py"
    script.write_text(KILLED_SAVER)
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env={**os.environ, hc.ENV_VAR: str(cache_path)})
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"pickling\n"
        temps = [p for p in cache_path.iterdir() if p.name.endswith(".tmp")]
        assert len(temps) == 1 and temps[0].stat().st_size > 4 << 20  # killed mid-write, for real
        assert stat.S_IMODE(temps[0].stat().st_mode) == 0o600
        proc.kill()
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()

    assert hc.load_from_cache("requests-big") == previous
    assert hc.delete_cache("requests-big") == 2  # the entry and the killed save's leftover
    assert list(cache_path.iterdir()) == []


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _flip(data: bytes) -> bytes:
    i = len(data) // 2
    return data[:i] + bytes([data[i] ^ 0x40]) + data[i + 1:]


@pytest.mark.parametrize("damage", [
    _truncate,
    _flip,
    lambda data: b"",
    lambda data: b"\x80\x05garbage",
    lambda data: dill.dumps([["written by the harness's own save_to_cache"]]),
], ids=["truncated", "flipped-byte", "empty", "garbage", "harness-written"])
def test_corrupted_file_is_a_miss_with_one_warning(damage, caplog_hc):
    assert hc.save_to_cache("requests-c", [["ok"] * 100])
    path = Path(hc.cache_file_path("requests-c"))
    path.write_bytes(damage(path.read_bytes()))
    caplog_hc.clear()
    assert hc.load_from_cache("requests-c") is None
    assert len(warnings_of(caplog_hc)) == 1


# --------------------------------------------------------------------------- callables


def test_instances_with_a_path_loaded_doc_to_visual_round_trip(tmp_path, caplog_hc):
    (tmp_path / "task").mkdir()
    utils = load_by_path(tmp_path / "task" / "utils.py")
    groups = instances(utils)
    assert hc.save_to_cache("requests-t-0shot-rank0-world_size1-tokenizer", groups)
    assert groups[0][0].arguments[2] is utils.doc_to_visual  # the caller's requests are left alone

    loaded = hc.load_from_cache("requests-t-0shot-rank0-world_size1-tokenizer")
    assert warnings_of(caplog_hc) == []
    assert [[(i.request_type, i.doc_id, i.metadata) for i in g] for g in loaded] == \
           [[(i.request_type, i.doc_id, i.metadata) for i in g] for g in groups]
    for group in loaded:
        for inst in group:
            assert all(a is not None for a in inst.arguments)
    fn = loaded[0][0].arguments[2]
    assert isinstance(fn, types.FunctionType)
    assert (fn.__qualname__, fn.__code__.co_filename) == ("doc_to_visual", utils.doc_to_visual.__code__.co_filename)
    for doc in docs():
        assert pixels(fn(doc)) == pixels(utils.doc_to_visual(doc))
        assert loaded[0][1].arguments[3](doc) == "P: " + doc["question"]
    # every reference to one function comes back as one object
    assert len({id(inst.arguments[2]) for group in loaded for inst in group}) == 1


def test_function_of_an_importable_module_comes_back_identical():
    import fakes

    assert hc.save_to_cache("requests-f", [fakes.visuals, fakes.gen_request(0)])
    fn, inst = hc.load_from_cache("requests-f")
    assert fn is fakes.visuals and inst.arguments[2] is fakes.visuals


def test_partial_keeps_function_arguments_and_keywords(tmp_path):
    utils = load_by_path(tmp_path / "utils.py")
    part = functools.partial(utils.doc_to_text, docs()[1], lmms_eval_specific_kwargs={"pre_prompt": ">> "})
    assert hc.save_to_cache("requests-p", {"p": part})
    loaded = hc.load_from_cache("requests-p")["p"]
    assert isinstance(loaded, functools.partial)
    assert loaded.func.__qualname__ == "doc_to_text"
    assert loaded.keywords == {"lmms_eval_specific_kwargs": {"pre_prompt": ">> "}}
    assert loaded() == part() == ">> q1?"


def test_changed_or_removed_utils_source_is_a_stale_miss(tmp_path, caplog_hc):
    path = tmp_path / "utils.py"
    utils = load_by_path(path)
    assert hc.save_to_cache("requests-s", instances(utils))

    path.write_text(UTILS.replace('.convert("RGB")]', '.convert("L")]  # grey now'))
    caplog_hc.clear()
    assert hc.load_from_cache("requests-s") is None
    assert len(warnings_of(caplog_hc)) == 1 and "stale" in warnings_of(caplog_hc)[0]

    path.write_text(UTILS)  # the code the entry was built with: a hit again
    assert hc.load_from_cache("requests-s") is not None

    path.unlink()
    caplog_hc.clear()
    assert hc.load_from_cache("requests-s") is None
    assert len(warnings_of(caplog_hc)) == 1


def test_a_callable_that_cannot_be_referenced_is_never_saved(caplog_hc):
    assert hc.save_to_cache("requests-l", [["old"]])
    caplog_hc.clear()
    assert hc.save_to_cache("requests-l", [[lambda doc: doc]]) is False
    assert len(warnings_of(caplog_hc)) == 1
    # the outdated entry is gone rather than served, and nothing half-written is left
    assert hc.load_from_cache("requests-l") is None
    assert not Path(hc.cache_dir()).exists() or list(Path(hc.cache_dir()).iterdir()) == []


# --------------------------------------------------------------------------- delete


def test_delete_by_prefix_removes_only_our_files(cache_path):
    assert hc.delete_cache() == 0 and not cache_path.exists()  # absent: nothing created
    for key in ("requests-a-rank0", "requests-a-rank1", "requests-b"):
        assert hc.save_to_cache(key, [key])
    foreign = [cache_path / "notes.txt", cache_path / "requests-a.pickle", cache_path / f"requests-a{hc.FILE_SUFFIX}.bak"]
    for f in foreign:
        f.write_text("not ours")
    (cache_path / f"requests-a-dir{hc.FILE_SUFFIX}").mkdir()

    assert hc.delete_cache("requests-a") == 2
    assert hc.load_from_cache("requests-b") == ["requests-b"]
    assert hc.load_from_cache("requests-a-rank0") is None
    assert hc.delete_cache("") == 1
    assert sorted(p.name for p in cache_path.iterdir()) == sorted([f.name for f in foreign] + [f"requests-a-dir{hc.FILE_SUFFIX}"])


# --------------------------------------------------------------------------- install


def test_install_patches_both_harnesses_and_uninstall_restores(monkeypatch):
    import lm_eval.api.task
    import lm_eval.caching.cache
    import lm_eval.evaluator
    import lmms_eval.api.task
    import lmms_eval.caching.cache

    users = {
        lmms_eval.caching.cache: ("load_from_cache", "save_to_cache", "delete_cache"),
        lmms_eval.api.task: ("load_from_cache", "save_to_cache"),
        lm_eval.caching.cache: ("load_from_cache", "save_to_cache", "delete_cache"),
        lm_eval.api.task: ("load_from_cache", "save_to_cache"),
        lm_eval.evaluator: ("delete_cache",),
    }
    before = {(m, n): getattr(m, n) for m, names in users.items() for n in names}
    assert all(f.__module__ != hc.__name__ for f in before.values())
    # a harness that is not installed is skipped without error
    monkeypatch.setitem(hc._HARNESSES, "no_such_harness_xyz", "no_such_harness_xyz.caching.cache")
    try:
        assert hc.install() == ["lmms_eval", "lm_eval"]
        assert hc.install() == ["lmms_eval", "lm_eval"]  # idempotent
        assert hc.installed() == ["lmms_eval", "lm_eval"]
        for (module, name) in before:
            assert getattr(module, name) is getattr(hc, name), (module.__name__, name)
        # a module importing the names after install() gets ours, and is restored too
        late = types.ModuleType("lm_eval.late_plugin")
        exec("from lm_eval.caching.cache import load_from_cache", late.__dict__)
        monkeypatch.setitem(sys.modules, late.__name__, late)
        assert late.load_from_cache is hc.load_from_cache
    finally:
        restored = hc.uninstall()
    assert restored == ["lmms_eval", "lm_eval"]
    assert hc.installed() == []
    for (module, name), original in before.items():
        assert getattr(module, name) is original, (module.__name__, name)
    assert late.load_from_cache is lm_eval.caching.cache.load_from_cache


def _lmms_task_dir(root: Path) -> Path:
    import datasets

    colors = [(200, 0, 0), (0, 200, 0), (0, 0, 200)]
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8), c) for c in colors],
                                     "question": [f"color {i}?" for i in range(3)], "answer": ["red", "green", "blue"]},
                                    features=features)
    datasets.DatasetDict({"test": ds}).save_to_disk(str(root / "data"))
    task_dir = root / "tasks" / "tiny"
    task_dir.mkdir(parents=True)
    (task_dir / "tiny.yaml").write_text(textwrap.dedent(f"""\
        dataset_path: {root / "data"}
        dataset_kwargs:
          load_from_disk: true
        task: tiny_hc
        test_split: test
        output_type: generate_until
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: 4
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        """))
    (task_dir / "utils.py").write_text(UTILS)
    return task_dir


def test_lmms_eval_cache_hit_gives_requests_bound_to_the_live_task(tmp_path, cache_path, monkeypatch, caplog_hc):
    """lmms-eval 0.7.3 with its own cache crashes on a hit (doc_to_visual None); installed, a hit works."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lmms_eval.tasks import TaskManager, get_task_dict

    task_dir = _lmms_task_dir(tmp_path)
    built: list[str] = []

    def build() -> Any:
        task = get_task_dict(["tiny_hc"], TaskManager(include_path=str(task_dir.parent), include_defaults=False))["tiny_hc"]
        monkeypatch.setattr(task, "construct_requests", functools.partial(_recording, task.construct_requests, built))
        task.build_all_requests(limit=None, rank=0, world_size=1, cache_requests=True)
        hc._live_tasks.clear()  # as in a new process: the task must be found by whoever loads
        return task

    assert "lmms_eval" in hc.install()
    try:
        first = build()
        assert len(built) == 3
        second = build()
        assert len(built) == 3  # a hit: nothing rebuilt
        assert [i.arguments[0] for i in second.instances] == [i.arguments[0] for i in first.instances]
        for inst, doc in zip(second.instances, second.test_docs(), strict=True):
            visual = inst.arguments[2]
            assert visual.__self__ is second  # bound to the live task, not None
            assert pixels(visual(doc)) == pixels([doc["image"].convert("RGB")])

        # outside a task that can take the requests, the entry is a miss (with a warning)
        [entry] = [p.name for p in cache_path.iterdir()]
        caplog_hc.clear()
        assert hc.load_from_cache(entry[: -len(hc.FILE_SUFFIX)]) is None
        assert len(warnings_of(caplog_hc)) == 1

        # a changed prompt function makes the cached contexts stale: rebuilt with the new prompt
        (task_dir / "utils.py").write_text(UTILS.replace('pre + doc["question"]', '"NEW " + doc["question"]'))
        caplog_hc.clear()
        third = build()
        assert len(built) == 6
        assert [i.arguments[0] for i in third.instances] == [f"NEW color {i}?" for i in range(3)]
        assert any("stale" in w for w in warnings_of(caplog_hc))
    finally:
        hc.uninstall()


def _recording(construct: Any, log: list[str], *args: Any, **kwargs: Any) -> Any:
    log.append(kwargs.get("doc_id", args[0] if args else None))
    return construct(*args, **kwargs)


def test_lm_eval_cache_hit_goes_through_our_files(tmp_path, cache_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    task_dir = tmp_path / "lmtasks"
    task_dir.mkdir()
    with open(tmp_path / "data.jsonl", "w") as f:
        for i in range(3):
            f.write(json.dumps({"q": f"q{i}", "a": f"a{i}"}) + "\n")
    (task_dir / "lmtiny.yaml").write_text(textwrap.dedent(f"""\
        task: lmtiny_hc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {tmp_path / "data.jsonl"}
          cache_dir: {tmp_path / "hf"}
        test_split: test
        output_type: generate_until
        doc_to_text: !function utils.doc_to_text
        doc_to_target: "{{{{a}}}}"
        generation_kwargs:
          until: ["\\n"]
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        """))
    (task_dir / "utils.py").write_text("def doc_to_text(doc):\n    return 'Q: ' + doc['q']\n")

    built: list[str] = []

    def build() -> Any:
        task = TaskManager(include_path=str(task_dir), include_defaults=False).load(["lmtiny_hc"])["tasks"]["lmtiny_hc"]
        monkeypatch.setattr(task, "construct_requests", functools.partial(_recording, task.construct_requests, built))
        task.build_all_requests(limit=None, rank=0, world_size=1, cache_requests=True)
        return task

    assert "lm_eval" in hc.install()
    try:
        first = build()
        assert len(built) == 3
        [entry] = list(cache_path.iterdir())
        assert entry.read_bytes().startswith(hc.MAGIC)
        entry.write_bytes(entry.read_bytes()[:-10])  # truncated: lm-eval rebuilds instead of failing
        second = build()
        assert len(built) == 6 and entry.read_bytes().startswith(hc.MAGIC)
        third = build()
        assert len(built) == 6  # a hit
        assert [i.arguments for i in third.instances] == [i.arguments for i in first.instances] == \
               [(f"Q: q{i}", {"until": ["\n"]}) for i in range(3)]
        assert [i.doc for i in second.instances] == [i.doc for i in third.instances]
    finally:
        hc.uninstall()
