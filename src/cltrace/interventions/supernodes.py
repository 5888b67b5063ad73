"""Supernodes: named groups of graph features ("Texas", "say a capital"), made by hand or suggested.

By hand: a supernode file (`cltrace.supernode_file`, the one format the viewer also reads
and writes), either `{name: [node ids]}` or the sidecar
`{"graph": ..., "supernodes": [{"name": ..., "node_ids": [...]}]}` saved beside the graph as
`<graph>.supernodes.json` (`save_supernodes` writes the sidecar form). Feature node ids are
`{layer}_{feature}_{pos}`; other nodes (errors, embeddings, logits) are ignored when
intervening. Logit ids have the same shape (`{n_layers+1}_{token}_{pos}`), so graph JSON is
read by its `feature_type` and interventions drop layers ≥ the model's.

Suggested: `cltrace.circuits.group.suggest_supernodes` (the one automatic grouping, also
behind `cltrace trace --circuit`). This module keeps what it builds on: `GraphView` /
`graph_view` (a graph JSON document or a pruned `Graph` as node ids and an adjacency),
`cosine_matrix`, average-linkage `agglomerate`, and `decoder_directions`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cltrace.interventions.steer import Intervention, Mode
from cltrace.supernode_file import (
    SIDECAR_SUFFIX,
    parse_supernodes,
    read_supernodes,
    sidecar_path,
    write_supernodes,
)
from cltrace.transcoders.interface import TranscoderLike

FEATURE_TYPES = {"cross layer transcoder", "feature"}  # Neuronpedia JSON / Graph node types
_FEATURE_ID = re.compile(r"^(\d+)_(\d+)_(\d+)$")


@dataclass(frozen=True)
class FeatureNode:
    layer: int
    feature: int
    pos: int


def parse_feature_id(node_id: str) -> FeatureNode | None:
    """`"{layer}_{feature}_{pos}"` -> FeatureNode; None for any other kind of node."""
    m = _FEATURE_ID.match(str(node_id))
    return FeatureNode(*map(int, m.groups())) if m else None


@dataclass
class Supernode:
    name: str
    node_ids: list[str]

    def features(self) -> list[FeatureNode]:
        return [f for f in map(parse_feature_id, self.node_ids) if f is not None]

    def interventions(
        self, mode: Mode, value: float, *, at: str = "own", n_layers: int | None = None
    ) -> list[Intervention]:
        """One intervention per member feature: at its own graph position (`at="own"`) or at
        every prompt position (`at="all"`, one intervention per distinct feature).
        With `n_layers`, ids of layer ≥ n_layers (logit nodes) are skipped."""
        feats = [f for f in self.features() if n_layers is None or f.layer < n_layers]
        if at == "all":
            unique = dict.fromkeys((f.layer, f.feature) for f in feats)
            return [Intervention(l, i, None, mode, value) for l, i in unique]
        return [Intervention(f.layer, f.feature, (f.pos,), mode, value) for f in feats]

    def to_dict(self) -> dict:
        return {"name": self.name, "node_ids": list(self.node_ids)}


def supernodes_from_json(data: Any) -> list[Supernode]:
    """Accepts `{name: [ids]}`, `{"supernodes": [{name, node_ids}]}` or `[{name, node_ids}]`."""
    return [Supernode(g["name"], g["node_ids"]) for g in parse_supernodes(data)]


def load_supernodes(path: str | Path) -> list[Supernode]:
    """Read a supernode file, or the sidecar of a graph file when given the graph."""
    p = Path(path)
    if not p.name.endswith(SIDECAR_SUFFIX) and sidecar_path(p).is_file():
        p = sidecar_path(p)
    return [Supernode(g["name"], g["node_ids"]) for g in read_supernodes(p)]


def save_supernodes(
    graph_path: str | Path, groups: Sequence[Supernode], graph_name: str | None = None
) -> Path:
    """Write groups atomically beside the graph, in the viewer's sidecar format."""
    return write_supernodes(graph_path, [g.to_dict() for g in groups], graph_name)


# -- automatic grouping --------------------------------------------------------------------


@dataclass
class GraphView:
    """What clustering needs from a graph: node ids and the adjacency [n, n] (row = target)."""

    node_ids: list[str]
    adjacency: np.ndarray
    is_feature: list[bool] | None = None  # from node types; None: judge by the id's shape

    def feature_rows(self) -> tuple[np.ndarray, list[FeatureNode]]:
        """Indices of the feature nodes and their parsed ids."""
        parsed = [(r, parse_feature_id(i)) for r, i in enumerate(self.node_ids)]
        keep = [
            (r, f) for r, f in parsed if f is not None and (self.is_feature is None or self.is_feature[r])
        ]
        return np.array([r for r, _ in keep], dtype=np.int64), [f for _, f in keep]


