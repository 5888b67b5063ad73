"""QK attributions for a traced graph's attention edges, attached to its JSON nodes.

An attention edge of a pruned graph is a link whose source sits at an earlier position k than
its target at q: the source's write reached the target through attention heads. For each such
(target, k), ranked by the summed |weight| of its links, the heads that carry the most of the
target's input from k (`QKTracer.head_flows`, limited to layers after the source's layer and
up to the target's) are explained with `QKTracer.explain`.

In the graph JSON each target node gets Neuronpedia's optional field ``qk_tracing_results``
(its keys ``pair_wise_contributors`` [[q_node_id, k_node_id, value], ...],
``top_q_marginal_contributors`` and ``top_k_marginal_contributors`` [[node_id, value], ...])
for its strongest attention edge, plus cltrace's ``heads``: every explained (layer, head,
q, k) of that node with its score, pattern weight and summary (`QKResult.to_dict`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cltrace.attribution.export import node_id
from cltrace.attribution.qk import QKResult, QKTracer
from cltrace.errors import CltraceError
from cltrace.transcoders.interface import TranscoderLike

#: JSON Schema of the `qk_tracing_results` object (Neuronpedia's fields; cltrace's are extra)
QK_TRACING_SCHEMA: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "required": ["pair_wise_contributors", "top_q_marginal_contributors", "top_k_marginal_contributors"],
    "properties": {
        "pair_wise_contributors": {
            "type": "array",
            "items": {
                "type": "array",
                "minItems": 3,
                "maxItems": 3,
                "items": [{"type": "string"}, {"type": "string"}, {"type": "number"}],
            },
        },
        "top_q_marginal_contributors": {"$ref": "#/definitions/marginals"},
        "top_k_marginal_contributors": {"$ref": "#/definitions/marginals"},
        "heads": {"type": "array", "items": {"type": "object"}},
    },
    "definitions": {
        "marginals": {
            "type": "array",
            "items": {
                "type": "array",
                "minItems": 2,
                "maxItems": 2,
                "items": [{"type": "string"}, {"type": "number"}],
            },
        }
    },
}


@dataclass
class AttentionEdge:
    """A target node reached from key position `k_pos` through attention."""

    target: int  # node index in the graph
    k_pos: int
    weight: float  # Σ |link weight| from sources at k_pos
    min_source_layer: int  # the earliest source layer among those links (embeddings: -1)


@dataclass
class QKAttachment:
    """QK results per JSON node id, and what they cost."""

    results: dict[str, list[QKResult]] = field(default_factory=dict)
    seconds: float = 0.0
    n_heads_explained: int = 0

    def node_field(self, nid: str) -> dict[str, Any]:
        """The node's `qk_tracing_results`: its first (strongest) result, all under `heads`."""
        items = self.results[nid]
        out = items[0].to_dict()
        out["heads"] = [r.to_dict() for r in items]
        return out


def attention_edges(graph, pruned, max_edges: int | None = None) -> list[AttentionEdge]:
    """Cross-position links of the pruned graph, grouped by (target, key position), strongest first."""
    table = graph.nodes()
    tgt, src = pruned.edge_mask.nonzero(as_tuple=True)
    groups: dict[tuple[int, int], list[float]] = {}
    for t, s in zip(tgt.tolist(), src.tolist()):
        kind = table.type[t]
        q, k = int(table.pos[t]), int(table.pos[s])
        if kind not in ("feature", "logit") or k >= q:
            continue
        layer_s = int(table.layer[s])
        entry = groups.setdefault((t, k), [0.0, layer_s])
        entry[0] += abs(float(graph.adjacency[t, s]))
        entry[1] = min(entry[1], layer_s)
    edges = [AttentionEdge(t, k, w, int(ls)) for (t, k), (w, ls) in groups.items()]
    edges.sort(key=lambda e: -e.weight)
    return edges if max_edges is None else edges[:max_edges]


