"""Files the tests read from the project's shared folder (`shared/` beside the clone).

Lookup: $CLTRACE_SHARED, then `<repository>/../shared`. A missing file fails the test when
$CI is set (a check that silently checks nothing is a defect) and skips it, saying why,
otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_dirs() -> list[Path]:
    env = os.environ.get("CLTRACE_SHARED")
    return ([Path(env).expanduser()] if env else []) + [REPO.parent / "shared"]


def shared_file(relative: str) -> Path:
    """The shared file `relative` (e.g. "interop/neuronpedia-graph-schema.json")."""
    tried = [d / relative for d in shared_dirs()]
    for path in tried:
        if path.is_file():
            return path
    reason = (
        f"shared file {relative} not found (tried {', '.join(map(str, tried))}); "
        "set CLTRACE_SHARED to the shared folder"
    )
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)
