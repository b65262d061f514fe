"""The ``lmms-cache`` command: a thin layer over the public API."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from . import __version__
from .store import StoreError, default_location, open_store


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmms-cache", description=__doc__)
    parser.add_argument("--version", action="version", version=f"lmms-cache {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    stats = commands.add_parser("stats", help="entries and bytes in a cache")
    stats.add_argument("path", nargs="?", default=None,
                       help=f"the cache directory (default: $LMMS_CACHE_DIR, else {default_location()})")
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    stats.set_defaults(run=_stats)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