def target_direction(graph, transcoder: TranscoderLike, lm, index: int):
    """(layer or None for a logit, position, direction read by the target node `index`)."""
    table = graph.nodes()
    kind, pos = table.type[index], int(table.pos[index])
    if kind == "feature":
        layer, feature = int(table.layer[index]), int(table.feature[index])
        return layer, pos, transcoder.encoder_weight(layer).detach()[:, feature].float()
    if kind == "logit":
        W = lm.adapter.unembed(lm.model).weight.detach().float()
        return None, pos, W[int(table.token_id[index])] - W.mean(0)
    raise CltraceError(
        f"node {index} is a {kind} node: only features and logits are reached through attention"
    )


def json_id(graph, index: int) -> str:
    t = graph.nodes()
    return node_id(
        graph,
        t.type[index],
        int(t.layer[index]),
        int(t.pos[index]),
        int(t.feature[index]),
        int(t.token_id[index]),
    )


def node_index(graph, nid: str) -> int:
    """The graph index of a JSON node id (features and logits)."""
    for i in range(graph.n_nodes):
        if json_id(graph, i) == nid:
            return i
    raise CltraceError(
        f"no node {nid!r} in this graph",
        "give a feature id as {layer}_{feature}_{pos} or a logit id as {n_layers+1}_{token}_{pos}",
    )


