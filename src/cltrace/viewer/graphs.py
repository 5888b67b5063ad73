"""Saved graphs on disk: safe name → path resolution, parsing with a cache, supernode sidecars.

A graph's name is its path relative to the graph folder that holds it, without `.json`
(`fact/dallas` for `<folder>/fact/dallas.json`). Names are checked before any file access:
no `..`, no absolute paths, no backslashes; the resolved path (symlinks followed) must stay
inside its folder. The listing never fails because of one file: a file whose name is not
servable, or that is not a graph, is listed with an `error` saying why.

Supernode sidecars use the one supernode file format (`cltrace.supernode_file`).
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cltrace.supernode_file import (
    SIDECAR_SUFFIX,
    SupernodeFileError,
    parse_supernodes,
    sidecar_path,
    write_supernodes,
)
from cltrace.viewer.backend import GraphRef

CIRCUIT_SUFFIX = ".circuit.json"  # docs/CIRCUIT_FORMAT.md, written by `cltrace trace --circuit`
SUBGRAPHS_SUFFIX = ".subgraphs.json"  # pinned subgraphs saved by the viewer
NOT_GRAPHS = (SIDECAR_SUFFIX, CIRCUIT_SUFFIX, SUBGRAPHS_SUFFIX)
DIFF_PREFIX = "diff-"  # `cltrace diff` output (docs/DIFF_FORMAT.md), not a graph
DIFF_KIND = "cltrace-graph-diff"
_NAME_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ +=,@()-]*$")
NAME_CHARS = "letters, digits, spaces and . _ - + = , @ ( )"
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
        raise GraphError(f"invalid graph name {name!r}: rename the file using {NAME_CHARS}", 400)


class GraphStore:
    """The graph folders the server may read, and the one parsed-graph cache."""

    def __init__(self, folders: list[Path]):
        self.folders = [Path(f).expanduser().resolve() for f in folders]
        self._cache: dict[Path, tuple[tuple[int, int], dict]] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """Every graph name, first folder wins on duplicates, sorted."""
        return sorted(self._files())

    def _files(self, diffs: bool = False) -> dict[str, Path]:
        """Graph name -> file, for every graph file (servable name or not); with `diffs`, the
        `cltrace diff` documents (diff-*.json) instead."""
        seen: dict[str, Path] = {}
        for folder in self.folders:
            for path in sorted(folder.rglob("*.json")) if folder.is_dir() else []:
                if path.name.endswith(NOT_GRAPHS) or path.name.startswith(DIFF_PREFIX) != diffs:
                    continue
                name = path.relative_to(folder).with_suffix("").as_posix()
                if name not in seen and self._inside(path.resolve(), folder):
                    seen[name] = path
        return seen

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

    def summaries(self) -> list[GraphSummary]:
        """One summary per graph file, sorted by name; a bad file's summary carries `error`."""
        return [self._summary(name, path) for name, path in sorted(self._files().items())]

    def summary(self, name: str) -> GraphSummary:
        return self._summary(name, self.path(name))

    def _summary(self, name: str, path: Path) -> GraphSummary:
        try:
            size = path.stat().st_size
            data = self.load(name).data
        except GraphError as err:
            return GraphSummary(name, None, None, None, _size(path), error=err.message)
        except OSError as err:
            return GraphSummary(
                name, None, None, None, _size(path), error=f"cannot read {path.name}: {err.strerror or err}"
            )
        return GraphSummary(
            name, data["metadata"].get("prompt"), len(data["nodes"]), len(data["links"]), size
        )

    def read_supernodes(self, graph: GraphRef) -> list[dict] | None:
        """Saved groups from the sidecar, or None when there is none."""
        sidecar = sidecar_path(graph.path)
        if sidecar.is_symlink() or not sidecar.is_file():  # never follow a link out
            return None
        try:
            text = sidecar.read_text(encoding="utf-8")
            return parse_supernodes(json.loads(text), where=sidecar.name)
        except SupernodeFileError as err:
            raise GraphError(f"unreadable supernode file {sidecar.name}: {err.message}", 422) from None
        except (ValueError, RecursionError) as err:
            raise GraphError(f"unreadable supernode file {sidecar.name}: {err}", 422) from None

    def write_supernodes(self, graph: GraphRef, groups: list[dict]) -> Path:
        """Save groups atomically next to the graph (`<name>.supernodes.json`)."""
        return write_supernodes(graph.path, groups, graph_name=graph.name)

    def diff_summaries(self) -> list[dict[str, Any]]:
        """One line per `cltrace diff` document: name, the two prompts, counts (or error)."""
        out = []
        for name in sorted(self._files(diffs=True)):
            try:
                doc = self.load_diff(name)
                out.append(
                    {
                        "name": name,
                        "a": doc["a"].get("prompt"),
                        "b": doc["b"].get("prompt"),
                        "counts": doc.get("counts"),
                    }
                )
            except GraphError as err:
                out.append({"name": name, "error": err.message})
        return out

    def load_diff(self, name: str) -> dict[str, Any]:
        """A `cltrace diff` document; GraphError 422 when the file is not one."""
        path = self.path(name)
        try:
            doc = json.loads(path.read_bytes())
        except (ValueError, UnicodeDecodeError, RecursionError) as err:
            raise GraphError(f"{path.name} is not valid JSON: {err}", 422) from None
        if not isinstance(doc, dict) or doc.get("kind") != DIFF_KIND:
            raise GraphError(f"{path.name} is not a `cltrace diff` document (kind {DIFF_KIND!r})", 422)
        sides_ok = all(isinstance(doc.get(k), dict) for k in ("a", "b"))
        if not sides_ok or not isinstance(doc.get("nodes"), list):
            raise GraphError(f"{path.name}: missing 'a', 'b' or 'nodes' (docs/DIFF_FORMAT.md)", 422)
        return doc

    def read_circuit(self, graph: GraphRef) -> dict | None:
        """The circuit file beside the graph (`<slug>.circuit.json`), or None when there is none."""
        data = self._read_sidecar(graph, CIRCUIT_SUFFIX)
        if data is None:
            return None
        if not isinstance(data.get("supernodes"), list) or not isinstance(data.get("edges"), list):
            raise GraphError(
                f"{_beside(graph, CIRCUIT_SUFFIX).name}: missing 'supernodes' or 'edges' "
                "(docs/CIRCUIT_FORMAT.md)",
                422,
            )
        return data

    def read_subgraphs(self, graph: GraphRef) -> list[dict]:
        """Saved pinned subgraphs ([] when none were saved)."""
        data = self._read_sidecar(graph, SUBGRAPHS_SUFFIX)
        items = (data or {}).get("subgraphs", [])
        return items if isinstance(items, list) else []

    def write_subgraphs(self, graph: GraphRef, subgraphs: list[dict]) -> Path:
        from cltrace.io import atomic_write_json

        path = _beside(graph, SUBGRAPHS_SUFFIX)
        return atomic_write_json({"version": 1, "graph": graph.name, "subgraphs": subgraphs}, path)

    def _read_sidecar(self, graph: GraphRef, suffix: str) -> dict | None:
        path = _beside(graph, suffix)
        if path.is_symlink() or not path.is_file():  # never follow a link out
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError, UnicodeDecodeError) as err:
            raise GraphError(f"unreadable {path.name}: {err}", 422) from None
        if not isinstance(data, dict):
            raise GraphError(f"unreadable {path.name}: top level is not an object", 422)
        return data

    @staticmethod
    def _inside(path: Path, folder: Path) -> bool:
        return path == folder or folder in path.parents


def _beside(graph: GraphRef, suffix: str) -> Path:
    """`graphs/x.json` -> `graphs/x<suffix>`."""
    return graph.path.with_name(graph.path.name.removesuffix(".json") + suffix)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def parse_graph(path: Path) -> dict:
    """Read a Neuronpedia-schema graph, checking the structure the viewer relies on."""
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as err:
        raise GraphError(f"{path.name} is not valid JSON: {err}", 422) from err
    except RecursionError:
        raise GraphError(f"{path.name} is nested too deeply to be a graph", 422) from None
    if not isinstance(data, dict):
        raise GraphError(f"{path.name}: top level is not an object", 422)
    for key, kind in (("metadata", dict), ("nodes", list), ("links", list)):
        if not isinstance(data.get(key), kind):
            raise GraphError(f"{path.name}: missing or malformed '{key}'", 422)
    if not all(isinstance(n, dict) and "node_id" in n for n in data["nodes"]):
        raise GraphError(f"{path.name}: every node needs a node_id", 422)
    if not all(isinstance(e, dict) and {"source", "target", "weight"} <= e.keys() for e in data["links"]):
        raise GraphError(f"{path.name}: every link needs source, target and weight", 422)
    return data
