"""The transcoder module of an earlier commit, for benchmarks that time old code against new in
one run (bench_train.py, bench_auxk.py). Scripts in bench/ import it by name (their folder is
on sys.path when run as `python bench/<script>.py`)."""

from __future__ import annotations

import importlib.util
import subprocess
import tempfile
from pathlib import Path
from types import ModuleType


def model_at(commit: str) -> ModuleType | None:
    """src/cltrace/transcoders/model.py as of `commit`, imported under another name (it still
    imports the rest of cltrace as it is now); None outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        src = subprocess.run(
            ["git", "-C", str(root), "show", f"{commit}:src/cltrace/transcoders/model.py"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.mkdtemp()) / f"model_{commit}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"model_{commit}", path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
