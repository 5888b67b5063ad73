"""Where cltrace keeps what it builds: model cache, corpus, activation stores, runs, graphs.

Everything lives under one home folder: $CLTRACE_HOME if set, else `.cache/cltrace` in the
current project when run from a checkout (a folder containing pyproject.toml), else
~/.cache/cltrace.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    env = os.environ.get("CLTRACE_HOME")
    if env:
        return Path(env).expanduser().resolve()
    here = Path.cwd()
    if (here / "pyproject.toml").exists() and (here / "src" / "cltrace").exists():
        return here / ".cache" / "cltrace"
    return Path.home() / ".cache" / "cltrace"


def models_dir() -> Path:
    return home() / "models"


def corpus_dir() -> Path:
    return home() / "corpus"


def runs_dir() -> Path:
    return home() / "runs"


def graphs_dir() -> Path:
    return home() / "graphs"


def stores_dir() -> Path:
    return home() / "activations"
