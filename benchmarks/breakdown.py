"""Where a hit and a miss spend their time: the proxy's stages timed one by one.

    python benchmarks/breakdown.py [--requests 10000] [--images 100]

A profiling aid for the numbers of run.py (see README.md, "Other scripts"). It calls lmms-cache
internals (``KeyBuilder``, ``Resolver``, the store, the codec) directly, so it may need
updating when they change; run.py does not depend on it. Each stage is timed over the
same requests the suite uses, per request, median of 3 passes (perf_counter_ns).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import workloads  # noqa: E402
from measure import fsync_probe_ms  # noqa: E402


def per_request(fn: Callable[[], Any], n: int, passes: int = 3) -> float:
    """Median over passes of (time of fn()) / n, in µs."""
    samples = []
    for _ in range(passes):
        t = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - t) / n)
    return statistics.median(samples) / 1e3


def row(label: str, value: float, total: float | None = None) -> None:
    share = f"{100 * value / total:5.0f} %" if total else ""
    print(f"  {label:<66} {value:10.1f} µs {share}")


def hit_breakdown(title: str, loaded: workloads.Loaded, reqs: list[Any], root: str) -> None:
    import lmms_cache.requests as requests_mod
    from lmms_cache import cached, codec
    from lmms_cache.requests import RESOLVE, _restore_random_states, _save_random_states, view

    # (named with a leading underscore before lmms-cache made them public)
    document_free_result = getattr(requests_mod, "document_free_result", None) or requests_mod._document_free_result
    needs_document = getattr(requests_mod, "NEEDS_DOCUMENT", None) or requests_mod._NEEDS_DOCUMENT

    path = os.path.join(root, title.replace(" ", "_"))
    lm = cached(workloads.FakeModel(loaded.task_dict), path, progress=False)
    getattr(lm, loaded.method)(reqs)
    lm.cache_close()
    lm = cached(workloads.FakeModel(loaded.task_dict), path, progress=False)
    method = loaded.method
    n = len(reqs)
    call = getattr(lm, method)
    call(reqs)  # warm
    total = per_request(lambda: call(reqs), n)
    kb = lm._self_cache.keys
    store = lm.cache_store
    keys = [rk.key for rk in kb.keys(method, reqs, count=False)]
    blobs = store.get_many(keys)
    print(f"\n{title}: {n} requests per call, a hit each (rerun)")
    row("whole call (proxy), per request", total, total)
    row("  keys: KeyBuilder.keys()", per_request(lambda: kb.keys(method, reqs, count=False, views=False), n), total)
    row("    view(): request layout", per_request(lambda: [view(method, r) for r in reqs], n), total)
    views = [view(method, r) for r in reqs]
    # Callables the proxy calls on the document; lmms-eval's own doc_to_visual of a text-only
    # task answers its configured None without one (document_free_result), as the proxy does.
    resolves = [(p.value, v.address) for v in views for p in v.parts if p.role is RESOLVE and p.value is not None
                and document_free_result(p.value) is needs_document]  # fmt: skip
    if not resolves and any(p.role is RESOLVE and p.value is not None for v in views for p in v.parts):
        print("    (doc_to_visual of a text-only lmms-eval task: answered without reading the document)")
    if resolves:
        resolver = kb._resolver
        row("    document access: task_dict[task][split][doc_id] (datasets row)",
            per_request(lambda: [resolver.document(a) for _, a in resolves], n), total)  # fmt: skip

        def states() -> None:
            for _ in resolves:
                _restore_random_states(_save_random_states())

        row("    random states saved + restored around each call (random, numpy, torch)",
            per_request(states, n), total)  # fmt: skip
        import random

        import numpy as np

        row("      of which numpy.random.get_state() + set_state()",
            per_request(lambda: [np.random.set_state(np.random.get_state()) for _ in resolves], n), total)  # fmt: skip
        row("      of which random.getstate() + setstate()",
            per_request(lambda: [random.setstate(random.getstate()) for _ in resolves], n), total)  # fmt: skip
        docs = [resolver.document(a) for _, a in resolves]
        values = [fn(d) for (fn, _), d in zip(resolves, docs, strict=True)]
        enc = kb._encoder
        row("    digest of the resolved visuals (Encoder.digest(media=True))",
            per_request(lambda: [enc.digest(v, media=True) for v in values], n), total)  # fmt: skip
    if not resolves:
        from lmms_cache.fingerprint import digest_bytes
        from lmms_cache.key import is_sampling

        enc = kb._encoder

        def parts_encoding() -> None:
            for v in views:
                out = bytearray()
                for p in v.parts:
                    value = document_free_result(p.value) if p.role is RESOLVE and p.value is not None else p.value
                    enc.write(out, value, p.role in ("media", RESOLVE))

        row("    Encoder.write() of every part (context, gen_kwargs, media)", per_request(parts_encoding, n), total)
        row("      of which the 2 KB context: str.encode + copies",
            per_request(lambda: [enc.write(bytearray(), v.parts[0].value) for v in views], n), total)  # fmt: skip
        row("      of which gen_kwargs (4 settings: sorted, tagged)",
            per_request(lambda: [enc.write(bytearray(), v.parts[1].value) for v in views], n), total)  # fmt: skip
        material = [enc.encode(v.parts[0].value) + enc.encode(v.parts[1].value) for v in views]
        row("    xxh3-128 of the key material", per_request(lambda: [digest_bytes(m) for m in material], n), total)
        row("    is_sampling()", per_request(lambda: [is_sampling(v.gen_kwargs, v.repeats) for v in views], n), total)
    row("  store.get_many() (one round trip per 900 keys)", per_request(lambda: store.get_many(keys), n), total)
    row("  codec.decode() of each value", per_request(lambda: [codec.decode(b.value) for b in blobs.values()], n), total)
    found = {k: codec.decode(b.value) for k, b in blobs.items()}
    rks = kb.keys(method, reqs, count=False)
    row("  hit bookkeeping (record_hits)", per_request(lambda: lm._self_cache.record_hits(rks, found), n), total)
    lm.cache_close()


def image_alternatives(loaded: workloads.Loaded, n: int) -> None:
    """The cost of decoding and hashing a 1024x1024 image, and of a zero-copy alternative."""
    import xxhash

    from lmms_cache.fingerprint import _image_digest

    split = loaded.task_dict[loaded.name][workloads.TASK_SPLIT]
    images = [split[i]["image"] for i in range(n)]

    print(f"\nimage 1024x1024 hashing, {n} decoded images (different ones, as a call meets them)")
    row("row access with decode (datasets Image feature)", per_request(lambda: [split[i] for i in range(n)], n))
    row("_image_digest(): raw pixels streamed into xxh3", per_request(lambda: [_image_digest(i) for i in images], n))


    def tobytes() -> None:
        for i in images:
            i.tobytes()

    row("  for comparison: img.tobytes() alone (a 3 MB copy)", per_request(tobytes, n))
    try:
        import pyarrow as pa

        row("zero-copy Arrow export (RGBX, 4 B/px) into xxh3 (a new key format)",
            per_request(lambda: [xxhash.xxh3_128_digest(memoryview(pa.array(i).buffers()[-1])) for i in images], n))
    except Exception as exc:  # pragma: no cover - optional
        print(f"  (arrow export unavailable: {exc})")


def miss_breakdown(title: str, loaded: workloads.Loaded, reqs: list[Any], root: str) -> None:
    from lmms_cache import cached
    from lmms_cache.explain import describe
    from lmms_cache.store import SQLiteStore

    method = loaded.method
    n = len(reqs)
    print(f"\n{title}: {n} requests in one call, all misses (fresh cache, batch_size 64)")
    print(f"  fsync probe: {fsync_probe_ms(root):.2f} ms per 4 KiB append + fsync")
    totals = {}
    for durable in (True, False):
        samples = []
        for p in range(3):
            path = os.path.join(root, f"miss-{title.replace(' ', '_')}-{durable}-{p}")
            model = workloads.FakeModel(loaded.task_dict)
            lm = cached(model, path, progress=False, durable=durable)
            t = time.perf_counter_ns()
            getattr(lm, method)(reqs)
            samples.append((time.perf_counter_ns() - t - model.clock.ns) / n)
            lm.cache_close()
        totals[durable] = statistics.median(samples) / 1e3
    total = totals[True]
    row("whole call, durable=True (default): proxy time - model time", total, total)
    row("whole call, durable=False", totals[False], total)
    path = os.path.join(root, f"parts-{title.replace(' ', '_')}")
    lm = cached(workloads.FakeModel(loaded.task_dict), path, progress=False)
    kb = lm._self_cache.keys
    rks = kb.keys(method, reqs, count=False)
    row("  keys: KeyBuilder.keys()", per_request(lambda: kb.keys(method, reqs, count=False, views=False), n), total)
    def describe_call() -> None:
        memo: dict[bytes, Any] = {}  # one per call, as the proxy does
        for rk in rks:
            describe(rk, memo)

    row("  describe(): component digests + readable settings (JSON), per miss", per_request(describe_call, n), total)
    described = {rk.key: describe(rk) for rk in rks}
    responses = getattr(workloads.FakeModel(), method)(reqs)
    now = time.time()
    row("  _Cache.entry(): codec.encode() + Entry, per miss",
        per_request(lambda: [lm._self_cache.entry(method, rk.key, rk, r, now, 0.0, described[rk.key])
                             for rk, r in zip(rks, responses, strict=True)], n), total)  # fmt: skip
    entries = [lm._self_cache.entry(method, rk.key, rk, r, now, 0.0, described[rk.key])
               for rk, r in zip(rks, responses, strict=True)]  # fmt: skip
    lm.cache_close()
    for durable in (True, False):
        for batch in (64, 1024):
            samples = []
            for p in range(3):
                store = SQLiteStore(os.path.join(root, f"put-{title.replace(' ', '_')}-{durable}-{batch}-{p}"),
                                    durable=durable)  # fmt: skip
                t = time.perf_counter_ns()
                for s in range(0, n, batch):
                    store.put_many(entries[s : s + batch])
                samples.append((time.perf_counter_ns() - t) / n)
                store.close()
            row(f"  put_many(), durable={durable}, {batch} per transaction",
                statistics.median(samples) / 1e3, total)  # fmt: skip
    # The same writes without the secondary indexes (explain, LRU, stats by model/task).
    samples = []
    for p in range(3):
        store = SQLiteStore(os.path.join(root, f"noidx-{title.replace(' ', '_')}-{p}"))
        conn = store._conn()
        for index in ("entries_model_task", "entries_document", "entries_prompt", "entries_used"):
            conn.execute(f"DROP INDEX {index}")
        t = time.perf_counter_ns()
        for s in range(0, n, 64):
            store.put_many(entries[s : s + 64])
        samples.append((time.perf_counter_ns() - t) / n)
        store.close()
    row("  put_many(), durable, 64 per transaction, without the 4 secondary indexes",
        statistics.median(samples) / 1e3, total)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="data sizes of run.py --quick")
    args = parser.parse_args()
    import datasets

    datasets.disable_progress_bars()
    root = tempfile.mkdtemp(prefix="lmms-cache-breakdown-")
    try:
        data = os.path.join(root, "data")
        quick = args.quick
        workloads.prepare("text", data, quick)
        text = workloads.load("text", data, quick)
        n = min(args.requests, workloads.size(workloads.WORKLOADS["text"], quick))
        hit_breakdown("text, lmms-eval layout", text, text.lmms_requests(n), root)
        hit_breakdown("text, lm-eval layout", text, text.lm_requests(n), root)
        miss_breakdown("text miss, lmms-eval layout", text, text.lmms_requests(n), root)
        miss_breakdown("text miss, lm-eval layout", text, text.lm_requests(n), root)
        workloads.prepare("image-1024", data, quick)
        images = workloads.load("image-1024", data, quick)
        m = min(args.images, workloads.size(workloads.WORKLOADS["image-1024"], quick))
        hit_breakdown("image-1024, lmms-eval layout", images, images.lmms_requests(m), root)
        hit_breakdown("image-1024, lm-eval layout", images, images.lm_requests(m), root)
        image_alternatives(images, m)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
