"""Circuits end to end: edge aggregation, JSON round trip, the SVG, `cltrace trace --circuit`."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

from cltrace.circuits import Circuit, CircuitEdge, CircuitNode
from cltrace.circuits.build import CircuitConfig, aggregate_edges, build_circuit, circuit_edges
from cltrace.circuits.diagram import write_svg
from cltrace.circuits.group import GroupConfig
from cltrace.errors import CltraceError

PROMPT = "Fact : the capital of the state containing Dallas is"


@pytest.fixture(scope="module")
def traced():
    from cltrace.attribution.graph import AttributionConfig, attribute
    from cltrace.attribution.prune import prune
    from test_attribution import make_transcoder
    from tiny import tiny_model

    lm = tiny_model("gemma")
    tc = make_transcoder(lm, "clt", n_features=48, fire=0.4)
    graph = attribute(lm, tc, PROMPT, AttributionConfig(max_feature_nodes=None, batch_size=16))
    return lm, tc, graph, prune(graph, node_threshold=0.95)


def test_aggregate_edges_is_the_sum_of_member_edges():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(12, 12, generator=g)
    groups = [[0, 3], [5], [6, 7, 11], [1]]
    W = aggregate_edges(A, groups)
    for t, tm in enumerate(groups):
        for s, sm in enumerate(groups):
            assert W[t, s] == pytest.approx(sum(float(A[i, j]) for i in tm for j in sm), abs=1e-5)


def test_circuit_edges_drop_self_edges_and_weak_ones(traced):
    from cltrace.circuits.build import _Part

    A = torch.zeros(4, 4)
    A[1, 0], A[2, 0], A[2, 1], A[3, 2], A[1, 1] = 2.0, 0.05, -1.0, 0.5, 9.0
    node = lambda i, kind: CircuitNode(f"n{i}", "x", kind, [], [0], None, [], 0.1)  # noqa: E731
    parts = [
        _Part(node(0, "embedding"), [0]),
        _Part(node(1, "features"), [1]),
        _Part(node(2, "features"), [2]),
        _Part(node(3, "logit"), [3]),
    ]
    edges = {(e.source, e.target): e.weight for e in circuit_edges(A, parts, 0.1)}
    assert edges == {("n0", "n1"): 2.0, ("n1", "n2"): -1.0, ("n2", "n3"): 0.5}
    A[2, 0] = 0.8  # now above 10% of the largest into n2 ...
    edges = {(e.source, e.target) for e in circuit_edges(A, parts, 0.1)}
    assert ("n0", "n2") in edges and ("n1", "n2") in edges
    edges = {(e.source, e.target) for e in circuit_edges(A, parts, 0.1, max_in_edges=1)}
    assert ("n1", "n2") in edges and ("n0", "n2") not in edges  # ... but only the strongest is kept


def test_build_circuit_on_a_traced_graph(traced):
    lm, tc, graph, pruned = traced
    c = build_circuit(graph, pruned, lm, tc, validate=False)
    feats = c.feature_nodes
    assert feats and all(n.kind == "features" for n in feats)
    kept = set(np.flatnonzero(pruned.node_mask[: graph.n_features].numpy()).tolist())
    from cltrace.circuits.validate import feature_index

    index = feature_index(graph)
    members = [index[i] for n in feats for i in n.node_ids]
    assert len(members) == len(set(members)) and set(members) <= kept  # disjoint, kept nodes
    infl = pruned.node_influence.double()
    total = float(infl[: graph.token_offset].sum())
    for n in feats:  # shares from prune's influence
        assert n.influence_share == pytest.approx(float(infl[[index[i] for i in n.node_ids]].sum()) / total)
    assert c.influence_share == pytest.approx(sum(n.influence_share for n in feats))
    assert c.influence_share + c.stats["dropped_share"] + c.stats["error_share"] <= 1 + 1e-9
    assert c.nodes[-1].id == "logit" and c.answer_id == int(graph.logit_tokens[0])
    assert c.nodes[-1].node_ids == [f"{graph.n_layers + 1}_{c.answer_id}_{graph.n_pos - 1}"]
    assert c.faithfulness["spearman_supernodes"] is None
    groups = {n.id: [index[i] for i in n.node_ids] for n in feats}
    logit = [graph.logit_offset]
    for e in c.edges:  # edges are sums of member edges
        if e.source in groups and e.target == "logit":
            assert e.weight == pytest.approx(
                float(graph.adjacency[logit][:, groups[e.source]].sum()), rel=1e-4
            )


def test_json_round_trip(traced, tmp_path):
    lm, tc, graph, pruned = traced
    c = build_circuit(graph, pruned, lm, tc, validate=False)
    c.nodes[1].predicted, c.nodes[1].measured, c.nodes[1].failed = -1.5, 0.25, True
    path = c.save(tmp_path / "x.circuit.json")
    doc = json.loads(path.read_text())
    assert doc["version"] == 1 and {
        "supernodes",
        "edges",
        "faithfulness",
        "influence_share",
        "prompt",
        "answer",
    } <= set(doc)
    assert doc["supernodes"][1]["predicted_effect"] == -1.5 and doc["supernodes"][1]["failed"] is True
    back = Circuit.load(path)
    assert back == c
    with pytest.raises(CltraceError):
        Circuit.from_dict({**doc, "version": 99})


def _toy_circuit(validated: bool) -> Circuit:
    nodes = [
        CircuitNode("emb:2", " Dallas", "embedding", ["E_7_2"], [2], None, [], 0.4),
        CircuitNode(
            "sn0",
            "Dallas · Texas → Austin & <co>",
            "features",
            ["1_2_2", "3_4_2"],
            [2],
            (1, 3),
            ["Dallas", "Texas", "→ Austin"],
            0.3,
        ),
        CircuitNode("sn1", "say a capital", "features", ["2_9_5"], [5], (2, 2), [], 0.1),
        CircuitNode("sn2", "' is' @5 L6-8", "features", ["6_1_5", "8_3_5"], [5], (6, 8), [], 0.2),
        CircuitNode("logit", " Austin", "logit", ["11_55_5"], [5], None, [], 1.0),
    ]
    if validated:
        for n, (p, m, f) in zip(nodes[1:4], [(-2.0, -1.5, False), (-0.5, 0.3, True), (-1.0, -0.9, False)]):
            n.predicted, n.measured, n.failed = p, m, f
    edges = [
        CircuitEdge("emb:2", "sn0", 3.0),
        CircuitEdge("sn0", "sn2", 1.0),
        CircuitEdge("sn1", "sn2", -0.5),
        CircuitEdge("sn2", "logit", 2.0),
        CircuitEdge("sn0", "logit", 0.4),
    ]
    faith = {
        "spearman_supernodes": 0.5 if validated else None,
        "spearman_features": None,
        "n_supernodes": 3 if validated else None,
        "n_features": None,
    }
    return Circuit(
        "the capital of the state containing Dallas is",
        ["<bos>", "the", " Dallas", "x", "y", " is"],
        " Austin",
        55,
        0.4,
        "m",
        "t",
        nodes,
        edges,
        0.6,
        faith,
        {"error_share": 0.3},
    )


@pytest.mark.parametrize("validated", [False, True])
def test_svg_is_well_formed_and_names_every_supernode(validated, tmp_path):
    c = _toy_circuit(validated)
    path = write_svg(c, tmp_path / "c.svg")
    root = ET.parse(path).getroot()
    texts = " ".join("".join(t.itertext()) for t in root.iter("{http://www.w3.org/2000/svg}text"))
    for n in c.nodes:
        assert n.name.strip() in texts.replace("'", "") or repr(n.name) in texts or n.name in texts
    boxes = {g.get("id"): g for g in root.iter("{http://www.w3.org/2000/svg}g")}
    assert set(boxes) == {n.id for n in c.nodes}
    rect = boxes["sn1"].find("{http://www.w3.org/2000/svg}rect")
    assert (rect.get("stroke-dasharray") is not None) == validated  # the failed part is marked
    assert ("pred " in texts) == validated
    paths = [p for p in root.iter("{http://www.w3.org/2000/svg}path") if p.get("marker-end")]
    assert len(paths) == len(c.edges)
    ys = {g.get("id"): float(g.find("{http://www.w3.org/2000/svg}rect").get("y")) for g in boxes.values()}
    assert ys["logit"] < ys["sn2"] < ys["sn1"] < ys["emb:2"]  # answer on top, tokens below
    assert ys["sn0"] < ys["emb:2"]


def test_trace_circuit_writes_both_files(tmp_path, capsys):
    from cltrace.cli import main
    from test_attribution import make_transcoder
    from tiny import tiny_model

    lm = tiny_model("gemma")
    lm.model.save_pretrained(tmp_path / "model")
    lm.tokenizer.save_pretrained(tmp_path / "model")
    make_transcoder(lm, "clt").save(tmp_path / "run1")
    out = tmp_path / "graphs" / "dallas.json"
    rc = main(
        [
            "trace",
            PROMPT,
            "--transcoder",
            str(tmp_path / "run1"),
            "--model",
            str(tmp_path / "model"),
            "--out",
            str(out),
            "--max-feature-nodes",
            "40",
            "--batch-size",
            "8",
            "--circuit",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "supernodes carry" in text and "diagram:" in text
    c = Circuit.load(tmp_path / "graphs" / "dallas.circuit.json")
    svg = (tmp_path / "graphs" / "dallas.circuit.svg").read_text()
    ET.fromstring(svg)
    assert c.prompt == PROMPT and c.nodes[-1].kind == "logit" and c.transcoder == "run1"
    graph_ids = {n["node_id"] for n in json.loads(out.read_text())["nodes"]}
    assert all(i in graph_ids for n in c.nodes for i in n.node_ids)  # ids are the graph JSON's


def test_circuit_config_checks():
    with pytest.raises(CltraceError):
        CircuitConfig(min_edge_share=2.0)
    assert CircuitConfig(group={"threshold": 0.3}).group.threshold == 0.3


def test_the_circuit_can_explain_another_output_node(traced):
    lm, tc, graph, pruned = traced
    assert graph.n_logits >= 2
    tok = int(graph.logit_tokens[1])
    c = build_circuit(graph, pruned, lm, tc, validate=False, answer_id=tok)
    assert c.answer_id == tok and c.answer_prob == pytest.approx(float(graph.logit_probabilities[1]))
    assert c.nodes[-1].node_ids == [f"{graph.n_layers + 1}_{tok}_{graph.n_pos - 1}"]
    from cltrace.circuits.validate import feature_index

    index = feature_index(graph)
    for e in c.edges:
        if e.target == "logit" and e.source.startswith("sn"):
            cols = [index[i] for i in c.node(e.source).node_ids]
            assert e.weight == pytest.approx(
                float(graph.adjacency[graph.logit_offset + 1, cols].sum()), rel=1e-4
            )
    with pytest.raises(CltraceError):
        build_circuit(graph, pruned, lm, tc, validate=False, answer_id=10**6)


def test_error_nodes_per_position_carry_their_influence(traced):
    lm, tc, graph, pruned = traced
    cfg = CircuitConfig(include_errors=True, group=GroupConfig(min_share=0.0))
    c = build_circuit(graph, pruned, lm, tc, cfg=cfg, validate=False)
    errs = [n for n in c.nodes if n.kind == "error"]
    assert errs
    infl = pruned.node_influence.double()
    total = float(infl[: graph.token_offset].sum())
    for n in errs:
        (p,) = n.positions
        assert n.id == f"err:{p}" and all(i.startswith("err_") and i.endswith(f"_{p}") for i in n.node_ids)
        idx = [graph.error_offset + int(i.split("_")[1]) * graph.n_pos + p for i in n.node_ids]
        assert n.influence_share == pytest.approx(float(infl[idx].sum()) / total)
    assert sum(n.influence_share for n in errs) <= c.stats["error_share"] + 1e-9


def test_user_groups_replace_the_automatic_ones(traced):
    """A supernode file edited by hand (two groups merged and renamed, one split off, an id that
    is not in this graph) builds the circuit: names kept, members exactly the file's graph
    features, shares from prune's influence, edges the sums of member edges."""
    from cltrace.circuits.validate import feature_index

    lm, tc, graph, pruned = traced
    auto = build_circuit(graph, pruned, lm, tc, validate=False).feature_nodes
    assert len(auto) >= 3
    merged = auto[0].node_ids + auto[1].node_ids
    split, rest = auto[2].node_ids[:1], auto[2].node_ids[1:]
    groups = [
        {"name": "Texas (merged)", "node_ids": [*merged, "0_999999_0"]},  # an id not in this graph
        {"name": "one feature", "node_ids": split},
        {"name": "the rest", "node_ids": rest},
        {"name": "gone", "node_ids": ["0_999999_1"]},  # nothing of this graph: dropped
    ]
    c = build_circuit(graph, pruned, lm, tc, validate=False, groups=groups)
    feats = c.feature_nodes
    assert sorted(n.name for n in feats) == sorted(g["name"] for g in groups[:3] if g["node_ids"])
    by_name = {n.name: n for n in feats}
    assert sorted(by_name["Texas (merged)"].node_ids) == sorted(merged)
    assert by_name["one feature"].node_ids == split
    index = feature_index(graph)
    infl = pruned.node_influence.double()
    total = float(infl[: graph.token_offset].sum())
    for n in feats:
        assert n.influence_share == pytest.approx(float(infl[[index[i] for i in n.node_ids]].sum()) / total)
    members = {n.id: [index[i] for i in n.node_ids] for n in feats}
    for e in c.edges:
        if e.source in members and e.target in members:
            want = float(graph.adjacency[members[e.target]][:, members[e.source]].sum())
            assert e.weight == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_circuit_files_write_an_editable_supernode_file(traced, tmp_path):
    """circuit_to_files writes the automatic groups as the graph's supernode file when it has
    none, and never overwrites one the user has."""
    from cltrace.circuits.build import circuit_to_files
    from cltrace.supernode_file import read_supernodes, sidecar_path, write_supernodes

    lm, tc, graph, pruned = traced
    graph_json = tmp_path / "dallas.json"
    c, _, _ = circuit_to_files(graph, pruned, graph_json, lm, tc, validate=False)
    saved = read_supernodes(sidecar_path(graph_json))
    assert [(g["name"], g["node_ids"]) for g in saved] == [(n.name, n.node_ids) for n in c.feature_nodes]
    mine = [{"name": "mine", "node_ids": c.feature_nodes[0].node_ids}]
    write_supernodes(graph_json, mine)
    circuit_to_files(graph, pruned, graph_json, lm, tc, validate=False)
    assert read_supernodes(sidecar_path(graph_json)) == mine
    c2, _, _ = circuit_to_files(graph, pruned, graph_json, lm, tc, validate=False, groups=mine)
    assert [n.name for n in c2.feature_nodes] == ["mine"]
