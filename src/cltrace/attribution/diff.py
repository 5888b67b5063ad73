"""Graph diff: what changes between the attribution graphs of two prompts (Tokyo vs Paris).

Alignment. Positions are aligned by the tokens the prompts share (difflib's longest matching
blocks over token ids: a common prefix and suffix, and any other shared run); the prompts may
differ in length. Each aligned position is a *slot*: ``shared`` (the same token at
a_pos in A and b_pos in B) or ``changed`` (one maximal run of differing tokens, one slot for
the whole run on each side; its features are compared as a bag over the run).

Nodes. A feature is keyed by (layer, feature, slot); error nodes by (layer, slot). Each
graph's pruned node set and its nodes' influence on the logits (share of the graph's total,
`prune.PruneResult.node_influence` normalised to sum to 1) are compared:

- appeared: kept in B's pruned graph, absent from A's;
- vanished: kept in A's, absent from B's;
- changed: kept in both, with |influence_B - influence_A| >= `min_change` (share of total
  influence) or an activation that moved by at least `min_relative` of the larger one.

Paths. For each graph the strongest paths to its answer (top logit) through nodes that
appeared (B) or vanished (A) are listed: the path from a token embedding through the node to
the answer maximising the product of the row-normalised |edge weights| of the pruned graph.

Supernodes. When `<slug>.circuit.json` files (cltrace.circuits) lie beside both graphs,
supernodes are matched by the overlap of their member features ((layer, feature, slot)
keys, Jaccard >= 0.3) and reported the same way by influence share.

The JSON written by `GraphDiff.to_dict` is documented in docs/DIFF_FORMAT.md.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cltrace.attribution.export import node_id
from cltrace.attribution.graph import Graph
from cltrace.attribution.prune import PruneResult, normalize_rows, prune
from cltrace.errors import CltraceError

FORMAT_VERSION = 1


# --------------------------------------------------------------------------- alignment


@dataclass
class Slot:
    """One aligned position (shared) or one run of differing tokens (changed)."""

    index: int
    status: str  # "shared" or "changed"
    a: list[int]  # positions in A (empty: inserted in B)
    b: list[int]  # positions in B

    def to_dict(self, tokens_a: list[str], tokens_b: list[str]) -> dict[str, Any]:
        return {
            "slot": self.index,
            "status": self.status,
            "a": self.a,
            "b": self.b,
            "tokens_a": [tokens_a[p] for p in self.a],
            "tokens_b": [tokens_b[p] for p in self.b],
        }


def align_positions(tokens_a: list[int], tokens_b: list[int]) -> list[Slot]:
    """Slots covering every position of both prompts, in order (module docstring)."""
    matcher = difflib.SequenceMatcher(a=tokens_a, b=tokens_b, autojunk=False)
    slots: list[Slot] = []
    for op, a0, a1, b0, b1 in matcher.get_opcodes():
        if op == "equal":
            slots += [Slot(len(slots) + i, "shared", [a0 + i], [b0 + i]) for i in range(a1 - a0)]
        else:
            slots.append(Slot(len(slots), "changed", list(range(a0, a1)), list(range(b0, b1))))
    return slots


def slot_maps(slots: list[Slot]) -> tuple[dict[int, int], dict[int, int]]:
    """position -> slot index, for A and for B."""
    in_a = {p: s.index for s in slots for p in s.a}
    in_b = {p: s.index for s in slots for p in s.b}
    return in_a, in_b


# --------------------------------------------------------------------------- per-graph view


@dataclass
class NodeInfo:
    """A kept node of one graph, keyed for alignment."""

    key: tuple  # ("feature", layer, feature, slot) / ("error", layer, slot) / ...
    node_ids: list[str] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    influence: float = 0.0  # share of the graph's total influence on the logits
    activation: float = 0.0  # summed over the slot's positions (features)


@dataclass
class GraphView:
    """What the diff reads from one graph."""

    graph: Graph
    pruned: PruneResult
    nodes: dict[tuple, NodeInfo]
    answer: str
    answer_prob: float
    source: str


def graph_view(
    graph: Graph, pruned: PruneResult, slot_of: dict[int, int], answer: str, source: str
) -> GraphView:
    """The kept feature and error nodes of a graph, keyed by (kind, layer, feature, slot)."""
    table = graph.nodes()
    infl = pruned.node_influence.float()
    share = infl / infl.sum().clamp_min(1e-30)
    nodes: dict[tuple, NodeInfo] = {}
    for i in pruned.node_mask.nonzero().squeeze(1).tolist():
        kind = table.type[i]
        if kind not in ("feature", "error"):
            continue
        layer, pos, feat = int(table.layer[i]), int(table.pos[i]), int(table.feature[i])
        key = (kind, layer, feat if kind == "feature" else -1, slot_of[pos])
        info = nodes.setdefault(key, NodeInfo(key))
        info.node_ids.append(node_id(graph, kind, layer, pos, feat, int(table.token_id[i])))
        info.positions.append(pos)
        info.influence += float(share[i])
        if kind == "feature":
            info.activation += float(table.activation[i])
    return GraphView(graph, pruned, nodes, answer, float(graph.logit_probabilities[0]), source)


# --------------------------------------------------------------------------- diff


@dataclass
class NodeChange:
    key: tuple
    status: str  # appeared / vanished / changed
    a: NodeInfo | None
    b: NodeInfo | None

    @property
    def delta(self) -> float:
        return (self.b.influence if self.b else 0.0) - (self.a.influence if self.a else 0.0)

    def to_dict(self) -> dict[str, Any]:
        kind, layer, feature, slot = self.key

        def side(n: NodeInfo | None) -> dict[str, Any] | None:
            if n is None:
                return None
            act = n.activation if kind == "feature" else None
            return {
                "node_ids": n.node_ids,
                "positions": n.positions,
                "influence": n.influence,
                "activation": act,
            }

        return {
            "kind": kind,
            "layer": layer,
            "feature": feature if kind == "feature" else None,
            "slot": slot,
            "status": self.status,
            "delta_influence": self.delta,
            "a": side(self.a),
            "b": side(self.b),
        }


def compare_nodes(
    a: dict[tuple, NodeInfo], b: dict[tuple, NodeInfo], min_change: float, min_relative: float
) -> list[NodeChange]:
    """Appeared, vanished and changed nodes, by |Δ influence| (largest first)."""
    out = [NodeChange(k, "vanished", a[k], None) for k in a.keys() - b.keys()]
    out += [NodeChange(k, "appeared", None, b[k]) for k in b.keys() - a.keys()]
    for k in a.keys() & b.keys():
        na, nb = a[k], b[k]
        big = max(abs(na.activation), abs(nb.activation))
        moved_act = big > 0 and abs(nb.activation - na.activation) >= min_relative * big
        if abs(nb.influence - na.influence) >= min_change or moved_act:
            out.append(NodeChange(k, "changed", na, nb))
    out.sort(key=lambda c: -abs(c.delta))
    return out


def best_paths(view: GraphView, through: list[int], top: int = 5) -> list[dict[str, Any]]:
    """For each graph node index in `through`, the strongest embedding -> node -> answer path
    of the pruned graph (product of row-normalised |weights|); the `top` strongest."""
    g, pr = view.graph, view.pruned
    A = normalize_rows(g.adjacency.float() * pr.edge_mask)  # [target, source]
    N, answer = g.n_nodes, g.logit_offset
    down = torch.zeros(N)  # best product from a node down to the answer
    down[answer] = 1.0
    nxt = torch.full((N,), -1, dtype=torch.long)
    up = torch.zeros(N)  # best product from an embedding up to a node
    up[g.token_offset : g.logit_offset] = 1.0
    prev = torch.full((N,), -1, dtype=torch.long)
    for _ in range(g.n_layers + 2):  # a DAG of depth <= L + 2
        cand, arg = (A * down[:, None]).max(0)  # over targets
        better = cand > down
        down, nxt = torch.where(better, cand, down), torch.where(better, arg, nxt)
        cand, arg = (A * up[None, :]).max(1)  # over sources
        better = cand > up
        up, prev = torch.where(better, cand, up), torch.where(better, arg, prev)
    ids = _ids(g)
    paths = []
    for i in through:
        if down[i] <= 0 or up[i] <= 0:
            continue
        chain = [i]
        while prev[chain[0]] >= 0:
            chain.insert(0, int(prev[chain[0]]))
        while nxt[chain[-1]] >= 0 and chain[-1] != answer:
            chain.append(int(nxt[chain[-1]]))
        paths.append(
            {"strength": float(up[i] * down[i]), "through": ids[i], "nodes": [ids[j] for j in chain]}
        )
    paths.sort(key=lambda p: -p["strength"])
    return paths[:top]


def _ids(graph: Graph) -> list[str]:
    t = graph.nodes()
    return [
        node_id(graph, t.type[i], int(t.layer[i]), int(t.pos[i]), int(t.feature[i]), int(t.token_id[i]))
        for i in range(graph.n_nodes)
    ]


@dataclass
class GraphDiff:
    """The result of `diff_graphs` (JSON: docs/DIFF_FORMAT.md)."""

    a: GraphView
    b: GraphView
    slots: list[Slot]
    changes: list[NodeChange]
    paths: dict[str, list[dict[str, Any]]]
    supernodes: list[dict[str, Any]] | None = None

    def by_status(self, status: str, kind: str = "feature") -> list[NodeChange]:
        return [c for c in self.changes if c.status == status and c.key[0] == kind]

    @property
    def is_empty(self) -> bool:
        return not self.changes and self.a.answer == self.b.answer and not self.supernodes

    def summary(self, top: int = 5) -> list[str]:
        """A few readable lines: the answers, then the largest feature changes."""
        lines = [
            f"answer: {self.a.answer!r} (p={self.a.answer_prob:.2f}) -> "
            f"{self.b.answer!r} (p={self.b.answer_prob:.2f})"
        ]
        for status in ("appeared", "vanished", "changed"):
            items = self.by_status(status)
            lines.append(f"{len(items)} features {status}")
            for c in items[:top]:
                info = c.b if c.b is not None else c.a
                nid = info.node_ids[0] if info is not None else "?"
                lines.append(f"  {nid}: influence share {100 * c.delta:+.3f}%")
        for side in ("a", "b"):
            for p in self.paths.get(side, [])[:2]:
                lines.append(f"path in {side.upper()}: " + " -> ".join(p["nodes"]))
        return lines

    def to_dict(self) -> dict[str, Any]:
        def side(v: GraphView) -> dict[str, Any]:
            return {
                "source": v.source,
                "prompt": v.graph.prompt,
                "tokens": v.graph.token_strings,
                "answer": v.answer,
                "answer_prob": v.answer_prob,
                "model": v.graph.model_name,
                "transcoder": v.graph.transcoder_id,
                "n_kept_features": sum(1 for k in v.nodes if k[0] == "feature"),
            }

        ta, tb = self.a.graph.token_strings, self.b.graph.token_strings
        counts = {s: len(self.by_status(s)) for s in ("appeared", "vanished", "changed")}
        return {
            "version": FORMAT_VERSION,
            "kind": "cltrace-graph-diff",
            "a": side(self.a),
            "b": side(self.b),
            "answer_changed": self.a.answer != self.b.answer,
            "alignment": [s.to_dict(ta, tb) for s in self.slots],
            "counts": counts,
            "nodes": [c.to_dict() for c in self.changes],
            "paths": self.paths,
            "supernodes": self.supernodes,
            "summary": self.summary(),
        }


def check_comparable(a: Graph, b: Graph) -> None:
    """Graphs traced with different models or transcoders cannot be compared feature by feature."""
    if a.model_name != b.model_name:
        raise CltraceError(
            f"the graphs were traced on different models ({a.model_name!r} vs {b.model_name!r})",
            "trace both prompts with the same model and transcoder",
        )
    if a.transcoder_id != b.transcoder_id:
        raise CltraceError(
            f"the graphs were traced with different transcoders ({a.transcoder_id!r} vs "
            f"{b.transcoder_id!r}): their feature numbers mean different things",
            "trace both prompts with the same transcoder",
        )


def diff_graphs(
    a: Graph,
    b: Graph,
    answers: tuple[str, str],
    *,
    pruned: tuple[PruneResult, PruneResult] | None = None,
    sources: tuple[str, str] = ("A", "B"),
    circuits: tuple[Any, Any] | None = None,
    min_change: float = 0.01,
    min_relative: float = 0.5,
) -> GraphDiff:
    """Diff two graphs of the same model and transcoder (module docstring).

    Args:
        a, b: the graphs.
        answers: each graph's answer (top logit) as text.
        pruned: their prune results (default: `prune` with its defaults).
        sources: where each came from (file or prompt), for the report.
        circuits: optional `Circuit` objects of both graphs (supernode-level diff).
        min_change: smallest |Δ influence share| reported as a change.
        min_relative: smallest relative activation change reported as a change.
    """
    check_comparable(a, b)
    pa, pb = pruned or (prune(a), prune(b))
    slots = align_positions(a.input_tokens.tolist(), b.input_tokens.tolist())
    in_a, in_b = slot_maps(slots)
    va = graph_view(a, pa, in_a, answers[0], sources[0])
    vb = graph_view(b, pb, in_b, answers[1], sources[1])
    changes = compare_nodes(va.nodes, vb.nodes, min_change, min_relative)
    index_a, index_b = {x: i for i, x in enumerate(_ids(a))}, {x: i for i, x in enumerate(_ids(b))}
    through_a = [index_a[n] for c in changes if c.a and c.status != "appeared" for n in c.a.node_ids]
    through_b = [index_b[n] for c in changes if c.b and c.status != "vanished" for n in c.b.node_ids]
    paths = {"a": best_paths(va, through_a), "b": best_paths(vb, through_b)}
    result = GraphDiff(va, vb, slots, changes, paths)
    if circuits is not None:
        result.supernodes = diff_supernodes(circuits[0], circuits[1], in_a, in_b, min_change)
    return result


# --------------------------------------------------------------------------- supernodes


def _member_keys(circuit, slot_of: dict[int, int]) -> dict[str, set[tuple]]:
    keys: dict[str, set[tuple]] = {}
    for sn in circuit.nodes:
        if sn.kind != "features":
            continue
        members = set()
        for nid in sn.node_ids:
            layer, feature, pos = (int(x) for x in nid.split("_"))
            members.add((layer, feature, slot_of.get(pos, -1)))
        keys[sn.id] = members
    return keys


def diff_supernodes(
    ca, cb, in_a: dict[int, int], in_b: dict[int, int], min_change: float
) -> list[dict[str, Any]]:
    """Supernodes matched by member overlap (Jaccard >= 0.3): appeared, vanished, changed."""
    ka, kb = _member_keys(ca, in_a), _member_keys(cb, in_b)
    by_a, by_b = {n.id: n for n in ca.nodes}, {n.id: n for n in cb.nodes}
    pairs = sorted(
        ((len(x & y) / len(x | y), ia, ib) for ia, x in ka.items() for ib, y in kb.items() if x | y),
        reverse=True,
    )
    used_a: set[str] = set()
    used_b: set[str] = set()
    out = []
    for jac, ia, ib in pairs:
        if jac < 0.3 or ia in used_a or ib in used_b:
            continue
        used_a.add(ia)
        used_b.add(ib)
        delta = by_b[ib].influence_share - by_a[ia].influence_share
        if abs(delta) >= min_change:
            out.append(_sn(by_a[ia], by_b[ib], "changed", delta, jac))
    out += [_sn(by_a[i], None, "vanished", -by_a[i].influence_share, 0.0) for i in ka if i not in used_a]
    out += [_sn(None, by_b[i], "appeared", by_b[i].influence_share, 0.0) for i in kb if i not in used_b]
    out.sort(key=lambda d: -abs(d["delta_influence"]))
    return out


def _sn(a, b, status: str, delta: float, overlap: float) -> dict[str, Any]:
    side = lambda n: None if n is None else {"id": n.id, "name": n.name, "influence_share": n.influence_share}  # noqa: E731
    return {"status": status, "delta_influence": delta, "overlap": overlap, "a": side(a), "b": side(b)}


# --------------------------------------------------------------------------- files


def graph_files(path: str | Path) -> tuple[Path, Path | None]:
    """(full graph .graph.safetensors, pruned .json or None) for either file of a traced graph."""
    p = Path(path).expanduser()
    name = p.name
    if name.endswith(".graph.safetensors"):
        stem = name[: -len(".graph.safetensors")]
        full, pruned_json = p, p.with_name(stem + ".json")
    elif name.endswith(".json"):
        stem = name[: -len(".json")]
        full, pruned_json = p.with_name(stem + ".graph.safetensors"), p
    else:
        raise CltraceError(f"{p} is neither a graph JSON nor a .graph.safetensors file")
    if not full.is_file():
        raise CltraceError(
            f"no full graph beside {p} (looked for {full.name})",
            "the diff needs the .graph.safetensors file `cltrace trace` writes next to the JSON",
        )
    return full, pruned_json if pruned_json.is_file() else None


def load_circuit(pruned_json: Path | None):
    """The circuit beside a graph JSON, or None (or when cltrace.circuits is absent)."""
    if pruned_json is None:
        return None
    try:
        from cltrace.circuits.circuit import Circuit, circuit_path
    except ImportError:
        return None
    path = circuit_path(pruned_json)
    return Circuit.load(path) if path.is_file() else None
