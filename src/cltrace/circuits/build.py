"""From a pruned attribution graph to a circuit: supernodes, their edges, their influence.

`build_circuit(graph, pruned, lm, transcoder)`:

1. group the pruned graph's features into supernodes (`circuits.group`);
2. add as input nodes the token embeddings that carry at least `min_embedding_share` of the
   embeddings' influence (at most `max_embeddings`; any left without a kept edge is dropped),
   optionally the error nodes of each position, and as the output node the answer's logit
   (`answer_id`, by default the graph's first logit node);
3. edges between supernodes: the signed sum of the full graph's edges between their members,
   ``W[T, S] = Σ_{t ∈ T, s ∈ S} A[t, s]``; an edge is kept when its |weight| is at least
   `min_edge_share` of the largest |weight| into the same target, at most `max_in_edges` per
   target (the strongest);
4. validation on the real model (`circuits.validate.validate_circuit`, when present).

`circuit_to_files` writes `<slug>.circuit.json` and `<slug>.circuit.svg` beside a graph.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cltrace.attribution.graph import Graph
from cltrace.attribution.prune import PruneResult
from cltrace.circuits.circuit import Circuit, CircuitEdge, CircuitNode, circuit_path
from cltrace.circuits.group import (
    FeatureSet,
    GroupConfig,
    Grouping,
    graph_feature_set,
    group_features,
    user_grouping,
)
from cltrace.errors import CltraceError
from cltrace.transcoders.interface import TranscoderLike


@dataclass
class CircuitConfig:
    """How `build_circuit` summarises a graph. Saved in the circuit's `stats.config`."""

    group: GroupConfig = field(default_factory=GroupConfig)  # automatic supernodes
    min_embedding_share: float = 0.05  # token embeddings shown: at least this share of theirs ...
    max_embeddings: int = 8  # ... at most this many
    include_errors: bool = False  # one node per position for its error nodes (when they
    # carry at least group.min_share)
    min_edge_share: float = 0.1  # keep edges with |w| >= this share of the largest into
    # the same target ...
    max_in_edges: int = 4  # ... at most this many per target (the strongest)
    constrain: bool = True  # validation: constrained patching where it applies

    def __post_init__(self):
        if isinstance(self.group, dict):
            self.group = GroupConfig(**self.group)
        if not 0.0 <= self.min_embedding_share <= 1.0:
            raise CltraceError(f"min_embedding_share must be in [0, 1], got {self.min_embedding_share}")
        if self.max_embeddings < 0:
            raise CltraceError(f"max_embeddings must be >= 0, got {self.max_embeddings}")
        if not 0.0 <= self.min_edge_share <= 1.0:
            raise CltraceError(f"min_edge_share must be in [0, 1], got {self.min_edge_share}")
        if self.max_in_edges < 1:
            raise CltraceError(f"max_in_edges must be >= 1, got {self.max_in_edges}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class _Part:
    """A circuit node under construction: the node and its members' graph indices."""

    node: CircuitNode
    members: list[int]


def build_circuit(
    graph: Graph,
    pruned: PruneResult,
    lm,
    transcoder: TranscoderLike,
    *,
    store=None,
    cfg: CircuitConfig | None = None,
    validate: bool = True,
    answer_id: int | None = None,
    groups: Sequence[Mapping[str, Any]] | None = None,
) -> Circuit:
    """The circuit of a pruned graph (module docstring). `lm` may be None when not validating
    (the answer's text is then its token id).

    `answer_id`: the output token the circuit explains; it must be one of the graph's logit
    nodes (None: the graph's first logit, its top token or first output target).
    `groups`: supernodes given by hand ([{"name", "node_ids"}], a supernode file's groups) in
    place of the automatic grouping; they are named, connected and validated the same way.
    """
    cfg = cfg or CircuitConfig()
    start = time.perf_counter()
    k = answer_logit(graph, answer_id)
    fs = graph_feature_set(graph, pruned, transcoder=transcoder, store=store, answer_logit=k)
    grouping = (
        group_features(fs, cfg.group, graph.token_strings)
        if groups is None
        else user_grouping(fs, groups, cfg.group, graph.token_strings)
    )
    index = _graph_indices(fs, pruned)
    parts = (
        _embedding_parts(graph, pruned, cfg)
        + _group_parts(grouping, index)
        + (_error_parts(graph, pruned, fs, cfg) if cfg.include_errors else [])
        + [_logit_part(graph, lm, k)]
    )
    edges = circuit_edges(graph.adjacency, parts, cfg.min_edge_share, cfg.max_in_edges)
    used = {e.source for e in edges}
    parts = [p for p in parts if p.node.kind != "embedding" or p.node.id in used]  # no loose tokens
    circuit = Circuit(
        prompt=graph.prompt,
        tokens=list(graph.token_strings),
        answer=parts[-1].node.name,
        answer_id=int(graph.logit_tokens[k]),
        answer_prob=float(graph.logit_probabilities[k]),
        model=graph.model_name,
        transcoder=graph.transcoder_id,
        nodes=[p.node for p in parts],
        edges=edges,
        influence_share=grouping.grouped_share,
        stats=dict(
            config=cfg.to_dict(),
            n_pruned_features=grouping.n_features,
            n_grouped_features=sum(len(g.members) for g in grouping.groups),
            n_clusters=grouping.n_clusters,
            dropped_share=grouping.dropped_share,
            error_share=_error_share(graph, pruned),
            seconds_build=time.perf_counter() - start,
            seconds_validate=None,
        ),
    )
    if validate:
        circuit = _validate(circuit, graph, lm, transcoder, cfg)
    return circuit


def _validate(circuit: Circuit, graph: Graph, lm, transcoder: TranscoderLike, cfg: CircuitConfig) -> Circuit:
    try:
        from cltrace.circuits.validate import validate_circuit
    except ImportError:
        return circuit
    if lm is None:
        raise CltraceError("validating a circuit needs the model", "pass lm, or validate=False")
    start = time.perf_counter()
    circuit = validate_circuit(circuit, graph, lm, transcoder, constrain=cfg.constrain)
    circuit.stats["seconds_validate"] = time.perf_counter() - start
    return circuit


# --------------------------------------------------------------------------- parts


def _graph_indices(fs: FeatureSet, pruned: PruneResult) -> dict[str, int]:
    """View node id -> graph node index (the view holds the kept nodes in graph order)."""
    keep = pruned.node_mask.nonzero().squeeze(1).tolist()
    return {nid: keep[r] for r, nid in enumerate(fs.view.node_ids)}


def _group_parts(grouping: Grouping, index: dict[str, int]) -> list[_Part]:
    groups = sorted(grouping.groups, key=lambda g: (sum(g.layers) / 2, g.positions[0]))
    return [
        _Part(
            CircuitNode(
                id=f"sn{k}",
                name=g.name,
                kind="features",
                node_ids=list(g.node_ids),
                positions=list(g.positions),
                layers=g.layers,
                evidence=list(g.evidence),
                influence_share=g.share,
            ),
            [index[i] for i in g.node_ids],
        )
        for k, g in enumerate(groups)
    ]


def _embedding_parts(graph: Graph, pruned: PruneResult, cfg: CircuitConfig) -> list[_Part]:
    """The token embeddings that matter, by position."""
    from cltrace.attribution.export import node_id

    lo, hi = graph.token_offset, graph.logit_offset
    infl = pruned.node_influence[lo:hi].double()
    shares = (infl / infl.sum().clamp_min(1e-30)).tolist()
    ranked = sorted(range(graph.n_pos), key=lambda p: -shares[p])[: cfg.max_embeddings]
    chosen = sorted(p for p in ranked if shares[p] >= cfg.min_embedding_share and shares[p] > 0)
    parts = []
    for p in chosen:
        tok = int(graph.input_tokens[p])
        parts.append(
            _Part(
                CircuitNode(
                    id=f"emb:{p}",
                    name=graph.token_strings[p],
                    kind="embedding",
                    node_ids=[node_id(graph, "embedding", -1, p, -1, tok)],
                    positions=[p],
                    layers=None,
                    evidence=[],
                    influence_share=shares[p],
                ),
                [lo + p],
            )
        )
    return parts


def _error_parts(graph: Graph, pruned: PruneResult, fs: FeatureSet, cfg: CircuitConfig) -> list[_Part]:
    """One node per position for the kept error nodes there, when they carry enough."""
    L, n = graph.n_layers, graph.n_pos
    parts = []
    for p in range(n):
        idx = [
            graph.error_offset + l * n + p
            for l in range(L)
            if bool(pruned.node_mask[graph.error_offset + l * n + p])
        ]
        share = float(pruned.node_influence[idx].sum()) / max(fs.total_influence, 1e-30) if idx else 0.0
        if share < cfg.group.min_share or not idx:
            continue
        layers = [(i - graph.error_offset) // n for i in idx]
        parts.append(
            _Part(
                CircuitNode(
                    id=f"err:{p}",
                    name=f"error @{p}",
                    kind="error",
                    node_ids=[f"err_{l}_{p}" for l in layers],
                    positions=[p],
                    layers=(min(layers), max(layers)),
                    evidence=[],
                    influence_share=share,
                ),
                idx,
            )
        )
    return parts


def answer_logit(graph: Graph, answer_id: int | None) -> int:
    """Index (0..n_logits-1) of the answer's logit node."""
    if answer_id is None:
        return 0
    tokens = graph.logit_tokens.tolist()
    if int(answer_id) not in tokens:
        raise CltraceError(
            f"token {answer_id} is not one of the graph's output nodes {tokens}",
            "trace with --output-target for that token",
        )
    return tokens.index(int(answer_id))


def _logit_part(graph: Graph, lm, k: int) -> _Part:
    from cltrace.attribution.export import node_id

    tok = int(graph.logit_tokens[k])
    text = lm.token_strings([tok])[0] if lm is not None else str(tok)
    nid = node_id(graph, "logit", graph.n_layers, graph.n_pos - 1, -1, tok)
    return _Part(
        CircuitNode(
            id="logit",
            name=text,
            kind="logit",
            node_ids=[nid],
            positions=[graph.n_pos - 1],
            layers=None,
            evidence=[],
            influence_share=1.0,
        ),
        [graph.logit_offset + k],
    )


def _error_share(graph: Graph, pruned: PruneResult) -> float:
    """Share of the feature and error nodes' influence that the error nodes carry."""
    infl = pruned.node_influence[: graph.token_offset].double()
    return float(infl[graph.error_offset :].sum() / infl.sum().clamp_min(1e-30))


# --------------------------------------------------------------------------- edges


def aggregate_edges(adjacency: torch.Tensor, groups: Sequence[Sequence[int]]) -> np.ndarray:
    """[g, g] signed sums of member edges: W[T, S] = Σ_{t ∈ T, s ∈ S} adjacency[t, s]
    (row = target, as the graph's adjacency)."""
    g = len(groups)
    W = np.zeros((g, g))
    for t, tm in enumerate(groups):
        rows = adjacency[torch.as_tensor(list(tm), dtype=torch.long)].double()  # [|T|, n]
        for s, sm in enumerate(groups):
            W[t, s] = float(rows[:, torch.as_tensor(list(sm), dtype=torch.long)].sum())
    return W


def circuit_edges(
    adjacency: torch.Tensor, parts: Sequence[_Part], min_edge_share: float, max_in_edges: int | None = None
) -> list[CircuitEdge]:
    """The kept edges between the parts (module docstring, step 3); no self-edges, none into
    an embedding."""
    W = aggregate_edges(adjacency, [p.members for p in parts])
    np.fill_diagonal(W, 0.0)
    edges = []
    for t, part in enumerate(parts):
        if part.node.kind == "embedding":
            continue
        row = W[t]
        top = np.abs(row).max() if row.size else 0.0
        kept = np.flatnonzero(np.abs(row) >= max(min_edge_share * top, 1e-30))
        kept = kept[np.argsort(-np.abs(row[kept]), kind="stable")][:max_in_edges]
        for s in sorted(kept.tolist()):
            edges.append(CircuitEdge(parts[s].node.id, part.node.id, float(row[s])))
    return edges


# --------------------------------------------------------------------------- files


def circuit_to_files(
    graph: Graph,
    pruned: PruneResult,
    graph_json: Path,
    lm,
    transcoder: TranscoderLike,
    *,
    store=None,
    cfg: CircuitConfig | None = None,
    validate: bool = True,
    answer_id: int | None = None,
    groups: Sequence[Mapping[str, Any]] | None = None,
) -> tuple[Circuit, Path, Path]:
    """Build the circuit and write `<slug>.circuit.json` and `<slug>.circuit.svg` beside
    `graph_json` (`<slug>.json`). Automatic groups are also written as the graph's supernode
    file (`<slug>.supernodes.json`) when it has none, so that a user can rename, merge or split
    them there (or in the viewer) and rebuild the circuit from it (`groups=`)."""
    from cltrace.circuits.diagram import write_svg
    from cltrace.supernode_file import sidecar_path, write_supernodes

    circuit = build_circuit(
        graph,
        pruned,
        lm,
        transcoder,
        store=store,
        cfg=cfg,
        validate=validate,
        answer_id=answer_id,
        groups=groups,
    )
    if groups is None and not sidecar_path(graph_json).exists():
        write_supernodes(
            graph_json, [{"name": n.name, "node_ids": n.node_ids} for n in circuit.feature_nodes]
        )
    json_path = circuit.save(circuit_path(graph_json))
    svg_path = write_svg(circuit, json_path.with_suffix(".svg"))
    return circuit, json_path, svg_path
