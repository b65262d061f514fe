"""Documents and the media derived from them (issue 10): the whole document in the key,
the derivation memo that keeps hits from decoding, and every way the memo is rebuilt.

Documents here are rows of real ``datasets`` datasets; the tasks' functions live in modules
written at run time, so that a test can edit their source.
"""

from __future__ import annotations

import importlib
import logging
import random
import sys
from pathlib import Path
from typing import Any

import pytest

from fakes import FakeModel, image
from lmms_cache import cached
from lmms_cache.documents import dataset_id, row_digests

datasets = pytest.importorskip("datasets")

TASK_MODULE = """
import os
CALLS = []

def helper(doc):
    return doc["image"]

def doc_to_visual(doc):
    CALLS.append(doc["q"])
    return [helper(doc)]

def video_path(doc):
    CALLS.append(doc["q"])
    return [os.path.join(os.environ["LMC_TEST_VIDEOS"], doc["video"])]
"""


@pytest.fixture
def task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A task module (``tmp_path/taskmod_<n>.py``) the tests import and may edit."""
    name = f"taskmod_{abs(hash(tmp_path)) % 10**8}"
    path = tmp_path / f"{name}.py"
    path.write_text(TASK_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    module.path = path
    yield module
    sys.modules.pop(name, None)


def rows(n: int = 4, *, videos: bool = False) -> Any:
    data: dict[str, list[Any]] = {"image": [image((40 * i, 10, 200)) for i in range(n)], "q": [f"q{i}" for i in range(n)]}
    if videos:
        data["video"] = [f"v{i}.mp4" for i in range(n)]
    return datasets.Dataset.from_dict(data).cast_column("image", datasets.Image())


def model(docs: Any) -> FakeModel:
    m = FakeModel()
    m.task_dict = {"t": {"test": docs}}
    return m


def requests(fn: Any, n: int = 4) -> list[Any]:
    from fakes import gen_request

    return [gen_request(i, doc_to_visual=fn) for i in range(n)]


def run(cache: Path, docs: Any, fn: Any, n: int = 4) -> Any:
    lm = cached(model(docs), cache)
    lm.generate_until(requests(fn, n))
    lm.cache_close()
    return lm


# -- the memo ----------------------------------------------------------------------------------


def test_a_rerun_derives_one_document_per_function_to_check_the_memo(tmp_path, task):
    docs = rows()
    first = run(tmp_path, docs, task.doc_to_visual)
    assert first.cache_stats.misses == 4 and len(task.CALLS) == 4
    task.CALLS.clear()
    again = run(tmp_path, docs, task.doc_to_visual)
    assert again.cache_stats.hits == 4
    assert task.CALLS == ["q0"]  # the once-per-call check; the other media come from the memo


def test_row_digests_are_memoized_in_the_cache(tmp_path, task):
    docs = rows()
    run(tmp_path, docs, task.doc_to_visual)
    with_indices = docs.select([3, 2, 1, 0])
    # select() is another dataset: its rows in their own order
    assert row_digests(with_indices) == b"".join(row_digests(docs)[16 * i : 16 * i + 16] for i in (3, 2, 1, 0))
    assert dataset_id(with_indices) != dataset_id(docs)
    assert dataset_id(docs.with_transform(lambda b: b)) is None  # a custom transform: rows decoded instead


def test_editing_the_task_module_rebuilds_the_memo(tmp_path, task):
    docs = rows()
    run(tmp_path, docs, task.doc_to_visual)
    task.path.write_text(TASK_MODULE.replace("CALLS = []", "CALLS = []  # edited\n"))
    task.CALLS.clear()
    again = run(tmp_path, docs, task.doc_to_visual)
    assert again.cache_stats.hits == 4
    assert len(task.CALLS) == 4  # the fingerprint changed: every document derived again


def test_a_new_decoder_version_rebuilds_the_memo(tmp_path, task, monkeypatch):
    import PIL

    docs = rows()
    run(tmp_path, docs, task.doc_to_visual)
    monkeypatch.setattr(PIL, "__version__", "0.0.1-test")
    task.CALLS.clear()
    run(tmp_path, docs, task.doc_to_visual)
    assert len(task.CALLS) == 4


def test_a_changed_helper_outside_the_fingerprint_is_caught_by_the_check(tmp_path, task, caplog):
    docs = rows()
    run(tmp_path, docs, task.doc_to_visual)
    # a helper changed without its module's source changing (patched at run time): the
    # once-per-call re-derivation of the first document sees it and drops the memo
    task.helper = lambda doc: doc["image"].resize((8, 8))
    task.CALLS.clear()
    with caplog.at_level(logging.INFO, logger="lmms_cache"):
        again = run(tmp_path, docs, task.doc_to_visual)
    assert "no longer matches" in caplog.text
    assert again.cache_stats.misses == 4  # new media: computed, never a wrong hit
    assert len(task.CALLS) == 4


def test_a_rewritten_file_behind_a_memoized_path_is_a_miss(tmp_path, task, monkeypatch):
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(4):
        (videos / f"v{i}.mp4").write_bytes(b"video-%d" % i)
    monkeypatch.setenv("LMC_TEST_VIDEOS", str(videos))
    docs = rows(videos=True)
    run(tmp_path / "cache", docs, task.video_path)
    (videos / "v2.mp4").write_bytes(b"another video")
    task.CALLS.clear()
    again = run(tmp_path / "cache", docs, task.video_path)
    assert again.cache_stats.hits == 3 and again.cache_stats.misses == 1
    assert "q2" in task.CALLS  # re-derived: its file's signature changed


def test_a_dataset_with_one_row_changed_misses_that_row_only(tmp_path, task):
    docs = rows()
    run(tmp_path, docs, task.doc_to_visual)
    changed = docs.map(lambda row, i: {"q": row["q"] + "!" if i == 1 else row["q"]}, with_indices=True)
    lm = cached(model(changed), tmp_path)
    lm.generate_until(requests(task.doc_to_visual))
    assert lm.cache_stats.hits == 3 and lm.cache_stats.misses == 1


# -- documents ---------------------------------------------------------------------------------


class SeedReader(FakeModel):
    """lmms-eval's DiffusersWMBase: reads doc["seed"] itself; no argument carries it."""

    def generate_until(self, requests: list[Any]) -> list[str]:
        self._record("generate_until", requests)
        return [f"sample with seed {self.task_dict[r.args[4]][r.args[5]][r.args[3]]['seed']}" for r in requests]


