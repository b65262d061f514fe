"""What the restricted loader costs per value (a standalone script, not a test).

    python benchmarks/codec.py [--batches 2000] [--per-batch 200]

For each value a model returns — a short str, a 2 KB str, a ``GenerationResult`` with
``TokenCounts``, a ``(float, bool)`` tuple, a 3-round list of str — times, per value:

* ``pickle.loads``: of the value's raw pickle (the floor);
* ``decode trusted``: ``codec.decode(blob, trusted=True)``, the old behaviour (checksum,
  decompression when stored compressed, ``pickle.loads``);
* ``decode untrusted``: ``codec.decode(blob)``, the restricted default;
* ``no fast path``: the same with the fast path (a bounded opcode walk proving the pickle
  names no global, then ``pickle.loads``) disabled, i.e. always the restricted Unpickler;
* ``is_safe``: the import/verify check (pickletools, no unpickling).

Each figure is the median and p99 over ``--batches`` batches of ``--per-batch`` calls (so
timer overhead is amortised), in nanoseconds per value. Absolute numbers drift on shared
machines; compare columns measured in one run.
"""

from __future__ import annotations

import argparse
import gc
import io
import pickle
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from lmms_eval.api.instance import GenerationResult, TokenCounts

from lmms_cache import codec


def sample_text(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = ["the", "image", "shows", "a", "red", "bus", "parked", "beside", "tree", "answer", "is", "B",
             "because", "of", "its", "color", "and", "shape", "in", "frame"]  # fmt: skip
    out: list[str] = []
    size = 0
    while size < n:
        w = rng.choice(words)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)[:n]


VALUES: dict[str, Any] = {
    "short str": "The answer is B.",
    "2 KB str": sample_text(2048),
    "GenerationResult+TokenCounts": GenerationResult(
        text="A red bus parked beside a tree.",
        token_counts=TokenCounts(input_tokens=812, output_tokens=9, reasoning_tokens=0)),
    "(float, bool)": (-3.2504, True),
    "3-round list of str": [sample_text(120, 1), sample_text(120, 2), sample_text(120, 3)],
}


def measure(fns: dict[str, Callable[[], object]], batches: int, per_batch: int) -> dict[str, tuple[float, float]]:
    """Per function, (median, p99) nanoseconds per call over ``batches`` batches of
    ``per_batch`` calls. The functions take turns batch by batch, so a noisy neighbour or a
    frequency change hits every column alike."""
    for fn in fns.values():
        for _ in range(per_batch * 5):  # warm caches (thread-local zstd context, stand-ins, imports)
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    clock = time.perf_counter_ns
    gc.disable()
    try:
        for _ in range(batches):
            for name, fn in fns.items():
                start = clock()
                for _ in range(per_batch):
                    fn()
                samples[name].append((clock() - start) / per_batch)
    finally:
        gc.enable()
    out = {}
    for name, values in samples.items():
        values.sort()
        out[name] = (statistics.median(values), values[min(len(values) - 1, int(len(values) * 0.99))])
    return out


def decode_without_fast_path(blob: bytes) -> Any:
    """codec.decode(blob) as it would be without the fast path: always the Unpickler."""
    _kind, payload = codec._open(blob)
    return codec._Restricted(io.BytesIO(payload)).load()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--per-batch", type=int, default=200)
    args = parser.parse_args()

    columns = ["pickle.loads", "decode trusted", "decode untrusted", "no fast path", "is_safe"]
    rows = []
    for name, value in VALUES.items():
        raw = pickle.dumps(value, protocol=5)
        blob = codec.encode(value)
        assert codec.decode(blob) == value and codec.is_safe(blob)
        fns: dict[str, Callable[[], object]] = {
            "pickle.loads": lambda raw=raw: pickle.loads(raw),
            "decode trusted": lambda blob=blob: codec.decode(blob, trusted=True),
            "decode untrusted": lambda blob=blob: codec.decode(blob),
            # decode untrusted minus the fast path: what every value would cost without it
            "no fast path": lambda blob=blob: decode_without_fast_path(blob),
        }
        results = measure(fns, args.batches, args.per_batch)
        # is_safe runs pickletools in Python, ~100x slower: fewer, smaller batches
        results |= measure({"is_safe": lambda blob=blob: codec.is_safe(blob)},
                           max(args.batches // 10, 10), max(args.per_batch // 10, 1))
        fast = "yes" if codec._plain(codec._open(blob)[1]) else "no"
        rows.append((name, len(blob), fast, results))

    print(f"python {sys.version.split()[0]}, {args.batches} batches x {args.per_batch} calls; "
          "ns per value, median / p99\n")  # fmt: skip
    header = ["value", "stored B", "fast path", *columns, "untrusted - trusted"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] * 3 + ["--:"] * (len(header) - 3)) + "|")
    for name, size, fast, results in rows:
        cells = [f"{results[c][0]:,.0f} / {results[c][1]:,.0f}" for c in columns]
        extra = results["decode untrusted"][0] - results["decode trusted"][0]
        print(f"| {name} | {size} | {fast} | " + " | ".join(cells) + f" | {extra:+,.0f} |")


if __name__ == "__main__":
    main()
