"""`cltrace.show(graph_or_path)`: the viewer inside a Jupyter notebook.

Starts (once per graph folder) a local viewer server in a background thread and returns an
`IPython.display.IFrame` of the graph's page. IPython is imported only inside `show`, and
when it is missing the page's URL is returned instead, so nothing here needs a notebook.

Accepted inputs: a graph JSON file (`<slug>.json`; its circuit file beside it is shown too),
what `cltrace.trace` returns (its `json_path`), a folder of graphs (the list page), or a
graph document (a dict in Neuronpedia's schema, as written by `cltrace trace`), which is
saved to a temporary folder first.
"""

from __future__ import annotations

import importlib
import json
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import quote

from cltrace.errors import CltraceError

_SERVERS: dict[Path, Any] = {}  # graph folder -> running ViewerServer
_TMP: list[tempfile.TemporaryDirectory] = []


def _server_for(folder: Path):
    from cltrace.viewer.server import ViewerConfig, start_in_thread

    folder = folder.resolve()
    if folder not in _SERVERS:
        server, _ = start_in_thread(ViewerConfig(graph_dirs=[folder], port=0))
        _SERVERS[folder] = server
    return _SERVERS[folder]


def _target(graph_or_path: Any) -> tuple[Path, str | None]:
    """(folder to serve, graph name or None for the list page)."""
    if isinstance(graph_or_path, dict):
        if not {"metadata", "nodes", "links"} <= graph_or_path.keys():
            raise CltraceError(
                "show() needs a graph document with metadata, nodes and links",
                "pass the JSON written by `cltrace trace`, or its path",
            )
        tmp = tempfile.TemporaryDirectory(prefix="cltrace-show-")
        _TMP.append(tmp)
        slug = str(graph_or_path["metadata"].get("slug") or "graph")
        name = "".join(c if c.isalnum() or c in "-_." else "-" for c in slug).strip(".-") or "graph"
        (Path(tmp.name) / f"{name}.json").write_text(json.dumps(graph_or_path), encoding="utf-8")
        return Path(tmp.name), name
    path = Path(getattr(graph_or_path, "json_path", graph_or_path)).expanduser()  # TraceResult too
    if path.is_dir():
        return path, None
    if path.suffix == ".json" and path.is_file():
        return path.parent, path.name.removesuffix(".json")
    raise CltraceError(f"no graph at {path}", "pass a graph JSON file, a folder of graphs or a graph dict")


def viewer_url(graph_or_path: Any, view: str | None = None) -> str:
    """Start (or reuse) the background server and return the page's URL."""
    folder, name = _target(graph_or_path)
    server = _server_for(folder)
    if name is None:
        return server.url
    query = f"?view={quote(view)}" if view else ""
    return f"{server.url}graph/{quote(name)}{query}"


def show(graph_or_path: Any, *, view: str | None = None, width: str = "100%", height: int = 720):
    """Display the viewer in Jupyter (an IFrame); without IPython, return the URL.

    view: "circuit", "graph" or "subgraph" (default: the circuit when there is one).
    """
    url = viewer_url(graph_or_path, view)
    try:  # optional (the `notebook` extra): imported by name, so type checks pass without it
        display = importlib.import_module("IPython.display")
    except ImportError:
        return url
    return display.IFrame(url, width=width, height=height)
