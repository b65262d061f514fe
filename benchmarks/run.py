"""Run the whole benchmark suite: ``python benchmarks/run.py [--quick]``.

Builds every workload's data in a temporary directory, measures each (workload, system,
mode) in its own process (``measure.py``: peak RSS per process), then writes
``results/<workload>.json``, ``results/scale.json``, ``results/run.json``,
``results/table.md`` and ``results/chart.png`` (``plot.py``). Only a complete full run
writes to ``benchmarks/results/``; ``--quick`` and subsets default to a temporary
directory (``--out`` chooses). See README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import plot  # noqa: E402
import rivals  # noqa: E402
import workloads  # noqa: E402

FULL = {"cold_passes": 1, "hit_passes": 3, "ones": None, "levels": [10_000, 100_000, 1_000_000], "open_repeats": 5}
RESULTS = os.path.join(HERE, "results")
QUICK = {"cold_passes": 1, "hit_passes": 2, "ones": 50, "levels": [1_000, 20_000], "open_repeats": 2}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("lmms-cache", "lmms_eval", "lm_eval", "datasets", "pillow", "numpy", "torch", "sqlitedict"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    import sqlite3

    out["sqlite"] = sqlite3.sqlite_version
    return out


INSTALL = ("pip install -e '.[test]' torch==2.13.0 -r tests/requirements-e2e.txt matplotlib && "
           "pip install --no-deps lmms-eval==0.7.3")  # fmt: skip


def missing_modules(args: argparse.Namespace) -> list[str]:
    """What the selected workloads and systems import, found missing (checked before any work)."""
    import importlib.util

    systems = set(args.systems.split(","))
    needed = ["lmms_cache", "datasets", "numpy", "PIL", "matplotlib", "lmms_eval"]
    if systems & {"lm-eval", "lmms-cache/lm-eval"}:
        needed.append("lm_eval")
    if "video-tensor" in args.workloads.split(","):
        needed.append("torch")
    return [m for m in needed if importlib.util.find_spec(m) is None]


def default_out(args: argparse.Namespace) -> str:
    """The committed ``results/`` only for what it documents: a complete full run (every
    workload, every system, the scale test, the fake model's cost 0). Anything else goes to a
    temporary directory, so that ``--quick`` or a subset never overwrites the committed results."""
    complete = (not args.quick and set(args.workloads.split(",")) == set(workloads.WORKLOADS)
                and set(args.systems.split(",")) == set(rivals.SYSTEMS) and not args.no_scale and not args.sleep_ms)  # fmt: skip
    if complete:
        return RESULTS
    return os.path.join(tempfile.gettempdir(), "lmms-cache-bench-quick" if args.quick else "lmms-cache-bench-partial")


def measure(spec: dict[str, Any], log: Any) -> list[dict[str, Any]]:
    log.write(f"=== {spec['workload']} {spec['system']} {spec['mode']}\n")
    log.flush()
    proc = subprocess.run([sys.executable, os.path.join(HERE, "measure.py"), json.dumps(spec)],
                          stdout=subprocess.PIPE, stderr=log, text=True)  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return [{"error": f"measure.py exited with {proc.returncode}; see {log.name}", "workload": spec["workload"],
                 "system": spec["system"], "mode": "bulk"}]  # fmt: skip
    return json.loads(lines[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description="lmms-cache benchmark suite")
    parser.add_argument("--quick", action="store_true", help="small sizes (~5 minutes), results in a temporary directory")
    parser.add_argument("--workloads", default=",".join(workloads.WORKLOADS), help="comma-separated subset")
    parser.add_argument("--systems", default=",".join(rivals.SYSTEMS), help="comma-separated subset")
    parser.add_argument("--no-scale", action="store_true", help="skip the 1M-entry scale test")
    parser.add_argument("--sleep-ms", type=float, default=0.0, help="fake model cost per request (subtracted)")
    parser.add_argument("--out", help="results directory (default: benchmarks/results for a complete full run, "
                        "else a temporary one: <tmp>/lmms-cache-bench-quick or -partial)")  # fmt: skip
    parser.add_argument("--tmp", help="where to build data and caches (default: the system temp dir)")
    args = parser.parse_args()
    for option, known in (("--workloads", workloads.WORKLOADS), ("--systems", rivals.SYSTEMS)):
        unknown = [n for n in getattr(args, option[2:]).split(",") if n and n not in known]
        if unknown:
            parser.error(f"{option}: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    missing = missing_modules(args)
    if missing:
        parser.error(f"not installed: {', '.join(missing)}; set up as benchmarks/README.md says:\n  {INSTALL}")
    out = args.out or default_out(args)
    os.makedirs(out, exist_ok=True)
    if not args.out and out != RESULTS:
        # A default scratch directory: drop an earlier run's files, so that the table never
        # mixes two runs (a subset run would otherwise show the rest of the previous one).
        for f in os.listdir(out):
            if f.endswith((".json", ".md", ".png")):
                os.remove(os.path.join(out, f))
    cfg = QUICK if args.quick else FULL
    started = time.perf_counter()
    root = tempfile.mkdtemp(prefix="lmms-cache-bench-", dir=args.tmp)
    log_path = os.path.join(args.tmp or tempfile.gettempdir(), "lmms-cache-bench.log")
    try:
        with open(log_path, "w") as log:
            run(args, cfg, root, out, log)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    total = time.perf_counter() - started
    meta_path = os.path.join(out, "run.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["total_seconds"] = round(total, 1)
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    plot.write(out)
    with open(os.path.join(out, "table.md")) as f:
        print(f.read())
    print(f"results in {out} ({total:.0f} s)")


def run(args: argparse.Namespace, cfg: dict[str, Any], root: str, out: str, log: Any) -> None:
    import datasets

    datasets.disable_progress_bars()
    data = os.path.join(root, "data")
    names = [n for n in args.workloads.split(",") if n]
    systems = [s for s in args.systems.split(",") if s]
    meta: dict[str, Any] = {"quick": args.quick, "sleep_ms": args.sleep_ms, "versions": versions(),
                            "python": platform.python_version(), "machine": platform.machine(),
                            "cpus": os.cpu_count(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                            "config": cfg, "prepare": {}}  # fmt: skip
    for name in names:
        t = time.perf_counter()
        w = workloads.WORKLOADS[name]
        meta["prepare"][name] = workloads.prepare(name, data, args.quick)
        print(f"{name}: data ready ({time.perf_counter() - t:.1f} s)", flush=True)
        rows = []
        for system in systems:
            if system == "lm-eval" and not w.lm_eval_supported:
                rows.append({"workload": name, "system": system, "unsupported": w.note})
                continue
            work = os.path.join(root, "work", name, system.replace("/", "_"))
            os.makedirs(work)
            spec = {"workload": name, "system": system, "mode": "both", "data": data, "work": work,
                    "quick": args.quick, "sleep_ms": args.sleep_ms, "cold_passes": cfg["cold_passes"],
                    "hit_passes": cfg["hit_passes"], "ones": cfg["ones"] or w.ones}  # fmt: skip
            t = time.perf_counter()
            results = measure(spec, log)
            shutil.rmtree(work, ignore_errors=True)
            rows.extend(results)
            print(f"  {system:<20} {_brief(results)} ({time.perf_counter() - t:.1f} s)", flush=True)
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            json.dump({"workload": name, "title": w.title, "method": w.method, "note": w.note, "rows": rows}, f,
                      indent=1)  # fmt: skip
        if name != "text" or args.no_scale:  # the scale test reuses the text data
            shutil.rmtree(os.path.join(data, name), ignore_errors=True)
    if not args.no_scale:
        t = time.perf_counter()
        if "text" not in names:
            workloads.prepare("text", data, args.quick)
        scale = []
        for system in ("lmms-cache", "lmms-cache/lm-eval"):
            work = os.path.join(root, "work", "scale", system.replace("/", "_"))
            os.makedirs(work)
            spec = {"workload": "text", "system": system, "mode": "scale", "data": data, "work": work,
                    "quick": args.quick, "sleep_ms": 0.0, "hit_passes": cfg["hit_passes"], "ones": 500,
                    "levels": cfg["levels"], "open_repeats": cfg["open_repeats"]}  # fmt: skip
            scale.extend(measure(spec, log))
            shutil.rmtree(work, ignore_errors=True)
        with open(os.path.join(out, "scale.json"), "w") as f:
            json.dump({"rows": scale}, f, indent=1)
        print(f"scale done ({time.perf_counter() - t:.1f} s)", flush=True)
    with open(os.path.join(out, "run.json"), "w") as f:
        json.dump(meta, f, indent=1)


def _brief(results: list[dict[str, Any]]) -> str:
    parts = []
    for res in results:
        if "error" in res:
            parts.append("ERROR " + res["error"])
        else:
            parts.append(f"{res['mode']}: miss {res['miss'].get('median_us', 0):8.1f} µs hit "
                         f"{res['hit'].get('median_us', 0):8.1f} µs")  # fmt: skip
    return " | ".join(parts)


if __name__ == "__main__":
    main()
