"""The Redis store beside SQLite, in the same run (a standalone script, not a test).

    python benchmarks/redis_store.py [--entries 20000] [--repeats 300] [--writers 4] [--out DIR]

Starts its own redis-server (Debian's package) on a free loopback port in a temporary
directory, as the store is meant to run (``appendonly yes``, ``appendfsync everysec``,
``maxmemory-policy noeviction``), and measures with entries shaped like the proxy's (a 1 KB
envelope, a model digest, a real components JSON of 383 bytes, an origin, key schema 2):

* ``get_many`` of 64 present keys, per batch (median and p99 over ``--repeats`` batches)
  from a store of ``--entries`` entries;
* ``put_many`` of 64 new entries, per batch (SQLite: its default ``synchronous=FULL``, one
  fsync per batch; Redis: acknowledged after the append-only file's write, fsync each second);
* ``--writers`` processes writing batches of 64 at once: entries per second, together;
* memory: the server's ``used_memory`` grown per entry while filling an empty server (and
  ``MEMORY USAGE`` of one entry's value and metadata keys); SQLite's file bytes per entry;
* through the proxy (``cached(...)``, benchmarks/hot_path.py's text requests of ~2 KB and a
  model whose own cost is zero): a rerun of ``--rerun`` requests that all hit, the whole
  call's time (keying included) and the part spent in the store's ``get_many``; on SQLite,
  on Redis as the cache, and on two tiers whose local tier is empty (every hit read from
  Redis, then copied into the local tier).

Issue 13's targets: ``get_many`` of 64 <= 1 ms, a batch of 64 written <= 10 ms, 4 writers
>= 5,000 entries/s together, <= 2.1 KB of server memory per entry of 1 KB of envelope, a
10,000-hit rerun spending <= 0.2 s in the cache.
Prints a table and writes ``results/redis.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from lmms_cache.store import Entry, SQLiteStore, Store  # noqa: E402

BATCH = 64
ENVELOPE = 1024
MODEL = "098b2035aab9819d3a7912e1b09f0c71"
# What the proxy stores for a generate_until request with three gen_kwargs (taken from a real entry).
COMPONENTS = (
    '{"d":{"model":"df52d7f1bf9ea63b","method":"0474b8b1fd77b527","context":"cccaffbafdbbe123",'
    '"gen_kwargs":"ed210f3ebb5d30a7","visual":"a8a93a56dfaadede","gen_kwargs.max_new_tokens":"54308c4571047231",'
    '"gen_kwargs.temperature":"eb0116b8602ae2f5","gen_kwargs.until":"4408f8740512c031"},'
    '"v":{"gen_kwargs.max_new_tokens":"128","gen_kwargs.temperature":"0","gen_kwargs.until":"[\\"\\\\n\\\\n\\"]"}}'
)
TARGETS = {"get_many_64_ms": 1.0, "put_many_64_ms": 10.0, "writers_entries_per_s": 5000.0,
           "server_bytes_per_entry": 2.1 * 1024, "rerun_10000_s": 0.2}  # fmt: skip


def make_entry(i: int, rng: random.Random, components: str | None = COMPONENTS) -> Entry:
    now = time.time()
    return Entry(key=i.to_bytes(16, "big"), value=rng.randbytes(ENVELOPE), model=MODEL, method="generate_until",
                 task="mme", split="test", doc_id=i, created_at=now, model_seconds=0.8, raw_size=ENVELOPE + 200,
                 components=components, used_at=now, prompt=None, key_schema="lmms-cache/key/2",
                 origin="uid:1000@548fa7238f004391", signature=None)  # fmt: skip


def fill(store: Store, start: int, count: int, seed: int = 0, components: str | None = COMPONENTS) -> None:
    rng = random.Random(seed)
    for b in range(start, start + count, BATCH):
        store.put_many([make_entry(i, rng, components) for i in range(b, min(b + BATCH, start + count))])


def timed(action: Callable[[], Any], repeats: int) -> dict[str, float]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        action()
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return {"median_ms": statistics.median(times), "p99_ms": times[min(len(times) - 1, int(len(times) * 0.99))],
            "mean_ms": statistics.fmean(times)}  # fmt: skip


def lookups(store: Store, entries: int, repeats: int) -> dict[str, float]:
    rng = random.Random(1)
    batches = [[rng.randrange(entries).to_bytes(16, "big") for _ in range(BATCH)] for _ in range(repeats)]
    it = iter(batches)

    def one() -> None:
        found = store.get_many(next(it))
        assert len(found) == len(set(found))

    store.get_many(batches[0])  # warm
    it = iter(batches)
    out = timed(one, repeats)
    out["us_per_key"] = out["median_ms"] * 1000 / BATCH
    return out


def writes(store: Store, start: int, repeats: int) -> dict[str, float]:
    rng = random.Random(2)
    batches = [[make_entry(start + n * BATCH + i, rng) for i in range(BATCH)] for n in range(repeats)]
    it = iter(batches)
    return timed(lambda: store.put_many(next(it)), repeats)


def _writer(kind: str, where: str, tag: int, batches: int, start: Any, results: Any) -> None:
    try:
        store = open_store(kind, where)
        rng = random.Random(tag)
        base = 10_000_000 * (tag + 1)
        work = [[make_entry(base + n * BATCH + i, rng) for i in range(BATCH)] for n in range(batches)]
        start.wait(60)
        t = time.perf_counter()
        for batch in work:
            store.put_many(batch)
        results.put((t, time.perf_counter()))
        store.close()
    except BaseException as exc:
        results.put(repr(exc))


def concurrent_writers(kind: str, where: str, writers: int, batches: int) -> dict[str, float]:
    ctx = multiprocessing.get_context("fork")
    start, results = ctx.Barrier(writers), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(kind, where, tag, batches, start, results)) for tag in range(writers)]
    for p in procs:
        p.start()
    spans = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(60)
    for s in spans:
        if isinstance(s, str):
            raise RuntimeError(f"a {kind} writer failed: {s}")
    wall = max(e for _, e in spans) - min(b for b, _ in spans)
    total = writers * batches * BATCH
    return {"writers": writers, "entries": total, "seconds": wall, "entries_per_s": total / wall}


def open_store(kind: str, where: str) -> Store:
    if kind == "sqlite":
        return SQLiteStore(where)
    from lmms_cache.store.redis import RedisStore

    return RedisStore(where)


def redis_memory(server: Any, entries: int, components: str | None = COMPONENTS) -> dict[str, Any]:
    """Server memory grown per entry while filling a fresh server (nothing else in it)."""
    from lmms_cache.store.redis import RedisStore

    admin = server.client()
    admin.flushall()
    before = int(admin.info("memory")["used_memory"])
    store = RedisStore(server.url("memory"))
    fill(store, 0, entries, seed=3, components=components)
    after = int(admin.info("memory")["used_memory"])
    p = store._p
    k = (entries // 2).to_bytes(16, "big")
    value_key = int(admin.memory_usage(p + b"v:" + k, samples=0))
    meta_key = int(admin.memory_usage(p + b"m:" + k, samples=0))
    per_entry = (after - before) / entries
    indexes = {name: int(admin.memory_usage(p + name, samples=0) or 0)
               for name in (b"u", b"c", b"i:d:s:mme", b"i:m:" + MODEL.encode())}  # fmt: skip
    store.close()
    admin.close()
    return {"entries": entries, "used_memory_per_entry": per_entry, "value_key_bytes": value_key,
            "meta_key_bytes": meta_key,
            "indexes_per_entry": {k.decode(): v / entries for k, v in indexes.items()}}  # fmt: skip


class _Timed:
    """Times a store's ``get_many`` (an instance attribute over the method)."""

    def __init__(self, store: Store) -> None:
        self.spent = 0.0
        self.get = store.get_many
        store.get_many = self  # type: ignore[method-assign]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return self.get(*args, **kwargs)
        finally:
            self.spent += time.perf_counter() - t


