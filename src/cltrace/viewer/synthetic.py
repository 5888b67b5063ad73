"""Synthetic graphs and a deterministic back-end, for the viewer's tests and benchmark.

`synthetic_graph(n_nodes, n_links)` builds a valid Neuronpedia-schema graph (embeddings at
the bottom, features and error nodes on transcoder layers, logits on top; links only go up
the layers and never backwards in position). `SyntheticBackend` answers every back-end call
with data derived from the request, so a browser test can exercise the whole UI.
"""

from __future__ import annotations

import random
from typing import Any

from cltrace.viewer.backend import FEATURE_TYPE, GraphRef, InterventionRequest, suggest_by_shared_target

PROMPT = ["<bos>", "Fact", ":", " the", " capital", " of", " the", " state", " containing", " Dallas", " is"]
LOGIT_TOKENS = [" Austin", " Texas", " the", " Houston", " a"]


def _node(node_id: str, feature: int, layer: str, ctx: int, ftype: str, **extra: Any) -> dict:
    node = {
        "node_id": node_id,
        "feature": feature,
        "layer": layer,
        "ctx_idx": ctx,
        "feature_type": ftype,
        "jsNodeId": node_id,
        "clerp": "",
        "influence": None,
        "activation": None,
        "token_prob": 0.0,
        "is_target_logit": False,
    }
    node.update(extra)
    return node


def _fixed_nodes(n_layers: int) -> list[dict]:
    last = len(PROMPT) - 1
    nodes = [_node(f"E_{100 + p}_{p}", p, "E", p, "embedding") for p in range(len(PROMPT))]
    probs = [0.45, 0.2, 0.1, 0.05, 0.03]
    for k, (tok, prob) in enumerate(zip(LOGIT_TOKENS, probs)):
        nodes.append(
            _node(
                f"{n_layers + 1}_{9000 + k}_{last}",
                9000 + k,
                str(n_layers + 1),
                last,
                "logit",
                clerp=f'Output "{tok}" (p={prob:.3f})',
                token_prob=prob,
                is_target_logit=k == 0,
            )
        )
    return nodes


def _inner_nodes(n: int, n_layers: int, rng: random.Random, n_features: int = 4096) -> list[dict]:
    nodes, seen = [], set()
    for l in range(n_layers):  # one error node per layer at the last position
        nodes.append(
            _node(f"E{l}_{len(PROMPT) - 1}", -1, str(l), len(PROMPT) - 1, "mlp reconstruction error")
        )
    while len(nodes) < n:
        layer, pos, feat = rng.randrange(n_layers), rng.randrange(len(PROMPT)), rng.randrange(n_features)
        if (layer, pos, feat) in seen:
            continue
        seen.add((layer, pos, feat))
        label = f"synthetic feature {layer}/{feat}" if rng.random() < 0.5 else ""
        nodes.append(
            _node(
                f"{layer}_{feat}_{pos}",
                feat,
                str(layer),
                pos,
                FEATURE_TYPE,
                clerp=label,
                activation=round(rng.uniform(0.1, 10), 3),
            )
        )
    scores = sorted(nodes, key=lambda _: rng.random())  # influence: cumulative share by rank
    for rank, node in enumerate(scores):
        node["influence"] = round((rank + 1) / len(scores), 6)
    return nodes


def _row(node: dict, n_layers: int) -> int:
    if node["feature_type"] == "embedding":
        return 0
    return n_layers + 1 if node["feature_type"] == "logit" else int(node["layer"]) + 1


def _links(nodes: list[dict], n_links: int, n_layers: int, rng: random.Random) -> list[dict]:
    rows = [_row(n, n_layers) for n in nodes]
    by_row: list[list[int]] = [[] for _ in range(n_layers + 2)]
    for i, r in enumerate(rows):
        by_row[r].append(i)
    targets = [i for i, r in enumerate(rows) if r > 0]
    links, seen = [], set()
    budget = n_links * 20
    while len(links) < n_links and budget:
        budget -= 1
        t = rng.choice(targets)
        s = rng.choice(by_row[rng.randrange(rows[t])])
        if nodes[s]["ctx_idx"] > nodes[t]["ctx_idx"] or (s, t) in seen:
            continue
        seen.add((s, t))
        weight = rng.gauss(0, 1) * rng.expovariate(1.0)
        links.append(
            {"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": round(weight, 5)}
        )
    return links


