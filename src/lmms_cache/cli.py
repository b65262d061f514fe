"""The ``lmms-cache`` command: a thin layer over the public API."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__, codec, harness_cache, manage
from .identity import identify_arguments
from .lazy import lazy_model
from .proxy import CacheMissError, Options, wrap
from .store import Store, StoreError, Where, default_location, open_store
from .units import format_size, parse_duration, parse_size


def _fail(message: str, code: int = 1) -> int:
    print(f"lmms-cache: {message}", file=sys.stderr)
    return code


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Rows as aligned text columns (numbers right-aligned)."""
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(row.get(c), (int, float)) for row in rows) and rows for c in columns]
    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)).rstrip()
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else ""


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str) if args.json else text)


def _progress(args: argparse.Namespace, total: int, what: str) -> Any:
    if args.json or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=what, unit="entry", leave=False)


def _open(args: argparse.Namespace, *, readonly: bool) -> Store:
    return manage.open_for_cli(args.path, readonly=readonly, trust=getattr(args, "trust", False))


def _filter(args: argparse.Namespace) -> manage.Filter:
    return manage.Filter(model=args.model, task=args.task, method=args.method, doc_id=args.doc_id,
                         older_than=parse_duration(args.older_than) if args.older_than else None)  # fmt: skip


def _stats(args: argparse.Namespace) -> int:
    store = _open(args, readonly=True)
    summary = store.summary()
    name = manage.label(store)
    for row in summary["by_model"]:
        row["label"] = name(row["model"])
    ratio = summary["raw_bytes"] / summary["bytes"] if summary["bytes"] else 1.0
    summary["compression_ratio"] = round(ratio, 2)
    text = [
        f"cache             {summary['location']}",
        f"entries           {summary['entries']}",
        f"values            {format_size(summary['bytes'])} stored, {format_size(summary['raw_bytes'])} "
        f"uncompressed (ratio {ratio:.2f})",
        f"on disk           {format_size(summary['file_bytes'])}",
        f"hits served       {summary['hits']}",
        f"model time saved  {summary['seconds_saved']:.1f} s",
        "",
        _table([{**r, "bytes": format_size(r["bytes"])} for r in summary["by_model"]],
               ["label", "entries", "bytes", "hits", "seconds_saved"]),
        "",
        _table([{**r, "bytes": format_size(r["bytes"])} for r in summary["by_task"]],
               ["task", "entries", "bytes", "hits", "seconds_saved"]),
    ]  # fmt: skip
    _emit(args, summary, "\n".join(text))
    return 0


def _ls(args: argparse.Namespace) -> int:
    store = _open(args, readonly=True)
    name = manage.label(store)
    rows = []
    for e in store.scan(_filter(args).where(store), limit=args.limit, recent_first=True):
        rows.append({"key": e.key.hex()[:16], "model": name(e.model), "method": e.method, "task": e.task,
                     "split": e.split, "doc_id": e.doc_id, "bytes": e.size, "hits": e.hits,
                     "created": _when(e.created_at), "response": manage.preview(e)})  # fmt: skip
    _emit(args, rows, _table(rows, ["key", "model", "method", "task", "doc_id", "bytes", "hits", "created",
                                    "response"]))  # fmt: skip
    return 0


def _show(args: argparse.Namespace) -> int:
    store = _open(args, readonly=True)
    try:
        e = manage.find(store, args.key)
    except KeyError as exc:
        return _fail(str(exc.args[0]))
    try:
        value: Any = codec.decode(e.value)
    except codec.CodecError as exc:
        value = f"<unreadable: {exc}>"
    data = {"key": e.key.hex(), "model": e.model, "model_label": manage.label(store)(e.model),
            "model_description": store.models().get(e.model), "method": e.method, "task": e.task,
            "split": e.split, "doc_id": e.doc_id, "created_at": _when(e.created_at),
            "last_used": _when(e.used_at), "hits": e.hits, "bytes": e.size, "raw_bytes": e.raw_size,
            "model_seconds": e.model_seconds,
            "components": json.loads(e.components) if e.components else None, "response": repr(value)}  # fmt: skip
    _emit(args, data, "\n".join(f"{k:<18} {v}" for k, v in data.items()))
    return 0


