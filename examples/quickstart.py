"""lmms-cache in one minute: wrap a model, run twice, the second run is free.

    python examples/quickstart.py [CACHE_DIR]

A tiny fake multimodal model stands in for a real one (it "thinks" 20 ms per request,
like a small GPU model). The first run pays for every request; the second, in a fresh
proxy as after a restart, answers everything from the cache on disk. Without CACHE_DIR the
cache lives in a temporary directory, removed at the end; with one, it stays (run the
script again: both runs are free, and ``lmms-cache stats CACHE_DIR`` shows the entries).
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from dataclasses import dataclass, field

from PIL import Image

from lmms_cache import cached


@dataclass
class Instance:
    """The shape of lmms-eval's ``Instance`` (use the real one in an evaluation)."""

    request_type: str
    arguments: tuple
    idx: int
    metadata: dict = field(default_factory=dict)

    @property
    def args(self) -> tuple:
        return self.arguments


class TinyVLM:
    """Stands in for an lmms-eval model: images from doc_to_visual, text out."""

    def __init__(self, pretrained: str = "example/tiny-vlm-1b") -> None:
        self.pretrained = pretrained
        self.task_dict: dict = {}  # lmms-eval's evaluator fills this with the datasets
        self.requests_seen = 0

    def generate_until(self, requests):
        answers = []
        for request in requests:
            context, _gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            image = doc_to_visual(self.task_dict[task][split][doc_id])[0]
            time.sleep(0.02)  # the GPU time a real model would spend
            self.requests_seen += 1
            red = image.getpixel((0, 0))[0]
            answers.append(f"{context} -> an image whose red channel is {red}")
        return answers


def doc_to_visual(doc):
    return [doc["image"]]


def main() -> None:
    docs = [{"image": Image.new("RGB", (64, 64), (i, 100, 200))} for i in range(50)]
    requests = [
        Instance("generate_until", ("Describe the image.", {"max_new_tokens": 32}, doc_to_visual, i, "demo", "test"),
                 idx=0, metadata={"task": "demo", "doc_id": i, "repeats": 1, "split": "test"})
        for i in range(len(docs))
    ]
    with contextlib.ExitStack() as stack:
        if len(sys.argv) > 1:
            cache_dir = sys.argv[1]
        else:
            cache_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="lmms-cache-quickstart-"))
        run_twice(requests, docs, cache_dir)
    if len(sys.argv) > 1:
        print(f"cache: {cache_dir}")
    else:
        print("cache: a temporary directory, now removed (pass a directory to keep it)")


def run_twice(requests: list, docs: list, cache_dir: str) -> None:
    for run in ("first", "second"):
        model = TinyVLM()
        model.task_dict = {"demo": {"test": docs}}
        lm = cached(model, cache_dir)  # the one line
        started = time.perf_counter()
        answers = lm.generate_until(requests)
        elapsed = time.perf_counter() - started
        stats = lm.cache_stats
        print(f"{run} run: {elapsed * 1000:8.1f} ms  {stats.hits:2d} hits, {stats.misses:2d} misses, "
              f"model asked {model.requests_seen} times")
        lm.cache_close()
    print(f"e.g. {answers[7]!r}")


if __name__ == "__main__":
    main()
