"""Check a circuit's predictions on the real model (issue 11 item 4, METHOD.md §7).

For every feature supernode, its member features are ablated (×0 at their own positions) on the
real model and the change of the answer's demeaned logit is compared with what the graph
predicts (`circuits.predict`); each supernode is also steered (×`steer`, default 2), reported
in ``stats["validation"]["steering"]``; for each circuit edge between feature supernodes S -> T
the predicted and measured change of T's summed member pre-activations when S is ablated is
in ``stats["validation"]["edges"]`` (Spearman: ``spearman_edges``):

- ``constrain=True`` (default, the paper's constrained patching): every MLP output is clamped
  to its clean value plus the ablated features' decoder writes (`Steerer` with
  ``constrain_until = n_layers - 1``). Other features cannot react, so the graph's prediction is
  the direct effect ``-Σ_{s∈S} A[answer, s]``; what can differ is only what the graph freezes
  but the model does not: attention patterns and norm scales.
- ``constrain=False``: the ablated features' writes are removed and the real model runs on
  (its MLPs react); the prediction is the total effect through every downstream feature.

Failure rule (`is_failed`), with p the predicted and m the measured change of the logit:
a supernode whose effects are both below ``floor`` (default 0.1 logit) is not judged (None);
otherwise it failed when the signs differ or when m is off by more than a factor of
``1 / (1 - rel_tol)`` (rel_tol 0.5: a factor of 2), i.e. ``|m - p| > rel_tol · max(|p|, |m|)``.

Faithfulness (per graph): Spearman rank correlation between predicted and measured effects
over the feature supernodes, and over the ``top_features`` features with the largest influence
on the logits (`attribution.prune.influence`), each ablated alone. All ablations of a graph run
batched (`circuits.batched.run_edits`), one prompt-length forward per row.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cltrace.attribution.graph import Graph
from cltrace.attribution.prune import influence, logit_weights, normalize_rows
from cltrace.circuits.batched import Edit, demeaned, probabilities, run_edits_reading
from cltrace.circuits.circuit import Circuit
from cltrace.circuits.predict import logit_index, propagate, relative_changes
from cltrace.errors import CltraceError
from cltrace.transcoders.interface import TranscoderLike


@dataclass
class ValidationConfig:
    """How `validate_circuit` ablates and judges."""

    constrain: bool = True  # constrained patching (direct effects) or the model running on
    top_features: int = 30  # features (by influence) ablated one at a time for the feature Spearman
    rel_tol: float = 0.5  # failed when |m - p| > rel_tol · max(|p|, |m|) (0.5: off by 2x)
    floor: float = 0.1  # effects (logits) both below this are not judged
    batch_size: int = 16  # ablations per forward
    steer: float | None = 2.0  # also steer each supernode ×this (stats only; None: skip)

    def __post_init__(self):
        if not 0.0 < self.rel_tol < 1.0:
            raise CltraceError(f"rel_tol must be in (0, 1), got {self.rel_tol}")
        if self.top_features < 0 or self.batch_size < 1 or self.floor < 0:
            raise CltraceError("top_features and floor must be >= 0 and batch_size >= 1")


def rank(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    xs = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation (Pearson of average ranks); None below 3 points or for constant input."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.shape != b.shape:
        raise ValueError("spearman needs two sequences of equal length")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if len(a) < 3:
        return None
    ra, rb = rank(a) - (len(a) + 1) / 2, rank(b) - (len(b) + 1) / 2
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return None if denom == 0 else float((ra * rb).sum() / denom)


def is_failed(predicted: float, measured: float, rel_tol: float = 0.5, floor: float = 0.1) -> bool | None:
    """The failure rule of the module docstring (None: both effects too small to judge)."""
    scale = max(abs(predicted), abs(measured))
    if scale < floor:
        return None
    if predicted * measured < 0:
        return True
    return abs(measured - predicted) > rel_tol * scale


def feature_index(graph: Graph) -> dict[str, int]:
    """Frontend feature node id `{layer}_{feature}_{pos}` -> feature node index in the graph."""
    feats = graph.active_features[graph.selected_features].tolist()
    return {f"{l}_{f}_{p}": i for i, (l, p, f) in enumerate(feats)}


def edits_for(graph: Graph, members: Sequence[int], scale: float = 0.0) -> list[Edit]:
    """Edits scaling feature nodes by `scale` (0: ablation), each at its own position."""
    feats = graph.active_features[graph.selected_features]
    return [Edit(int(feats[i, 0]), int(feats[i, 1]), int(feats[i, 2]), "scale", scale) for i in members]


def top_features_by_influence(graph: Graph, n: int) -> list[int]:
    """The n feature nodes with the largest influence on the (probability-weighted) logits."""
    infl = influence(normalize_rows(graph.adjacency.float()), logit_weights(graph))[: graph.n_features]
    k = min(n, graph.n_features)
    return torch.topk(infl, k).indices.tolist() if k else []


@dataclass
class AblationMeasurement:
    """Predicted and measured changes of the answer's demeaned logit, one entry per group."""

    predicted: list[float]
    measured: list[float]
    prob_after: list[float]
    prob_before: float
    node_predicted: torch.Tensor | None = None  # [group, n_features]: predicted Δ pre-activation
    node_measured: torch.Tensor | None = None  # [group, read]: measured Δ pre-activation of `read`