def best_heads(
    flows: torch.Tensor, k_pos: int, min_layer: int, max_layer: int, n: int
) -> list[tuple[int, int]]:
    """The `n` (layer, head) with the largest |flow| at key k_pos, layers min_layer..max_layer."""
    col = flows[:, :, k_pos].abs().clone()  # [L, H]
    col[: max(min_layer, 0)] = 0
    col[max_layer + 1 :] = 0
    order = torch.argsort(col.flatten(), descending=True)[:n]
    H = flows.shape[1]
    return [(int(i) // H, int(i) % H) for i in order if float(col.flatten()[i]) > 0]


def qk_for_graph(
    lm,
    transcoder: TranscoderLike,
    graph,
    pruned=None,
    *,
    node_ids: Sequence[str] | None = None,
    max_edges: int = 8,
    heads_per_edge: int = 1,
    top: int = 10,
    tracer: QKTracer | None = None,
) -> QKAttachment:
    """Explain the heads of the graph's strongest attention edges (or of chosen nodes).

    Args:
        lm, transcoder: those the graph was traced with.
        graph, pruned: the graph and its `prune` result (needed without `node_ids`).
        node_ids: explain these nodes instead: their `heads_per_edge` strongest (layer, head,
            key) over every earlier key position (by head flow).
        max_edges: attention edges explained (strongest first): the graph's (target, key)
            link groups are visited in order until max_edges x heads_per_edge distinct
            (layer, head, q, k) are explained (targets sharing one get the same result).
        heads_per_edge: heads explained per edge.
        top: pairs and marginals listed per head.
    """
    start = time.perf_counter()
    tracer = tracer or QKTracer(lm, transcoder, graph.input_tokens, zero_bos=graph.config.zero_bos)
    out = QKAttachment()
    flows_cache: dict[int, torch.Tensor] = {}

    def flows_of(index: int):
        layer, pos, direction = target_direction(graph, transcoder, lm, index)
        if index not in flows_cache:
            flows_cache[index] = tracer.head_flows(layer, pos, direction.to(lm.device))
        return layer, pos, flows_cache[index]

    jobs: list[tuple[int, int, int, int]] = []  # (node index, layer, head, k)
    if node_ids:
        for nid in node_ids:
            index = node_index(graph, nid)
            layer, q, flows = flows_of(index)
            flows = flows.clone()
            flows[:, :, q:] = 0  # attention edges: earlier keys only
            order = torch.argsort(flows.abs().flatten(), descending=True)[:heads_per_edge]
            L, H, n = flows.shape
            jobs += [(index, int(i) // (H * n), int(i) // n % H, int(i) % n) for i in order]
    else:
        if pruned is None:
            raise CltraceError("qk_for_graph needs the pruned graph (or node_ids)")
        wanted = max_edges * heads_per_edge
        distinct: set[tuple[int, int, int, int]] = set()
        for edge in attention_edges(graph, pruned, 4 * max_edges):  # until `wanted` distinct heads
            if len(distinct) >= wanted:
                break
            layer, q, flows = flows_of(edge.target)
            last = graph.n_layers - 1 if layer is None else layer
            for lh in best_heads(flows, edge.k_pos, edge.min_source_layer + 1, last, heads_per_edge):
                jobs.append((edge.target, lh[0], lh[1], edge.k_pos))
                distinct.add((lh[0], lh[1], q, edge.k_pos))
    table = graph.nodes()
    done: dict[tuple[int, int, int, int], QKResult] = {}
    for index, layer, head, k in jobs:
        key = (layer, head, int(table.pos[index]), k)
        if key not in done:
            done[key] = tracer.explain(layer, head, key[2], k, top=top)
        out.results.setdefault(json_id(graph, index), []).append(done[key])
    out.n_heads_explained = len(done)
    out.seconds = time.perf_counter() - start
    return out


def attach(document: Mapping[str, Any], attachment: QKAttachment) -> int:
    """Set `qk_tracing_results` on the document's nodes that have results; returns how many."""
    count = 0
    for node in document["nodes"]:
        if node["node_id"] in attachment.results:
            node["qk_tracing_results"] = attachment.node_field(node["node_id"])
            count += 1
    return count


def validate_qk(document: Mapping[str, Any]) -> None:
    """Raise ValueError unless every node's `qk_tracing_results` fits `QK_TRACING_SCHEMA`."""
    import jsonschema

    for node in document["nodes"]:
        if "qk_tracing_results" in node:
            try:
                jsonschema.validate(node["qk_tracing_results"], QK_TRACING_SCHEMA)
            except jsonschema.ValidationError as err:
                raise ValueError(f"node {node['node_id']}: qk_tracing_results: {err.message}") from None


def attach_to_trace(
    lm,
    transcoder: TranscoderLike,
    trace,
    *,
    node_ids: Sequence[str] | None = None,
    max_edges: int = 8,
    heads_per_edge: int = 1,
) -> QKAttachment:
    """`cltrace trace --qk`: explain the traced graph's attention edges and rewrite its JSON."""
    import json

    from cltrace.attribution.export import write_json

    attachment = qk_for_graph(
        lm,
        transcoder,
        trace.graph,
        trace.pruned,
        node_ids=node_ids,
        max_edges=max_edges,
        heads_per_edge=heads_per_edge,
    )
    path = Path(trace.json_path)
    document = json.loads(path.read_text())
    missing = [nid for nid in attachment.results if nid not in {n["node_id"] for n in document["nodes"]}]
    attach(document, attachment)
    document.setdefault("metadata", {}).setdefault("cltrace", {})["qk"] = {
        "seconds": attachment.seconds,
        "n_heads_explained": attachment.n_heads_explained,
        "nodes_not_in_pruned_graph": {nid: attachment.node_field(nid) for nid in missing},
    }
    write_json(document, path)
    return attachment


def report_qk(
    lm, transcoder: TranscoderLike, trace, *, node_ids: Sequence[str] | None = None, max_edges: int = 8
) -> QKAttachment:
    """`cltrace trace --qk / --qk-node`: attach, then print one line per explained head."""
    attachment = attach_to_trace(
        lm, transcoder, trace, node_ids=node_ids, max_edges=max_edges, heads_per_edge=3 if node_ids else 1
    )
    print(
        f"QK attribution: {attachment.n_heads_explained} heads on "
        f"{len(attachment.results)} nodes in {attachment.seconds:.1f} s "
        f"(the graph took {trace.seconds:.1f} s)"
    )
    shared: dict[int, tuple[QKResult, list[str]]] = {}
    for nid, results in attachment.results.items():
        for r in results:
            shared.setdefault(id(r), (r, []))[1].append(nid)
    for r, nids in shared.values():
        print(f"  {', '.join(nids)}: {r.summary}")
    return attachment
