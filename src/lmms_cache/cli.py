"""The lmms-cache command: manage a response cache, or run lmms-eval / lm-eval with one."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from . import __version__, codec, harness_cache, manage
from .identity import identify_arguments
from .key import KEY_SCHEMA
from .lazy import is_constructed, lazy_model
from .observe import HitCounter
from .proxy import CacheMissError, Options, wrap
from .store import Entry, SQLiteStore, StoreError, Where, default_location, is_url, open_store
from .store.redis import redact
from .units import format_size, parse_duration, parse_size

#: Exit codes (also in ``lmms-cache --help``).
EXIT_OK = 0
EXIT_FAILURE = 1  # the command could not do what was asked (no cache, damaged file, nothing found)
EXIT_USAGE = 2  # the command line is wrong (unknown option, bad size or duration, missing filter)
EXIT_REFUSED = 3  # eval --on-miss error met requests that were not in the cache
EXIT_PIPE = 141  # the reader of the output went away (``| head``): 128 + SIGPIPE, as the shell reports it

EXIT_CODES = f"""\
exit codes:
  {EXIT_OK}    success
  {EXIT_FAILURE}    failure: no cache there, a damaged or foreign file, nothing found, damaged
       entries found by verify, the harness not installed
  {EXIT_USAGE}    usage error: unknown option, bad size or duration, a missing filter or --yes
  {EXIT_REFUSED}    eval --on-miss error: requests that were not in the cache were refused
  {EXIT_PIPE}  the output was closed early (e.g. piped into head)
  eval otherwise exits with the harness's own code"""

_REQUEST_METHODS = "generate_until, loglikelihood, loglikelihood_rolling, generate_until_multi_round"
_INSTALL = {"lmms-eval": ("lmms_eval", "pip install lmms-eval"), "lm-eval": ("lm_eval", "pip install lm-eval")}


class UsageError(Exception):
    """A command line that cannot be run as written (exit code 2)."""


def _fail(message: str, code: int = EXIT_FAILURE) -> int:
    print(f"lmms-cache: {message}", file=sys.stderr)
    return code


def _plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def _entries(n: int) -> str:
    return _plural(n, "entry", "entries")


# -- output --------------------------------------------------------------------------------


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Rows as aligned text columns (numbers right-aligned)."""
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    numeric = [bool(rows) and all(isinstance(row.get(c), (int, float)) for row in rows) for c in columns]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def _iso(t: float | None) -> str | None:
    """A Unix time as ISO 8601 with the local zone's offset (``2025-03-01T14:03:07+01:00``)."""
    if not t:
        return None
    return datetime.datetime.fromtimestamp(t, tz=datetime.timezone.utc).astimezone().isoformat(timespec="seconds")


def _when(t: float | None) -> str:
    """A Unix time for a text table (local time, to the minute)."""
    if not t:
        return ""
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False, default=str) if args.json else text)


def _progress(args: argparse.Namespace, total: int, what: str) -> Any:
    if args.json or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=what, unit="entry", leave=False)