def synthetic_graph(
    n_nodes: int = 60,
    n_links: int = 240,
    n_layers: int = 6,
    seed: int = 0,
    slug: str = "synthetic",
    n_features: int = 4096,
) -> dict:
    """A Neuronpedia-schema graph with about `n_nodes` nodes and `n_links` links; feature
    indices below `n_features` (a real store's width, for dashboards from it)."""
    rng = random.Random(seed)
    fixed = _fixed_nodes(n_layers)
    nodes = fixed + _inner_nodes(max(n_nodes - len(fixed), n_layers), n_layers, rng, n_features)
    return {
        "metadata": {
            "slug": slug,
            "scan": "synthetic",
            "prompt_tokens": list(PROMPT),
            "prompt": "".join(PROMPT[1:]),
            "node_threshold": 0.8,
            "schema_version": 1,
            "info": {
                "description": "synthetic graph for viewer tests",
                "generator": {"name": "cltrace.viewer.synthetic"},
            },
        },
        "qParams": {
            "pinnedIds": [],
            "supernodes": [],
            "linkType": "both",
            "clickedId": "",
            "sparsityThreshold": 0,
        },
        "nodes": nodes,
        "links": _links(nodes, n_links, n_layers, rng),
    }


def synthetic_circuit(graph: dict, n_groups: int = 4, seed: int = 0) -> dict:
    """A circuit file (docs/CIRCUIT_FORMAT.md) over `graph`: `n_groups` feature supernodes of
    same-layer features, the prompt's embeddings and the top logit; edges are the summed graph
    links between supernodes. The first group is validated, the second failed, the rest not."""
    rng = random.Random(seed)
    feats = [n for n in graph["nodes"] if n["feature_type"] == FEATURE_TYPE]
    by_layer: dict[str, list[dict]] = {}
    for n in sorted(feats, key=lambda n: n["influence"]):
        by_layer.setdefault(n["layer"], []).append(n)
    layers = sorted(by_layer, key=int)[:n_groups]
    tokens = graph["metadata"]["prompt_tokens"]
    logit = next(n for n in graph["nodes"] if n["feature_type"] == "logit")
    sns = [
        _sn(
            f"emb:{p}",
            tok,
            "embedding",
            [n["node_id"] for n in graph["nodes"] if n["feature_type"] == "embedding" and n["ctx_idx"] == p],
            [p],
        )
        for p, tok in enumerate(tokens)
    ]
    for k, layer in enumerate(layers):
        members = by_layer[layer][:3]
        sn = _sn(
            f"sn{k}",
            f"group {k} · L{layer}",
            "features",
            [n["node_id"] for n in members],
            sorted({n["ctx_idx"] for n in members}),
            layers=[int(layer), int(layer)],
            influence_share=round(0.3 / (k + 1), 3),
        )
        if k < 2:
            sn.update(
                predicted_effect=-1.5 + k,
                measured_effect=-1.2 - 2 * k,
                measured_prob=round(rng.uniform(0.05, 0.4), 3),
                failed=k == 1,
            )
        sns.append(sn)
    sns.append(
        _sn("logit", logit["clerp"], "logit", [logit["node_id"]], [logit["ctx_idx"]], influence_share=1.0)
    )
    owner = {nid: sn["id"] for sn in sns for nid in sn["node_ids"]}
    sums: dict[tuple[str, str], float] = {}
    for link in graph["links"]:
        s, t = owner.get(link["source"]), owner.get(link["target"])
        if s and t and s != t:
            sums[(s, t)] = sums.get((s, t), 0.0) + link["weight"]
    edges = [{"source": s, "target": t, "weight": round(w, 5)} for (s, t), w in sums.items()]
    return {
        "version": 1,
        "prompt": graph["metadata"]["prompt"],
        "tokens": tokens,
        "answer": LOGIT_TOKENS[0],
        "answer_id": 9000,
        "answer_prob": 0.45,
        "model": "synthetic",
        "transcoder": "synthetic",
        "influence_share": 0.5,
        "faithfulness": {
            "spearman_supernodes": 0.5,
            "spearman_features": None,
            "n_supernodes": 2,
            "n_features": None,
        },
        "supernodes": sns,
        "edges": edges,
        "stats": {},
    }


