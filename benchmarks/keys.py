"""The proxy's lean keys against the general path, interleaved in one process.

    python benchmarks/keys.py [--workloads text,mc] [--passes 15]

For each workload of the suite (its data built on first use in the system temp dir), the
lmms-eval-layout requests are keyed through ``KeyBuilder.keys`` both ways, alternately:
``views=True`` (every request through its :class:`RequestView`) and ``views=False`` (what
the proxy does: the common layouts written directly). Per request, thread CPU time, in
chunks of the proxy's size, min and median over passes. Interleaving makes the ratio robust
to a machine whose speed drifts; the keys themselves are checked equal first.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import workloads  # noqa: E402


def key_all(kb: Any, method: str, reqs: list[Any], views: bool) -> list[bytes | None]:
    """The keys of ``reqs`` as the proxy makes them in one call (chunks of KEY_CHUNK)."""
    from lmms_cache.engine import KEY_CHUNK

    call = kb.new_call()
    out = []
    for s in range(0, len(reqs), KEY_CHUNK):
        out += [rk.key for rk in kb.keys(method, reqs[s : s + KEY_CHUNK], call=call, count=False, views=views)]
    kb.end_call()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="text,mc")
    parser.add_argument("--passes", type=int, default=15)
    parser.add_argument("--requests", type=int, default=10_000)
    args = parser.parse_args()

    from lmms_cache import cached
    root = os.path.join(tempfile.gettempdir(), "lmms-cache-bench-keys")
    for name in args.workloads.split(","):
        if not os.path.exists(os.path.join(root, name)):
            workloads.prepare(name, root, quick=False)
        loaded = workloads.load(name, root, quick=False)
        n = min(args.requests, workloads.size(workloads.WORKLOADS[name], False))
        reqs = loaded.lmms_requests(n)
        with tempfile.TemporaryDirectory() as cache_dir:
            lm = cached(workloads.FakeModel(loaded.task_dict), cache_dir, progress=False, durable=False)
            getattr(lm, loaded.method)(reqs)  # fills the derivation memo, as a rerun finds it
            kb = lm._self_cache.keys

            assert key_all(kb, loaded.method, reqs, True) == key_all(kb, loaded.method, reqs, False), "they disagree"
            general: list[float] = []
            lean: list[float] = []
            for _ in range(args.passes):
                for views, samples in ((True, general), (False, lean)):
                    gc.disable()
                    t = time.thread_time_ns()
                    key_all(kb, loaded.method, reqs, views)
                    samples.append((time.thread_time_ns() - t) / n / 1e3)
                    gc.enable()
            lm.cache_close()
        print(f"{name:12s} {n:>6,} requests  general {min(general):6.2f} / {statistics.median(general):6.2f} µs"
              f"  lean {min(lean):6.2f} / {statistics.median(lean):6.2f} µs  (min / median per request)"
              f"  lean/general {statistics.median(lean) / statistics.median(general):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