def _explain(args: argparse.Namespace) -> int:
    store = _open(args, readonly=True)
    rows = manage.explain_document(store, args.task, args.doc_id, args.method)
    if not rows:
        return _fail(f"nothing stored for task {args.task!r}, doc_id {args.doc_id!r}")
    name = manage.label(store)
    lines = []
    for r in rows:
        what = "; ".join(r["differs"]) if r["differs"] else "(the most recent)"
        lines.append(f"{r['key'][:16]}  {r['method']:<16} {name(r['model']):<28} {_when(r['created_at'])}  {what}")
    _emit(args, rows, "\n".join(lines))
    return 0


def _rm(args: argparse.Namespace) -> int:
    f = _filter(args)
    if f.empty:
        return _fail("rm needs a filter (--model, --task, --method, --doc-id, --older-than); "
                     "to delete everything use: lmms-cache clear --yes", 2)  # fmt: skip
    store = _open(args, readonly=False)
    removed = store.delete_where(f.where(store))
    store.compact()
    _emit(args, {"removed": removed}, f"removed {removed} entries")
    return 0


def _clear(args: argparse.Namespace) -> int:
    if not args.yes:
        return _fail("clear deletes every entry; add --yes to do it", 2)
    store = _open(args, readonly=False)
    removed = store.delete_where(Where())
    store.compact()
    _emit(args, {"removed": removed}, f"removed {removed} entries")
    return 0


def _prune(args: argparse.Namespace) -> int:
    if args.max_size is None and args.older_than is None:
        return _fail("prune needs --max-size and/or --older-than", 2)
    store = _open(args, readonly=False)
    removed, freed = manage.prune(store, max_size=parse_size(args.max_size) if args.max_size else None,
                                  older_than=parse_duration(args.older_than) if args.older_than else None)  # fmt: skip
    _emit(args, {"removed": removed, "bytes": freed}, f"removed {removed} entries ({format_size(freed)})")
    return 0


def _export(args: argparse.Namespace) -> int:
    store = _open(args, readonly=True)
    bar = _progress(args, store.stats()["entries"], "exporting")
    try:
        n = manage.export(store, args.file, _filter(args).where(store), bar.update if bar else None)
    except FileExistsError as exc:
        return _fail(str(exc))
    finally:
        if bar is not None:
            bar.close()
    _emit(args, {"exported": n, "file": args.file}, f"exported {n} entries to {args.file}")
    return 0


def _import(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.file):
        return _fail(f"no such file: {args.file}")
    store = open_store(args.path, trust=args.trust)  # importing into a new cache creates it
    counts = manage.import_(store, args.file, trust=args.trust)
    _emit(args, counts, f"added {counts['added']} entries; {counts['conflicts']} already there kept their "
                        f"value; {counts['damaged']} damaged skipped")  # fmt: skip
    return 0


def _verify(args: argparse.Namespace) -> int:
    store = _open(args, readonly=not args.drop)
    total = store.stats()["entries"]
    bar = _progress(args, total, "verifying")
    try:
        bad = manage.verify(store, drop=args.drop, progress=bar.update if bar else None)
    finally:
        if bar is not None:
            bar.close()
    data = {"checked": total, "damaged": [k.hex() for k in bad], "dropped": len(bad) if args.drop else 0}
    text = f"checked {data['checked']} entries: {len(bad)} damaged" + (
        "".join(f"\n  {k.hex()}" for k in bad) + ("\n(dropped)" if args.drop else "\n(re-run with --drop to delete them)")
        if bad else "")  # fmt: skip
    _emit(args, data, text)
    return 1 if bad and not args.drop else 0


