"""CLI subcommands. Each module: `register(subparsers)`; only argparse at import time."""

import argparse


def add_parser(subparsers, name: str, help: str) -> argparse.ArgumentParser:
    """A subparser whose --help shows defaults."""
    return subparsers.add_parser(name, help=help, description=help,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)


DEVICE_HELP = "torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ..."


def add_device_argument(p: argparse.ArgumentParser) -> None:
    """The same --device flag on every command (resolved by `cltrace.hardware.resolve_device`)."""
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
