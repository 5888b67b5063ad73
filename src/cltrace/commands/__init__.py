"""CLI subcommands. Each module: `register(subparsers)`; only argparse at import time."""

import argparse


def add_parser(subparsers, name: str, help: str) -> argparse.ArgumentParser:
    """A subparser whose --help shows defaults."""
    return subparsers.add_parser(name, help=help, description=help,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