def proxy_rerun(location: str, n: int, repeats: int = 5, shared: str | None = None,
                cold: Callable[[], str] | None = None) -> dict[str, Any]:
    """A rerun of ``n`` text requests through ``cached(...)``, all hits: the call's whole
    time (the model's is zero) and the store reads' part of it. ``cold`` gives a fresh local
    directory for each repeat (two tiers whose local tier is empty)."""
    from hot_path import FreeModel, text_requests

    from lmms_cache import cached

    requests = text_requests(n)
    first = cached(FreeModel(), location if cold is None else cold(), progress=False, shared=shared)
    first.generate_until(requests)
    first.cache_close()
    totals, reads = [], []
    for _ in range(repeats):
        lm = cached(FreeModel(), location if cold is None else cold(), progress=False, shared=shared)
        timers = [_Timed(t.store) for t in lm._self_cache.tiers.stores()]
        t = time.perf_counter()
        lm.generate_until(requests)
        totals.append(time.perf_counter() - t)
        reads.append(sum(timer.spent for timer in timers))
        assert lm.cache_stats.hits == n and lm.cache_stats.misses == 0, lm.cache_stats
        lm.cache_close()
    return {"requests": n, "median_s": statistics.median(totals), "min_s": min(totals),
            "store_reads_median_s": statistics.median(reads),
            "per_hit_us": statistics.median(totals) / n * 1e6}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=20_000, help="entries in the store read from")
    parser.add_argument("--repeats", type=int, default=300, help="batches timed per measurement")
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--writer-batches", type=int, default=60, help="batches of 64 per writer")
    parser.add_argument("--rerun", type=int, default=10_000, help="requests of the rerun through the proxy")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    import redis as redis_py

    from redis_server import RedisServer

    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version(),
                               "machine": platform.machine(), "cpus": os.cpu_count(), "batch": BATCH,
                               "envelope_bytes": ENVELOPE, "settings": vars(args) | {"out": str(args.out)}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="lmc-bench-") as tmp, RedisServer.started() as server:
        version = server.client().info("server")["redis_version"]
        import sqlite3

        import hiredis

        results["versions"] = {"redis-server": version, "redis-py": redis_py.__version__,
                               "hiredis": hiredis.__version__, "sqlite": sqlite3.sqlite_version}  # fmt: skip
        locations = {"sqlite": os.path.join(tmp, "sqlite"), "redis": server.url("bench")}
        for kind, where in locations.items():
            print(f"{kind}: filling {args.entries} entries ...", file=sys.stderr)
            store = open_store(kind, where)
            fill(store, 0, args.entries)
            row: dict[str, Any] = {"get_many_64": lookups(store, args.entries, args.repeats),
                                   "put_many_64": writes(store, args.entries, args.repeats)}  # fmt: skip
            store.close()
            print(f"{kind}: {args.writers} writers ...", file=sys.stderr)
            row["writers"] = concurrent_writers(kind, where, args.writers, args.writer_batches)
            if kind == "sqlite":
                db = Path(where) / "cache.db"
                total = args.entries + args.repeats * BATCH + args.writers * args.writer_batches * BATCH
                row["file_bytes_per_entry"] = db.stat().st_size / total
            results[kind] = row
        print(f"proxy: a rerun of {args.rerun} hits ...", file=sys.stderr)
        colds = iter(range(1000))
        results["sqlite"]["rerun"] = proxy_rerun(os.path.join(tmp, "proxy-sqlite"), args.rerun)
        results["redis"]["rerun"] = proxy_rerun(server.url("proxy"), args.rerun)
        results["redis"]["rerun_two_tiers_cold"] = proxy_rerun(
            "", args.rerun, shared=server.url("proxy2"), cold=lambda: os.path.join(tmp, f"cold{next(colds)}"))
        print("redis: memory ...", file=sys.stderr)
        results["redis"]["memory"] = redis_memory(server, args.entries)
        results["redis"]["memory_without_components"] = redis_memory(server, args.entries, components=None)

    targets = {
        "get_many_64_ms": results["redis"]["get_many_64"]["median_ms"],
        "put_many_64_ms": results["redis"]["put_many_64"]["median_ms"],
        "writers_entries_per_s": results["redis"]["writers"]["entries_per_s"],
        "server_bytes_per_entry": results["redis"]["memory"]["used_memory_per_entry"],
        "rerun_10000_s": results["redis"]["rerun"]["median_s"] * 10_000 / args.rerun,
    }
    results["targets"] = {name: {"measured": value, "target": TARGETS[name],
                                 "met": value >= TARGETS[name] if name.endswith("per_s") else value <= TARGETS[name]}
                          for name, value in targets.items()}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "redis.json").write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    print(f"\nwritten to {args.out / 'redis.json'}")