def test_differently_seeded_rows_with_identical_requests_are_five_requests(tmp_path):
    from fakes import gen_request

    m = SeedReader()
    m.task_dict = {"t": {"test": datasets.Dataset.from_dict({"prompt": ["a cat"] * 5, "seed": [11, 12, 13, 14, 15]})}}
    lm = cached(m, tmp_path)
    out = lm.generate_until([gen_request(i, context="a cat", doc_to_visual=None) for i in range(5)])
    assert out == [f"sample with seed {s}" for s in (11, 12, 13, 14, 15)]
    assert m.calls == 1 and len(m.seen) == 5


def test_a_doc_to_visual_that_draws_from_the_global_random_state_bypasses_the_cache(tmp_path, caplog):
    from fakes import gen_request

    def random_crop(doc: dict[str, Any]) -> list[Any]:
        left = random.randint(0, 4)
        return [doc["image"].crop((left, 0, left + 8, 8))]

    docs = [{"image": image((i, 0, 0), (16, 16))} for i in range(3)]
    m = FakeModel()
    m.task_dict = {"crops": {"test": docs}}
    with caplog.at_level(logging.WARNING, logger="lmms_cache"):
        lm = cached(m, tmp_path)
        state = random.getstate()
        lm.generate_until([gen_request(i, task="crops", doc_to_visual=random_crop) for i in range(3)])
        assert random.getstate() == state  # keying drew nothing the model would not
        lm.generate_until([gen_request(0, task="crops", doc_to_visual=random_crop)])
    assert lm.cache_stats.bypassed == 4 and lm.cache_stats.written == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "crops" in warnings[0] and "bypass" in warnings[0]


def test_an_lm_eval_instance_counts_its_document_task_and_doc_id():
    from lm_eval.api.instance import Instance

    from lmms_cache.fingerprint import Encoder
    from lmms_cache.identity import identify
    from lmms_cache.key import KeyBuilder

    def request(doc: dict[str, Any], task: str = "arith", doc_id: int = 0) -> Any:
        return Instance(request_type="generate_until", doc=doc, arguments=("Q: 2+2? A:", {"until": ["\n"]}),
                        idx=0, metadata=(task, doc_id, 1))  # fmt: skip

    kb = KeyBuilder(identify(None, model_id="m"), None, Encoder())

    def key(r: Any) -> bytes:
        return kb.keys("generate_until", [r])[0].key

    base = key(request({"q": "2+2", "seed": 1}))
    assert key(request({"q": "2+2", "seed": 1})) == base
    assert key(request({"q": "2+2", "seed": 2})) != base  # a field no argument carries
    assert key(request({"q": "2+2", "seed": 1}, task="arith_b")) != base
    assert key(request({"q": "2+2", "seed": 1}, doc_id=1)) != base