def graph_view(graph: Any, pruned: Any = None) -> GraphView:
    """A GraphView from
    - Neuronpedia-style JSON (`nodes` + `links`, as the viewer holds it; already pruned),
    - an `attribution.graph.Graph` (with `pruned`, a PruneResult, its kept nodes and edges), or
    - any object with `node_ids` (list or method) and `adjacency` (row = target, col = source).
    """
    if isinstance(graph, dict):
        return _view_from_json(graph)
    if callable(getattr(graph, "nodes", None)) and hasattr(graph, "adjacency"):
        return _view_from_graph(graph, pruned)
    ids = graph.node_ids() if callable(getattr(graph, "node_ids", None)) else graph.node_ids
    types = getattr(graph, "node_types", None)
    kinds = [str(t) in FEATURE_TYPES for t in types] if types is not None else None
    return GraphView([str(i) for i in ids], _numpy(graph.adjacency), kinds)


def _numpy(adj: Any) -> np.ndarray:
    return adj.detach().cpu().float().numpy() if hasattr(adj, "detach") else np.asarray(adj, np.float32)


def _view_from_json(data: dict) -> GraphView:
    nodes = data.get("nodes", [])
    ids = [str(n["node_id"]) for n in nodes]
    index = {nid: r for r, nid in enumerate(ids)}
    adj = np.zeros((len(ids), len(ids)), dtype=np.float32)
    for link in data.get("links", []):
        s, t = index.get(str(link.get("source"))), index.get(str(link.get("target")))
        if s is not None and t is not None:
            adj[t, s] += float(link.get("weight", 0.0))
    typed = bool(nodes) and all("feature_type" in n for n in nodes)
    kinds = [n["feature_type"] in FEATURE_TYPES for n in nodes] if typed else None
    return GraphView(ids, adj, kinds)


def _view_from_graph(graph: Any, pruned: Any = None) -> GraphView:
    """Node ids as the exporter writes them; only kept nodes/edges when `pruned` is given."""
    from cltrace.attribution.export import node_id

    table = graph.nodes()
    ids = [
        node_id(
            graph, kind, int(table.layer[i]), int(table.pos[i]), int(table.feature[i]), int(table.token_id[i])
        )
        for i, kind in enumerate(table.type)
    ]
    adj = _numpy(graph.adjacency)
    kinds = [kind == "feature" for kind in table.type]
    if pruned is not None:
        keep = np.flatnonzero(_numpy(pruned.node_mask).astype(bool))
        adj = (adj * _numpy(pruned.edge_mask))[np.ix_(keep, keep)]
        ids, kinds = [ids[k] for k in keep], [kinds[k] for k in keep]
    return GraphView(ids, adj, kinds)


def cosine_matrix(vectors: np.ndarray) -> np.ndarray:
    """[m, k] -> [m, m] cosine similarities (0 for zero vectors)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = np.divide(vectors, norms, out=np.zeros_like(vectors, dtype=np.float64), where=norms > 0)
    return unit @ unit.T


def agglomerate(sim: np.ndarray, threshold: float) -> list[list[int]]:
    """Average-linkage agglomerative clustering on a similarity matrix [m, m].

    Merges the most similar pair of clusters while its average similarity is ≥ threshold.
    Returns clusters (lists of indices), largest first.
    """
    m = sim.shape[0]
    S = sim.astype(np.float64).copy()
    np.fill_diagonal(S, -np.inf)
    sizes = np.ones(m)
    members = [[i] for i in range(m)]
    while m > 1:
        i, j = np.unravel_index(np.argmax(S), S.shape)
        if S[i, j] < threshold:
            break
        merged = (sizes[i] * S[i] + sizes[j] * S[j]) / (sizes[i] + sizes[j])  # Lance-Williams
        S[i, :], S[:, i] = merged, merged
        S[j, :], S[:, j] = -np.inf, -np.inf
        S[i, i] = -np.inf
        sizes[i] += sizes[j]
        members[i] += members[j]
        members[j] = []
    return sorted((sorted(c) for c in members if c), key=lambda c: (-len(c), c[0]))


def decoder_directions(transcoder: TranscoderLike, feats: Sequence[FeatureNode]) -> np.ndarray:
    """[m, d]: each feature's total decoder write Σ_{l'} W_dec_{l→l'} (as in the feature store)."""
    import torch

    out: dict[int, np.ndarray] = {}  # index in feats -> [d]; every layer of feats is visited
    with torch.no_grad():
        for layer in sorted({f.layer for f in feats}):
            rows = [k for k, f in enumerate(feats) if f.layer == layer]
            w_dec = transcoder.decoder_weight(layer)  # [F, T, d]
            dirs = w_dec[torch.tensor([feats[k].feature for k in rows], device=w_dec.device)]
            for k, v in zip(rows, dirs.float().sum(1).cpu().numpy()):
                out[k] = v
    return np.stack([out[k] for k in range(len(feats))]) if feats else np.zeros((0, 0))
