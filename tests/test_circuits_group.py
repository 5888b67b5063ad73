"""Automatic supernodes: planted groups are recovered; names; label evidence."""

from __future__ import annotations

import numpy as np
import pytest

from cltrace.circuits.evidence import Evidence, parse_label, shared_evidence
from cltrace.circuits.group import GroupConfig, feature_set, group_features, group_name, suggest_supernodes
from cltrace.interventions.supernodes import GraphView

N_LAYERS, D = 8, 32
# Planted roles: (position, layers, name). Two roles share position 5 (different layers and
# outputs); two sit at adjacent positions 2 and 3 with the same layers (different directions).
PLANTED = {
    "dallas": (2, [1, 2, 3, 2]),
    "state": (3, [1, 2, 3]),
    "say_capital": (5, [1, 2, 2]),
    "say_austin": (5, [5, 6, 7, 6]),
}
NOISE = [(0, 1), (1, 4), (2, 6), (4, 2), (5, 3), (3, 7), (4, 5), (1, 1)]


class FakeTranscoder:
    """decoder_weight(layer) -> [F, T, d]: planted groups share a direction (plus noise)."""

    def __init__(self, dirs: dict[tuple[int, int], np.ndarray]):
        import torch

        self.w = {}
        for layer in range(N_LAYERS):
            W = torch.zeros(100, 1, D)
            for (lay, feat), v in dirs.items():
                if lay == layer:
                    W[feat, 0] = torch.as_tensor(v, dtype=torch.float32)
            self.w[layer] = W

    def decoder_weight(self, layer):
        return self.w[layer]


def planted_graph(seed: int = 0, noise_influence: float = 0.05):
    """A pruned-graph view with planted groups, edges, decoder directions and influence.

    Edges: E2 -> dallas -> say_austin, E3 -> state -> say_capital -> say_austin,
    E5 -> say_capital; say_austin -> logit A; noise features get small random edges.
    Returns (view, influence per node, planted {name: [ids]}, transcoder, noise ids).
    """
    rng = np.random.default_rng(seed)
    ids, kinds = [f"E_{10 + p}_{p}" for p in range(6)], ["embedding"] * 6
    planted: dict[str, list[str]] = {}
    dirs = {}
    feat = 0
    for name, (pos, layers) in PLANTED.items():
        base = rng.normal(size=D)
        planted[name] = []
        for layer in layers:
            nid = f"{layer}_{feat}_{pos}"
            planted[name].append(nid)
            ids.append(nid), kinds.append("cross layer transcoder")
            dirs[(layer, feat)] = base + 0.35 * rng.normal(size=D) * np.linalg.norm(base) / np.sqrt(D)
            feat += 1
    noise = []
    for pos, layer in NOISE:
        nid = f"{layer}_{feat}_{pos}"
        noise.append(nid)
        ids.append(nid), kinds.append("cross layer transcoder")
        dirs[(layer, feat)] = rng.normal(size=D)
        feat += 1
    ids += [f"{N_LAYERS + 1}_900_5", f"{N_LAYERS + 1}_901_5"]
    kinds += ["logit", "logit"]
    idx = {nid: k for k, nid in enumerate(ids)}
    A = np.zeros((len(ids), len(ids)))

    def link(srcs, tgts, w):
        for s in srcs:
            for t in tgts:
                A[idx[t], idx[s]] = w * (1 + 0.2 * rng.normal())

    link(["E_12_2"], planted["dallas"], 1.0)
    link(["E_13_3"], planted["state"], 1.0)
    link(["E_15_5"], planted["say_capital"], 0.8)
    link(planted["state"], planted["say_capital"], 0.6)
    link(planted["dallas"], planted["say_austin"], 0.7)
    link(planted["say_capital"], planted["say_austin"], 0.5)
    link(planted["say_austin"], [f"{N_LAYERS + 1}_900_5"], 1.2)
    link(planted["say_capital"], [f"{N_LAYERS + 1}_901_5"], -0.4)
    for nid in noise:  # a random source and target each
        f_pos = int(nid.split("_")[2])
        src = f"E_{10 + f_pos}_{f_pos}"
        A[idx[nid], idx[src]] = 0.3 * rng.normal()
        A[idx[f"{N_LAYERS + 1}_901_5"], idx[nid]] = 0.3 * rng.normal()
    influence = np.zeros(len(ids))
    for nid in ids:
        if nid in noise:
            influence[idx[nid]] = noise_influence
        elif kinds[idx[nid]] == "cross layer transcoder":
            influence[idx[nid]] = 1.0
    view = GraphView(ids, A.astype(np.float32), [k == "cross layer transcoder" for k in kinds])
    return view, influence, planted, FakeTranscoder(dirs), noise