def test_until_as_a_string_is_until_as_a_list():
    from fakes import gen_request
    from lmms_cache.fingerprint import Encoder
    from lmms_cache.identity import identify
    from lmms_cache.key import KeyBuilder

    m = FakeModel()
    m.task_dict = {"t": {"test": [{"q": "x"}]}}
    kb = KeyBuilder(identify(None, model_id="m"), m, Encoder())

    def key(until: Any) -> bytes:
        return kb.keys("generate_until", [gen_request(0, gen_kwargs={"until": until}, doc_to_visual=None)])[0].key

    assert key("\n\n") == key(["\n\n"])
    assert key("\n") != key(["\n\n"])
    lm_eval_style = [("Q:", {"until": "x"}), ("Q:", {"until": ["x"]})]
    a, b = (kb.keys("generate_until", [r])[0].key for r in lm_eval_style)
    assert a == b


def test_each_distinct_document_is_keyed_once_per_call(tmp_path, monkeypatch):
    """lmms-eval's multiple choice: 4 requests per document share its digest."""
    import lmms_cache.fingerprint as fp
    from fakes import ll_request

    m = FakeModel()
    m.task_dict = {"t": {"test": [{"image": image((i, 0, 0)), "question": f"q{i}"} for i in range(3)]}}
    encoded: list[Any] = []
    original = fp._image_digest

    def counting(img: Any) -> bytes:
        encoded.append(img)
        return original(img)

    monkeypatch.setattr(fp, "_image_digest", counting)
    lm = cached(m, tmp_path)
    lm.loglikelihood([ll_request(d, f" {c}") for d in range(3) for c in "ABCD"])
    assert len(encoded) == 3  # once per document: the media the model sees are the document's image


def test_a_frame_folder_in_a_media_position_counts_by_its_frames(tmp_path):
    from fakes import gen_request

    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        (frames / f"{i}.jpg").write_bytes(b"frame %d" % i)
    m = FakeModel()
    m.task_dict = {"v": {"test": [{"frames": str(frames)}]}}

    def folder(doc: dict[str, Any]) -> list[str]:
        return [doc["frames"]]

    lm = cached(m, tmp_path / "cache")
    lm.generate_until([gen_request(0, task="v", doc_to_visual=folder)])
    lm.generate_until([gen_request(0, task="v", doc_to_visual=folder)])
    assert lm.cache_stats.hits == 1
    (frames / "1.jpg").write_bytes(b"rewritten frame")
    lm.generate_until([gen_request(0, task="v", doc_to_visual=folder)])
    assert lm.cache_stats.misses == 2


# -- multi-round: later rounds' media, discovered as the model asks for them ---------------------

STEP_MODULE = """
import os

def chunk(doc, round_idx):
    return os.path.join(os.environ["LMC_TEST_CHUNKS"], f"{doc['video']}-{round_idx}.bin")

def step(doc, previous_output=None, round_idx=None, previous_round_info=None):
    if round_idx >= 3:
        return None, None, True, previous_output, None
    return [chunk(doc, round_idx)], f"round {round_idx}", False, previous_output, None
"""


class MultiRound(FakeModel):
    """The loop of lmms-eval's llava_onevision.generate_until_multi_round, trimmed: the first
    round's media from doc_to_visual, later rounds' from the step function."""

    def generate_until_multi_round(self, requests: list[Any]) -> list[Any]:
        self.calls += 1
        out = []
        for r in requests:
            context, _gen, doc_to_visual, doc_to_text, doc_id, task, split = r.args
            doc = self.task_dict[task][split][doc_id]
            visuals, answers, round_idx = doc_to_visual(doc), [], 0
            while True:
                if round_idx:
                    visuals, context, terminal, _, _ = doc_to_text(doc, previous_output=answers, round_idx=round_idx,
                                                                   previous_round_info=None)  # fmt: skip
                    if terminal:
                        break
                seen = b"".join(Path(v).read_bytes() for v in visuals)
                answers.append(f"{context}: {seen.decode()}")
                round_idx += 1
            out.append(answers)
        return out


