"""One measurement in its own process (run.py starts one per workload, system and mode).

    python benchmarks/measure.py '<spec JSON>'

Modes:

* ``bulk``: cold (a fresh cache, every request a miss, all requests in one call), then a
  rerun (the cache reopened with a fresh model, as the next evaluation would) answering
  the same requests from the cache in one call, several passes;
* ``ones``: the same with one request per call: each miss, each hit timed on its own;
* ``scale``: lmms-cache text hits with the store grown to 10k, 100k and 1M entries (synthetic
  entries inserted with ``SQLiteStore.put_many(durable=False)`` in big batches), its size on
  disk, and the time to open it (``cached(...)`` + the first call) in fresh processes;
* ``both``: bulk then ones in one process (what run.py uses);
* ``open``: (used by ``scale``) one open + first call, timed, in a fresh process.

Times come from ``time.perf_counter_ns``; model time (measured by the fake model itself)
is subtracted. Memory: ``rss_base_mb`` is the resident set after loading the data, building
the requests and importing everything; ``rss_peak_mb`` the peak (VmHWM, reset at the start
of each mode) while measuring; ``rss_anon*``/``rss_file*`` split the resident set at the
start and end into anonymous memory and file-backed pages (a memory-mapped Arrow dataset
read row by row shows up as file-backed growth). ``fsync_ms`` is a probe of the disk's fsync latency taken
just before (it varies a lot on shared virtual disks, and durable misses pay it).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import rivals
import workloads

SCALE_BATCH = 50_000


def _status(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """The resident set size now (MiB)."""
    now = _status("VmRSS")
    return now if now is not None else peak_rss_mb()


def peak_rss_mb() -> float:
    """The peak resident set size since the last reset_peak_rss() (MiB).

    VmHWM belongs to this process's memory map: unlike ru_maxrss, which Linux carries
    over from the parent through fork and exec, it starts with the process.
    """
    hwm = _status("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Start VmHWM again from the current RSS (Linux >= 4.0), so each phase has its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def fsync_probe_ms(where: str, n: int = 20) -> float:
    """Median latency of appending 4 KiB and fsync-ing, here and now: durable writes on
    shared virtual disks vary by an order of magnitude within minutes."""
    path = os.path.join(where, "fsync-probe")
    samples = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for _ in range(n):
            t = time.perf_counter_ns()
            os.write(fd, b"x" * 4096)
            os.fsync(fd)
            samples.append(time.perf_counter_ns() - t)
    finally:
        os.close(fd)
        os.remove(path)
    return statistics.median(samples) / 1e6


def summary(samples_ns: Sequence[float]) -> dict[str, Any]:
    """Median, p99, mean, min and max of per-request samples, in microseconds."""
    if not samples_ns:
        return {}
    s = sorted(samples_ns)
    p99 = s[min(len(s) - 1, round(0.99 * (len(s) - 1)))]
    return {"n": len(s), "median_us": statistics.median(s) / 1e3, "p99_us": p99 / 1e3,
            "mean_us": statistics.fmean(s) / 1e3, "min_us": s[0] / 1e3, "max_us": s[-1] / 1e3}  # fmt: skip


def dir_bytes(path: str) -> int:
    total = 0
    for base, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(base, f))
    return total


def requests_for(loaded: workloads.Loaded, system: str, n: int) -> list[Any]:
    return loaded.lm_requests(n) if rivals.LAYOUT[system] == "lm" else loaded.lmms_requests(n)


def timed_call(sys_: rivals.System, model: workloads.FakeModel, method: str, reqs: list[Any]) -> tuple[int, int, list[Any]]:
    """(wall ns, model ns, responses) of one call."""
    before = model.clock.ns
    t = time.perf_counter_ns()
    out = sys_.call(method, reqs)
    wall = time.perf_counter_ns() - t
    return wall, model.clock.ns - before, out


def run_bulk(spec: dict[str, Any], sys_: rivals.System, loaded: workloads.Loaded, reqs: list[Any]) -> dict[str, Any]:
    n = len(reqs)
    work = spec["work"]
    method = loaded.method
    res: dict[str, Any] = {"requests": n}
    # Cold: fresh caches, every request a miss, durable writes included.
    miss, walls, opens, closes, written = [], [], [], [], []
    path = ""
    for p in range(spec["cold_passes"]):
        path = os.path.join(work, f"cold{p}")
        model = workloads.FakeModel(loaded.task_dict, spec["sleep_ms"])
        t = time.perf_counter_ns()
        sys_.open(path, model)
        opens.append(time.perf_counter_ns() - t)
        wall, model_ns, out = timed_call(sys_, model, method, reqs)
        assert len(out) == n, (len(out), n)
        miss.append((wall - model_ns) / n)
        walls.append(wall)
        w = sys_.written()
        written.append(n if w is None else w)
        t = time.perf_counter_ns()
        sys_.close()
        closes.append(time.perf_counter_ns() - t)
    res["miss"] = summary(miss)
    if isinstance(sys_, rivals.LmmsCache):
        # The same misses written without an fsync per batch (durable=False): what the cache
        # itself costs, apart from the disk's sync latency.
        fast = []
        sys_.durable = False
        try:
            for p in range(spec["cold_passes"]):
                model = workloads.FakeModel(loaded.task_dict, spec["sleep_ms"])
                sys_.open(os.path.join(work, f"cold-nondurable{p}"), model)
                wall, model_ns, out = timed_call(sys_, model, method, reqs)
                assert len(out) == n
                fast.append((wall - model_ns) / n)
                sys_.close()
        finally:
            sys_.durable = True
        res["miss_nondurable"] = summary(fast)
    res["cold_wall_s"] = statistics.median(walls) / 1e9
    res["written"] = written[-1]
    res["writes_per_s"] = written[-1] / (statistics.median(walls) / 1e9) if rivals.CACHING[sys_.name] else None
    res["open_fresh_ms"] = statistics.median(opens) / 1e6
    res["close_ms"] = statistics.median(closes) / 1e6
    # Warm: a rerun over the last cache, the same requests (the same objects, as a rerun
    # rebuilds equal ones; keys never depend on identity).
    model = workloads.FakeModel(loaded.task_dict, spec["sleep_ms"])
    t = time.perf_counter_ns()
    sys_.open(path, model)
    res["open_ms"] = (time.perf_counter_ns() - t) / 1e6
    hit, model_share = [], []
    for _ in range(spec["hit_passes"]):
        gc.collect()
        wall, model_ns, out = timed_call(sys_, model, method, reqs)
        assert len(out) == n
        hit.append((wall - model_ns) / n)
        model_share.append(model_ns / n)
    res["hit"] = summary(hit)
    res["hit_model_us"] = statistics.median(model_share) / 1e3
    res["all_hits"] = model.clock.requests == 0 if rivals.CACHING[sys_.name] else None
    sys_.close()
    res["cache_bytes"] = dir_bytes(path)
    return res


def run_ones(spec: dict[str, Any], sys_: rivals.System, loaded: workloads.Loaded, reqs: list[Any]) -> dict[str, Any]:
    method = loaded.method
    path = os.path.join(spec["work"], "ones")
    res: dict[str, Any] = {"requests": len(reqs)}
    model = workloads.FakeModel(loaded.task_dict, spec["sleep_ms"])
    sys_.open(path, model)
    miss = []
    t0 = time.perf_counter_ns()
    for r in reqs:
        wall, model_ns, _ = timed_call(sys_, model, method, [r])
        miss.append(wall - model_ns)
    total = time.perf_counter_ns() - t0
    w = sys_.written()
    sys_.close()
    res["miss"] = summary(miss)
    res["writes_per_s"] = (len(reqs) if w is None else w) / (total / 1e9) if rivals.CACHING[sys_.name] else None
    model = workloads.FakeModel(loaded.task_dict, spec["sleep_ms"])
    sys_.open(path, model)
    hit = []
    for r in reqs:
        wall, model_ns, _ = timed_call(sys_, model, method, [r])
        hit.append(wall - model_ns)
    res["all_hits"] = model.clock.requests == 0 if rivals.CACHING[sys_.name] else None
    sys_.close()
    res["miss"] = summary(miss)
    res["hit"] = summary(hit)
    res["hit_samples_us"] = [round(x / 1e3, 2) for x in hit]
    return res


# -- scale ------------------------------------------------------------------------------------


def grow(path: str, template_key: bytes, target: int) -> float:
    """Add synthetic entries (like the template, random keys) until the store has ``target``."""
    from lmms_cache.store import Entry, SQLiteStore

    store = SQLiteStore(path, durable=False)
    store._conn().execute("PRAGMA cache_size = -262144")  # building only: 256 MiB of page cache
    have = store.stats()["entries"]
    template = store.get(template_key)
    assert template is not None
    started = time.perf_counter()
    now = time.time()
    i = have
    while i < target:
        batch = min(SCALE_BATCH, target - i)
        keys = os.urandom(16 * batch)
        prompts = os.urandom(8 * batch).hex()
        entries = [
            Entry(key=keys[16 * j : 16 * j + 16], value=template.value, model=template.model, method=template.method,
                  task=template.task, split=template.split, doc_id=str(i + j), created_at=now,
                  model_seconds=template.model_seconds, raw_size=template.raw_size, components=template.components,
                  used_at=now, prompt=prompts[16 * j : 16 * j + 16])
            for j in range(batch)
        ]  # fmt: skip
        store.put_many(entries)
        i += batch
    store.close()
    return time.perf_counter() - started


def timed_call_lm(lm: Any, model: workloads.FakeModel, reqs: list[Any]) -> tuple[int, int, list[Any]]:
    before = model.clock.ns
    t = time.perf_counter_ns()
    out = lm.generate_until(reqs)
    wall = time.perf_counter_ns() - t
    return wall, model.clock.ns - before, out


def run_scale(spec: dict[str, Any], loaded: workloads.Loaded, reqs: list[Any]) -> dict[str, Any]:
    """Every level is its own copy of the store (the real entries, then synthetic ones up to
    the level), measured in interleaved rounds so that drift of a shared machine falls on
    every level alike."""
    from lmms_cache import cached

    system = spec["system"]
    method = loaded.method
    paths = [os.path.join(spec["work"], f"level{i}") for i in range(len(spec["levels"]))]
    model = workloads.FakeModel(loaded.task_dict)
    lm = cached(model, paths[0], progress=False)
    lm.generate_until(reqs)
    template_key = lm._self_cache.keys.keys(method, reqs[:1], count=False)[0].key
    assert template_key is not None, "a text request always has a key"
    lm.cache_close()
    levels: list[dict[str, Any]] = []
    for i, level in enumerate(spec["levels"]):
        if i:
            shutil.copytree(paths[i - 1], paths[i])
        levels.append({"entries": level, "build_s": grow(paths[i], template_key, level), "bulk": [], "ones": [],
                       "all_hits": True, "opens": []})  # fmt: skip
        levels[-1]["db_bytes"] = dir_bytes(paths[i])
    ones = reqs[: spec["ones"]]
    for _round in range(spec.get("rounds", 2)):
        for path, lv in zip(paths, levels, strict=True):
            model = workloads.FakeModel(loaded.task_dict)
            lm = cached(model, path, progress=False)
            for _ in range(spec["hit_passes"]):
                gc.collect()
                wall, model_ns, _ = timed_call_lm(lm, model, reqs)
                lv["bulk"].append((wall - model_ns) / len(reqs))
            for r in ones:
                wall, model_ns, _ = timed_call_lm(lm, model, [r])
                lv["ones"].append(wall - model_ns)
            lv["all_hits"] = lv["all_hits"] and model.clock.requests == 0
            lm.cache_close()
    # Opening: cached(...) construction + the first call (one request, a hit), each in a
    # fresh process (imports and data loading excluded), levels interleaved.
    for _ in range(spec["open_repeats"]):
        for path, lv in zip(paths, levels, strict=True):
            child = dict(spec, mode="open", path=path)
            proc = subprocess.run([sys.executable, __file__, json.dumps(child)], capture_output=True, text=True,
                                  check=True)  # fmt: skip
            lv["opens"].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    out: dict[str, Any] = {"requests": len(reqs), "levels": []}
    for lv in levels:
        opens = lv.pop("opens")
        lv["hit_bulk"] = summary(lv.pop("bulk"))
        lv["hit_ones"] = summary(lv.pop("ones"))
        lv["open_construct_ms"] = statistics.median(o["construct_ms"] for o in opens)
        lv["open_first_call_ms"] = statistics.median(o["first_call_ms"] for o in opens)
        lv["open_ms"] = statistics.median(o["construct_ms"] + o["first_call_ms"] for o in opens)
        lv["open_bulk_first_call_ms"] = statistics.median(o["bulk_first_call_ms"] for o in opens)
        lv["bulk_rss_growth_mb"] = statistics.median(o["bulk_rss_growth_mb"] for o in opens)
        lv["responses_mb"] = statistics.median(o["responses_mb"] for o in opens)
        out["levels"].append(lv)
        print(f"  scale {system} {lv['entries']:>9,} entries: bulk hit {lv['hit_bulk']['median_us']:.1f} µs, "
              f"open {lv['open_ms']:.1f} ms", file=sys.stderr, flush=True)  # fmt: skip
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
    return out


def run_open(spec: dict[str, Any], loaded: workloads.Loaded, reqs: list[Any]) -> dict[str, Any]:
    from lmms_cache import cached

    model = workloads.FakeModel(loaded.task_dict)
    t0 = time.perf_counter_ns()
    lm = cached(model, spec["path"], progress=False)
    t1 = time.perf_counter_ns()
    lm.generate_until(reqs[:1])
    t2 = time.perf_counter_ns()
    # Memory of a call of N hits in a fresh process (no earlier call has grown the heap):
    # the peak over the resident set just before, against the size of the responses.
    gc.collect()
    reset_peak_rss()
    before = rss_mb()
    t3 = time.perf_counter_ns()
    out = lm.generate_until(reqs)
    t4 = time.perf_counter_ns()
    growth = peak_rss_mb() - before
    responses = sum(sys.getsizeof(r) for r in out) / 2**20
    assert model.clock.requests == 0, "the open test must hit"
    lm.cache_close()
    return {"construct_ms": (t1 - t0) / 1e6, "first_call_ms": (t2 - t1) / 1e6, "bulk_first_call_ms": (t4 - t3) / 1e6,
            "bulk_rss_growth_mb": growth, "responses_mb": responses}  # fmt: skip


def main() -> None:
    spec = json.loads(sys.argv[1])
    rivals.quiet_harness_logs()
    system = spec["system"]
    sys_ = rivals.make(system)
    sys_.preload()
    w = workloads.WORKLOADS[spec["workload"]]
    loaded = workloads.load(w.name, spec["data"], spec["quick"])
    n = workloads.size(w, spec["quick"])
    caps = w.quick_caps if spec["quick"] else w.caps
    n = min(n, caps.get(system, n))
    reqs = requests_for(loaded, system, n)
    if spec["mode"] == "open":
        print(json.dumps(run_open(spec, loaded, reqs)))
        return
    results = []
    modes = ("bulk", "ones") if spec["mode"] == "both" else (spec["mode"],)
    for mode in modes:
        gc.collect()
        reset_peak_rss()
        base = rss_mb()
        anon0, file0 = _status("RssAnon"), _status("RssFile")
        started = time.perf_counter()
        res: dict[str, Any] = {"fsync_ms": fsync_probe_ms(spec["work"])}
        if mode == "bulk":
            res.update(run_bulk(spec, sys_, loaded, reqs))
        elif mode == "ones":
            res.update(run_ones(spec, sys_, loaded, reqs[: spec["ones"]]))
        elif mode == "scale":
            res.update(run_scale(spec, loaded, reqs))
        else:
            raise ValueError(mode)
        res.update(workload=w.name, system=system, mode=mode, rss_base_mb=base, rss_peak_mb=peak_rss_mb(),
                   rss_anon_base_mb=anon0, rss_anon_mb=_status("RssAnon"), rss_file_base_mb=file0,
                   rss_file_mb=_status("RssFile"),
                   seconds=time.perf_counter() - started)  # fmt: skip
        results.append(res)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
