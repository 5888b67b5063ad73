"""The `cltrace` console script: one subcommand per pipeline stage.

Each subcommand lives in `cltrace.commands.<name>` and exposes `register(subparsers)`.
Command modules import only argparse at module level, so `cltrace --help` is instant;
torch and transformers load inside the handlers.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from cltrace import __version__, hardware
from cltrace.commands import HelpFormatter
from cltrace.errors import CltraceError

# Order shown in --help: the pipeline order.
COMMANDS = [
    "demo",
    "models",
    "corpus",
    "harvest",
    "train",
    "finetune",
    "eval",
    "trace",
    "diff",
    "circuits",
    "features",
    "feature",
    "intervene",
    "serve",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cltrace",
        description="Cross-layer transcoders, attribution graphs and interventions for causal LMs, offline.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"cltrace {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"cltrace.commands.{name}")
        except ModuleNotFoundError:
            continue  # stage not built yet
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    hardware.enable_huge_pages()  # before torch's first large tensor (it reads the switch once)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        result = args.func(args)
    except CltraceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            return _internal_error(err)
        print(
            f"error: disk full: {err}\n  hint: free space and rerun the same command (with --resume "
            "where it has one) to continue",
            file=sys.stderr,
        )
        return 2
    except MemoryError:
        print("error: out of memory; use a shorter prompt, fewer tokens or a smaller batch", file=sys.stderr)
        return 2
    except Exception as err:
        return _internal_error(err)
    return int(result or 0)


def _internal_error(err: Exception) -> int:
    """A bug: say so in one line; CLTRACE_DEBUG=1 re-raises for the traceback."""
    if os.environ.get("CLTRACE_DEBUG"):
        raise err
    print(
        f"internal error: {type(err).__name__}: {err}\n  hint: this is a bug in cltrace; "
        "rerun with CLTRACE_DEBUG=1 for the traceback and report it",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
