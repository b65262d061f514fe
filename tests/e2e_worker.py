"""One lmms-eval-like evaluation in its own process, for tests/test_e2e.py.

Builds a deterministic setup (real lmms-eval Instances, a task_dict of tiny PIL images and,
for every fourth document, a media file the visual callable returns by path), wraps a fake
model with ``cached(model, --cache, batch_size=...)``, sends all requests in ONE
``generate_until`` call as the evaluator does, and writes a JSON report:

    {"responses": [text...], "types": [type name...], "received": [context...],
     "model_calls": int, "stats": {...}}

Control (never through model attributes: those are part of the model's identity):
  --block-at K   the model, starting its K-th call (0-based), prints "BLOCKED K" on stdout
                 and waits for stdin to close (the test SIGKILLs it meanwhile)
  --raise-at K   the model raises RuntimeError("model failed in batch K") on its K-th call
  --gate         print "READY" after setup and wait for a line on stdin before wrapping
                 the model (a barrier the test releases for several workers at once)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from fakes import FakeModel, gen_request, image
from lmms_cache import cached

TASK, SPLIT, N_DOCS = "e2e", "test", 32
CONTROL: dict[str, int | None] = {"block_at": None, "raise_at": None}


class E2EModel(FakeModel):
    def generate_until(self, requests):
        batch = self.calls  # FakeModel counts calls in _record
        if batch == CONTROL["block_at"]:
            print(f"BLOCKED {batch}", flush=True)
            sys.stdin.read()  # until the test kills us (or goes away and closes the pipe)
            os._exit(3)
        if batch == CONTROL["raise_at"]:
            raise RuntimeError(f"model failed in batch {batch}")
        return super().generate_until(requests)


def media_path(media: str, i: int) -> str:
    """A small file whose content depends only on the document (written atomically)."""
    path = os.path.join(media, f"clip{i}.bin")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(bytes((i * 7 + j) % 256 for j in range(256)))
        os.replace(tmp, path)
    return path


def build_task_dict(media: str) -> dict:
    os.makedirs(media, exist_ok=True)
    docs = []
    for i in range(N_DOCS):
        doc = {"image": image((i * 8 % 256, 255 - i * 8 % 256, 100), size=(8, 8)), "question": f"q{i}"}
        if i % 4 == 3:
            doc["clip"] = media_path(media, i)
        docs.append(doc)
    return {TASK: {SPLIT: docs}}


def doc_to_visual(doc: dict) -> list:
    return [doc["image"]] + ([doc["clip"]] if "clip" in doc else [])


def parse_docs(spec: str) -> list[int]:
    """``"0-19"`` or ``"0-5,8,10-12"``; a leading ``r:`` reverses the order."""
    reverse = spec.startswith("r:")
    ids: list[int] = []
    for part in spec.removeprefix("r:").split(","):
        lo, _, hi = part.partition("-")
        ids.extend(range(int(lo), int(hi or lo) + 1))
    return ids[::-1] if reverse else ids


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("report")
    p.add_argument("--cache", required=True)
    p.add_argument("--media", required=True)
    p.add_argument("--docs", default="0-19")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-at", type=int)
    p.add_argument("--raise-at", type=int)
    p.add_argument("--gate", action="store_true")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s:%(name)s:%(message)s")
    CONTROL.update(block_at=a.block_at, raise_at=a.raise_at)

    model = E2EModel(pretrained="fake/e2e-vlm", max_length=2048)
    model.task_dict = build_task_dict(a.media)
    requests = [
        gen_request(
            i,
            context=f"<image> q{i}?",
            task=TASK,
            split=SPLIT,
            doc_to_visual=doc_to_visual,
            gen_kwargs={"max_new_tokens": 16, "temperature": 0, "until": ["\n\n", "Q:"]},
        )
        for i in parse_docs(a.docs)
    ]
    if a.gate:
        print("READY", flush=True)
        sys.stdin.readline()

    lm = cached(model, a.cache, batch_size=a.batch_size)
    results = lm.generate_until(requests)

    report = {
        "responses": [getattr(r, "text", r) for r in results],
        "types": [type(r).__name__ for r in results],
        "received": [args[0] for _, args in model.seen],
        "model_calls": model.calls,
        "stats": lm.cache_stats.as_dict(),
    }
    tmp = a.report + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f)
    os.replace(tmp, a.report)


if __name__ == "__main__":
    main()
