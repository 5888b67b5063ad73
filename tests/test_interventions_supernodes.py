"""Supernodes: files by hand, the clustering primitives, and the suggestions (circuits.group)
on a real pruned graph, intervened on."""

import json

import numpy as np
import torch

from cltrace.circuits.group import GroupConfig, suggest_supernodes
from cltrace.interventions.supernodes import (
    Supernode,
    agglomerate,
    graph_view,
    load_supernodes,
    parse_feature_id,
    save_supernodes,
)


def toy_graph() -> dict:
    """Two groups of features: {0_1_2, 0_4_2, 1_3_2} feed logit A; {0_7_3, 1_9_3} feed logit B."""
    ids = ["E_5_2", "0_1_2", "0_4_2", "1_3_2", "0_7_3", "1_9_3", "27_100_3", "27_200_3"]
    kinds = ["embedding"] + ["cross layer transcoder"] * 5 + ["logit"] * 2
    nodes = [{"node_id": i, "feature_type": k} for i, k in zip(ids, kinds)]
    links = []
    for src, w in (("0_1_2", 1.0), ("0_4_2", 0.9), ("1_3_2", 1.1)):
        links += [
            {"source": "E_5_2", "target": src, "weight": 0.5},
            {"source": src, "target": "27_100_3", "weight": w},
        ]
    for src, w in (("0_7_3", 2.0), ("1_9_3", 1.7)):
        links += [{"source": src, "target": "27_200_3", "weight": w}]
    return {"nodes": nodes, "links": links}


def test_parse_feature_ids():
    assert parse_feature_id("3_17_5").layer == 3 and parse_feature_id("3_17_5").pos == 5
    assert parse_feature_id("E_3_5") is None and parse_feature_id("27_100") is None


def test_agglomerate_merges_while_similar():
    sim = np.array([[1, 0.9, 0.1, 0], [0.9, 1, 0.2, 0], [0.1, 0.2, 1, 0.8], [0, 0, 0.8, 1]], float)
    assert agglomerate(sim, 0.5) == [[0, 1], [2, 3]]
    assert agglomerate(sim, 0.95) == [[0], [1], [2], [3]]
    assert agglomerate(sim, -1.0) == [[0, 1, 2, 3]]


def test_suggestions_find_the_two_groups_of_the_json_graph():
    groups = suggest_supernodes(toy_graph(), cfg=GroupConfig(min_share=0.0, min_groups=0))
    assert sorted(sorted(g["node_ids"]) for g in groups) == [["0_1_2", "0_4_2", "1_3_2"], ["0_7_3", "1_9_3"]]


def test_decoder_directions_can_split_a_group():
    class Tc:
        def decoder_weight(self, l):
            w = torch.zeros(10, 2, 4)
            w[:, :, 0] = 1.0
            w[4, :, :] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # 0_4 points elsewhere
            return w

    cfg = GroupConfig(threshold=0.75, w_decoder=3.0, min_share=0.0, min_groups=0)
    names = [sorted(g["node_ids"]) for g in suggest_supernodes(toy_graph(), transcoder=Tc(), cfg=cfg)]
    assert ["0_1_2", "1_3_2"] in names and ["0_4_2"] in names
    without = [sorted(g["node_ids"]) for g in suggest_supernodes(toy_graph(), cfg=cfg)]
    assert ["0_1_2", "0_4_2", "1_3_2"] in without


def test_files_by_hand_and_sidecar(tmp_path):
    by_hand = tmp_path / "groups.json"
    by_hand.write_text(json.dumps({"Texas": ["0_1_2", "1_3_2", "E_0_2"]}))
    (sn,) = load_supernodes(by_hand)
    assert [f.layer for f in sn.features()] == [0, 1]
    assert len(Supernode("x", ["0_1_2", "27_100_3"]).interventions("scale", 0.0, n_layers=26)) == 1
    ivs = sn.interventions("scale", -2.0)
    assert [(i.layer, i.feature, i.positions, i.value) for i in ivs] == [
        (0, 1, (2,), -2.0),
        (1, 3, (2,), -2.0),
    ]
    assert all(i.positions is None for i in sn.interventions("scale", 0.0, at="all"))
    graph = tmp_path / "dallas.json"
    graph.write_text(json.dumps(toy_graph()))
    path = save_supernodes(graph, [sn, Supernode("capital", ["0_7_3"])])
    assert path.name == "dallas.supernodes.json"
    assert json.loads(path.read_text())["graph"] == "dallas"
    assert [g.name for g in load_supernodes(graph)] == ["Texas", "capital"]


def test_suggestions_on_a_real_pruned_graph_and_intervening_on_them():
    """Graph -> prune -> suggested groups (feature ids of kept nodes) -> one intervention each."""
    from cltrace.attribution.graph import AttributionConfig, attribute
    from cltrace.attribution.prune import prune
    from cltrace.interventions.steer import Steerer
    from test_features_standin import make_transcoder
    from tiny import tiny_model

    lm = tiny_model("llama")
    tc = make_transcoder(lm, n_features=24)
    prompt = "Fact : the capital of the state containing Dallas is"
    graph = attribute(lm, tc, prompt, AttributionConfig(max_feature_nodes=None, progress=False))
    pruned = prune(graph, node_threshold=0.9, edge_threshold=0.99)
    view = graph_view(graph, pruned)
    rows, feats = view.feature_rows()
    assert len(rows) == int(pruned.node_mask[: graph.n_features].sum())
    groups = suggest_supernodes(graph, pruned=pruned, transcoder=tc)
    assert groups and all(g["node_ids"] for g in groups)
    kept = {view.node_ids[r] for r in rows}
    assert all(set(g["node_ids"]) <= kept for g in groups)
    ivs = Supernode(groups[0]["name"], groups[0]["node_ids"]).interventions(
        "scale", 0.0, n_layers=lm.n_layers
    )
    res = Steerer(lm, tc).run(prompt, ivs, top_k=3)
    assert (res.logits_after - res.logits_before).abs().max() > 0