def measure_groups(
    graph: Graph,
    lm,
    transcoder: TranscoderLike,
    groups: Sequence[Sequence[int]],
    answer_id: int,
    cfg: ValidationConfig,
    scales: Sequence[float] | None = None,
    read: Sequence[int] = (),
) -> AblationMeasurement:
    """Scale each group of feature nodes (default ×0: ablate) on the real model; predict the same
    from the graph. The pre-activations of the feature nodes `read` are measured too."""
    until = lm.n_layers - 1 if cfg.constrain else None
    scales = [0.0] * len(groups) if scales is None else list(scales)
    r = torch.cat([relative_changes(graph, [g], s - 1.0) for g, s in zip(groups, scales)]) if groups else None
    col = graph.logit_offset + logit_index(graph, answer_id)
    delta = None if r is None else propagate(graph, r, until)
    pred = [] if delta is None else delta[:, col].tolist()
    tokens = graph.input_tokens.reshape(1, -1).to(lm.device)
    rows = [[]] + [edits_for(graph, g, s) for g, s in zip(groups, scales)]
    feats = graph.active_features[graph.selected_features]
    where = [(int(feats[i, 0]), int(feats[i, 1]), int(feats[i, 2])) for i in read]
    run = run_edits_reading(
        lm, transcoder, tokens, rows, where, constrain=cfg.constrain, batch_size=cfg.batch_size
    )
    d = demeaned(run.logits, answer_id)
    probs = probabilities(lm, run.logits)[:, answer_id]
    return AblationMeasurement(
        pred,
        (d[1:] - d[0]).tolist(),
        probs[1:].tolist(),
        float(probs[0]),
        None if delta is None else delta[:, : graph.n_features],
        None if run.pre is None else (run.pre[1:] - run.pre[0]).cpu(),
    )


def validate_circuit(
    circuit: Circuit,
    graph: Graph,
    lm,
    transcoder: TranscoderLike,
    *,
    constrain: bool = True,
    cfg: ValidationConfig | None = None,
) -> Circuit:
    """Fill each feature supernode's predicted / measured effect and `failed`, and the circuit's
    faithfulness (Spearman over supernodes and over the top features); returns the circuit.
    `cfg`, when given, overrides `constrain`. Details (per-feature values, steering, supernode
    edges, timing) go to ``circuit.stats["validation"]``."""
    cfg = cfg or ValidationConfig(constrain=constrain)
    start = time.perf_counter()
    index = feature_index(graph)
    ids = {v: k for k, v in index.items()}
    nodes = [n for n in circuit.feature_nodes if any(i in index for i in n.node_ids)]
    groups = [[index[i] for i in n.node_ids if i in index] for n in nodes]
    singles = top_features_by_influence(graph, cfg.top_features)
    steered = groups if cfg.steer is not None else []
    scales = [0.0] * (len(groups) + len(singles)) + [cfg.steer or 0.0] * len(steered)
    members = sorted({i for g in groups for i in g})
    m = measure_groups(
        graph,
        lm,
        transcoder,
        groups + [[i] for i in singles] + steered,
        circuit.answer_id,
        cfg,
        scales,
        members,
    )
    k, f = len(groups), len(groups) + len(singles)
    for node, p, meas, prob in zip(nodes, m.predicted[:k], m.measured[:k], m.prob_after[:k]):
        node.predicted, node.measured, node.measured_prob = p, meas, prob
        node.failed = is_failed(p, meas, cfg.rel_tol, cfg.floor)
    circuit.faithfulness = {
        "spearman_supernodes": spearman(m.predicted[:k], m.measured[:k]),
        "spearman_features": spearman(m.predicted[k:f], m.measured[k:f]),
        "n_supernodes": k,
        "n_features": len(singles),
    }
    circuit.stats["validation"] = {
        "mode": "constrained" if cfg.constrain else "unconstrained",
        "rule": f"failed: signs differ or |m-p| > {cfg.rel_tol}*max(|p|,|m|); not judged below {cfg.floor}",
        "n_failed": sum(1 for n in nodes if n.failed),
        "answer_prob_before": m.prob_before,
        "features": [
            {"node_id": ids[i], "predicted": p, "measured": q}
            for i, p, q in zip(singles, m.predicted[k:f], m.measured[k:f])
        ],
        "steering": None
        if cfg.steer is None
        else {
            "scale": cfg.steer,
            "spearman": spearman(m.predicted[f:], m.measured[f:]),
            "supernodes": [
                {"id": n.id, "predicted": p, "measured": q, "prob_after": pr}
                for n, p, q, pr in zip(nodes, m.predicted[f:], m.measured[f:], m.prob_after[f:])
            ],
        },
        "edges": supernode_edges(circuit, nodes, groups, members, m),
        "seconds": time.perf_counter() - start,
    }
    edges = circuit.stats["validation"]["edges"]
    circuit.stats["validation"]["spearman_edges"] = spearman(
        [e["predicted"] for e in edges], [e["measured"] for e in edges]
    )
    return circuit


def supernode_edges(
    circuit: Circuit, nodes, groups, members: list[int], m: AblationMeasurement
) -> list[dict]:
    """For each circuit edge between feature supernodes S -> T: the predicted and measured change of
    the summed pre-activations of T's members when S is ablated (the paper's check that
    downstream supernodes move as the graph says)."""
    if m.node_predicted is None or m.node_measured is None:
        return []
    slot = {i: j for j, i in enumerate(members)}
    row = {n.id: a for a, n in enumerate(nodes)}
    out = []
    for e in circuit.edges:
        if e.source not in row or e.target not in row:
            continue
        a, b = row[e.source], row[e.target]
        cols = groups[b]
        pred = float(m.node_predicted[a, cols].sum())
        meas = float(m.node_measured[a, [slot[i] for i in cols]].sum())
        out.append(
            {"source": e.source, "target": e.target, "edge": e.weight, "predicted": pred, "measured": meas}
        )
    return out