class _CachingFactory:
    """Stands in for the model class a harness looks up by name.

    ``create_from_arg_string`` / ``create_from_arg_obj`` return a proxy around a model
    constructed on its first miss; every other class attribute is the class's own.
    """

    def __init__(self, cls: type, harness: str, name: str, options: argparse.Namespace,
                 parse: Callable[[str], dict[str, Any]]) -> None:  # fmt: skip
        self._cls = cls
        self._harness = harness
        self._name = name
        self._options = options
        self._parse = parse
        self.created: list[Any] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cls, name)

    def create_from_arg_string(self, arg_string: str, additional_config: dict[str, Any] | None = None) -> Any:
        return self._create(self._parse(arg_string) if arg_string else {}, additional_config)

    def create_from_arg_obj(self, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None) -> Any:
        return self._create(dict(arg_dict or {}), additional_config)

    def _create(self, model_args: dict[str, Any], additional_config: dict[str, Any] | None) -> Any:
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        model = lazy_model(self._cls, {**model_args, **extra})
        o = self._options
        # The identity comes from the arguments the model will be built with (its class, code,
        # settings and local checkpoint files): reading the model would build it.
        identity = identify_arguments(self._cls, self._harness, self._name, model_args)
        lm = wrap(model, Options.make(path=o.cache_dir, batch_size=o.batch_size, on_miss=o.on_miss,
                                      identity=identity))  # fmt: skip
        if o.clear_cache and int(os.environ.get("RANK", 0)) == 0:
            removed = lm.cache_store.delete_where(Where(models=(lm.cache_identity.digest,)))
            print(f"lmms-cache: cleared {removed} entries of {lm.cache_identity.label}", file=sys.stderr)
        self.created.append(lm)
        return lm


def _harness(name: str) -> tuple[Any, Callable[[str], dict[str, Any]], Callable[[], Any]]:
    """(the module whose get_model looks up model classes, the args parser, the CLI entry)."""
    if name == "lmms-eval":
        import lmms_eval.models as registry
        from lmms_eval.__main__ import cli_evaluate
        from lmms_eval.utils import simple_parse_args_string
    else:
        import lm_eval.api.registry as registry
        from lm_eval.__main__ import cli_evaluate
        from lm_eval.utils import simple_parse_args_string
    return registry, simple_parse_args_string, cli_evaluate