@pytest.fixture
def chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    folder = tmp_path / "chunks"
    folder.mkdir()
    for r in range(3):
        (folder / f"clip-{r}.bin").write_bytes(b"chunk %d" % r)
    monkeypatch.setenv("LMC_TEST_CHUNKS", str(folder))
    name = f"stepmod_{abs(hash(tmp_path)) % 10**8}"
    (tmp_path / f"{name}.py").write_text(STEP_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    module.folder = folder
    module.path = tmp_path / f"{name}.py"
    yield module
    sys.modules.pop(name, None)


def multi_round(chunks: Any) -> tuple[MultiRound, list[Any]]:
    from lmms_eval.api.instance import Instance

    m = MultiRound()
    m.task_dict = {"ovo": {"test": [{"video": "clip"}]}}

    def first_round(doc: dict[str, Any]) -> list[str]:
        return [chunks.chunk(doc, 0)]

    args = ("round 0", {"max_new_tokens": 8}, first_round, chunks.step, 0, "ovo", "test")
    return m, [Instance(request_type="generate_until_multi_round", arguments=args, idx=0,
                        metadata={"task": "ovo", "doc_id": 0, "repeats": 1, "split": "test"})]  # fmt: skip


def test_a_later_rounds_chunk_rewritten_is_a_miss(tmp_path, chunks):
    cache = tmp_path / "cache"
    m, reqs = multi_round(chunks)
    first = cached(m, cache).generate_until_multi_round(reqs)
    assert first == [["round 0: chunk 0", "round 1: chunk 1", "round 2: chunk 2"]]
    m, reqs = multi_round(chunks)
    lm = cached(m, cache)
    assert lm.generate_until_multi_round(reqs) == first and m.calls == 0
    (chunks.folder / "clip-2.bin").write_bytes(b"chunk 2, re-encoded")  # only the model's third round reads it
    m, reqs = multi_round(chunks)
    lm = cached(m, cache)
    assert lm.generate_until_multi_round(reqs) == [["round 0: chunk 0", "round 1: chunk 1",
                                                    "round 2: chunk 2, re-encoded"]]  # fmt: skip
    assert m.calls == 1 and lm.cache_stats.hits == 0


def test_the_step_functions_module_source_is_in_the_key(tmp_path, chunks):
    cache = tmp_path / "cache"
    m, reqs = multi_round(chunks)
    cached(m, cache).generate_until_multi_round(reqs)
    chunks.path.write_text(STEP_MODULE.replace("import os", "import os  # a helper of the step changed"))
    m, reqs = multi_round(chunks)
    cached(m, cache).generate_until_multi_round(reqs)
    assert m.calls == 1


def test_one_request_calls_within_a_second_share_a_check_and_later_ones_check_again(tmp_path, task, monkeypatch):
    import lmms_cache.documents as documents

    now = [1000.0]
    monkeypatch.setattr(documents.time, "monotonic", lambda: now[0])
    docs = rows()
    run(tmp_path, docs, task.doc_to_visual)
    lm = cached(model(docs), tmp_path)
    task.CALLS.clear()
    for i in range(4):  # a loop of one-request calls, 0.1 s apart
        lm.generate_until(requests(task.doc_to_visual)[i : i + 1])
        now[0] += 0.1
    assert lm.cache_stats.hits == 4
    assert task.CALLS == ["q0"]  # one re-derivation for the four calls
    now[0] += 5
    lm.generate_until(requests(task.doc_to_visual)[2:3])
    assert task.CALLS == ["q0", "q2"]  # a call later than a second: checked again


def test_a_function_that_moves_the_random_state_is_never_memoized(tmp_path):
    import sqlite3

    from fakes import gen_request

    def jitter(doc: dict[str, Any]) -> list[Any]:
        random.random()  # a crop, a frame choice: depends on what ran before
        return [doc["image"]]

    lm = cached(model(rows()), tmp_path)
    lm.generate_until([gen_request(i, doc_to_visual=jitter) for i in range(4)])
    lm.cache_close()
    assert lm.cache_stats.bypassed == 4 and lm.cache_stats.written == 0
    with sqlite3.connect(tmp_path / "cache.db") as conn:
        assert conn.execute("SELECT count(*) FROM derived").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM row_digests").fetchone()[0] == 1  # the rows are fine
