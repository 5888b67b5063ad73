"""The viewer's back-end contract: feature dashboards, interventions, supernode suggestions.

The server only reads graph JSON files; anything that needs a model, a transcoder or a
feature store goes through an object implementing `ViewerBackend`. `NullBackend` works from
the graph file alone; `make_backend(args)` picks the back-end for `cltrace serve`.

Feature dashboard (what `feature` returns, all keys optional except layer/index):
    {"layer": int, "index": int, "label": str, "density": float | None,
     "contexts": [{"tokens": [str], "active_index": int, "value": float}],
     "promoted": [{"token": str, "value": float}],
     "suppressed": [{"token": str, "value": float}],
     "message": str}                      # shown when data is missing

Intervention result (what `intervene` returns):
    {"before": [{"token": str, "prob": float}], "after": [{"token": str, "prob": float}],
     "continuation_before": str | None, "continuation": str | None}
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol


@dataclass(frozen=True)
class GraphRef:
    """A saved graph as the server sees it."""

    name: str  # URL name: path relative to its graph folder, without .json
    path: Path  # resolved file path
    data: dict[str, Any]  # parsed Neuronpedia-schema JSON

    @property
    def metadata(self) -> dict[str, Any]:
        return self.data.get("metadata", {})


@dataclass(frozen=True)
class Intervention:
    """Set or scale one transcoder feature's activation."""

    layer: int
    feature: int
    pos: int | None  # None: every position
    mode: Literal["set", "scale"]
    value: float


@dataclass(frozen=True)
class InterventionRequest:
    graph: str
    interventions: list[Intervention] = field(default_factory=list)
    generate: int = 0  # tokens of greedy continuation to return (0: none)
    freeze_attention: bool = False  # constrained patching: clean MLP outputs up to the last layer


class BackendError(Exception):
    """A back-end failure the page should show; `status` is the HTTP status to send."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


class ViewerBackend(Protocol):
    def feature(self, graph: GraphRef, layer: int, index: int) -> dict | None:
        """The feature's dashboard, or None when nothing is known about it."""
        ...

    def intervene(self, graph: GraphRef, request: InterventionRequest) -> dict:
        """Run the graph's prompt with the interventions; raise BackendError on failure."""
        ...

    def suggest_supernodes(self, graph: GraphRef) -> list[dict]:
        """Suggested groups: [{"name": str, "node_ids": [str]}]."""
        ...


FEATURE_TYPE = "cross layer transcoder"
NO_STORE_LABELS = (
    "labels are saved in a feature store, and this server has none: run `cltrace serve --features DB`"
)
NO_MODEL = "interventions need a loaded model: run `cltrace serve --transcoder RUN [--model ...]`"


def feature_index(node: dict) -> int | None:
    """A feature node's transcoder index, from its id `{layer}_{feature}_{pos}`.

    circuit-tracer stores a Cantor pairing of (layer, feature) in `feature`, so the id is
    the reliable source; fall back to `feature` for ids in another shape.
    """
    parts = str(node.get("node_id", "")).split("_")
    if len(parts) == 3 and all(p.lstrip("-").isdigit() for p in parts):
        return int(parts[1])
    value = node.get("feature")
    return value if isinstance(value, int) else None


def find_feature_node(graph: GraphRef, layer: int, index: int) -> dict | None:
    for node in graph.data.get("nodes", []):
        if (
            node.get("feature_type") == FEATURE_TYPE
            and str(node.get("layer")) == str(layer)
            and feature_index(node) == index
        ):
            return node
    return None


class NullBackend:
    """Works from the graph JSON alone: no model, no feature store."""

    # Node fields an exporter may embed to make dashboards work without a store.
    EMBEDDED_KEYS = ("density", "contexts", "promoted", "suppressed")

    def feature(self, graph: GraphRef, layer: int, index: int) -> dict | None:
        node = find_feature_node(graph, layer, index)
        if node is None:
            return None
        card = {"layer": layer, "index": index, "label": node.get("clerp") or ""}
        embedded = {k: node[k] for k in self.EMBEDDED_KEYS if k in node}
        card.update(embedded)
        if not embedded:
            card["message"] = (
                "no feature store: run `cltrace serve --features DB` for top contexts and token effects"
            )
        return card

    def intervene(self, graph: GraphRef, request: InterventionRequest) -> dict:
        raise BackendError(NO_MODEL, status=501)

    def swap(self, graph: GraphRef, request: Any, source: GraphRef | None, circuit_b: dict | None) -> dict:
        raise BackendError(NO_MODEL, status=501)

    def set_label(self, graph: GraphRef, layer: int, index: int, label: str) -> dict:
        raise BackendError(NO_STORE_LABELS, status=501)

    def suggest_supernodes(self, graph: GraphRef) -> list[dict]:
        return suggest_by_shared_target(graph.data)


def suggest_by_shared_target(data: dict, max_groups: int = 20) -> list[dict]:
    """Group same-layer features whose strongest outgoing link goes to the same node."""
    nodes = {n.get("node_id"): n for n in data.get("nodes", [])}
    best: dict[str, tuple[float, str]] = {}  # source id -> (|weight|, target id)
    for link in data.get("links", []):
        src, weight = link.get("source"), abs(float(link.get("weight", 0.0)))
        if nodes.get(src, {}).get("feature_type") == FEATURE_TYPE:
            if weight > best.get(src, (-1.0, ""))[0]:
                best[src] = (weight, link.get("target"))
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    strength: dict[tuple[str, str], float] = defaultdict(float)
    for src, (weight, target) in best.items():
        key = (str(nodes[src].get("layer")), target)
        groups[key].append(src)
        strength[key] += weight
    ranked = sorted((k for k in groups if len(groups[k]) > 1), key=lambda k: -strength[k])
    return [
        {
            "name": f"L{layer} → {_short_label(nodes.get(target), target)}",
            "node_ids": sorted(groups[(layer, target)]),
        }
        for layer, target in ranked[:max_groups]
    ]


def _short_label(node: dict | None, fallback: str) -> str:
    label = (node or {}).get("clerp") or fallback
    return label if len(label) <= 40 else label[:39] + "…"


def make_backend(args: Any) -> ViewerBackend:
    """The back-end for `cltrace serve`: model-backed when --features/--transcoder are given.

    `--transcoder RUN` (with an optional `--model` override) enables interventions;
    `--features DB` enables dashboards. Without either, `NullBackend` serves what the graph
    files hold.
    """
    features, transcoder = getattr(args, "features", None), getattr(args, "transcoder", None)
    model = getattr(args, "model", None)
    if model and not transcoder:
        from cltrace.errors import CltraceError

        raise CltraceError(
            "--model needs --transcoder", hint="pass the training run (or transcoder folder) to steer with"
        )
    if not (features or transcoder):
        return NullBackend()
    from cltrace.viewer.model_backend import load_model_backend

    return load_model_backend(features, transcoder, model, getattr(args, "device", "auto"))
