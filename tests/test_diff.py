"""Graph diff: alignment, empty diff for identical prompts, planted changes, refusals, CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from cltrace.attribution.diff import align_positions, diff_graphs
from cltrace.attribution.graph import AttributionConfig, attribute
from cltrace.attribution.prune import prune
from cltrace.errors import CltraceError
from test_attribution import PROMPT, make_transcoder
from tiny import tiny_model

CFG = AttributionConfig(max_feature_nodes=None, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py (module scope, as before)


@pytest.fixture(scope="module")
def setup():
    lm = tiny_model("llama")
    tc = make_transcoder(lm, "clt")
    graph = attribute(lm, tc, PROMPT, CFG, transcoder_id="run1")
    return lm, tc, graph


def test_alignment_by_shared_tokens():
    slots = align_positions([1, 2, 3, 4, 5], [1, 2, 9, 9, 4, 5])
    assert [(s.status, s.a, s.b) for s in slots] == [
        ("shared", [0], [0]),
        ("shared", [1], [1]),
        ("changed", [2], [2, 3]),
        ("shared", [3], [4]),
        ("shared", [4], [5]),
    ]
    assert [s.status for s in align_positions([1, 2], [1, 2, 7])] == ["shared", "shared", "changed"]


def test_identical_prompts_give_an_empty_diff(setup):
    lm, tc, graph = setup
    again = attribute(lm, tc, PROMPT, CFG, transcoder_id="run1")
    d = diff_graphs(graph, again, ("x", "x"))
    assert d.is_empty and d.changes == []
    assert all(s.status == "shared" for s in d.slots)
    doc = json.loads(json.dumps(d.to_dict()))
    assert doc["counts"] == {"appeared": 0, "vanished": 0, "changed": 0} and doc["nodes"] == []


def kept_features(graph, pruned):
    infl = pruned.node_influence[: graph.n_features]
    kept = pruned.node_mask[: graph.n_features].nonzero().squeeze(1)
    return kept[torch.argsort(infl[kept], descending=True)].tolist()


def test_planted_changes_are_found(setup):
    lm, tc, graph = setup
    pruned = prune(graph)
    kept = kept_features(graph, pruned)
    assert len(kept) >= 4
    x, y, z = kept[0], kept[-1], kept[1]  # x vanishes, y grows, z is renumbered
    A = graph.adjacency.clone()
    A[x] = 0
    A[:, x] = 0
    A[:, y] *= 20
    af = graph.active_features.clone()
    zi = int(graph.selected_features[z])
    af[zi, 2] = tc.cfg.n_features + 7  # a feature number no graph uses
    planted = dataclasses.replace(graph, adjacency=A, active_features=af)
    d = diff_graphs(graph, planted, ("a", "b"))
    key = lambda i, feature=None: (  # noqa: E731
        "feature",
        int(graph.active_features[graph.selected_features[i], 0]),
        int(graph.active_features[graph.selected_features[i], 2]) if feature is None else feature,
        int(graph.active_features[graph.selected_features[i], 1]),  # slot = position (same prompt)
    )
    status = {c.key: c for c in d.changes}
    assert status[key(x)].status == "vanished" and status[key(x)].delta < 0
    assert status[key(z)].status == "vanished"
    assert status[key(z, tc.cfg.n_features + 7)].status == "appeared"
    assert status[key(y)].status == "changed" and status[key(y)].delta > 0
    # the biggest changes are the planted ones
    top = {c.key for c in d.changes[:4]}
    assert key(x) in top
    assert d.paths["a"] and any(p["through"] == d.changes[0].a.node_ids[0] for p in d.paths["a"])


def test_supernode_level(setup):
    from cltrace.circuits.circuit import Circuit, CircuitNode

    lm, tc, graph = setup

    def circuit(nodes):
        return Circuit(
            prompt="p",
            tokens=[],
            answer="a",
            answer_id=0,
            answer_prob=0.5,
            model="m",
            transcoder="t",
            nodes=nodes,
            edges=[],
            influence_share=0.5,
            faithfulness={},
        )

    def sn(i, ids, share):
        return CircuitNode(
            id=f"sn{i}",
            name=f"n{i}",
            kind="features",
            node_ids=ids,
            positions=[1],
            layers=(0, 1),
            evidence=[],
            influence_share=share,
        )

    ca = circuit([sn(0, ["0_3_1", "1_4_1"], 0.1), sn(1, ["2_5_1"], 0.2)])
    cb = circuit([sn(0, ["0_3_1", "1_4_1", "1_9_1"], 0.3), sn(1, ["2_8_1"], 0.2)])
    d = diff_graphs(graph, graph, ("a", "a"), circuits=(ca, cb))
    got = {(s["status"], (s["a"] or s["b"])["id"]) for s in d.supernodes}
    assert got == {("changed", "sn0"), ("vanished", "sn1"), ("appeared", "sn1")}


def test_refuses_different_transcoders_or_models(setup):
    lm, tc, graph = setup
    with pytest.raises(CltraceError, match="different transcoders"):
        diff_graphs(graph, dataclasses.replace(graph, transcoder_id="other"), ("a", "a"))
    with pytest.raises(CltraceError, match="different models"):
        diff_graphs(graph, dataclasses.replace(graph, model_name="gpt2"), ("a", "a"))


def test_prompts_of_different_length(setup):
    lm, tc, graph = setup
    other = attribute(
        lm, tc, "Fact : the capital of the big state containing Austin is", CFG, transcoder_id="run1"
    )
    d = diff_graphs(graph, other, ("a", "b"))
    changed = [s for s in d.slots if s.status == "changed"]
    assert len(changed) == 2  # "big" inserted, "Dallas" -> "Austin"
    last = d.slots[-1]
    assert last.status == "shared" and last.a == [graph.n_pos - 1] and last.b == [other.n_pos - 1]
    doc = json.loads(json.dumps(d.to_dict()))
    assert doc["a"]["tokens"][-1] == doc["b"]["tokens"][-1]
    assert doc["counts"]["appeared"] + doc["counts"]["vanished"] + doc["counts"]["changed"] > 0


def test_diff_cli(tmp_path, capsys):
    from cltrace.attribution.pipeline import trace_to_files
    from cltrace.cli import main

    lm = tiny_model("gemma")
    tc = make_transcoder(lm, "clt")
    for name, prompt in (
        ("a", PROMPT),
        ("b", PROMPT),
        ("c", "Fact : the capital of the state containing Austin is"),
    ):
        trace_to_files(lm, tc, prompt, CFG, tmp_path / f"{name}.json", transcoder_id="run1")
    out = tmp_path / "d.json"
    assert main(["diff", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(out)]) == 0
    assert "no difference" in capsys.readouterr().out
    assert (
        main(["diff", str(tmp_path / "a.json"), str(tmp_path / "c.graph.safetensors"), "--out", str(out)])
        == 0
    )
    doc = json.loads(out.read_text())
    assert doc["kind"] == "cltrace-graph-diff" and doc["version"] == 1
    assert main(["diff", str(tmp_path / "a.json"), "some prompt"]) == 2
    assert "not one of each" in capsys.readouterr().err
    assert main(["diff", str(tmp_path / "a.json"), str(tmp_path / "nope.json")]) == 2
    assert "no full graph" in capsys.readouterr().err
