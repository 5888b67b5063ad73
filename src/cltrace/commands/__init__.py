"""CLI subcommands. Each module: `register(subparsers)`; only argparse at import time."""

import argparse
import re

_STATES_DEFAULT = re.compile(r"\(default|default:", re.IGNORECASE)


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help once, and only where X means something:
    not for flags, required options, a None or empty default, or help that states its own."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if _STATES_DEFAULT.search(text) or not _meaningful_default(action):
            return text
        return text + " (default: %(default)s)"


def _meaningful_default(action: argparse.Action) -> bool:
    default = action.default
    if action.nargs == 0 or action.required or default is None or default is argparse.SUPPRESS:
        return False  # flags (store_true, count, help, version), required options, "unset"
    if isinstance(default, (str, list, tuple, dict)) and not default:
        return False
    return bool(action.option_strings) or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)


def add_parser(subparsers, name: str, help: str) -> argparse.ArgumentParser:
    """A subparser whose --help shows each meaningful default once (`HelpFormatter`)."""
    return subparsers.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)


DEVICE_HELP = "torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ..."


def add_device_argument(p: argparse.ArgumentParser) -> None:
    """The same --device flag on every command (resolved by `cltrace.hardware.resolve_device`)."""
    p.add_argument("--device", default="auto", help=DEVICE_HELP)


RUN_HELP = "transcoder run: a run name under cltrace's runs folder, or a folder"
MODEL_HELP = "model name or folder, if not the one the transcoder was trained on"


def add_run_arguments(p: argparse.ArgumentParser, *, required: bool = True, note: str = "") -> None:
    """--transcoder RUN, --model and --device: how every command that loads a run names it
    (opened by `cltrace.runs.open_run`)."""
    help_run = f"{RUN_HELP}; {note}" if note else RUN_HELP
    p.add_argument("--transcoder", required=required, default=None, metavar="RUN", help=help_run)
    p.add_argument("--model", default=None, help=MODEL_HELP)
    add_device_argument(p)
