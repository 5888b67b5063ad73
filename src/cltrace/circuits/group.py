"""Automatic supernodes: group a pruned graph's features that play one role (METHOD.md §7).

Signals, for every pair of feature nodes i, j kept by pruning (each in [0, 1]):

- position gate g: 1 at the same token position, `span_factor` at adjacent positions (a
  multi-token subject such as " New York"); features further apart never share a group (their
  similarity is a large negative number, so no average reaches the threshold);
- layers: exp(-|l_i - l_j| / (layer_scale · n_layers));
- decoder direction: cosine of the total decoder writes Σ_{l'} W_dec_{l→l'} (clipped at 0);
- edge profile: mean cosine (clipped at 0) of three signed profiles in the pruned graph: the
  inputs summed by source slot, the outputs summed by target slot (slot = (layer, position)
  for features and errors, the position for embeddings, each logit), and the outputs to each
  node;
- label evidence: Jaccard overlap J of the members' label words (read side and write side
  kept apart), when both have labels. Noisy labels rarely overlap, so no overlap is no
  evidence against a merge: labels only raise the similarity.

  b(i, j) = Σ_k w_k s_k / Σ_k w_k   (layers, edges and decoders, those available)
  sim(i, j) = g · (b + (1 - b) · w_labels · J)

A pair whose signed influences on the answer's logit (`signed_influence`: prune's influence
with signs kept) are opposite, both at least `sign_floor` of the largest, never shares a group
either: a supernode pushes the answer one way.

Average-linkage agglomerative clustering merges while the best pair's similarity is at least
`threshold`. The groups are then ranked by the logit influence they carry (prune's node
influence, as a share of the influence of all feature and error nodes); those carrying at
least `min_share` are kept, at most `max_groups` (the `min_groups` strongest are kept even
below the share). The rest is dropped and its share reported. Nothing depends on the prompt.

Names come from the label evidence most members share (`circuits.evidence`; "Tokyo · Japan →
Japanese": read side before the arrow, write side after); without evidence, from the
position's token, the position, the layers and the sign of the effect ("' Tokyo' @5 L2-6 (+)").

`suggest_supernodes` runs the same grouping on a graph JSON document (the viewer's) or a
pruned Graph: the one automatic grouping of cltrace.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cltrace.circuits.evidence import Evidence, feature_evidence, jaccard_matrix, parse_label, shared_evidence
from cltrace.errors import CltraceError
from cltrace.interventions.supernodes import (
    FeatureNode,
    GraphView,
    agglomerate,
    cosine_matrix,
    decoder_directions,
    graph_view,
    parse_feature_id,
)
from cltrace.transcoders.interface import TranscoderLike

_ERROR_ID = re.compile(r"^err_(\d+)_(\d+)$")
_EMBED_ID = re.compile(r"^E_(-?\d+)_(\d+)$")
FORBIDDEN = -1e9  # similarity of pairs that must never share a group


@dataclass
class GroupConfig:
    """How features are grouped into supernodes (module docstring)."""

    threshold: float = 0.3  # merge while the average similarity is at least this
    span_factor: float = 0.6  # position gate for adjacent positions (0: one position only)
    layer_scale: float = 0.15  # layer similarity decays over this fraction of the layers
    w_layer: float = 1.0  # weights of the signals
    w_decoder: float = 1.0
    w_edges: float = 2.0
    w_labels: float = 0.5  # share of the gap to 1 closed by a full label overlap (Jaccard 1)
    sign_floor: float = 0.05  # features whose signed effects on the answer are opposite and both at
    # least this share of the largest never share a group
    min_share: float = 0.02  # keep groups carrying at least this share of influence ...
    max_groups: int = 12  # ... at most this many ...
    min_groups: int = 5  # ... and at least this many (the strongest), when there are
    max_evidence: int = 6  # evidence words kept per group

    def __post_init__(self):
        if not 0.0 <= self.span_factor <= 1.0:
            raise CltraceError(f"span_factor must be in [0, 1], got {self.span_factor}")
        if self.layer_scale <= 0:
            raise CltraceError(f"layer_scale must be > 0, got {self.layer_scale}")
        if min(self.w_layer, self.w_decoder, self.w_edges) < 0:
            raise CltraceError("signal weights must be >= 0")
        if not 0.0 <= self.w_labels <= 1.0:
            raise CltraceError(f"w_labels must be in [0, 1], got {self.w_labels}")
        if not 0.0 <= self.min_share <= 1.0:
            raise CltraceError(f"min_share must be in [0, 1], got {self.min_share}")
        if self.max_groups < 1 or self.min_groups < 0 or self.min_groups > self.max_groups:
            raise CltraceError(
                f"need 0 <= min_groups <= max_groups and max_groups >= 1, got "
                f"{self.min_groups} and {self.max_groups}"
            )


# --------------------------------------------------------------------------- features of a view


@dataclass
class FeatureSet:
    """The feature nodes of a (pruned) graph view, with what the signals need."""

    view: GraphView
    rows: np.ndarray  # indices into view.node_ids of the feature nodes
    feats: list[FeatureNode]
    influence: np.ndarray  # [m] logit influence of each feature
    total_influence: float  # of every feature and error node (share denominator)
    n_layers: int
    evidence: list[Evidence] = field(default_factory=list)
    decoder_dirs: np.ndarray | None = None  # [m, d]
    effect: np.ndarray | None = None  # [m] signed influence on the answer's logit

    @property
    def ids(self) -> list[str]:
        return [self.view.node_ids[r] for r in self.rows]

    @property
    def layers(self) -> np.ndarray:
        return np.array([f.layer for f in self.feats], dtype=np.int64)

    @property
    def positions(self) -> np.ndarray:
        return np.array([f.pos for f in self.feats], dtype=np.int64)


def node_slot(node_id: str, is_feature: bool) -> tuple:
    """Where a node sits: features and errors by (layer, pos), embeddings by pos, logits by id."""
    if is_feature:
        f = parse_feature_id(node_id)
        if f is None:
            raise ValueError(f"{node_id!r} is flagged as a feature but is not a layer_feature_pos id")
        return ("lp", f.layer, f.pos)
    m = _ERROR_ID.match(node_id)
    if m:
        return ("lp", int(m.group(1)), int(m.group(2)))
    m = _EMBED_ID.match(node_id)
    if m:
        return ("emb", int(m.group(2)))
    return ("node", node_id)


def _feature_flags(view: GraphView) -> list[bool]:
    rows, _ = view.feature_rows()
    flags = [False] * len(view.node_ids)
    for r in rows.tolist():
        flags[r] = True
    return flags


def edge_similarity(view: GraphView, rows: np.ndarray) -> np.ndarray:
    """[m, m] mean of the clipped cosines of the three edge profiles (module docstring)."""
    flags = _feature_flags(view)
    slots = [node_slot(i, f) for i, f in zip(view.node_ids, flags)]
    index = {s: k for k, s in enumerate(dict.fromkeys(slots))}
    S = np.zeros((len(slots), len(index)), dtype=np.float64)
    S[np.arange(len(slots)), [index[s] for s in slots]] = 1.0
    adj = view.adjacency.astype(np.float64)
    inputs, outputs = adj[rows, :], adj[:, rows].T  # [m, n] each
    sims = [cosine_matrix(inputs @ S), cosine_matrix(outputs @ S), cosine_matrix(outputs)]
    return np.mean([np.clip(s, 0.0, 1.0) for s in sims], axis=0)


def similarity(fs: FeatureSet, cfg: GroupConfig) -> np.ndarray:
    """[m, m] combined similarity of the feature nodes (module docstring)."""
    pos, lay = fs.positions, fs.layers
    dp = np.abs(pos[:, None] - pos[None, :])
    gate = np.where(dp == 0, 1.0, np.where(dp == 1, cfg.span_factor, 0.0))
    scale = cfg.layer_scale * max(fs.n_layers, 1)
    num = cfg.w_layer * np.exp(-np.abs(lay[:, None] - lay[None, :]) / scale)
    den = np.full_like(num, cfg.w_layer)
    num = num + cfg.w_edges * edge_similarity(fs.view, fs.rows)
    den = den + cfg.w_edges
    if fs.decoder_dirs is not None and len(fs.decoder_dirs):
        num = num + cfg.w_decoder * np.clip(cosine_matrix(fs.decoder_dirs), 0.0, 1.0)
        den = den + cfg.w_decoder
    base = num / np.maximum(den, 1e-12)
    if fs.evidence and cfg.w_labels > 0:  # shared words raise the similarity; none do not lower it
        jac, both = jaccard_matrix([e.words() for e in fs.evidence])
        base = base + (1.0 - base) * cfg.w_labels * np.where(both, jac, 0.0)
    allowed = (gate > 0) & ~opposite_effects(fs.effect, cfg.sign_floor)
    return np.where(allowed, gate * base, FORBIDDEN)


def opposite_effects(effect: np.ndarray | None, floor: float) -> np.ndarray | bool:
    """[m, m] pairs whose signed effects on the answer differ in sign, both at least `floor` of
    the largest |effect| (False everywhere without effects)."""
    if effect is None or not len(effect) or not np.abs(effect).max() > 0:
        return False
    strong = np.abs(effect) >= floor * np.abs(effect).max()
    sign = np.sign(effect)
    return (sign[:, None] * sign[None, :] < 0) & strong[:, None] & strong[None, :]


def signed_influence(adjacency: np.ndarray, target: int, max_iter: int = 1000) -> np.ndarray:
    """[n] signed influence of every node on node `target`: the sum over paths of the products
    of edge weights, each divided by its target's total |input| (prune's influence, with signs)."""
    A = adjacency.astype(np.float64)
    norm = A / np.maximum(np.abs(A).sum(1, keepdims=True), 1e-30)
    current = np.zeros(A.shape[0])
    current[target] = 1.0
    total = np.zeros_like(current)
    for _ in range(max_iter):
        current = current @ norm
        if not current.any():
            return total
        total += current
    raise RuntimeError("signed influence did not converge: the graph has a cycle")


# --------------------------------------------------------------------------- grouping


@dataclass
class FeatureGroup:
    """One automatic supernode: member feature ids, the share of influence, evidence, name."""

    node_ids: list[str]
    members: list[int]  # indices into the FeatureSet
    share: float
    evidence: list[str]  # "reads" words, then "→ writes" words, most shared first
    name: str
    positions: list[int]
    layers: tuple[int, int]
    effect: float | None = None  # Σ of the members' signed influence on the answer (None: unknown)


@dataclass
class Grouping:
    """The kept groups (strongest first) and what was left out."""

    groups: list[FeatureGroup]
    n_features: int  # feature nodes in the pruned graph
    grouped_share: float  # Σ share of the kept groups
    dropped_share: float  # share of the pruned graph's features in no kept group
    n_clusters: int  # clusters before the influence selection


def group_features(
    fs: FeatureSet, cfg: GroupConfig | None = None, token_strings: Sequence[str] | None = None
) -> Grouping:
    """Cluster the features, keep the groups carrying enough influence, name them."""
    cfg = cfg or GroupConfig()
    m = len(fs.feats)
    if m == 0:
        return Grouping([], 0, 0.0, 0.0, 0)
    clusters = agglomerate(similarity(fs, cfg), cfg.threshold) if m > 1 else [[0]]
    denom = max(fs.total_influence, 1e-30)
    shares = [float(fs.influence[c].sum()) / denom for c in clusters]
    order = sorted(range(len(clusters)), key=lambda k: -shares[k])
    keep = [
        k
        for n, k in enumerate(order)
        if n < cfg.max_groups and (shares[k] >= cfg.min_share or n < cfg.min_groups) and shares[k] > 0
    ]
    groups = [_make_group(fs, clusters[k], shares[k], cfg, token_strings) for k in keep]
    _distinct_names(groups)
    total = float(fs.influence.sum()) / denom
    grouped = sum(shares[k] for k in keep)
    return Grouping(groups, m, grouped, max(0.0, total - grouped), len(clusters))


def user_grouping(
    fs: FeatureSet,
    groups: Sequence[Mapping[str, Any]],
    cfg: GroupConfig | None = None,
    token_strings: Sequence[str] | None = None,
) -> Grouping:
    """Groups given by hand ([{"name", "node_ids"}], e.g. a supernode file renamed, merged or
    split by the user) in place of the clustering: each keeps its name; node ids that are not
    feature nodes of this pruned graph are left out (a group left empty is dropped)."""
    cfg = cfg or GroupConfig()
    at = {nid: k for k, nid in enumerate(fs.ids)}
    denom = max(fs.total_influence, 1e-30)
    out = []
    for g in groups:
        members = [at[str(i)] for i in g["node_ids"] if str(i) in at]
        if members:
            group = _make_group(fs, members, float(fs.influence[members].sum()) / denom, cfg, token_strings)
            group.name = str(g["name"])
            out.append(group)
    grouped = sum(g.share for g in out)
    total = float(fs.influence.sum()) / denom
    return Grouping(out, len(fs.feats), grouped, max(0.0, total - grouped), len(out))


def _make_group(
    fs: FeatureSet, members: list[int], share: float, cfg: GroupConfig, token_strings: Sequence[str] | None
) -> FeatureGroup:
    feats = [fs.feats[k] for k in members]
    positions = sorted({f.pos for f in feats})
    layers = (min(f.layer for f in feats), max(f.layer for f in feats))
    weights = fs.influence[members]
    evidence = shared_evidence(
        [fs.evidence[k] for k in members] if fs.evidence else [], weights, cfg.max_evidence
    )
    name = group_name(evidence, positions, layers, token_strings)
    effect = None if fs.effect is None else float(fs.effect[members].sum())
    if not evidence and effect:  # a position-only name says at least which way the group pushes
        name = f"{name} ({'+' if effect > 0 else '−'})"
    return FeatureGroup(
        [fs.ids[k] for k in members], list(members), share, evidence, name, positions, layers, effect
    )


def _distinct_names(groups: list[FeatureGroup]) -> None:
    """Groups that got the same name (same evidence, or same position and layers) are told
    apart by the sign of their effect on the answer ("(+)": they push it up, "(−)": down), then
    by " #2", " #3", ... in order of influence."""
    names = Counter(g.name for g in groups)
    for g in groups:
        if names[g.name] > 1 and g.effect and not g.name.endswith((" (+)", " (−)")):
            g.name = f"{g.name} ({'+' if g.effect > 0 else '−'})"
    seen: Counter[str] = Counter()
    for g in groups:
        seen[g.name] += 1
        if seen[g.name] > 1:
            g.name = f"{g.name} #{seen[g.name]}"


def group_name(
    evidence: Sequence[str],
    positions: Sequence[int],
    layers: tuple[int, int],
    token_strings: Sequence[str] | None,
) -> str:
    """ "Tokyo · Japan → Japanese" from the evidence, else "' Tokyo' @5 L2-6"."""
    reads = [w for w in evidence if not w.startswith("→ ")][:3]
    writes = [w[2:] for w in evidence if w.startswith("→ ")][:2]
    if reads or writes:
        name = " · ".join(reads)
        return f"{name} → {' · '.join(writes)}".strip() if writes else name
    span = layer_label(layers)
    at = f"@{positions[0]}" if len(positions) == 1 else f"@{positions[0]}-{positions[-1]}"
    if token_strings is None:
        return f"{at} {span}"
    text = "".join(token_strings[p] for p in positions if 0 <= p < len(token_strings))
    return f"{text!r} {at} {span}"


# --------------------------------------------------------------------------- front ends


def feature_set(
    view: GraphView,
    influence: np.ndarray,
    n_layers: int,
    *,
    transcoder: TranscoderLike | None = None,
    store=None,
    labels: Mapping[tuple[int, int], str] | None = None,
    total_influence: float | None = None,
    answer: str | None = None,
) -> FeatureSet:
    """The feature nodes of `view` with their influence (`influence`: one value per view node).

    Share denominator: `total_influence`, by default the influence of every feature and error
    node of the view. `answer`: the node id of the answer's logit, for the sign of each
    feature's effect on it (no sign constraint without it).
    """
    rows, feats = view.feature_rows()
    flags = _feature_flags(view)
    middle = [k for k, nid in enumerate(view.node_ids) if flags[k] or _ERROR_ID.match(nid)]
    total = float(np.asarray(influence)[middle].sum()) if middle else 0.0
    total = total if total_influence is None else float(total_influence)
    if labels is not None:
        found = {(f.layer, f.feature): parse_label(labels.get((f.layer, f.feature))) for f in feats}
    else:
        found = feature_evidence(store, feats)
    evidence = [found.get((f.layer, f.feature), Evidence()) for f in feats] if found else []
    dirs = decoder_directions(transcoder, feats) if transcoder is not None and feats else None
    effect = None
    if answer is not None and answer in view.node_ids:
        effect = signed_influence(view.adjacency, view.node_ids.index(answer))[rows]
    return FeatureSet(
        view,
        rows,
        feats,
        np.asarray(influence, dtype=np.float64)[rows],
        total,
        n_layers,
        evidence,
        dirs,
        effect,
    )


def graph_feature_set(
    graph, pruned, *, transcoder: TranscoderLike | None = None, store=None, answer_logit: int = 0
) -> FeatureSet:
    """A FeatureSet of an attribution `Graph` and its `PruneResult` (influence from prune).

    Share denominator: every feature and error node of the unpruned graph, so the shares of
    the groups, of the features left out and of the errors add up to at most 1.
    `answer_logit`: which logit node (0..n_logits-1) the effect signs refer to.
    """
    view = graph_view(graph, pruned)
    keep = pruned.node_mask.nonzero().squeeze(1).cpu().numpy()
    infl = pruned.node_influence.detach().cpu().double().numpy()
    total = float(infl[: graph.token_offset].sum())
    token = int(graph.logit_tokens[answer_logit])
    answer = f"{graph.n_layers + 1}_{token}_{graph.n_pos - 1}"  # export.node_id's logit id
    return feature_set(
        view,
        infl[keep],
        graph.n_layers,
        transcoder=transcoder,
        store=store,
        total_influence=total,
        answer=answer,
    )


def json_influence(data: Mapping[str, Any], view: GraphView) -> np.ndarray:
    """Logit influence of each node of a graph JSON document, computed on its own links
    (prune's definition, the logit nodes weighted by their `token_prob`, or equally when no
    node has one)."""
    import torch

    from cltrace.attribution.prune import influence, normalize_rows

    probs = {
        str(n["node_id"]): float(n.get("token_prob") or 0.0)
        for n in data.get("nodes", [])
        if n.get("feature_type") == "logit"
    }
    if probs and not any(probs.values()):
        probs = dict.fromkeys(probs, 1.0 / len(probs))
    w = torch.tensor([probs.get(i, 0.0) for i in view.node_ids], dtype=torch.float64)
    A = torch.as_tensor(view.adjacency, dtype=torch.float64)
    return influence(normalize_rows(A), w).numpy()


def suggest_supernodes(
    graph: Any,
    *,
    pruned: Any = None,
    transcoder: TranscoderLike | None = None,
    store=None,
    cfg: GroupConfig | None = None,
) -> list[dict]:
    """Suggested supernodes: [{"name", "node_ids"}], as the supernode sidecar holds them.

    Args:
        graph: a graph JSON document (the viewer's; labels from its nodes' `clerp`s unless a
            store is given), or an attribution `Graph` with its `PruneResult` as `pruned`.
        transcoder: adds decoder-direction similarity.
        store: a FeatureStore whose labels give the evidence and the names.
    """
    if isinstance(graph, Mapping):
        fs, tokens = _json_feature_set(graph, transcoder, store)
    else:
        if pruned is None:
            raise CltraceError("suggest_supernodes on a Graph needs its PruneResult (pruned=...)")
        fs, tokens = graph_feature_set(graph, pruned, transcoder=transcoder, store=store), graph.token_strings
    return [{"name": g.name, "node_ids": g.node_ids} for g in group_features(fs, cfg, tokens).groups]


def _json_feature_set(
    data: Mapping[str, Any], transcoder: TranscoderLike | None, store
) -> tuple[FeatureSet, list[str] | None]:
    view = graph_view(dict(data))
    logits = [n for n in data.get("nodes", []) if n.get("feature_type") == "logit"]
    heads = [str(n.get("node_id", "")).split("_")[0] for n in logits]  # "{n_layers+1}_{token}_{pos}"
    layers = [int(h) - 1 for h in heads if h.isdigit()] or [f.layer + 1 for f in view.feature_rows()[1]]
    n_layers = max(layers, default=1)
    labels = None
    if store is None:
        labels = {
            (f.layer, f.feature): str(n.get("clerp") or "")
            for n in data.get("nodes", [])
            if (f := parse_feature_id(n.get("node_id", "")))
        }
    target = max(
        logits, key=lambda n: (bool(n.get("is_target_logit")), float(n.get("token_prob") or 0)), default=None
    )
    fs = feature_set(
        view,
        json_influence(data, view),
        n_layers,
        transcoder=transcoder,
        store=store,
        labels=labels,
        answer=None if target is None else str(target["node_id"]),
    )
    return fs, data.get("metadata", {}).get("prompt_tokens")


def layer_label(layers: tuple[int, int]) -> str:
    """(2, 6) -> "L2-6"; (3, 3) -> "L3"."""
    return f"L{layers[0]}" if layers[0] == layers[1] else f"L{layers[0]}-{layers[1]}"
