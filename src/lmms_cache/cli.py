"""The ``lmms-cache`` command: a thin layer over the public API."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__
from .identity import model_id_from_arguments
from .lazy import lazy_model
from .proxy import cached
from .store import StoreError, Where, default_location, open_store


def _stats(args: argparse.Namespace) -> int:
    try:
        store = open_store(args.path, readonly=True)
    except StoreError as exc:
        print(f"lmms-cache: {exc}", file=sys.stderr)
        return 1
    stats = store.stats()
    store.close()
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
    else:
        width = max(map(len, stats))
        for name, value in stats.items():
            print(f"{name:<{width}}  {value}")
    return 0


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
        lm = cached(model, o.cache_dir, model_id=model_id_from_arguments(self._harness, self._name, model_args),
                    batch_size=o.batch_size, on_miss=o.on_miss)  # fmt: skip
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
    argv = sys.argv
    sys.argv = [args.harness, *harness_args]
    try:
        run()
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
    stats = commands.add_parser("stats", help="entries and bytes in a cache")
    stats.add_argument("path", nargs="?", default=None,
                       help=f"the cache directory (default: $LMMS_CACHE_DIR, else {default_location()})")
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    stats.set_defaults(run=_stats)

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
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
