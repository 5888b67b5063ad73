"""Every subcommand's --help: a default is shown once and only where it means something."""

from __future__ import annotations

import argparse
import re

import pytest

from cltrace.cli import COMMANDS, build_parser

MEANINGLESS = re.compile(r"\(default:\s*(None|False|True|\[\]|)\)")
TWICE = re.compile(r"\(default:[^)]*\)[^\n]*\(default:")


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def option_line(text: str, action: argparse.Action) -> str:
    """The entry (help rendered wide: one line, or two after a long option) documenting `action`."""
    first = re.escape(action.option_strings[0])
    lines = text.splitlines()
    (start,) = [i for i, ln in enumerate(lines) if re.match(rf"\s+{first}(?=[ ,=]|$)", ln)]
    entry = [lines[start]]
    for ln in lines[start + 1 :]:
        if not ln.strip() or ln.lstrip().startswith("-") or not ln.startswith("   "):
            break
        entry.append(ln.strip())
    return " ".join(entry)


def test_every_command_is_checked():
    assert set(subparsers()) == set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_help_shows_meaningful_defaults_once(name, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option
    parser = subparsers()[name]
    text = parser.format_help()
    assert not MEANINGLESS.search(text), MEANINGLESS.search(text).group(0)
    assert not TWICE.search(text), TWICE.search(text).group(0)
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        line = option_line(text, action)
        shown = len(re.findall("default:", line, re.IGNORECASE))
        states_own = bool(re.search(r"\(default|default:", action.help or "", re.IGNORECASE))
        flag_or_unset = action.nargs == 0 or action.required or action.default in (None, [], "")
        if flag_or_unset and not states_own:
            assert shown == 0, line
        elif not flag_or_unset:
            assert shown == 1, line
        if states_own:
            assert shown == 1, line


def test_examples_of_each_case(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")
    parsers = subparsers()
    harvest = parsers["harvest"].format_help()
    assert "tokens to harvest (position 0 excluded) (default: 1000000)" in harvest
    assert re.search(r"--resume\s.*stops$", harvest, re.M)  # a flag: no "(default: False)"
    train = parsers["train"].format_help()
    assert "cross-layer or per-layer (default: clt)" in train and "(default: clt) (default" not in train
    trace = parsers["trace"]
    required = [a for a in trace._actions if a.required and a.option_strings]
    assert required and all("(default" not in option_line(trace.format_help(), a) for a in required)