# -- argument types: a bad value is a usage error (exit 2) ----------------------------------


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _duration_arg(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _whole_number(text: str, what: str, minimum: int, below: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
    if n < minimum:
        raise argparse.ArgumentTypeError(below.format(n))
    return n


def _limit_arg(text: str) -> int:
    return _whole_number(text, "a number of rows", 0, "a limit cannot be negative: {} (0 shows every row)")


def _positive_arg(text: str) -> int:
    return _whole_number(text, "a whole number", 1, "must be at least 1: {}")


# -- the management commands -----------------------------------------------------------------


def _open(args: argparse.Namespace, *, readonly: bool) -> Any:
    return manage.opened(args.path, readonly=readonly, trust=getattr(args, "trust", False))


def _filter(args: argparse.Namespace) -> manage.Filter:
    return manage.Filter(model=args.model, task=args.task, method=args.method, doc_id=args.doc_id,
                         older_than=args.older_than)  # fmt: skip


def _stats(args: argparse.Namespace) -> int:
    with _open(args, readonly=True) as store:
        summary = store.summary()
        name = manage.label(store)
    for row in summary["by_model"]:
        row["model_label"] = name(row["model"])
    ratio = summary["raw_bytes"] / summary["bytes"] if summary["bytes"] else 1.0
    summary["compression_ratio"] = round(ratio, 2)
    current = KEY_SCHEMA.decode()
    old = sum(r["entries"] for r in summary.get("by_schema", ()) if r["key_schema"] != current)
    old_bytes = sum(r["bytes"] for r in summary.get("by_schema", ()) if r["key_schema"] != current)
    summary["old_schema_entries"] = old
    text = [
        f"cache             {summary['location']}",
        f"entries           {summary['entries']}",
        f"values            {format_size(summary['bytes'])} stored, {format_size(summary['raw_bytes'])} "
        f"uncompressed (ratio {ratio:.2f})",
        (f"server memory     {format_size(summary['server_bytes'])} (the whole server's used memory)"
         if "server_bytes" in summary else f"on disk           {format_size(summary['file_bytes'])}"),
        f"hits served       {summary['hits']}",
        f"model time saved  {summary['seconds_saved']:.1f} s",
        *([f"old key schema    {_entries(old)} the proxy never hits ({format_size(old_bytes)}): "
           "lmms-cache prune --old-schema drops them"] if old else []),
        "",
        _table([{**r, "model": r["model_label"], "bytes": format_size(r["bytes"])} for r in summary["by_model"]],
               ["model", "entries", "bytes", "hits", "seconds_saved"]),
        "",
        _table([{**r, "bytes": format_size(r["bytes"])} for r in summary["by_task"]],
               ["task", "entries", "bytes", "hits", "seconds_saved"]),
    ]  # fmt: skip
    _emit(args, summary, "\n".join(text))
    return EXIT_OK


def _entry_json(e: Entry, name: Callable[[str], str]) -> dict[str, Any]:
    """What every command says about an entry, in JSON (``doc_id`` with its stored type)."""
    return {"key": e.key.hex(), "model": e.model, "model_label": name(e.model), "method": e.method,
            "task": e.task, "split": e.split, "doc_id": e.doc_id, "bytes": e.size, "hits": e.hits,
            "created_at": _iso(e.created_at), "used_at": _iso(e.used_at)}  # fmt: skip


def _ls(args: argparse.Namespace) -> int:
    with _open(args, readonly=True) as store:
        where = _filter(args).where(store)
        name = manage.label(store)
        entries = list(store.scan(where, limit=args.limit or None, recent_first=True))
        shown = [{**_entry_json(e, name), "response": manage.preview(e, trust_all=args.trust)} for e in entries]
        more = max(0, manage.count(store, where) - len(shown)) if args.limit and len(shown) == args.limit else 0
    rows = [{**r, "key": r["key"][:16], "model": r["model_label"], "created": _when(e.created_at)}
            for r, e in zip(shown, entries, strict=True)]  # fmt: skip
    text = _table(rows, ["key", "model", "method", "task", "doc_id", "bytes", "hits", "created", "response"])
    if more:
        text += f"\n... {more} more; --limit 0 shows all"
    _emit(args, {"entries": shown, "more": more}, text)
    return EXIT_OK


def _show(args: argparse.Namespace) -> int:
    with _open(args, readonly=True) as store:
        try:
            e = manage.find(store, args.key)
        except KeyError as exc:
            return _fail(str(exc.args[0]))
        name = manage.label(store)
        description = manage.description(store, e.model)
    try:
        value: Any = manage.load(e, trust_all=args.trust)
        response, kind = manage.jsonable(value), type(value).__name__
    except codec.UntrustedValueError as exc:
        value = response = (f"<not loaded: needs {exc.needed}; written elsewhere and unsigned "
                            "(--trust loads it; only for caches you trust)>")  # fmt: skip
        kind = None
    except codec.CodecError as exc:
        value = response = f"<unreadable: {exc}>"
        kind = None
    data = {**_entry_json(e, name), "model_description": description, "raw_bytes": e.raw_size,
            "model_seconds": e.model_seconds, "components": json.loads(e.components) if e.components else None,
            "response": response, "response_type": kind}  # fmt: skip
    shown = {**data, "response": value if isinstance(value, str) else repr(value),
             "model_description": json.dumps(description, ensure_ascii=False, sort_keys=True),
             "components": json.dumps(data["components"], ensure_ascii=False, sort_keys=True)}  # fmt: skip
    _emit(args, data, "\n".join(f"{k:<18} {_cell(v)}" for k, v in shown.items()))
    return EXIT_OK


def _explain(args: argparse.Namespace) -> int:
    with _open(args, readonly=True) as store:
        rows = manage.explain_document(store, args.task, args.doc_id, args.method)
        name = manage.label(store)
    if not rows:
        return _fail(f"nothing stored for task {args.task!r}, doc_id {args.doc_id!r}")
    data = [{**r, "model_label": name(r["model"]), "created_at": _iso(r["created_at"]), "used_at": _iso(r["used_at"])}
            for r in rows]  # fmt: skip
    lines = []
    for r, raw in zip(data, rows, strict=True):
        what = "; ".join(r["differs"]) if r["differs"] else "(the most recent)"
        lines.append(f"{r['key'][:16]}  {r['method']:<16} {r['model_label']:<28} {_when(raw['created_at'])}  {what}")
    _emit(args, data, "\n".join(lines))
    return EXIT_OK


def _rm(args: argparse.Namespace) -> int:
    f = _filter(args)
    if f.empty:
        raise UsageError("rm needs a filter (--model, --task, --method, --doc-id, --older-than); "
                         "to delete everything use: lmms-cache clear --yes")  # fmt: skip
    with _open(args, readonly=False) as store:
        removed = store.delete_where(f.where(store))
        store.compact()
    _emit(args, {"removed": removed}, f"removed {_entries(removed)}")
    return EXIT_OK


def _clear(args: argparse.Namespace) -> int:
    if not args.yes:
        raise UsageError("clear deletes every entry; add --yes to do it")
    with _open(args, readonly=False) as store:
        removed = store.delete_where(Where())
        store.compact()
    _emit(args, {"removed": removed}, f"removed {_entries(removed)}")
    return EXIT_OK


def _prune(args: argparse.Namespace) -> int:
    if args.max_size is None and args.older_than is None and not args.old_schema:
        raise UsageError("prune needs --max-size, --older-than and/or --old-schema")
    with _open(args, readonly=False) as store:
        removed, freed = manage.prune(store, max_size=args.max_size, older_than=args.older_than,
                                      old_schema=args.old_schema)  # fmt: skip
    _emit(args, {"removed": removed, "bytes": freed}, f"removed {_entries(removed)} ({format_size(freed)})")
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    with _open(args, readonly=True) as store:
        bar = _progress(args, store.stats()["entries"], "exporting")
        try:
            n = manage.export(store, args.file, _filter(args).where(store), bar.update if bar else None)
        except FileExistsError as exc:
            return _fail(str(exc))
        finally:
            if bar is not None:
                bar.close()
    _emit(args, {"exported": n, "file": args.file}, f"exported {_entries(n)} to {args.file}")
    return EXIT_OK


def _import(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.file):
        return _fail(f"no such file: {args.file}")
    try:
        manage.check_export(args.file)  # before anything is created
    except manage.NotAnExportError as exc:
        return _fail(str(exc))
    # importing into a new cache creates it
    with manage.opened(args.path, readonly=False, trust=args.trust, create=True) as store:
        counts = manage.import_(store, args.file, trust=args.trust)
    refused = (f"; {_entries(counts['refused'])} refused: written elsewhere, unsigned, and needing classes "
               "outside the safe set to load (--trust imports them; only from people you trust)"
               if counts["refused"] else "")  # fmt: skip
    _emit(args, counts, f"added {_entries(counts['added'])}; {counts['conflicts']} already there kept their "
                        f"value; {counts['damaged']} damaged skipped{refused}")  # fmt: skip
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    if is_url(args.path):
        db = ""
        aside_before: set[str] = set()
    else:
        directory, filename = manage.location(args.path)
        db = os.path.join(directory, filename)
        aside_before = _set_aside_files(db)
    try:
        with _open(args, readonly=not args.drop) as store:
            total = store.stats()["entries"]
            bar = _progress(args, total, "verifying")
            try:
                bad = manage.verify(store, drop=args.drop, progress=bar.update if bar else None)
            finally:
                if bar is not None:
                    bar.close()
            foreign = manage.foreign_unsafe(store)
    except StoreError as exc:
        if args.drop or not db or not os.path.exists(db):
            return _fail(str(exc))
        return _fail(f"{exc}; if the file is damaged, verify --drop moves it aside and starts a new cache")
    moved = sorted(_set_aside_files(db) - aside_before) if db else []
    if moved:  # the file itself was damaged: the store moved it aside on opening
        data = {"checked": 0, "damaged": [], "dropped": 0, "file_damaged": True, "moved_to": moved[0]}
        _emit(args, data, f"the cache file {db} was damaged: it was moved to {moved[0]} and a new, empty cache "
                          "started in its place")  # fmt: skip
        return EXIT_FAILURE
    data = {"checked": total, "damaged": [k.hex() for k in bad], "dropped": len(bad) if args.drop else 0,
            "unsigned_foreign": [k.hex() for k in foreign]}  # fmt: skip
    text = f"checked {_entries(total)}: {len(bad)} damaged" + (
        "".join(f"\n  {k.hex()}" for k in bad) + ("\n(dropped)" if args.drop else "\n(re-run with --drop to delete them)")
        if bad else "")  # fmt: skip
    if foreign:
        text += (f"\n{_entries(len(foreign))} written elsewhere and unsigned need classes outside the safe set "
                 "to load: hits recompute them (a cache you trust: --trust loads them)")  # fmt: skip
    _emit(args, data, text)
    return EXIT_FAILURE if bad and not args.drop else EXIT_OK


def _recover(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.file):
        return _fail(f"no such file: {args.file}")
    cache = args.path if args.path is not None else os.path.dirname(os.path.abspath(args.file))
    with manage.opened(cache, readonly=False, trust=args.trust, create=True) as store:
        counts = manage.recover(store, args.file, trust=args.trust)
        where = store.location
    unsaved = (f"; {counts['unsaved']} could not be written (is the disk full?): run it again once there is room"
               if counts.get("unsaved") else "")  # fmt: skip
    _emit(args, {**counts, "file": args.file, "cache": where},
          f"recovered {_entries(counts['kept'])} from {args.file} into {where}; {counts['lost']} lost{unsaved}")
    return EXIT_OK


def _push(args: argparse.Namespace) -> int:
    if is_url(args.path):
        raise UsageError("push sends a local cache's outbox: give the local cache (its directory), not a server")
    with manage.opened(args.path, readonly=False, trust=args.trust) as local:
        assert isinstance(local, SQLiteStore)
        waiting = local.outboxes()
        if args.shared is not None:
            target = open_store(args.shared, readonly=True, lazy=True).location  # (names the queue; no connection)
            waiting = {target: waiting.get(target, 0)}
        results: list[dict[str, Any]] = []
        for target, queued in waiting.items():
            # The queue names the server without its password: $LMMS_CACHE_REDIS_PASSWORD, or --shared's URL.
            url = args.shared if args.shared is not None else target
            shared = open_store(url)
            try:
                bar = _progress(args, queued, f"pushing to {target}")
                try:
                    counts = manage.push(local, shared, target=target, progress=bar.update if bar else None)
                finally:
                    if bar is not None:
                        bar.close()
            finally:
                shared.close()
            results.append({"shared": target, **counts})
    lines = [f"{r['shared']}: pushed {_entries(r['pushed'])}"
             + (f", {r['missing']} no longer in the local cache" if r["missing"] else "")
             + (f", {r['left']} still queued" if r["left"] else "") for r in results]  # fmt: skip
    _emit(args, {"outboxes": results}, "\n".join(lines) or "nothing waits to be pushed")
    return EXIT_OK


def _copy(args: argparse.Namespace) -> int:
    with manage.opened(args.path, readonly=True, trust=args.trust) as source, \
            manage.opened(args.destination, readonly=False, trust=args.trust, create=True) as target:  # fmt: skip
        where = _filter(args).where(source)
        bar = _progress(args, manage.count(source, where), "copying")
        try:
            counts = manage.copy(source, target, where, trust=args.trust, progress=bar.update if bar else None)
        finally:
            if bar is not None:
                bar.close()
        names = (source.location, target.location)
    refused = (f"; {_entries(counts['refused'])} refused: written elsewhere, unsigned, and needing classes "
               "outside the safe set to load (--trust copies them; only from people you trust)"
               if counts["refused"] else "")  # fmt: skip
    _emit(args, {**counts, "source": names[0], "destination": names[1]},
          f"copied {_entries(counts['added'])} from {names[0]} to {names[1]}; {counts['conflicts']} already there "
          f"kept their value; {counts['damaged']} damaged skipped{refused}")  # fmt: skip
    return EXIT_OK


def _display(location: str) -> str:
    """A cache's location as the summary names it: a server without its password, a
    directory by its database file."""
    if is_url(location):
        return redact(location)
    return os.path.join(*manage.location(location))


def _set_aside_files(db: str) -> set[str]:
    directory, name = os.path.split(db)
    try:
        return {os.path.join(directory, f) for f in os.listdir(directory)
                if f.startswith(name + ".corrupt-") and not f.endswith(("-wal", "-shm"))}  # fmt: skip
    except OSError:
        return set()


# -- eval ------------------------------------------------------------------------------------


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
        self.counter = HitCounter()  # key -> hits in this run, as the proxies record them

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
        if o.clear_cache and int(os.environ.get("RANK", 0)) == 0:
            # The local cache's entries of this model (never a shared tier's: the team's).
            try:
                with manage.opened(self.location, readonly=False) as store:
                    removed = store.delete_where(Where(models=(identity.digest,)))
            except StoreError:
                removed = 0  # no cache yet
            print(f"lmms-cache: cleared {_entries(removed)} of {identity.label}", file=sys.stderr)
        lm = wrap(model, Options.make(path=o.cache_dir, batch_size=o.batch_size, on_miss=o.on_miss,
                                      identity=identity, shared=o.shared, observers=[self.counter]))  # fmt: skip
        self.created.append(lm)
        return lm

    @property
    def location(self) -> str:
        return self._options.cache_dir if self._options.cache_dir is not None else default_location()

    def saved_seconds(self) -> float:
        """The model time the hits counted so far saved (each hit: its entry's model time),
        read from the cache once its proxies are closed."""
        keys = list(self.counter.counts)
        if not keys:
            return 0.0
        try:
            with manage.opened(self.location, readonly=True) as store:
                found = store.entries(keys, values=False)
        except StoreError:
            return 0.0
        return sum(self.counter.counts[e.key] * e.model_seconds for e in found)


class HarnessMissing(Exception):
    """The harness ``eval`` should run cannot be imported."""


def _harness(name: str) -> tuple[Any, Callable[[str], dict[str, Any]], Callable[[], Any]]:
    """(the module whose get_model looks up model classes, the args parser, the CLI entry)."""
    package, install = _INSTALL[name]
    try:
        registry = importlib.import_module(f"{package}.models" if name == "lmms-eval" else f"{package}.api.registry")
        run = importlib.import_module(f"{package}.__main__").cli_evaluate
        parse = importlib.import_module(f"{package}.utils").simple_parse_args_string
    except ImportError as exc:
        missing = exc.name or ""
        if missing == package or missing.startswith(package + "."):
            raise HarnessMissing(f"eval --harness {name} needs {name}, which is not installed: {install}") from exc
        raise HarnessMissing(f"{name} is installed but cannot be imported: {exc} (install what it needs, "
                             f"or reinstall it: {install})") from exc  # fmt: skip
    return registry, parse, run


def _eval(args: argparse.Namespace) -> int:
    try:
        registry, parse, run = _harness(args.harness)
    except HarnessMissing as exc:
        return _fail(str(exc))
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
    # Only when asked: the harnesses' request-building cache (--cache_requests), replaced by
    # one with atomic files and callables that survive a hit (lmms-eval 0.7.3 crashes on its
    # own hit). It patches the harness's module namespaces.
    fixed = args.fix_request_cache and not harness_cache.installed()
    if fixed:
        harness_cache.install()
    argv = sys.argv
    sys.argv = [args.harness, *args.harness_args]
    refusal: CacheMissError | None = None
    try:
        run()
    except CacheMissError as exc:  # lm-eval lets it through; lmms-eval logs it and goes on
        refusal = exc
    finally:
        sys.argv = argv
        registry.get_model = original
        if fixed:
            harness_cache.uninstall()
    created = [lm for f in factories for lm in f.created]
    if created:
        print(_summary(created, factories), file=sys.stderr)
    # The harnesses log an evaluation's exception and exit 0; a replay-only run that met a
    # miss must fail visibly.
    if refusal is not None:
        print(f"lmms-cache: {refusal}", file=sys.stderr)
        return EXIT_REFUSED
    refused = sum(lm.cache_stats.refused for lm in created)
    if refused:
        print(f"lmms-cache: {refused} request(s) were not in the cache (--on-miss error)", file=sys.stderr)
        return EXIT_REFUSED
    return EXIT_OK


def _summary(created: Sequence[Any], factories: Sequence[_CachingFactory]) -> str:
    """One line: what the cache did in this run."""
    for lm in created:
        lm.cache_close()  # records the last hits (and retries unsaved entries)
    hits = sum(lm.cache_stats.hits for lm in created)
    misses = sum(lm.cache_stats.misses for lm in created)
    written = sum(lm.cache_stats.written for lm in created)
    built = any(is_constructed(lm.__wrapped__) for lm in created)
    saved = 0.0
    for f in factories:
        if f.created:
            saved += f.saved_seconds()
        f.counter.counts.clear()
    where = _display(factories[0].location) if factories else ""
    shared = factories[0]._options.shared if factories else None
    if shared is not None:
        where += f" (shared: {_display(shared)})"
    return (f"lmms-cache: {_plural(hits, 'hit')}, {_plural(misses, 'miss', 'misses')}, {written} written; "
            f"model {'built' if built else 'never built'}; model time saved {saved:.1f} s; cache {where}")  # fmt: skip


# -- the parser ------------------------------------------------------------------------------

_EVAL_DESCRIPTION = """\
Run the harness's own command line (lmms-eval's, or lm-eval's with --harness lm-eval) with
the model it creates wrapped by the cache. Everything after -- is the harness's. The model
is constructed on its first miss: a fully cached rerun never loads it. A line on stderr at
the end tells what the cache did (hits, misses, entries written, whether the model was
built, the model time the hits saved)."""

_EVAL_EPILOG = """\
example:
  lmms-cache eval --cache-dir runs/cache -- --model qwen2_5_vl \\
      --model_args pretrained=Qwen/Qwen2.5-VL-3B-Instruct --tasks mme --batch_size 1

""" + EXIT_CODES


def build_parser() -> argparse.ArgumentParser:
    """The ``lmms-cache`` parser (``eval``'s own options: :func:`build_eval_parser`)."""
    parser = argparse.ArgumentParser(prog="lmms-cache", description=__doc__, epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)  # fmt: skip
    parser.add_argument("--version", action="version", version=f"lmms-cache {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    where = (f"the cache: its directory, its database file, or a server URL (redis://host:6379/0?prefix=NAME, "
             f"rediss://, unix://; password from the URL or $LMMS_CACHE_REDIS_PASSWORD) (default: $LMMS_CACHE_DIR, "
             f"else {default_location()})")  # fmt: skip

    def command(name: str, run: Callable[[argparse.Namespace], int], help: str, *, json_out: bool = True,
                filters: bool = False) -> argparse.ArgumentParser:  # fmt: skip
        p = commands.add_parser(name, help=help, description=help, epilog=EXIT_CODES, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        p.add_argument("path", nargs="?", default=None, metavar="CACHE", help=where)
        if json_out:
            p.add_argument("--json", action="store_true", help="machine-readable output (JSON)")
        p.add_argument("--trust", action="store_true",
                       help="use a cache owned by another user (its values are pickles: loading them runs code)")
        if filters:
            p.add_argument("--model", help="only entries of models whose identity digest starts with this, or "
                                           "whose description contains it (e.g. a checkpoint name)")  # fmt: skip
            p.add_argument("--task", help="only entries of this task (the harness's task name)")
            p.add_argument("--method", help=f"only entries of this request type: {_REQUEST_METHODS}")
            p.add_argument("--doc-id", dest="doc_id", metavar="ID", help="only entries of this document id")
            p.add_argument("--older-than", dest="older_than", type=_duration_arg, metavar="AGE",
                           help="only entries created longer ago than this, e.g. 30d, 12h, 90m")
        p.set_defaults(run=run)
        return p

    command("stats", _stats, "entries, sizes, compression, hits and model time saved, by model and task")
    ls = command("ls", _ls, "one row per entry, most recently used first", filters=True)
    ls.add_argument("--limit", type=_limit_arg, default=50, metavar="N",
                    help="show at most N rows (default 50; 0 shows all); a last line says how many more there are")
    show = command("show", _show, "one whole entry, its response decoded")
    show.add_argument("key", help="the entry's key, or enough of its first hex characters to name one entry")
    ex = command("explain", _explain, "how the stored entries of one document differ from each other")
    ex.add_argument("--task", required=True, help="the document's task")
    ex.add_argument("--doc-id", dest="doc_id", required=True, metavar="ID", help="the document's id in the task")
    ex.add_argument("--method", help=f"only entries of this request type: {_REQUEST_METHODS}")
    command("rm", _rm, "delete the entries the filters select (at least one filter)", filters=True)
    clear = command("clear", _clear, "delete every entry")
    clear.add_argument("--yes", action="store_true", help="really delete everything")
    prune = command("prune", _prune, "delete old or least recently used entries; give the space back")
    prune.add_argument("--max-size", dest="max_size", type=_size_arg, metavar="SIZE",
                       help="keep at most this much of stored values, least recently used deleted first, "
                            "e.g. 20GB, 512MiB")  # fmt: skip
    prune.add_argument("--older-than", dest="older_than", type=_duration_arg, metavar="AGE",
                       help="delete entries created longer ago than this, e.g. 30d, 12h")
    prune.add_argument("--old-schema", dest="old_schema", action="store_true",
                       help="delete entries written under an older key schema (never hit by this version)")
    exp = command("export", _export, "write entries to a portable file (all, or those the filters select)",
                  filters=True)  # fmt: skip
    exp.add_argument("file", help="the file to write (one SQLite file; it must not exist yet)")
    imp = command("import", _import, "merge entries from an exported file (existing entries win)")
    imp.add_argument("file", help="a file written by lmms-cache export")
    ver = command("verify", _verify, "check every stored value's checksum (nothing is unpickled)")
    ver.add_argument("--drop", action="store_true",
                     help="delete the damaged entries (a damaged file is moved aside and a new cache started)")
    rec = commands.add_parser(
        "recover", help="copy what still reads of a damaged cache file (cache.db.corrupt-*) into a cache",
        description="Copy every entry of a damaged cache file that still reads and whose value verifies into a "
                    "cache (entries already there keep their value); the file itself is only read. A damaged "
                    "cache is set aside as cache.db.corrupt-<time> and what reads is copied at once; this "
                    "does it again for such a file.",
        epilog=EXIT_CODES, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    rec.add_argument("file", help="the damaged file, e.g. runs/cache/cache.db.corrupt-20250301-140307")
    rec.add_argument("path", nargs="?", default=None, metavar="CACHE",
                     help="the cache to copy into: its directory or database file (default: the one beside FILE)")
    rec.add_argument("--json", action="store_true", help="machine-readable output (JSON)")
    rec.add_argument("--trust", action="store_true",
                     help="recover a file owned by another user (its values are pickles: loading them runs code)")
    rec.set_defaults(run=_recover)
    push = command("push", _push, "send what a local cache's outbox holds to its shared cache (responses a run with "
                                  "shared=... could not send while the server was away)")  # fmt: skip
    push.add_argument("--shared", metavar="URL", default=None,
                      help="only this shared cache's queue, reached with this URL (its password, if any); default: "
                           "every queue, each server reached with $LMMS_CACHE_REDIS_PASSWORD")  # fmt: skip
    cp = command("copy", _copy, "copy entries between two caches, any of them a directory, a file or a server "
                                "(existing entries win), e.g. warm a laptop's cache from the team's", filters=True)  # fmt: skip
    cp.add_argument("destination", metavar="DEST", help="the cache to copy into (created when it is a new directory)")
    # listed here for --help; main() parses eval's words with build_eval_parser()
    commands.add_parser("eval", help="run lmms-eval's (or lm-eval's) command line with its model cached",
                        add_help=False)  # fmt: skip
    return parser


def build_eval_parser() -> argparse.ArgumentParser:
    """``lmms-cache eval``'s own options (the harness's come after ``--``)."""
    ev = argparse.ArgumentParser(prog="lmms-cache eval", usage="%(prog)s [OPTIONS] -- HARNESS-ARGUMENTS...",
                                 description=_EVAL_DESCRIPTION, epilog=_EVAL_EPILOG, allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ev.add_argument("--cache-dir", default=None, metavar="DIR",
                    help="the cache directory, or a server URL (default: $LMMS_CACHE_DIR, else the per-user one)")
    ev.add_argument("--shared", default=None, metavar="URL",
                    help="a shared cache behind the local one (redis://host:6379/0?prefix=NAME): read when the "
                         "local one misses, written after it")
    ev.add_argument("--no-cache", action="store_true", help="run without the cache")
    ev.add_argument("--clear-cache", action="store_true",
                    help="first delete this model's entries (same name and --model_args)")
    ev.add_argument("--on-miss", choices=("compute", "error"), default="compute",
                    help="'error' fails on any miss, listing what is missing (replay-only runs); exit code 3")
    ev.add_argument("--batch-size", type=_positive_arg, default=None, metavar="N",
                    help="misses per model call and per durable write (default 64)")
    ev.add_argument("--harness", choices=("lmms-eval", "lm-eval"), default="lmms-eval",
                    help="whose command line runs (default lmms-eval)")
    ev.add_argument("--fix-request-cache", action="store_true",
                    help="replace the harness's own request-building cache (--cache_requests) by lmms-cache's: "
                         "atomic files, callables that survive a hit (lmms-eval 0.7.3 crashes on its own hit). "
                         "It patches the harness's modules for this run; off by default")  # fmt: skip
    return ev


def _parse_eval(words: list[str]) -> argparse.Namespace:
    own, harness_args = (words[: words.index("--")], words[words.index("--") + 1 :]) if "--" in words else (words, [])
    parser = build_eval_parser()
    args, unknown = parser.parse_known_args(own)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}\n"
                     f"The harness's own arguments go after --: "
                     f"lmms-cache eval --cache-dir DIR -- {' '.join(unknown[:2]) or '--model ...'} ...")  # fmt: skip
    args.harness_args = harness_args
    args.run = _eval
    return args


def _run(words: list[str]) -> int:
    parser = build_parser()
    try:
        if words and words[0] == "eval":
            args = _parse_eval(words[1:])
        else:
            commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            if words and words[0] in commands.choices:
                # Options may sit anywhere among a command's words (export CACHE --task x FILE).
                args = commands.choices[words[0]].parse_intermixed_args(words[1:])
            else:
                args = parser.parse_args(words)
    except SystemExit as exc:  # argparse's usage errors (2), --help and --version (0)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        code = int(args.run(args))
    except UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except (StoreError, ValueError) as exc:
        return _fail(str(exc))
    sys.stdout.flush()  # a closed pipe shows here, inside the handler in main()
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lmms-cache`` with ``argv`` (default: the process's arguments); returns the exit code."""
    words = list(sys.argv[1:] if argv is None else argv)
    try:
        return _run(words)
    except BrokenPipeError:
        # The reader went away (``lmms-cache ls | head``): stop quietly. Later writes, and the
        # interpreter's last flush, go to /dev/null instead of raising again.
        with contextlib.suppress(Exception):  # not a real file (captured output): nothing to do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PIPE


if __name__ == "__main__":
    sys.exit(main())