def _eval(args: argparse.Namespace) -> int:
    harness_args = list(args.harness_args)
    if harness_args[:1] == ["--"]:
        harness_args = harness_args[1:]
    registry, parse, run = _harness(args.harness)
    original = registry.get_model

    factories: list[_CachingFactory] = []

    def get_model(name: Any, *rest: Any, **kwargs: Any) -> Any:
        cls = original(name, *rest, **kwargs)
        if not isinstance(name, str):
            return cls
        factories.append(_CachingFactory(cls, args.harness, name, args, parse))
        return factories[-1]

    if not args.no_cache:
        registry.get_model = get_model
        # The harnesses' request-building cache too: atomic files, and callables that
        # survive a hit (lmms-eval 0.7.3 crashes on its own --cache_requests hit).
        harness_cache.install()
    argv = sys.argv
    sys.argv = [args.harness, *harness_args]
    try:
        run()
    except CacheMissError as exc:  # lm-eval lets it through; lmms-eval logs it and goes on
        print(f"lmms-cache: {exc}", file=sys.stderr)
        return 3
    finally:
        sys.argv = argv
        registry.get_model = original
    # The harnesses log an evaluation's exception and exit 0; a replay-only run that met a
    # miss must fail visibly.
    refused = sum(lm.cache_stats.refused for f in factories for lm in f.created)
    if refused:
        print(f"lmms-cache: {refused} request(s) were not in the cache (--on-miss error)", file=sys.stderr)
        return 3
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmms-cache", description=__doc__)
    parser.add_argument("--version", action="version", version=f"lmms-cache {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    where = f"the cache directory (default: $LMMS_CACHE_DIR, else {default_location()})"

    def command(name: str, run: Callable[[argparse.Namespace], int], help: str, *, json_out: bool = True,
                filters: bool = False) -> argparse.ArgumentParser:  # fmt: skip
        p = commands.add_parser(name, help=help, description=help)
        p.add_argument("path", nargs="?", default=None, help=where)
        if json_out:
            p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument("--trust", action="store_true",
                       help="read a cache owned by another user (its values are pickles: they run code)")
        if filters:
            p.add_argument("--model", help="a model identity digest prefix, or text in its description")
            p.add_argument("--task")
            p.add_argument("--method")
            p.add_argument("--doc-id", dest="doc_id")
            p.add_argument("--older-than", dest="older_than", help="e.g. 30d, 12h")
        p.set_defaults(run=run)
        return p

    command("stats", _stats, "entries, sizes, compression, hits and model time saved, by model and task")
    ls = command("ls", _ls, "one row per entry, most recently used first", filters=True)
    ls.add_argument("--limit", type=int, default=50)
    show = command("show", _show, "one whole entry")
    show.add_argument("key", help="the entry's key, or enough of its first hex characters")
    ex = command("explain", _explain, "how the stored entries of one document differ from each other")
    ex.add_argument("--task", required=True)
    ex.add_argument("--doc-id", dest="doc_id", required=True)
    ex.add_argument("--method")
    command("rm", _rm, "delete the entries the filters select", filters=True)
    clear = command("clear", _clear, "delete every entry")
    clear.add_argument("--yes", action="store_true", help="really delete everything")
    prune = command("prune", _prune, "delete old or least recently used entries; give the space back")
    prune.add_argument("--max-size", dest="max_size", help="keep at most this much of values, e.g. 20GB")
    prune.add_argument("--older-than", dest="older_than", help="delete entries older than this, e.g. 30d")
    exp = command("export", _export, "write entries to a portable file", filters=True)
    exp.add_argument("file")
    imp = command("import", _import, "merge entries from an exported file (existing entries win)")
    imp.add_argument("file")
    ver = command("verify", _verify, "check every stored value's checksum")
    ver.add_argument("--drop", action="store_true", help="delete the damaged entries")

    ev = commands.add_parser(
        "eval", help="run lmms-eval's (or lm-eval's) command line with its model cached",
        description="Run the harness's own command line with the model it creates wrapped by "
        "the cache. The model is constructed on its first miss: a fully cached rerun never "
        "loads it. Example: lmms-cache eval --cache-dir runs/cache -- --model qwen2_5_vl "
        "--model_args pretrained=Qwen/Qwen2.5-VL-3B-Instruct --tasks mme --batch_size 1",
    )  # fmt: skip
    ev.add_argument("--cache-dir", default=None,
                    help="the cache directory (default: $LMMS_CACHE_DIR, else the per-user one)")
    ev.add_argument("--no-cache", action="store_true", help="run without the cache")
    ev.add_argument("--clear-cache", action="store_true",
                    help="first delete this model's entries (same name and --model_args)")
    ev.add_argument("--on-miss", choices=("compute", "error"), default="compute",
                    help="'error' fails on any miss, listing what is missing (replay-only runs)")
    ev.add_argument("--batch-size", type=int, default=None,
                    help="misses per model call and per durable write (default 64)")
    ev.add_argument("--harness", choices=("lmms-eval", "lm-eval"), default="lmms-eval")
    ev.add_argument("harness_args", nargs=argparse.REMAINDER,
                    help="the harness's own arguments, after --")
    ev.set_defaults(run=_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if words and words[0] in commands.choices and words[0] != "eval":
        # Options may sit anywhere among a command's words (export CACHE --task x FILE);
        # eval passes everything after -- to the harness untouched.
        args = commands.choices[words[0]].parse_intermixed_args(words[1:])
    else:
        args = parser.parse_args(words)
    try:
        return int(args.run(args))
    except (StoreError, ValueError) as exc:
        return _fail(str(exc))


if __name__ == "__main__":
    sys.exit(main())