def _groups(view, influence, tc, cfg, labels=None):
    fs = feature_set(view, influence, N_LAYERS, transcoder=tc, labels=labels)
    return group_features(fs, cfg)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_groups_are_recovered_exactly(seed):
    view, infl, planted, tc, noise = planted_graph(seed)
    cfg = GroupConfig(min_share=0.0, max_groups=100, min_groups=0)
    got = [sorted(g.node_ids) for g in _groups(view, infl, tc, cfg).groups]
    for name, members in planted.items():
        assert sorted(members) in got, f"{name} not recovered: {got}"
    for group in got:  # noise never joins a planted group
        if any(n in group for n in noise):
            assert not any(m in group for ms in planted.values() for m in ms), group


def test_influence_selection_keeps_the_planted_groups_and_reports_the_rest():
    view, infl, planted, tc, noise = planted_graph(0, noise_influence=0.1)
    result = _groups(view, infl, tc, GroupConfig(min_share=0.05, min_groups=0))
    assert sorted(sorted(g.node_ids) for g in result.groups) == sorted(sorted(m) for m in planted.values())
    total = infl.sum()
    n_planted = sum(len(m) for m in planted.values())
    assert result.grouped_share == pytest.approx(n_planted / total)
    assert result.dropped_share == pytest.approx(len(noise) * 0.1 / total)
    shares = [g.share for g in result.groups]
    assert shares == sorted(shares, reverse=True)
    capped = _groups(view, infl, tc, GroupConfig(min_share=0.0, max_groups=2, min_groups=0))
    assert len(capped.groups) == 2 and sorted(len(g.node_ids) for g in capped.groups) == [4, 4]


def test_without_decoders_edges_and_positions_still_separate_the_roles():
    view, infl, planted, _, _ = planted_graph(0)
    got = [
        sorted(g.node_ids)
        for g in _groups(view, infl, None, GroupConfig(min_share=0.0, max_groups=100, min_groups=0)).groups
    ]
    for members in planted.values():
        assert sorted(members) in got


def test_features_two_positions_apart_never_merge():
    ids = ["0_1_0", "0_2_2", "E_5_0", "E_6_2"]
    A = np.zeros((4, 4), dtype=np.float32)
    A[0, 2] = A[1, 3] = 1.0
    view = GraphView(ids, A, [True, True, False, False])
    fs = feature_set(view, np.array([1.0, 1.0, 0, 0]), 4, labels={(0, 1): "Texas", (0, 2): "Texas"})
    res = group_features(fs, GroupConfig(threshold=0.0, min_share=0.0, min_groups=0))
    assert sorted(len(g.node_ids) for g in res.groups) == [1, 1]


def test_shared_label_evidence_names_the_group():
    view, infl, planted, tc, _ = planted_graph(0)
    labels = {}
    for nid in planted["dallas"]:
        layer, feat, _ = map(int, nid.split("_"))
        labels[(layer, feat)] = "Dallas · Texas → Austin"
    labels[(1, 0)] = "Dallas/Houston → Texas"
    res = _groups(view, infl, tc, GroupConfig(min_share=0.0, max_groups=100, min_groups=0), labels)
    dallas = next(g for g in res.groups if sorted(g.node_ids) == sorted(planted["dallas"]))
    assert dallas.name == "Dallas · Texas → Austin"
    assert dallas.evidence[0] == "Dallas" and "→ Austin" in dallas.evidence
    other = next(g for g in res.groups if sorted(g.node_ids) == sorted(planted["say_austin"]))
    assert other.name == "@5 L5-7"  # no labels, no token strings


def test_parse_label_and_fallback_names():
    assert parse_label("Tokyo · Japan/Osaka → Japanese") == Evidence(
        frozenset({"Tokyo", "Japan", "Osaka"}), frozenset({"Japanese"})
    )
    assert parse_label("Texas…") == Evidence(frozenset({"Texas"}), frozenset())
    assert parse_label("→ Austin") == Evidence(frozenset(), frozenset({"Austin"}))
    assert not parse_label("(never active)") and not parse_label("") and not parse_label(None)
    assert not parse_label("the (too broad: fires on 40% of tokens)")
    assert not parse_label("(broad: fires on 31% of tokens)")
    assert parse_label(", · \\n → Austin") == Evidence(
        frozenset(), frozenset({"Austin"})
    )  # no punctuation names
    assert group_name([], [5], (2, 6), ["a"] * 5 + [" Tokyo"]) == "' Tokyo' @5 L2-6"
    assert group_name([], [4, 5], (3, 3), ["a"] * 4 + [" New", " York"]) == "' New York' @4-5 L3"
    assert group_name(["Texas", "→ Austin"], [1], (0, 0), None) == "Texas → Austin"


def test_shared_evidence_needs_support_from_several_members():
    ev = [
        Evidence(frozenset({"Texas"}), frozenset({"Austin"})),
        Evidence(frozenset({"Texas", "Houston"}), frozenset()),
        Evidence(frozenset({"Texas"}), frozenset({"Austin"})),
        Evidence(frozenset({"cat"}), frozenset()),
    ]
    assert shared_evidence(ev, np.ones(4), 6) == ["Texas", "→ Austin"]
    assert shared_evidence([Evidence(frozenset({"cat"}))], np.ones(1), 6) == ["cat"]
    assert shared_evidence([Evidence(), Evidence()], np.ones(2), 6) == []


