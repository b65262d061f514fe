"""The benchmark workloads: their data on disk, their requests, and the fake model.

Every workload is served the way lmms-eval serves it: documents live in a ``datasets``
``DatasetDict`` (``model.task_dict[task][split][doc_id]`` decodes an ``Image`` feature on
row access), and each request carries the bound ``doc_to_visual`` method of a real
lmms-eval ``ConfigurableTask`` (see :func:`make_task`), which the model (and lmms-cache, to
key the request by content) calls on the document. The same
content is also offered in lm-eval's layout, where the request itself holds the decoded
images (``(context, gen_kwargs, {"visual": [...]})``), as lm-eval builds its requests.

Sizes (``full`` / ``quick``):

=============  =========================================================  ============
workload       requests                                                   quick
=============  =========================================================  ============
text           10,000 generate_until, ~2 KB prompts                       1,000
image-1024     1,000 generate_until, one 1024x1024 JPEG each              50
image-4x448    1,000 generate_until, four 448x448 JPEGs each              50
video-file     64 generate_until, a 20 MB file path each                  4
video-tensor   64 generate_until, a 32x3x448x448 uint8 tensor each        4
mc             2,500 documents x 4 choices loglikelihood, one image each  100 x 4
=============  =========================================================  ============

lm-eval's CachingLM, whose image keys cost a PNG encoding (~0.2 s for 1024x1024), gets the
first 16 requests of the image workloads and 64 of mc (4 / 16 with ``--quick``), and the
proxy on lm-eval's layout 200 / 2,000 (those requests hold decoded images). Images cycle through 64 distinct JPEG encodings (one document's image is decoded on every
access, whatever it holds; distinct prompts keep every request distinct).
"""

from __future__ import annotations

import io
import json
import os
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

TASK_SPLIT = "test"
GEN_KWARGS = {"max_new_tokens": 32, "temperature": 0, "do_sample": False, "until": ["\n\n"]}
DISTINCT_IMAGES = 64


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    method: str  # generate_until | loglikelihood
    requests: int  # full size
    quick: int  # quick size
    docs_per_request: float = 1.0  # mc: 4 requests per document
    # per system: at most this many requests in bulk calls / calls of one (slow rivals)
    caps: dict[str, int] = field(default_factory=dict)
    quick_caps: dict[str, int] = field(default_factory=dict)
    ones: int = 1000  # requests sent one per call (hits); misses use half
    lm_eval_supported: bool = True
    note: str = ""


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("text", "text generate_until, 2 KB prompts", "generate_until", 10_000, 1_000, ones=1000),
        Workload("image-1024", "1 image 1024x1024 per request", "generate_until", 1_000, 50, ones=100,
                 caps={"lm-eval": 16, "lmms-cache/lm-eval": 200}, quick_caps={"lm-eval": 4}),
        Workload("image-4x448", "4 images 448x448 per request", "generate_until", 1_000, 50, ones=100,
                 caps={"lm-eval": 16, "lmms-cache/lm-eval": 200}, quick_caps={"lm-eval": 4}),
        Workload("video-file", "video: a 20 MB file path", "generate_until", 64, 4, ones=64,
                 note="lm-eval keys a path by its name, lmms-eval ignores visuals; lmms-cache hashes the file"),
        Workload("video-tensor", "video: a 32x3x448x448 uint8 tensor", "generate_until", 64, 4, ones=64,
                 lm_eval_supported=False, note="lm-eval's CachingLM cannot key a tensor (json TypeError)"),
        Workload("mc", "multiple choice: 4 choices x 1 image 448x448", "loglikelihood", 10_000, 400,
                 docs_per_request=0.25, ones=400, caps={"lm-eval": 64, "lmms-cache/lm-eval": 2000},
                 quick_caps={"lm-eval": 16}),
    )
}


def size(workload: Workload, quick: bool) -> int:
    return workload.quick if quick else workload.requests


