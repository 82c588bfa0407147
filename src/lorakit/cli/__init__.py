"""`lorakit` command line: one entry point, one error path.

Each subcommand lives in its own module in this package and exposes `add_parser(subparsers)` which registers
the subcommand and sets `func(args) -> int`. Anticipated user errors (`LorakitError`) print one clear
message and exit 2; unexpected errors print a short message and the path of a log with the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
import traceback

from lorakit.errors import LorakitError

# subcommand name -> module in lorakit.cli that defines add_parser(subparsers)
COMMANDS = {
    "train": "train",
    "generate": "generate",
    "eval": "evaluate",
    "merge": "merge",
    "inspect": "inspect",
    "rank": "rank",
    "search": "search",
    "bench": "bench",
    "data": "data",
    "export": "export",
    "serve": "serve",
    "plan": "plan",
}


def build_parser() -> argparse.ArgumentParser:
    """Returns the top-level parser with every available subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="LoRA and QLoRA fine-tuning: train, generate, evaluate, merge, inspect and rank adapters.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of short messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        try:
            mod = importlib.import_module(f"lorakit.cli.{module}")
        except ModuleNotFoundError as e:
            if e.name == f"lorakit.cli.{module}":
                continue  # subcommand not built yet
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the process exit status (0 ok, 2 user error, 1 unexpected error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from lorakit.train.progress import quiet_third_party_progress
    quiet_third_party_progress()  # in a log (stderr not a terminal): no third-party progress bars
    try:
        return int(args.func(args) or 0)
    except LorakitError as e:
        if debug:
            raise
        print(f"lorakit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorakit {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # unexpected: keep the traceback in a log, show a short message
        if debug:
            raise
        fd, path = tempfile.mkstemp(prefix=f"lorakit-{args.command}-{time.strftime('%Y%m%d-%H%M%S')}-",
                                    suffix=".log")
        with os.fdopen(fd, "w") as f:
            traceback.print_exc(file=f)
        print(f"lorakit {args.command}: unexpected error: {type(e).__name__}: {e}\n"
              f"The full traceback is in {path} (rerun with --debug to see it here).", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
