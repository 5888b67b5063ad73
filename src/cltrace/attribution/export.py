"""Pruned graphs as JSON for Neuronpedia and circuit-tracer's frontend (the cltrace viewer too).

Node ids (unique by construction, one scheme per node type):

    feature    {layer}_{feature}_{pos}          e.g. 3_1207_5   (Neuronpedia's)
    error      err_{layer}_{pos}                e.g. err_3_5    (circuit-tracer writes
                                                 0_{layer}_{pos}, which can equal a layer-0
                                                 feature's id; cltrace does not)
    embedding  E_{token_id}_{pos}               e.g. E_2329_7   (Neuronpedia's)
    logit      {n_layers + 1}_{token_id}_{pos}  e.g. 19_6037_13 (Neuronpedia's)

`NEURONPEDIA_GRAPH_SCHEMA` restates the structure, types and required fields of the
"Anthropic Attribution Graph" JSON Schema (draft-07, version 1.0.0) that Neuronpedia
publishes for its graph upload (github.com/hijohnnylin/neuronpedia, MIT licence); it is
written here from that structure, with short descriptions of our own.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cltrace.attribution.graph import Graph
from cltrace.attribution.prune import GraphScores, PruneResult
from cltrace.io import atomic_write_json

FEATURE_TYPES = {
    "feature": "cross layer transcoder",
    "error": "mlp reconstruction error",
    "embedding": "embedding",
    "logit": "logit",
}

_STR = {"type": "string"}
_NUM = {"type": "number"}
_INT = {"type": "integer"}

#: Structure of Neuronpedia's attribution-graph schema (see the module docstring).
NEURONPEDIA_GRAPH_SCHEMA: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "Anthropic Attribution Graph",
    "version": "1.0.0",
    "description": "Attribution graph for Neuronpedia / circuit-tracer's frontend "
    "(structure after Neuronpedia's published schema, MIT licence).",
    "type": "object",
    "required": ["metadata", "qParams", "nodes", "links"],
    "properties": {
        "metadata": {
            "type": "object",
            "required": ["slug", "scan", "prompt_tokens", "prompt"],
            "properties": {
                "slug": _STR,
                "scan": _STR,
                "prompt_tokens": {"type": "array", "items": _STR},
                "prompt": _STR,
                "feature_details": {
                    "type": "object",
                    "properties": {
                        "feature_json_base_url": _STR,
                        "neuronpedia_source_set": _STR,
                        "neuronpedia_lorsa_source_set": _STR,
                    },
                },
                "node_threshold": _NUM,
                "info": {
                    "type": "object",
                    "properties": {
                        "description": _STR,
                        "creator_name": _STR,
                        "creator_url": _STR,
                        "source_urls": {"type": "array"},
                        "generator": {
                            "type": "object",
                            "properties": {"name": _STR, "version": _STR, "url": _STR, "email": _STR},
                        },
                        "create_time_ms": _NUM,
                    },
                },
                "generation_settings": {
                    "type": "object",
                    "properties": {
                        "max_n_logits": _INT,
                        "desired_logit_prob": _NUM,
                        "batch_size": _INT,
                        "max_feature_nodes": _INT,
                    },
                },
                "pruning_settings": {
                    "type": "object",
                    "properties": {"node_threshold": _NUM, "edge_threshold": _NUM},
                },
            },
        },
        "qParams": {
            "type": "object",
            "required": [],
            "properties": {
                "pinnedIds": {"type": "array", "items": _STR},
                "supernodes": {"type": "array"},
                "linkType": _STR,
                "clickedId": _STR,
                "sg_pos": _STR,
            },
        },
        "nodes": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "clerp"],
                "properties": {
                    "node_id": _STR,
                    "feature": {"type": ["integer", "null"]},
                    "layer": {"type": ["string", "integer"]},
                    "ctx_idx": _INT,
                    "feature_type": _STR,
                    "jsNodeId": _STR,
                    "clerp": _STR,
                    "influence": {"type": ["number", "null"]},
                    "activation": {"type": ["number", "null"]},
                },
            },
        },
        "links": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["source", "target", "weight"],
                "properties": {"source": _STR, "target": _STR, "weight": _NUM},
            },
        },
    },
}


def display_token(text: str) -> str:
    """A token as the frontend shows it: newlines and tabs made visible."""
    return text.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵")


def node_id(graph: Graph, kind: str, layer: int, pos: int, feature: int, token: int) -> str:
    """The JSON id of a node (module docstring)."""
    if kind == "feature":
        return f"{layer}_{feature}_{pos}"
    if kind == "error":
        return f"err_{layer}_{pos}"
    if kind == "embedding":
        return f"E_{token}_{pos}"
    return f"{graph.n_layers + 1}_{token}_{pos}"


def _node_json(
    graph: Graph, i: int, table, shares, logit_strings: dict[int, str], clerps: Mapping[str, str]
) -> dict[str, Any]:
    kind = table.type[i]
    layer, pos = int(table.layer[i]), int(table.pos[i])
    feature, token = int(table.feature[i]), int(table.token_id[i])
    nid = node_id(graph, kind, layer, pos, feature, token)
    node = {
        "node_id": nid,
        "feature": feature,
        "layer": str(layer),
        "ctx_idx": pos,
        "feature_type": FEATURE_TYPES[kind],
        "jsNodeId": f"{layer}_{feature}-0",
        "clerp": clerps.get(nid, ""),
        "influence": float(shares[i]),
        "activation": None,
        "token_prob": 0.0,
        "is_target_logit": False,
        "run_idx": 0,
        "reverse_ctx_idx": 0,
    }
    if kind == "feature":
        node["activation"] = float(table.activation[i])
    elif kind == "error":
        node.update(feature=None, jsNodeId=f"err_{layer}_{pos}-0")
    elif kind == "embedding":
        node.update(feature=pos, layer="E", jsNodeId=f"E_{token}-{pos}")
    else:
        k = i - graph.logit_offset
        prob = float(graph.logit_probabilities[k])
        node.update(
            feature=token,
            layer=str(graph.n_layers + 1),
            jsNodeId=f"L_{token}-{pos}",
            token_prob=prob,
            is_target_logit=k == 0,
            clerp=clerps.get(nid, f'Output "{logit_strings[token]}" (p={prob:.3f})'),
        )
    return node


def to_frontend_json(
    graph: Graph,
    pruned: PruneResult,
    *,
    slug: str,
    logit_strings: Mapping[int, str],
    scan: str | None = None,
    clerps: Mapping[str, str] | None = None,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    scores: Mapping[str, GraphScores] | None = None,
) -> dict[str, Any]:
    """The pruned graph as a Neuronpedia-schema document.

    Args:
        graph, pruned: the graph and its `prune` result.
        slug: short name of the graph (file name without .json).
        logit_strings: token id -> text, for the logit labels.
        scan: model id for Neuronpedia (default: graph.model_name).
        clerps: optional labels by node id.
        scores: optional named GraphScores (e.g. "pruned", "unpruned") stored in metadata.
    """
    from cltrace import __version__

    clerps = clerps or {}
    table = graph.nodes()
    src_t, src_s = pruned.edge_mask.nonzero(as_tuple=True)
    used = set(src_t.tolist()) | set(src_s.tolist())
    keep = [
        i
        for i in pruned.node_mask.nonzero().squeeze(1).tolist()
        if i in used or table.type[i] in ("embedding", "logit")
    ]
    nodes = [_node_json(graph, i, table, pruned.cumulative_scores, dict(logit_strings), clerps) for i in keep]
    ids = {i: n["node_id"] for i, n in zip(keep, nodes)}
    weights = graph.adjacency[src_t, src_s].tolist()
    links = [
        {"source": ids[s], "target": ids[t], "weight": w}
        for t, s, w in zip(src_t.tolist(), src_s.tolist(), weights)
        if s in ids and t in ids
    ]
    cfg = graph.config
    metadata = {
        "slug": slug,
        "scan": scan or graph.model_name,
        "prompt_tokens": [display_token(t) for t in graph.token_strings],
        "prompt": graph.prompt,
        "node_threshold": node_threshold,
        "info": {
            "description": f"cltrace attribution graph ({graph.transcoder_id or 'transcoder'})",
            "generator": {"name": "cltrace", "version": __version__},
            "create_time_ms": time.time() * 1000,
        },
        "generation_settings": {
            "max_n_logits": cfg.max_n_logits,
            "desired_logit_prob": cfg.desired_logit_prob,
            "batch_size": int(graph.stats.get("batch_size", cfg.batch_size or 0)),
            "max_feature_nodes": int(
                cfg.max_feature_nodes
                if cfg.max_feature_nodes is not None
                else graph.stats.get("n_active", graph.n_features)
            ),
        },
        "pruning_settings": {"node_threshold": node_threshold, "edge_threshold": edge_threshold},
        "transcoder_list": [],
        "cltrace": {
            "transcoder": graph.transcoder_id,
            "model": graph.model_name,
            "scores": {k: vars(v) for k, v in (scores or {}).items()},
        },
    }
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": qparams, "nodes": nodes, "links": links}


def validate(document: Mapping[str, Any], schema: Mapping[str, Any] | None = None) -> None:
    """Raise ValueError unless `document` fits the schema (needs the `jsonschema` package)."""
    import jsonschema

    try:
        jsonschema.validate(document, dict(schema or NEURONPEDIA_GRAPH_SCHEMA))
    except jsonschema.ValidationError as err:
        raise ValueError(f"graph JSON does not fit the schema: {err.message}") from None


def write_json(document: Mapping[str, Any], path: str | Path) -> Path:
    """Write `document` to `path` atomically (temp file in the same folder, then rename)."""
    return atomic_write_json(dict(document), path, compact=True)