def docs(workload: Workload, quick: bool) -> int:
    return max(1, int(size(workload, quick) * workload.docs_per_request))


# -- the fake model ----------------------------------------------------------------------------


class Clock:
    """Nanoseconds spent inside the fake model (an object: never part of a model identity)."""

    def __init__(self) -> None:
        self.ns = 0
        self.calls = 0
        self.requests = 0


class FakeModel:
    """A model whose own cost is zero (or ``sleep_ms`` per request), timing itself.

    It answers from the prompt alone and never looks at media, so everything measured
    around it is the cache's (or the harness's) own work.
    """

    def __init__(self, task_dict: dict[str, Any] | None = None, sleep_ms: float = 0.0) -> None:
        self.pretrained = "bench/fake-model"
        self.task_dict = task_dict or {}
        self.sleep_s = sleep_ms / 1e3
        self.clock = Clock()

    def _account(self, started: int, n: int) -> None:
        self.clock.ns += time.perf_counter_ns() - started
        self.clock.calls += 1
        self.clock.requests += n

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        t = time.perf_counter_ns()
        if self.sleep_s:
            time.sleep(self.sleep_s * len(requests))
        out = [f"The answer is {zlib.crc32(r.args[0].encode()) % 1000}." for r in requests]
        self._account(t, len(requests))
        return out

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        t = time.perf_counter_ns()
        if self.sleep_s:
            time.sleep(self.sleep_s * len(requests))
        out = [(-float(zlib.crc32(r.args[1].encode()) % 1000) / 100, False) for r in requests]
        self._account(t, len(requests))
        return out

    def set_cache_hook(self, hook: Any) -> None:  # lm-eval's CachingLM installs one
        self.cache_hook = hook


def make_task(name: str, doc_to_visual: str | Callable[[Any], Any] | None, output_type: str,
              features: Sequence[str]) -> Any:  # fmt: skip
    """A real lmms-eval 0.7.3 ``ConfigurableTask``, without its ``__init__`` (which downloads
    and processes a dataset): only what ``ConfigurableTask.doc_to_visual`` reads is set (its
    ``config``, i.e. ``_config``, a real ``TaskConfig``; ``features``, the dataset's column
    names; ``lmms_eval_specific_kwargs``).

    The requests carry the task's bound ``doc_to_visual`` as lmms-eval's do: the harness's
    own, unmodified method, so that whatever a cache does with it (lmms-cache answers a
    text-only task's ``None`` without reading the document) is what it does in a real run.
    """
    try:
        from lmms_eval.api.task import ConfigurableTask, TaskConfig
    except ImportError as exc:
        raise ImportError(f"the lmms-eval workloads need lmms-eval 0.7.3 (pip install --no-deps lmms-eval==0.7.3 "
                          f"and tests/requirements-e2e.txt): {exc}") from exc  # fmt: skip

    task = ConfigurableTask.__new__(ConfigurableTask)
    task._config = TaskConfig(task=name, doc_to_visual=doc_to_visual, output_type=output_type)
    task.features = list(features)
    task.lmms_eval_specific_kwargs = None
    return task


def four_images(doc: dict[str, Any]) -> list[Any]:
    return [doc["image_1"], doc["image_2"], doc["image_3"], doc["image_4"]]


# -- data on disk ------------------------------------------------------------------------------