def test_suggest_supernodes_on_graph_json_finds_the_planted_groups():
    view, _, planted, _, noise = planted_graph(0)
    nodes = []
    for nid, is_feat in zip(view.node_ids, view.is_feature):
        kind = "cross layer transcoder" if is_feat else ("embedding" if nid.startswith("E_") else "logit")
        nodes.append(
            {
                "node_id": nid,
                "feature_type": kind,
                "clerp": "",
                "token_prob": 0.6 if nid.endswith("900_5") else 0.3 if kind == "logit" else 0.0,
            }
        )
    t, s = np.nonzero(view.adjacency)
    links = [
        {"source": view.node_ids[j], "target": view.node_ids[i], "weight": float(view.adjacency[i, j])}
        for i, j in zip(t, s)
    ]
    doc = {
        "metadata": {"prompt_tokens": ["<bos>", "a", "Dallas", "state", "b", "is"]},
        "nodes": nodes,
        "links": links,
    }
    got = suggest_supernodes(doc, cfg=GroupConfig(min_share=0.0, max_groups=100, min_groups=0))
    assert all(set(g) == {"name", "node_ids"} for g in got)
    found = [sorted(g["node_ids"]) for g in got]
    for name in ("dallas", "say_austin"):  # without decoders: the strong roles
        assert sorted(planted[name]) in found
    assert any(g["name"].startswith("'Dallas' @2") for g in got)


def test_signed_influence_is_the_normalised_path_sum():
    from cltrace.circuits.group import signed_influence

    # nodes: 0 emb, 1 f1, 2 f2, 3 logit; edges 0->1 (2), 0->2 (-1), 1->2 (3), 1->3 (1), 2->3 (-3)
    A = np.zeros((4, 4))
    A[1, 0], A[2, 0], A[2, 1], A[3, 1], A[3, 2] = 2.0, -1.0, 3.0, 1.0, -3.0
    e = signed_influence(A, 3)
    n32, n31 = -3 / 4, 1 / 4  # row 3 normalised by |1| + |-3|
    n21, n20, n10 = 3 / 4, -1 / 4, 1.0
    assert e[2] == pytest.approx(n32)
    assert e[1] == pytest.approx(n31 + n32 * n21)
    assert e[0] == pytest.approx(n31 * n10 + n32 * n20 + n32 * n21 * n10)
    assert e[3] == 0


def test_features_pushing_the_answer_opposite_ways_never_merge():
    # two features at one position and layer, same input, decoders alike; one excites the
    # answer, the other inhibits it: they must stay apart, and the names say which is which
    ids = ["E_5_1", "0_1_1", "0_2_1", "0_3_1", "5_900_1"]
    A = np.zeros((5, 5), dtype=np.float32)
    A[1, 0] = A[2, 0] = A[3, 0] = 1.0
    A[4, 1], A[4, 2], A[4, 3] = 1.0, 0.9, -1.0
    view = GraphView(ids, A, [False, True, True, True, False])
    infl = np.array([0, 1.0, 1.0, 1.0, 0])
    cfg = GroupConfig(threshold=0.1, min_share=0.0, min_groups=0)
    free = group_features(feature_set(view, infl, 4), cfg)
    assert len(free.groups) == 1  # no sign: one group
    signed = group_features(feature_set(view, infl, 4, answer="5_900_1"), cfg, ["<bos>", " hot"])
    got = {tuple(sorted(g.node_ids)): g for g in signed.groups}
    assert set(got) == {("0_1_1", "0_2_1"), ("0_3_1",)}
    assert got[("0_1_1", "0_2_1")].name == "' hot' @1 L0 (+)" and got[("0_3_1",)].name == "' hot' @1 L0 (−)"
    assert got[("0_3_1",)].effect < 0 < got[("0_1_1", "0_2_1")].effect


def test_labels_that_do_not_overlap_never_split_a_group():
    """Every feature gets its own unrelated label: no overlap anywhere, the same groups."""
    view, infl, planted, tc, _ = planted_graph(0)
    rows, feats = view.feature_rows()
    labels = {(f.layer, f.feature): f"word{k} → other{k}" for k, f in enumerate(feats)}
    cfg = GroupConfig(min_share=0.0, max_groups=100, min_groups=0)
    got = [sorted(g.node_ids) for g in _groups(view, infl, tc, cfg, labels).groups]
    for members in planted.values():
        assert sorted(members) in got


def test_structured_store_evidence_is_cleaned_like_parsed_labels():
    from cltrace.circuits.evidence import feature_evidence
    from cltrace.interventions.supernodes import FeatureNode

    class Store:
        def label_evidence(self, keys):
            return {(0, 1): ([",", "Texas…", "\\n"], [" Austin"]), (0, 2): ([], [])}

    found = feature_evidence(Store(), [FeatureNode(0, 1, 3), FeatureNode(0, 2, 3)])
    assert found[(0, 1)] == Evidence(frozenset({"Texas"}), frozenset({"Austin"})) and not found[(0, 2)]
