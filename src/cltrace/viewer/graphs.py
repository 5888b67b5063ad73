"""Saved graphs on disk: safe name → path resolution, parsing with a cache, supernode sidecars.

A graph's name is its path relative to the graph folder that holds it, without `.json`
(`fact/dallas` for `<folder>/fact/dallas.json`). Names are checked before any file access:
no `..`, no absolute paths, no backslashes; the resolved path (symlinks followed) must stay
inside its folder.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cltrace.io import atomic_write_json
from cltrace.viewer.backend import GraphRef

SIDECAR_SUFFIX = ".supernodes.json"
_NAME_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ +=,@-]*$")
MAX_NAME_LEN = 255


class GraphError(Exception):
    """A graph that cannot be served; `status` is the HTTP status (400, 404, 422)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class GraphSummary:
    name: str
    prompt: str | None
    n_nodes: int | None
    n_links: int | None
    size_bytes: int
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def check_name(name: str) -> None:
    """Raise GraphError(400) unless `name` is a plain relative name."""
    if not name or len(name) > MAX_NAME_LEN:
        raise GraphError("graph name is empty or too long", 400)
    parts = name.split("/")
    if any(not _NAME_PART.match(p) or p in (".", "..") or ".." in p for p in parts):
        raise GraphError(f"invalid graph name {name!r}", 400)


class GraphStore:
    """The graph folders the server may read, and the one parsed-graph cache."""

    def __init__(self, folders: list[Path]):
        self.folders = [Path(f).expanduser().resolve() for f in folders]
        self._cache: dict[Path, tuple[tuple[int, int], dict]] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """Every graph name, first folder wins on duplicates, sorted."""
        seen: dict[str, Path] = {}
        for folder in self.folders:
            for path in sorted(folder.rglob("*.json")) if folder.is_dir() else []:
                if path.name.endswith(SIDECAR_SUFFIX):
                    continue
                name = path.relative_to(folder).with_suffix("").as_posix()
                if name not in seen and self._inside(path.resolve(), folder):
                    seen[name] = path
        return sorted(seen)

    def path(self, name: str) -> Path:
        """The resolved file for `name`; GraphError 400 for a bad name, 404 if absent."""
        check_name(name)
        for folder in self.folders:
            candidate = (folder / f"{name}.json").resolve()
            if self._inside(candidate, folder) and candidate.is_file():
                return candidate
        raise GraphError(f"no graph named {name!r}", 404)

    def load(self, name: str) -> GraphRef:
        """Parse (or reuse) the graph; GraphError 422 when the file is not a graph."""
        path = self.path(name)
        stat = path.stat()
        key = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            cached = self._cache.get(path)
        if cached is None or cached[0] != key:
            cached = (key, parse_graph(path))
            with self._lock:
                self._cache[path] = cached
        return GraphRef(name=name, path=path, data=cached[1])

    def summary(self, name: str) -> GraphSummary:
        size = self.path(name).stat().st_size
        try:
            data = self.load(name).data
        except GraphError as err:
            return GraphSummary(name, None, None, None, size, error=err.message)
        return GraphSummary(name, data["metadata"].get("prompt"), len(data["nodes"]),
                            len(data["links"]), size)

    def read_supernodes(self, graph: GraphRef) -> list[dict] | None:
        """Saved groups from the sidecar, or None when there is none."""
        sidecar = sidecar_path(graph.path)
        if sidecar.is_symlink() or not sidecar.is_file():  # never follow a link out
            return None
        try:
            saved = json.loads(sidecar.read_text(encoding="utf-8"))
            return list(saved["supernodes"])
        except (ValueError, KeyError, TypeError) as err:
            raise GraphError(f"unreadable supernode file {sidecar.name}: {err}", 422)

    def write_supernodes(self, graph: GraphRef, groups: list[dict]) -> Path:
        """Save groups atomically next to the graph (`<name>.supernodes.json`)."""
        return atomic_write_json({"graph": graph.name, "supernodes": groups},
                                 sidecar_path(graph.path), indent=1)

    @staticmethod
    def _inside(path: Path, folder: Path) -> bool:
        return path == folder or folder in path.parents


def sidecar_path(graph_path: Path) -> Path:
    return graph_path.with_name(graph_path.name[: -len(".json")] + SIDECAR_SUFFIX)


def parse_graph(path: Path) -> dict:
    """Read a Neuronpedia-schema graph, checking the structure the viewer relies on."""
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as err:
        raise GraphError(f"{path.name} is not valid JSON: {err}", 422)
    if not isinstance(data, dict):
        raise GraphError(f"{path.name}: top level is not an object", 422)
    for key, kind in (("metadata", dict), ("nodes", list), ("links", list)):
        if not isinstance(data.get(key), kind):
            raise GraphError(f"{path.name}: missing or malformed '{key}'", 422)
    if not all(isinstance(n, dict) and "node_id" in n for n in data["nodes"]):
        raise GraphError(f"{path.name}: every node needs a node_id", 422)
    if not all(isinstance(e, dict) and {"source", "target", "weight"} <= e.keys()
               for e in data["links"]):
        raise GraphError(f"{path.name}: every link needs source, target and weight", 422)
    return data
