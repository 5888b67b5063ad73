"""The viewer's issue-13 routes without a browser: circuit file, saved subgraphs, compare,
the listing skipping side files, freeze attention, and `cltrace.show`."""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import pytest

from cltrace.viewer.compare import compare_graphs
from cltrace.viewer.graphs import GraphStore
from cltrace.viewer.server import ViewerConfig, start_in_thread
from cltrace.viewer.synthetic import SyntheticBackend, synthetic_circuit, synthetic_graph
from test_viewer_api import request


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("routes")
    g = synthetic_graph(60, 200, seed=1)
    (root / "a.json").write_text(json.dumps(g))
    (root / "a.circuit.json").write_text(json.dumps(synthetic_circuit(g)))
    (root / "b.json").write_text(json.dumps(synthetic_graph(60, 200, seed=2)))
    (root / "bad.json").write_text(json.dumps(g))
    (root / "bad.circuit.json").write_text("[1, 2]")
    (root / "diff-a-vs-b.json").write_text(json.dumps(DIFF_DOC))
    (root / "diff-broken.json").write_text(json.dumps({"kind": "something else"}))
    return root


# A `cltrace diff` document as docs/DIFF_FORMAT.md shows it.
DIFF_DOC = {
    "version": 1,
    "kind": "cltrace-graph-diff",
    "a": {
        "source": "a.json",
        "prompt": "Dallas is in",
        "tokens": ["Dallas", " is", " in"],
        "answer": " Texas",
    },
    "b": {
        "source": "b.json",
        "prompt": "Paris is in",
        "tokens": ["Paris", " is", " in"],
        "answer": " France",
    },
    "answer_changed": True,
    "alignment": [
        {"slot": 0, "status": "changed", "a": [0], "b": [0], "tokens_a": ["Dallas"], "tokens_b": ["Paris"]},
        {"slot": 1, "status": "shared", "a": [1], "b": [1], "tokens_a": [" is"], "tokens_b": [" is"]},
        {"slot": 2, "status": "shared", "a": [2], "b": [2], "tokens_a": [" in"], "tokens_b": [" in"]},
    ],
    "counts": {"appeared": 1, "vanished": 1, "changed": 0},
    "nodes": [
        {
            "kind": "feature",
            "layer": 3,
            "feature": 212,
            "slot": 0,
            "status": "vanished",
            "delta_influence": -0.04,
            "a": {"node_ids": ["3_212_0"], "positions": [0], "influence": 0.04, "activation": 4.1},
            "b": None,
        },
        {
            "kind": "feature",
            "layer": 2,
            "feature": 9,
            "slot": 0,
            "status": "appeared",
            "delta_influence": 0.03,
            "a": None,
            "b": {"node_ids": ["2_9_0"], "positions": [0], "influence": 0.03, "activation": 2.0},
        },
    ],
    "paths": {
        "a": [{"strength": 0.02, "through": "3_212_0", "nodes": ["E_9_0", "3_212_0", "5_70_2"]}],
        "b": [],
    },
    "supernodes": None,
    "summary": ["1 appeared, 1 vanished"],
}


@pytest.fixture(scope="module")
def srv(folder):
    server, _ = start_in_thread(ViewerConfig(graph_dirs=[folder], port=0), SyntheticBackend())
    yield server
    server.shutdown()
    server.server_close()


def test_listing_skips_circuit_and_subgraph_files(srv):
    status, body = request(srv, "GET", "/api/graphs")
    assert status == 200 and [g["name"] for g in body["graphs"]] == ["a", "b", "bad"]


def test_diff_documents_are_listed_and_served(srv):
    status, body = request(srv, "GET", "/api/diffs")
    assert status == 200
    good, broken = body["diffs"]
    assert good == {
        "name": "diff-a-vs-b",
        "a": "Dallas is in",
        "b": "Paris is in",
        "counts": DIFF_DOC["counts"],
    }
    assert broken["name"] == "diff-broken" and "not a `cltrace diff` document" in broken["error"]
    assert request(srv, "GET", "/api/diff/diff-a-vs-b") == (200, DIFF_DOC)
    assert request(srv, "GET", "/api/diff/diff-broken")[0] == 422


def test_circuit_route(srv, folder):
    status, body = request(srv, "GET", "/api/graph/a/circuit")
    assert status == 200 and body["circuit"] == json.loads((folder / "a.circuit.json").read_text())
    status, body = request(srv, "GET", "/api/graph/b/circuit")
    assert status == 200 and body["circuit"] is None and "--circuit" in body["message"]
    status, body = request(srv, "GET", "/api/graph/bad/circuit")
    assert status == 422 and "bad.circuit.json" in body["error"]
    assert request(srv, "GET", "/api/graph/a")[0] == 200  # the server keeps serving


