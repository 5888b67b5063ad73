"""Compare two served graph JSON files for the viewer's compare page (no torch, no full graph).

`cltrace diff` (docs/DIFF_FORMAT.md) compares the full graphs with influences recomputed by
prune; the viewer only has the pruned JSON files, so this is the same comparison on what
they hold, in the same shapes: positions aligned by shared tokens (`slots`), feature nodes
keyed by (layer, feature, slot) and reported as `appeared` (only in B), `vanished` (only in
A) or `changed` (in both, activation moved by at least half of the larger one), and, when
both graphs have a circuit file, supernodes matched by the Jaccard overlap of their members'
keys (>= 0.3) with their influence shares.
"""

from __future__ import annotations

import difflib
from typing import Any

from cltrace.viewer.backend import FEATURE_TYPE, GraphRef, feature_index

MIN_JACCARD = 0.3
MAX_NODES = 500


def align(tokens_a: list[str], tokens_b: list[str]) -> list[dict[str, Any]]:
    """Slots in prompt order: one per shared position, one per run of differing tokens."""
    matcher = difflib.SequenceMatcher(a=tokens_a, b=tokens_b, autojunk=False)
    slots: list[dict[str, Any]] = []
    for op, a0, a1, b0, b1 in matcher.get_opcodes():
        runs = (
            [([a0 + i], [b0 + i]) for i in range(a1 - a0)]
            if op == "equal"
            else [(list(range(a0, a1)), list(range(b0, b1)))]
        )
        for pa, pb in runs:
            slots.append(
                {
                    "slot": len(slots),
                    "status": "shared" if op == "equal" else "changed",
                    "a": pa,
                    "b": pb,
                    "tokens_a": [tokens_a[p] for p in pa],
                    "tokens_b": [tokens_b[p] for p in pb],
                }
            )
    return slots


def _features(graph: GraphRef, slot_of: dict[int, int]) -> dict[tuple, dict[str, Any]]:
    """(layer, feature, slot) -> {node_ids, activation, label} of the graph's feature nodes."""
    out: dict[tuple, dict[str, Any]] = {}
    for node in graph.data["nodes"]:
        index = feature_index(node)
        if node.get("feature_type") != FEATURE_TYPE or index is None:
            continue
        pos = int(node.get("ctx_idx") or 0)
        key = (int(node.get("layer") or 0), index, slot_of.get(pos, -1))
        item = out.setdefault(key, {"node_ids": [], "activation": 0.0, "label": ""})
        item["node_ids"].append(str(node["node_id"]))
        item["activation"] += float(node.get("activation") or 0.0)
        item["label"] = item["label"] or node.get("clerp") or ""
    return out


def _node_changes(fa: dict, fb: dict) -> list[dict[str, Any]]:
    changes = []
    for key in fa.keys() | fb.keys():
        a, b = fa.get(key), fb.get(key)
        act_a, act_b = (a or {}).get("activation", 0.0), (b or {}).get("activation", 0.0)
        if a and b:
            if abs(act_b - act_a) < 0.5 * max(abs(act_a), abs(act_b)):
                continue
            status = "changed"
        else:
            status = "appeared" if b else "vanished"
        changes.append(
            {
                "kind": "feature",
                "layer": key[0],
                "feature": key[1],
                "slot": key[2],
                "status": status,
                "delta_activation": act_b - act_a,
                "a": a,
                "b": b,
            }
        )
    changes.sort(key=lambda c: -abs(c["delta_activation"]))
    return changes


def _circuit_keys(circuit: dict, slot_of: dict[int, int]) -> dict[str, set[tuple]]:
    keys = {}
    for sn in circuit.get("supernodes", []):
        if sn.get("kind") != "features":
            continue
        members = set()
        for nid in sn.get("node_ids", []):
            parts = str(nid).split("_")
            if len(parts) == 3 and all(p.isdigit() for p in parts):
                members.add((int(parts[0]), int(parts[1]), slot_of.get(int(parts[2]), -1)))
        keys[str(sn.get("id"))] = members
    return keys


def compare_supernodes(ca: dict, cb: dict, in_a: dict[int, int], in_b: dict[int, int]) -> list[dict]:
    """Supernodes matched by member overlap: changed (matched), vanished, appeared."""
    ka, kb = _circuit_keys(ca, in_a), _circuit_keys(cb, in_b)
    by_a = {str(s.get("id")): s for s in ca.get("supernodes", [])}
    by_b = {str(s.get("id")): s for s in cb.get("supernodes", [])}
    pairs = sorted(
        ((len(x & y) / len(x | y), ia, ib) for ia, x in ka.items() for ib, y in kb.items() if x | y),
        reverse=True,
    )
    used_a, used_b, out = set(), set(), []
    for jac, ia, ib in pairs:
        if jac >= MIN_JACCARD and ia not in used_a and ib not in used_b:
            used_a.add(ia)
            used_b.add(ib)
            out.append(_sn("changed", by_a[ia], by_b[ib], jac))
    out += [_sn("vanished", by_a[i], None, 0.0) for i in ka if i not in used_a]
    out += [_sn("appeared", None, by_b[i], 0.0) for i in kb if i not in used_b]
    out.sort(key=lambda d: -abs(d["delta_influence"]))
    return out


def _sn(status: str, a: dict | None, b: dict | None, overlap: float) -> dict[str, Any]:
    def side(s):
        return (
            None
            if s is None
            else {
                "id": s.get("id"),
                "name": s.get("name"),
                "influence_share": float(s.get("influence_share") or 0.0),
            }
        )

    delta = (side(b) or {}).get("influence_share", 0.0) - (side(a) or {}).get("influence_share", 0.0)
    return {"status": status, "delta_influence": delta, "overlap": overlap, "a": side(a), "b": side(b)}


def compare_graphs(
    ga: GraphRef, gb: GraphRef, circuit_a: dict | None = None, circuit_b: dict | None = None
) -> dict[str, Any]:
    """The compare page's document (module docstring)."""
    tokens_a = [str(t) for t in ga.metadata.get("prompt_tokens") or []]
    tokens_b = [str(t) for t in gb.metadata.get("prompt_tokens") or []]
    slots = align(tokens_a, tokens_b)
    in_a = {p: s["slot"] for s in slots for p in s["a"]}
    in_b = {p: s["slot"] for s in slots for p in s["b"]}
    nodes = _node_changes(_features(ga, in_a), _features(gb, in_b))
    counts = {k: sum(n["status"] == k for n in nodes) for k in ("appeared", "vanished", "changed")}
    supernodes = None
    if circuit_a is not None and circuit_b is not None:
        supernodes = compare_supernodes(circuit_a, circuit_b, in_a, in_b)
    return {
        "kind": "cltrace-viewer-compare",
        "version": 1,
        "a": {"name": ga.name, "prompt": ga.metadata.get("prompt"), "tokens": tokens_a},
        "b": {"name": gb.name, "prompt": gb.metadata.get("prompt"), "tokens": tokens_b},
        "alignment": slots,
        "counts": counts,
        "nodes": nodes[:MAX_NODES],
        "supernodes": supernodes,
    }
