"""Hit latency and miss overhead of the proxy's hot path (a standalone script, not a test).

    python benchmarks/hot_path.py [--requests 10000] [--images 200]

Measures, through ``cached(...)`` with a fake model whose own cost is zero:

* text hit: ~2 KB prompts, warm cache, per request, in calls of N requests and of 1;
* image hit: one 1024x1024 image per request, from a document list that decodes a JPEG on
  every row access (as a ``datasets`` dataset does), and from already-decoded images;
* miss overhead: proxy time minus model time per request, durable per-batch commits
  included (batch_size 64), in calls of N and of 1.

Prints median and p99 per request. Absolute numbers drift on shared machines; compare
ratios measured in one run.
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import string
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

from lmms_cache import cached


class Request:
    __slots__ = ("args", "metadata")

    def __init__(self, args: tuple[Any, ...], metadata: dict[str, Any]) -> None:
        self.args = args
        self.metadata = metadata


class FreeModel:
    """A model whose own cost is ~zero, timing its own time so it can be subtracted."""

    def __init__(self) -> None:
        self.pretrained = "bench/free-model"
        self.task_dict: dict[str, Any] = {}
        self.model_seconds = 0.0

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        t = time.perf_counter()
        out = [f"answer {r.args[0][:16]}" for r in requests]
        self.model_seconds += time.perf_counter() - t
        return out


class DecodingRows(list):  # type: ignore[type-arg]
    """Rows whose image is decoded from JPEG bytes on every access, like ``datasets``."""

    def __getitem__(self, i: Any) -> Any:
        row = super().__getitem__(i)
        return {"image": Image.open(io.BytesIO(row["jpeg"])).convert("RGB")}


def visual(doc: dict[str, Any]) -> list[Any]:
    return [doc["image"]]


def text_requests(n: int, seed: int = 0) -> list[Request]:
    rng = random.Random(seed)
    alphabet = string.ascii_letters + " "
    return [
        Request((f"{i} " + "".join(rng.choices(alphabet, k=2048)), {"max_new_tokens": 32, "temperature": 0,
                 "until": ["\n\n"]}, None, i, "text", "test"), {"task": "text", "doc_id": i, "repeats": 1})
        for i in range(n)
    ]


def image_requests(n: int, task: str) -> list[Request]:
    return [Request((f"Describe image {i}.", {"max_new_tokens": 32}, visual, i, task, "test"),
                    {"task": task, "doc_id": i, "repeats": 1}) for i in range(n)]


def percentiles(samples: list[float]) -> tuple[float, float]:
    samples = sorted(samples)
    return statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.99))]


def per_request(fn: Callable[[list[Request]], Any], requests: list[Request], per_call: int,
                repeat: int) -> list[float]:  # fmt: skip
    """Seconds per request, one sample per call (calls of ``per_call`` requests)."""
    samples = []
    for _ in range(repeat):
        for s in range(0, len(requests), per_call):
            chunk = requests[s : s + per_call]
            t = time.perf_counter()
            fn(chunk)
            samples.append((time.perf_counter() - t) / len(chunk))
    return samples


def row(name: str, samples: list[float]) -> None:
    med, p99 = percentiles(samples)
    print(f"{name:<52} {med * 1e6:>10.1f} {p99 * 1e6:>10.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--images", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lmms-cache-bench-") as root:
        run(args, root)


def run(args: argparse.Namespace, root: str) -> None:
    print(f"{'workload':<52} {'median µs':>10} {'p99 µs':>10}")

    # Miss overhead: a fresh cache, every request a miss; proxy time minus model time.
    texts = text_requests(args.requests)
    for per_call, label in ((args.requests, f"calls of {args.requests}"), (1, "calls of 1")):
        n = args.requests if per_call > 1 else min(args.requests, 2000)
        model = FreeModel()
        lm = cached(model, f"{root}/text-{per_call}", progress=False)
        samples = []
        for s in range(0, n, per_call):
            chunk = texts[s : s + per_call]
            before = model.model_seconds
            t = time.perf_counter()
            lm.generate_until(chunk)
            spent = time.perf_counter() - t - (model.model_seconds - before)
            samples.append(spent / len(chunk))
        row(f"text miss overhead ({label}, durable)", samples)
        # Text hits on the same, now warm, cache.
        row(f"text hit ({label})", per_request(lm.generate_until, texts[:n], per_call, 1 if per_call == 1 else 5))

    # Image hits: 1024x1024, decoded on row access (as datasets does) or already decoded.
    rng = random.Random(1)
    decoded = []
    jpegs = []
    for _ in range(args.images):
        img = Image.frombytes("RGB", (1024, 1024), rng.randbytes(1024 * 1024 * 3))
        decoded.append({"image": img})
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        jpegs.append({"jpeg": buf.getvalue()})
    for task, rows_ in (("decoded", decoded), ("jpeg", DecodingRows(jpegs))):
        model = FreeModel()
        model.task_dict = {task: {"test": rows_}}
        lm = cached(model, f"{root}/image-{task}", progress=False)
        reqs = image_requests(args.images, task)
        lm.generate_until(reqs)
        t = time.perf_counter()
        for i in range(min(50, args.images)):
            rows_[i]
        access = (time.perf_counter() - t) / min(50, args.images)
        name = "image hit 1024x1024 (pre-decoded)" if task == "decoded" else \
            f"image hit 1024x1024 (JPEG decoded on access, ~{access * 1e3:.1f} ms of it)"
        row(name, per_request(lm.generate_until, reqs, 1, 1))


if __name__ == "__main__":
    main()