def _sn(
    sid: str,
    name: str,
    kind: str,
    node_ids: list[str],
    positions: list[int],
    layers: list[int] | None = None,
    influence_share: float = 0.0,
) -> dict:
    return {
        "id": sid,
        "name": name,
        "kind": kind,
        "node_ids": node_ids,
        "positions": positions,
        "layers": layers,
        "evidence": [],
        "influence_share": influence_share,
        "predicted_effect": None,
        "measured_effect": None,
        "measured_prob": None,
        "failed": None,
    }


class SyntheticBackend:
    """Deterministic answers for every back-end call (tests, benchmark, demos)."""

    def feature(self, graph: GraphRef, layer: int, index: int) -> dict | None:
        tokens = graph.metadata.get("prompt_tokens") or ["a", "b", "c"]
        contexts = [
            {"tokens": tokens, "active_index": (index + k) % len(tokens), "value": round(5.0 - k, 2)}
            for k in range(3)
        ]
        return {
            "layer": layer,
            "index": index,
            "label": f"fake feature {layer}/{index}",
            "density": 0.0123,
            "contexts": contexts,
            "promoted": [{"token": t, "value": 1.0 - 0.1 * k} for k, t in enumerate(LOGIT_TOKENS[:3])],
            "suppressed": [{"token": t, "value": -1.0 + 0.1 * k} for k, t in enumerate(LOGIT_TOKENS[3:])],
            "quantiles": [
                {"low": 0.5 * k, "high": 0.5 * (k + 1), "examples": contexts[:1]} for k in range(2)
            ],
            "label_source": "auto",
            "label_reads": ["Dallas"],
            "label_writes": ["Texas"],
            "label_broad": False,
            "label_detection": 0.91,
            "label_output": 0.5,
        }

    def intervene(self, graph: GraphRef, request: InterventionRequest) -> dict:
        logits = [n for n in graph.data["nodes"] if n.get("feature_type") == "logit"]
        before = [
            {
                "token": n["clerp"].split('"')[1] if '"' in n.get("clerp", "") else n["node_id"],
                "prob": float(n.get("token_prob", 0.0)),
            }
            for n in logits
        ]
        shift = sum(i.value for i in request.interventions) / (10 * len(request.interventions))
        after = [
            {
                "token": b["token"],
                "prob": round(max(b["prob"] * (1 - shift) if k == 0 else b["prob"] + shift / 10, 0.0), 6),
            }
            for k, b in enumerate(before)
        ]
        after.sort(key=lambda x: -x["prob"])
        words = ["and", "then", "the", "capital"][: request.generate]
        return {
            "before": before,
            "after": after,
            "continuation_before": None,
            "continuation": " ".join(words) or None,
            "freeze_attention": request.freeze_attention,
        }

    def suggest_supernodes(self, graph: GraphRef) -> list[dict]:
        return suggest_by_shared_target(graph.data)

    def labels(self, graph: GraphRef) -> dict[str, dict]:
        """Detection score (index % 100) / 100 for every feature; output None; never broad."""
        return {
            n["node_id"]: {
                "label": f"fake feature {n['layer']}/{n['feature']}",
                "detection": (int(n["feature"]) % 100) / 100,
                "output": None,
                "broad": False,
            }
            for n in graph.data["nodes"]
            if n.get("feature_type") == FEATURE_TYPE
        }