def _jpegs(side: int, count: int, seed: int) -> list[bytes]:
    """``count`` distinct, photo-like (smooth plus noise) JPEGs of ``side`` x ``side``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side]
    out = []
    for i in range(count):
        base = np.stack([(x * (i + 1) // 7) % 256, (y * 3 // (i % 5 + 1)) % 256, ((x + y + 9 * i) // 5) % 256], -1)
        arr = np.clip(base + rng.integers(-12, 12, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _prompts(n: int, seed: int = 0, length: int = 2048) -> list[str]:
    import numpy as np

    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ      ", dtype=np.uint8)
    rng = np.random.default_rng(seed)
    chars = alphabet[rng.integers(0, len(alphabet), n * length)].tobytes().decode()
    return [f"Question {i}: " + chars[i * length : (i + 1) * length] for i in range(n)]


def prepare(name: str, root: str, quick: bool) -> dict[str, Any]:
    """Write the workload's documents under ``root/name``; returns a small description."""
    import datasets

    w = WORKLOADS[name]
    where = os.path.join(root, name)
    os.makedirs(where, exist_ok=True)
    n_docs = docs(w, quick)
    started = time.perf_counter()
    info: dict[str, Any] = {"docs": n_docs}
    image = datasets.Image()
    if name == "text":
        cols: dict[str, Any] = {"question": _prompts(n_docs)}
        feats = datasets.Features({"question": datasets.Value("string")})
    elif name in ("image-1024", "mc"):
        side = 1024 if name == "image-1024" else 448
        jp = _jpegs(side, DISTINCT_IMAGES, seed=side)
        cols = {"image": [{"bytes": jp[i % len(jp)], "path": None} for i in range(n_docs)],
                "question": [f"Describe image {i} in detail." for i in range(n_docs)]}  # fmt: skip
        feats = datasets.Features({"image": image, "question": datasets.Value("string")})
        if name == "mc":
            cols["choices"] = [[f"choice {c} of {i}" for c in "ABCD"] for i in range(n_docs)]
            feats["choices"] = datasets.Sequence(datasets.Value("string"))
        info["jpeg_bytes"] = sum(map(len, jp)) // len(jp)
    elif name == "image-4x448":
        jp = _jpegs(448, DISTINCT_IMAGES, seed=4)
        cols = {f"image_{k}": [{"bytes": jp[(i * 4 + k) % len(jp)], "path": None} for i in range(n_docs)]
                for k in range(1, 5)}  # fmt: skip
        cols["question"] = [f"Compare the four images of set {i}." for i in range(n_docs)]
        feats = datasets.Features({**{f"image_{k}": image for k in range(1, 5)}, "question": datasets.Value("string")})
        info["jpeg_bytes"] = sum(map(len, jp)) // len(jp)
    elif name == "video-file":
        paths = []
        block = os.urandom(1 << 20)
        for i in range(n_docs):
            path = os.path.join(where, f"video_{i:03d}.mp4")
            with open(path, "wb") as f:
                f.write(b"%08d" % i)  # every file distinct
                for _ in range(20):
                    f.write(block)
            paths.append(path)
        cols = {"video": paths, "question": [f"What happens in video {i}?" for i in range(n_docs)]}
        feats = datasets.Features({"video": datasets.Value("string"), "question": datasets.Value("string")})
        info["file_bytes"] = os.path.getsize(paths[0])
    elif name == "video-tensor":
        # Tensors are made in memory by each measuring process (see load()).
        info["prepare_seconds"] = 0.0
        return info
    else:
        raise KeyError(name)
    ds = datasets.Dataset.from_dict(cols, features=feats)
    datasets.DatasetDict({TASK_SPLIT: ds}).save_to_disk(os.path.join(where, "dataset"))
    info["prepare_seconds"] = time.perf_counter() - started
    with open(os.path.join(where, "info.json"), "w") as f:
        json.dump(info, f)
    return info


# -- loading and requests ----------------------------------------------------------------------


@dataclass
class Loaded:
    """A workload ready to send: the model's task_dict and both layouts of its requests."""

    name: str
    task: Callable[[], Any]  # -> the workload's lmms_eval ConfigurableTask (see make_task), made on first use
    task_dict: dict[str, Any]
    method: str
    lmms_requests: Callable[[int], list[Any]]  # n -> the first n requests, lmms-eval layout
    lm_requests: Callable[[int], list[Any]]  # n -> the first n requests, lm-eval layout


