"""Influence on the logits, pruning, replacement and completeness scores (METHOD.md §4).

Definitions (as circuit-tracer's `prune_graph` / `compute_graph_scores`):

- Â = |A| with each row (a node's inputs) normalised to sum to 1.
- Influence of node s on the logits: I = w·(Â + Â² + ...) = w·((I - Â)⁻¹ - I), with w the
  logit probabilities on the logit rows (a DAG: the series ends after at most depth terms).
- Nodes: keep the smallest set of highest-influence nodes carrying `node_threshold` of the
  total influence (features and error nodes compete; tokens and logits are always kept).
- Edges: in the node-pruned graph, edge score = Â'[t, s] · (I'[t] + w[t]); keep the edges
  carrying `edge_threshold` of the total. Then drop, repeatedly, features and errors left
  without outgoing edges and features left without incoming edges.
- Replacement score: I(tokens) / (I(tokens) + I(errors)), the end-to-end fraction of
  influence that reaches the logits from the tokens rather than from error nodes.
- Completeness score: Σ_t (1 - Σ_{s error} Â[t, s]) · (I[t] + w[t]) / Σ_t (I[t] + w[t]), the
  influence-weighted fraction of each node's input that does not come from errors.
- Pruned graphs (Neuronpedia's subgraph convention): every feature that was pruned away is
  folded into the error node of its (layer, position) — its column is added to that error's
  column and its row and column are removed — then the same two scores are computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from cltrace.attribution.graph import Graph


@dataclass
class PruneResult:
    """Which nodes and edges of a graph survive pruning."""

    node_mask: Bool[Tensor, "node"]
    edge_mask: Bool[Tensor, "node node"]  # [target, source]
    node_influence: Float[Tensor, "node"]  # influence on the logits (unpruned graph)
    cumulative_scores: Float[Tensor, "node"]  # share of total influence of nodes at least as
    # influential (the frontend's `influence`)

    @property
    def n_nodes(self) -> int:
        return int(self.node_mask.sum())

    @property
    def n_edges(self) -> int:
        return int(self.edge_mask.sum())


@dataclass
class GraphScores:
    """How much of the computation the graph explains through features (0..1, higher better)."""

    replacement: float
    completeness: float


def normalize_rows(adjacency: Float[Tensor, "node node"]) -> Float[Tensor, "node node"]:
    """|A| with each row scaled to sum to 1 (rows without inputs stay zero)."""
    a = adjacency.abs()
    return a / a.sum(1, keepdim=True).clamp_min(1e-10)


def influence(
    normalized: Float[Tensor, "node node"], logit_weights: Float[Tensor, "node"], max_iter: int = 1000
) -> Float[Tensor, "node"]:
    """w·(Â + Â² + ...): total influence of every node on the weighted logits."""
    current = logit_weights @ normalized
    total = current.clone()
    for _ in range(max_iter):
        if not current.any():
            return total
        current = current @ normalized
        total += current
    raise RuntimeError(f"influence did not converge in {max_iter} steps: the graph has a cycle")


def logit_weights(graph: Graph) -> Float[Tensor, "node"]:
    w = torch.zeros(graph.n_nodes)
    w[graph.logit_offset :] = graph.logit_probabilities.float()
    return w


def score_threshold(scores: Tensor, fraction: float) -> float:
    """Smallest score among the top scores that together carry `fraction` of the total."""
    ordered = torch.sort(scores.flatten(), descending=True).values
    total = ordered.sum()
    if total <= 0:
        return float("inf")
    cumulative = torch.cumsum(ordered, 0) / total
    index = min(
        int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=cumulative.dtype))),
        ordered.numel() - 1,
    )
    return float(ordered[index])


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PruneResult:
    """Keep the nodes and edges that carry most of the influence on the logits."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    A = graph.adjacency.float()
    w = logit_weights(graph)
    node_infl = influence(normalize_rows(A), w)
    node_mask = node_infl >= score_threshold(node_infl, node_threshold)
    node_mask[graph.token_offset :] = True  # tokens and logits
    pruned = A.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    norm = normalize_rows(pruned)
    edge_scores = norm * (influence(norm, w) + w)[:, None]
    edge_mask = edge_scores >= score_threshold(edge_scores, edge_threshold)
    edge_mask &= pruned != 0
    _drop_dangling(graph, node_mask, edge_mask)
    return PruneResult(node_mask, edge_mask, node_infl, cumulative_shares(node_infl))


def _drop_dangling(graph: Graph, node_mask: Tensor, edge_mask: Tensor) -> None:
    """Features/errors need an outgoing edge, features an incoming one; repeat to a fixpoint."""
    inner, n_feat = graph.token_offset, graph.n_features
    while True:
        before = node_mask.clone()
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[:inner] &= edge_mask[:, :inner].any(0)
        node_mask[:n_feat] &= edge_mask[:n_feat].any(1)
        if torch.equal(before, node_mask):
            return


def cumulative_shares(node_infl: Tensor) -> Tensor:
    """For each node, the share of total influence carried by it and all stronger nodes."""
    ordered, index = torch.sort(node_infl, descending=True)
    shares = torch.zeros_like(node_infl)
    shares[index] = torch.cumsum(ordered, 0) / ordered.sum().clamp_min(1e-30)
    return shares


def graph_scores(graph: Graph, node_mask: Tensor | None = None) -> GraphScores:
    """Replacement and completeness scores, of the whole graph or of its kept nodes.

    With a `node_mask`, features outside it are folded into their (layer, pos) error node.
    """
    A = graph.adjacency.float()
    error = torch.zeros(graph.n_nodes, dtype=torch.bool)
    error[graph.error_offset : graph.token_offset] = True
    if node_mask is not None:
        A = _fold_pruned_features(graph, A, node_mask)
    norm = normalize_rows(A)
    w = logit_weights(graph)
    infl = influence(norm, w)
    tokens = infl[graph.token_offset : graph.logit_offset].sum()
    errors = infl[error].sum()
    replacement = float(tokens / (tokens + errors)) if tokens + errors > 0 else 0.0
    out = infl + w
    non_error = 1.0 - norm[:, error].sum(1)
    completeness = float((non_error * out).sum() / out.sum()) if out.sum() > 0 else 0.0
    return GraphScores(replacement=replacement, completeness=completeness)


def _fold_pruned_features(graph: Graph, A: Tensor, node_mask: Tensor) -> Tensor:
    """Add each dropped feature's column to its error node's column; remove the feature."""
    A = A.clone()
    dropped = (~node_mask[: graph.n_features]).nonzero().squeeze(1)
    if dropped.numel():
        feats = graph.active_features[graph.selected_features[dropped]]
        err_cols = graph.error_offset + feats[:, 0] * graph.n_pos + feats[:, 1]
        A.index_add_(1, err_cols, A[:, dropped])
        A[dropped] = 0
        A[:, dropped] = 0
    return A
