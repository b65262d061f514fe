"""What re-reading a model's identity costs per call, on lm-eval's real ``HFLM`` (a standalone
script, not a test).

    python benchmarks/identity.py [--layers 32] [--calls 200]

Builds a GPT-2 checkpoint with random weights in a temporary directory (``--layers`` sets how
many parameter tensors it has: 32 layers is ~390, a 7B model's order of magnitude), a
tokenizer trained on the spot, loads it with ``HFLM`` on the CPU, and times what the proxy does
once per call: ``Tracker.refresh()`` (settings, configs, generation config, tokenizer template
and size, dtype, train mode, parameter version counters), median and p99 over ``--calls``.
Also the one-time cost of wrapping (class code, checkpoint files, tokenizer vocabulary).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval.models.huggingface import HFLM

    import tiny_models
    from lmms_cache.identity import Tracker

    with tempfile.TemporaryDirectory() as root:
        tiny_models.build_gpt2(root, n_layer=args.layers)
        lm = HFLM(pretrained=root, device="cpu", batch_size=1)
        tensors = sum(1 for _ in lm._model.parameters()) + sum(1 for _ in lm._model.buffers())
        started = time.perf_counter()
        tracker = Tracker(lm)
        wrap_ms = (time.perf_counter() - started) * 1e3
        samples = []
        for _ in range(args.calls):
            t = time.perf_counter_ns()
            tracker.refresh()
            samples.append((time.perf_counter_ns() - t) / 1e3)
        samples.sort()
        print(f"HFLM, GPT-2 with {args.layers} layers ({tensors} parameter and buffer tensors)")
        print(f"  wrap (identity taken once):     {wrap_ms:8.1f} ms")
        print(f"  re-read per call, median / p99: {statistics.median(samples):8.1f} µs / "
              f"{samples[int(len(samples) * 0.99) - 1]:.1f} µs")


if __name__ == "__main__":
    main()