def table(r: dict[str, Any]) -> str:
    s, d = r["sqlite"], r["redis"]
    rows = [
        ("get_many of 64, median (p99)", "{median_ms:.3f} ms ({p99_ms:.3f})", "get_many_64", "<= 1 ms"),
        ("  per key", "{us_per_key:.1f} us", "get_many_64", ""),
        ("put_many of 64, median (p99)", "{median_ms:.2f} ms ({p99_ms:.2f})", "put_many_64", "<= 10 ms"),
        (f"{d['writers']['writers']} writers together", "{entries_per_s:,.0f} entries/s", "writers", ">= 5,000/s"),
    ]
    lines = [f"{'':32} {'SQLite':>22} {'Redis':>22}   target (Redis)", "-" * 100]
    for label, fmt, name, target in rows:
        lines.append(f"{label:32} {fmt.format(**s[name]):>22} {fmt.format(**d[name]):>22}   {target}")
    m = d["memory"]
    rr = d["rerun_two_tiers_cold"]
    title = f"rerun of {s['rerun']['requests']} hits, proxy"
    lines.append(f"{title:32} {s['rerun']['median_s']:>20.3f} s "
                 f"{d['rerun']['median_s']:>20.3f} s   <= 0.2 s")  # fmt: skip
    lines.append(f"{'  of which store reads':32} {s['rerun']['store_reads_median_s']:>20.3f} s "
                 f"{d['rerun']['store_reads_median_s']:>20.3f} s")  # fmt: skip
    lines.append(f"{'  two tiers, local tier empty':32} {'':>22} {rr['median_s']:>20.3f} s   "
                 f"(reads {rr['store_reads_median_s']:.3f} s, copies included)")  # fmt: skip
    lines.append(f"{'memory per entry (1 KB envelope)':32} {s['file_bytes_per_entry']:>17,.0f} B file "
                 f"{m['used_memory_per_entry']:>15,.0f} B RAM   <= 2,150 B")  # fmt: skip
    lines.append(f"{'  the same without components':32} {'':>22} "
                 f"{d['memory_without_components']['used_memory_per_entry']:>15,.0f} B RAM")  # fmt: skip
    lines.append(f"{'  value key / metadata key':32} {'':>22} {m['value_key_bytes']:>10} / {m['meta_key_bytes']:<9}")
    lines.append(f"{'  indexes per entry':32} {'':>22}   "
                 + ", ".join(f"{k} {v:.0f}" for k, v in m["indexes_per_entry"].items()))  # fmt: skip
    v = r["versions"]
    lines.append(f"\nredis-server {v['redis-server']}, redis-py {v['redis-py']}, hiredis {v['hiredis']}, "
                 f"SQLite {v['sqlite']}; {r['cpus']} CPUs, Python {r['python']}")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
