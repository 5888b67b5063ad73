"""The viewer's routes, independent of the HTTP plumbing: `ViewerApp.handle` maps a method,
a decoded path, a query and a body to a `Response`.

Routes:
    GET  /                                      list of saved graphs (page)
    GET  /graph/<name>                          graph page
    GET  /static/<file>                         packaged assets
    GET  /api/graphs                            [{name, prompt, n_nodes, n_links, ...}]
    GET  /api/graph/<name>                      the graph JSON file
    GET  /api/graph/<name>/supernodes           saved groups (sidecar, else the graph's qParams)
    POST /api/graph/<name>/supernodes           save groups: {supernodes: [{name, node_ids}]}
    GET  /api/graph/<name>/supernodes/suggest   back-end suggestions
    GET  /api/graph/<name>/circuit              the circuit file beside the graph ({circuit: null} if none)
    GET  /api/graph/<name>/labels               {labels: {node_id: {label, detection, output, broad}}}
    GET  /api/graph/<name>/subgraphs            saved pinned subgraphs
    POST /api/graph/<name>/subgraphs            save them: {subgraphs: [{name, pinnedIds, supernodes}]}
    GET  /compare?a=<name>&b=<name>             compare page
    GET  /api/compare?a=<name>&b=<name>         the two graphs' feature-level differences
    GET  /api/diffs                             `cltrace diff` documents (diff-*.json) in the folders
    GET  /api/diff/<name>                       one of them (docs/DIFF_FORMAT.md)
    GET  /api/feature/<layer>/<index>?graph=<name>
    POST /api/feature/<layer>/<index>/label     {graph, label}: save the user's label in the feature
                                                 store ("" reverts to the automatic label); the card
    POST /api/intervene                         {graph, interventions: [...], generate}
    POST /api/swap                              {graph, node_ids, name?, source_graph | source_prompt,
                                                 generate}: graph-guided swap (viewer/swap.py)
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cltrace.viewer.backend import NO_STORE_LABELS, BackendError, GraphRef, ViewerBackend, find_feature_node
from cltrace.viewer.graphs import GraphError, GraphStore
from cltrace.viewer.validation import (
    BadRequest,
    parse_intervention,
    parse_json,
    parse_label,
    parse_subgraphs,
    parse_supernodes,
    parse_swap,
)

STATIC_DIR = Path(__file__).parent / "static"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
_STATIC_NAME = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9]+)+$")
JSON_TYPE = "application/json"


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = JSON_TYPE
    headers: dict[str, str] = field(default_factory=dict)


def json_response(payload: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(payload).encode("utf-8"))


def error_response(status: int, message: str) -> Response:
    return json_response({"error": message, "status": status}, status)


def internal_error(err: BaseException) -> Response:
    """A 500 reply for an exception no handler expected (a bug in cltrace)."""
    return error_response(
        500, f"internal error: {type(err).__name__}: {err} (a bug in cltrace; the server keeps running)"
    )


class ViewerApp:
    """Routes requests to the graph store and the back-end."""

    def __init__(self, store: GraphStore, backend: ViewerBackend):
        self.store = store
        self.backend = backend
        name = r"(?P<name>.+?)"
        self.routes: list[tuple[str, re.Pattern, Callable[..., Response]]] = [
            ("GET", re.compile(r"/"), self.index_page),
            ("GET", re.compile(r"/graph/" + name), self.graph_page),
            ("GET", re.compile(r"/static/(?P<file>[^/]+)"), self.static),
            ("GET", re.compile(r"/api/graphs"), self.list_graphs),
            ("GET", re.compile(r"/api/graph/" + name + r"/supernodes/suggest"), self.suggest),
            ("GET", re.compile(r"/api/graph/" + name + r"/supernodes"), self.get_supernodes),
            ("POST", re.compile(r"/api/graph/" + name + r"/supernodes"), self.save_supernodes),
            ("GET", re.compile(r"/api/graph/" + name + r"/circuit"), self.get_circuit),
            ("GET", re.compile(r"/api/graph/" + name + r"/labels"), self.get_labels),
            ("GET", re.compile(r"/api/graph/" + name + r"/subgraphs"), self.get_subgraphs),
            ("POST", re.compile(r"/api/graph/" + name + r"/subgraphs"), self.save_subgraphs),
            ("GET", re.compile(r"/compare"), self.compare_page),
            ("GET", re.compile(r"/api/compare"), self.compare),
            ("GET", re.compile(r"/api/diffs"), self.list_diffs),
            ("GET", re.compile(r"/api/diff/" + name), self.get_diff),
            ("GET", re.compile(r"/api/graph/" + name), self.get_graph),
            ("GET", re.compile(r"/api/feature/(?P<layer>\d{1,6})/(?P<index>\d{1,10})"), self.feature),
            (
                "POST",
                re.compile(r"/api/feature/(?P<layer>\d{1,6})/(?P<index>\d{1,10})/label"),
                self.set_label,
            ),
            ("POST", re.compile(r"/api/intervene"), self.intervene),
            ("POST", re.compile(r"/api/swap"), self.swap),
        ]

    def handle(self, method: str, path: str, query: dict[str, list[str]], body: bytes = b"") -> Response:
        """Dispatch; errors become JSON `{error, status}` responses (a bug: 500, never a
        dropped connection)."""
        allowed = []
        for route_method, pattern, handler in self.routes:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            if route_method != method:
                allowed.append(route_method)
                continue
            try:
                return handler(query=query, body=body, **match.groupdict())
            except GraphError as err:
                return error_response(err.status, err.message)
            except BadRequest as err:
                return error_response(400, str(err))
            except BackendError as err:
                return error_response(err.status, err.message)
            except RecursionError:
                return error_response(400, "the request is nested too deeply")
            except Exception as err:  # a bug: answer it, and keep serving
                return internal_error(err)
        if allowed:
            methods = ", ".join(sorted(set(allowed)))
            return error_response(405, f"{method} not allowed here; use {methods}")
        return error_response(404, f"no route for {path}")

    # -- pages and assets -------------------------------------------------------------------
    def index_page(self, **_: Any) -> Response:
        return self._asset("index.html")

    def graph_page(self, name: str, **_: Any) -> Response:
        self.store.path(name)  # 400/404 before serving the page; malformed files load there
        return self._asset("graph.html")

    def static(self, file: str, **_: Any) -> Response:
        if not _STATIC_NAME.match(file):
            return error_response(400, "invalid asset name")
        return self._asset(file)

    def _asset(self, file: str) -> Response:
        path = (STATIC_DIR / file).resolve()
        if STATIC_DIR.resolve() not in path.parents or not path.is_file():
            return error_response(404, f"no asset {file}")
        content_type = CONTENT_TYPES.get(path.suffix, "application/octet-stream")
        return Response(200, path.read_bytes(), content_type)

    # -- graphs -----------------------------------------------------------------------------
    def list_graphs(self, **_: Any) -> Response:
        graphs = [s.to_json() for s in self.store.summaries()]
        return json_response({"graphs": graphs, "folders": [str(f) for f in self.store.folders]})

    def get_graph(self, name: str, **_: Any) -> Response:
        graph = self.store.load(name)  # 422 for a malformed file
        return Response(200, graph.path.read_bytes())

    def get_supernodes(self, name: str, **_: Any) -> Response:
        graph = self.store.load(name)
        saved = self.store.read_supernodes(graph)
        if saved is not None:
            return json_response({"supernodes": saved, "source": "sidecar"})
        return json_response({"supernodes": qparams_supernodes(graph), "source": "graph"})

    def save_supernodes(self, name: str, body: bytes, **_: Any) -> Response:
        graph = self.store.load(name)
        ids = {n["node_id"] for n in graph.data["nodes"]}
        groups = parse_supernodes(parse_json(body), ids)
        path = self.store.write_supernodes(graph, groups)
        return json_response({"saved": len(groups), "file": path.name})

    def get_circuit(self, name: str, **_: Any) -> Response:
        graph = self.store.load(name)
        circuit = self.store.read_circuit(graph)  # 422 for a malformed circuit file
        if circuit is None:
            return json_response(
                {
                    "circuit": None,
                    "message": "no circuit file beside this graph (trace with `cltrace trace ... --circuit`)",
                }
            )
        return json_response({"circuit": circuit})

    def get_labels(self, name: str, **_: Any) -> Response:
        graph = self.store.load(name)
        labels = getattr(self.backend, "labels", None)
        found = labels(graph) if labels is not None else {}
        return json_response(
            {
                "labels": found,
                "message": None
                if found
                else "no label scores: serve with --features DB (a store with scored labels)",
            }
        )

    def get_subgraphs(self, name: str, **_: Any) -> Response:
        return json_response({"subgraphs": self.store.read_subgraphs(self.store.load(name))})

    def save_subgraphs(self, name: str, body: bytes, **_: Any) -> Response:
        graph = self.store.load(name)
        ids = {str(n["node_id"]) for n in graph.data["nodes"]}
        items = parse_subgraphs(parse_json(body), ids)
        path = self.store.write_subgraphs(graph, items)
        return json_response({"saved": len(items), "file": path.name})

    def compare_page(self, **_: Any) -> Response:
        return self._asset("compare.html")

    def compare(self, query: dict[str, list[str]], **_: Any) -> Response:
        from cltrace.viewer.compare import compare_graphs

        a, b = query.get("a", []), query.get("b", [])
        if len(a) != 1 or len(b) != 1:
            raise BadRequest("give two graphs: /api/compare?a=<name>&b=<name>")
        ga, gb = self.store.load(a[0]), self.store.load(b[0])
        return json_response(compare_graphs(ga, gb, self.store.read_circuit(ga), self.store.read_circuit(gb)))

    def list_diffs(self, **_: Any) -> Response:
        return json_response({"diffs": self.store.diff_summaries()})

    def get_diff(self, name: str, **_: Any) -> Response:
        return json_response(self.store.load_diff(name))

    def suggest(self, name: str, **_: Any) -> Response:
        graph = self.store.load(name)
        return json_response({"suggestions": self.backend.suggest_supernodes(graph)})

    # -- back-end ---------------------------------------------------------------------------
    def feature(self, layer: str, index: str, query: dict[str, list[str]], **_: Any) -> Response:
        names = query.get("graph", [])
        if len(names) != 1:
            raise BadRequest("give the graph once: /api/feature/<layer>/<index>?graph=<name>")
        graph = self.store.load(names[0])
        card = self.backend.feature(graph, int(layer), int(index))
        if card is None:
            node = find_feature_node(graph, int(layer), int(index))
            card = {
                "layer": int(layer),
                "index": int(index),
                "label": (node or {}).get("clerp") or "",
                "message": "no data for this feature",
            }
        return json_response(card)

    def set_label(self, layer: str, index: str, body: bytes, **_: Any) -> Response:
        graph_name, label = parse_label(parse_json(body))
        graph = self.store.load(graph_name)
        setter = getattr(self.backend, "set_label", None)
        if setter is None:
            raise BackendError(NO_STORE_LABELS, status=501)
        return json_response(setter(graph, int(layer), int(index), label))

    def intervene(self, body: bytes, **_: Any) -> Response:
        data = parse_json(body)
        name = data.get("graph")
        if not isinstance(name, str) or not name:  # parse_intervention's first check, made before loading
            raise BadRequest("graph must be a non-empty string")
        graph = self.store.load(name)
        n_pos = len(graph.metadata.get("prompt_tokens") or [])
        request = parse_intervention(data, n_pos or None)
        return json_response(self.backend.intervene(graph, request))

    def swap(self, body: bytes, **_: Any) -> Response:
        data = parse_json(body)
        name = data.get("graph")
        if not isinstance(name, str) or not name:
            raise BadRequest("graph must be a non-empty string")
        graph = self.store.load(name)
        request = parse_swap(data, {str(n["node_id"]) for n in graph.data["nodes"]})
        source = self.store.load(request.source_graph) if request.source_graph else None
        try:
            circuit_b = self.store.read_circuit(source) if source is not None else None
        except GraphError:  # a malformed circuit file: B's subject features are used instead
            circuit_b = None
        swap = getattr(self.backend, "swap", None)
        if swap is None:
            raise BackendError("this server's back-end cannot swap", status=501)
        return json_response(swap(graph, request, source, circuit_b))


def qparams_supernodes(graph: GraphRef) -> list[dict]:
    """Neuronpedia's `qParams.supernodes` ([[name, id, id, ...]]) as [{name, node_ids}]."""
    groups = (graph.data.get("qParams") or {}).get("supernodes") or []
    return [
        {"name": str(g[0]), "node_ids": [str(x) for x in g[1:]]}
        for g in groups
        if isinstance(g, list) and len(g) > 1
    ]