def test_subgraphs_round_trip_and_validation(srv, folder):
    ids = [n["node_id"] for n in json.loads((folder / "b.json").read_text())["nodes"][:3]]
    item = {"name": "s", "pinnedIds": ids, "supernodes": [["g", ids[0], ids[1]]]}
    status, body = request(srv, "POST", "/api/graph/b/subgraphs", {"subgraphs": [item]})
    assert status == 200 and body["file"] == "b.subgraphs.json"
    assert request(srv, "GET", "/api/graph/b/subgraphs")[1]["subgraphs"] == [item]
    bad = {"subgraphs": [{**item, "pinnedIds": ["nope"]}]}
    status, body = request(srv, "POST", "/api/graph/b/subgraphs", bad)
    assert status == 400 and "nope" in body["error"]
    status, body = request(
        srv, "POST", "/api/graph/b/subgraphs", {"subgraphs": [{**item, "supernodes": [["x"]]}]}
    )
    assert status == 400 and "[name, node id, ...]" in body["error"]


def test_compare_identical_graphs_is_empty_and_different_ones_are_not(folder):
    store = GraphStore([folder])
    a, b = store.load("a"), store.load("b")
    same = compare_graphs(a, a, store.read_circuit(a), store.read_circuit(a))
    assert same["counts"] == {"appeared": 0, "vanished": 0, "changed": 0} and same["nodes"] == []
    assert all(s["status"] == "changed" and s["overlap"] == 1.0 for s in same["supernodes"])
    diff = compare_graphs(a, b)

    def keys(g):  # (layer, feature, slot); slot = position, as both prompts are the same
        return {
            tuple(int(x) for x in n["node_id"].split("_"))
            for n in g.data["nodes"]
            if n["feature_type"] == "cross layer transcoder"
        }

    ka, kb = keys(a), keys(b)
    by_status = {
        s: {(n["layer"], n["feature"], n["slot"]) for n in diff["nodes"] if n["status"] == s}
        for s in ("appeared", "vanished")
    }
    assert by_status["appeared"] == kb - ka and by_status["vanished"] == ka - kb
    assert diff["supernodes"] is None
    assert all(s["status"] == "shared" for s in diff["alignment"])  # same prompt


def test_compare_route_needs_two_graphs(srv):
    assert request(srv, "GET", "/api/compare?a=a")[0] == 400
    status, body = request(srv, "GET", "/api/compare?a=a&b=b")
    assert status == 200 and body["kind"] == "cltrace-viewer-compare"
    assert request(srv, "GET", "/compare")[0] == 200


def test_freeze_attention_is_validated_and_passed(srv):
    base = {
        "graph": "a",
        "interventions": [{"layer": 0, "feature": 1, "pos": None, "mode": "set", "value": 0}],
    }
    status, body = request(srv, "POST", "/api/intervene", {**base, "freeze_attention": True})
    assert status == 200 and body["freeze_attention"] is True
    status, body = request(srv, "POST", "/api/intervene", {**base, "freeze_attention": "yes"})
    assert status == 400 and "freeze_attention" in body["error"]


def test_show_serves_the_graph_without_ipython(folder):
    import cltrace

    url = cltrace.show(folder / "a.json")
    if not isinstance(url, str):  # IPython present: an IFrame
        url = url.src
    assert url.endswith("/graph/a")
    with urllib.request.urlopen(url.replace("/graph/a", "/api/graph/a/circuit"), timeout=10) as reply:
        assert json.loads(reply.read())["circuit"]["version"] == 1
    from_dict = cltrace.show(synthetic_graph(20, 40, slug="in memory"), view="graph")
    from_dict = from_dict if isinstance(from_dict, str) else from_dict.src
    assert from_dict.endswith("/graph/in-memory?view=graph")
    with urllib.request.urlopen(
        from_dict.replace("/graph/", "/api/graph/").split("?")[0], timeout=10
    ) as reply:
        assert json.loads(reply.read())["metadata"]["slug"] == "in memory"
    traced = type("TraceResult", (), {"json_path": folder / "b.json"})()
    shown = cltrace.show(traced)
    assert (shown if isinstance(shown, str) else shown.src).endswith("/graph/b")
    if "IPython" not in sys.modules:
        assert isinstance(url, str)


class _ScoredStore:
    meta = {"transcoder": "synthetic"}

    def labels_table(self, include_broad=False):
        return [{"layer": 2, "index": 7, "label": "seven", "detection": 0.8, "output": 0.3, "broad": False}]


def test_labels_route(folder):
    from cltrace.viewer.backend import GraphRef, NullBackend
    from cltrace.viewer.model_backend import ModelBackend

    graph = synthetic_graph(20, 40, seed=3)
    graph["nodes"].append(
        {
            **graph["nodes"][-1],
            "node_id": "2_7_3",
            "layer": "2",
            "feature": 7,
            "feature_type": "cross layer transcoder",
        }
    )
    ref = GraphRef("g", folder / "g.json", graph)
    assert ModelBackend(store=_ScoredStore()).labels(ref) == {
        "2_7_3": {"label": "seven", "detection": 0.8, "output": 0.3, "broad": False}
    }
    server, _ = start_in_thread(ViewerConfig(graph_dirs=[folder], port=0), NullBackend())
    try:
        status, body = request(server, "GET", "/api/graph/a/labels")
        assert status == 200 and body["labels"] == {} and "--features" in body["message"]
    finally:
        server.shutdown()
        server.server_close()