def _video_tensors(n: int) -> list[dict[str, Any]]:
    import torch

    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 256, (32, 3, 448, 448), dtype=torch.uint8, generator=g)
    rows = []
    for i in range(n):
        t = base.clone()
        t.view(-1)[: 8] = torch.tensor(list(i.to_bytes(8, "little")), dtype=torch.uint8)
        rows.append({"video": t, "question": f"What happens in clip {i}?"})
    return rows


def load(name: str, root: str, quick: bool) -> Loaded:
    w = WORKLOADS[name]
    n_docs = docs(w, quick)
    if name == "video-tensor":
        split: Any = _video_tensors(n_docs)
        dataset_dict: Any = {TASK_SPLIT: split}
    else:
        import datasets

        dataset_dict = datasets.load_from_disk(os.path.join(root, name, "dataset"))
        split = dataset_dict[TASK_SPLIT]
    visual: Any = {"text": None, "image-1024": "image", "mc": "image", "image-4x448": four_images,
                   "video-file": "video", "video-tensor": "video"}[name]  # fmt: skip
    columns = ["video", "question"] if name == "video-tensor" else list(split.features)
    made: list[Any] = []

    def task() -> Any:
        # Made on first use: importing lmms_eval.api.task costs ~5 s and ~0.5 GB of resident
        # imports (torch, transformers, ...), which lm-eval-layout processes never pay.
        if not made:
            made.append(make_task(name, visual, w.method, columns))
        return made[0]

    def doc_to_visual(doc: dict[str, Any]) -> Any:
        # What ConfigurableTask.doc_to_visual returns, for lm-eval's layout (decoded up front).
        return [doc[visual]] if isinstance(visual, str) else visual(doc)

    task_dict = {name: dataset_dict}
    questions = split["question"] if name != "video-tensor" else [r["question"] for r in split]

    def lmms_requests(n: int) -> list[Any]:
        from lmms_eval.api.instance import Instance

        out = []
        fn = task().doc_to_visual  # one bound method per construct_requests call, as lmms-eval does
        if w.method == "generate_until":
            for i in range(n):
                out.append(Instance("generate_until", (questions[i], dict(GEN_KWARGS), fn, i, name, TASK_SPLIT), 0,
                                    {"task": name, "doc_id": i, "repeats": 1, "split": TASK_SPLIT}))  # fmt: skip
        else:
            choices = split["choices"]
            for i in range(n):
                d = i // 4
                out.append(Instance("loglikelihood", (f"{questions[d]}\nAnswer:", f" {choices[d][i % 4]}", fn, d, name,
                                                      TASK_SPLIT), i % 4,
                                    {"task": name, "doc_id": d, "repeats": 1, "split": TASK_SPLIT}))  # fmt: skip
        return out

    def lm_requests(n: int) -> list[Any]:
        # lm-eval builds every request with its visuals already decoded (doc_to_image at
        # construct_requests time): they are decoded here, outside any timing.
        from lm_eval.api.instance import Instance

        out = []
        if w.method == "generate_until":
            for i in range(n):
                args: tuple[Any, ...] = (questions[i], dict(GEN_KWARGS))
                if name != "text":
                    args += ({"visual": doc_to_visual(split[i])},)
                out.append(Instance("generate_until", {}, args, 0, (name, i, 1)))
        else:
            choices = split["choices"]
            aux: dict[str, Any] = {}
            for i in range(n):
                d = i // 4
                if i % 4 == 0:
                    aux = {"visual": doc_to_visual(split[d])}  # one dict shared by the 4 choices
                out.append(Instance("loglikelihood", {}, (f"{questions[d]}\nAnswer:", f" {choices[d][i % 4]}", aux),
                                    i % 4, (name, d, 1)))  # fmt: skip
        return out

    return Loaded(name, task, task_dict, w.method, lmms_requests, lm_requests)
