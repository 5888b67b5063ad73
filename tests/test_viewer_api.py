"""The viewer's HTTP API: listing, serving, path safety, body validation, back-end errors.

A real server runs on a free port in a thread; requests go through http.client so paths
reach the server exactly as written (no client-side normalisation).
"""

from __future__ import annotations

import http.client
import json
import os
from pathlib import Path

import pytest

from cltrace.viewer.backend import NullBackend, suggest_by_shared_target
from cltrace.viewer.server import ViewerConfig, start_in_thread
from cltrace.viewer.synthetic import SyntheticBackend, synthetic_graph
from shared_files import shared_file


@pytest.fixture(scope="module")
def graph_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("viewer")
    folder = root / "graphs"
    (folder / "sub").mkdir(parents=True)
    (folder / "good.json").write_text(json.dumps(synthetic_graph(seed=1)))
    (folder / "sub" / "nested.json").write_text(json.dumps(synthetic_graph(30, 60, seed=2)))
    (folder / "broken.json").write_text("{ not json")
    (folder / "wrong.json").write_text(json.dumps({"metadata": {}, "nodes": 3, "links": []}))
    (root / "secret.json").write_text(json.dumps(synthetic_graph(seed=3, slug="secret")))
    os.symlink(root / "secret.json", folder / "escape.json")
    return folder


def _serve(folder: Path, backend):
    server, thread = start_in_thread(ViewerConfig(graph_dirs=[folder], port=0), backend)
    return server


@pytest.fixture(scope="module")
def server(graph_dir):
    srv = _serve(graph_dir, NullBackend())
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def fake_server(graph_dir):
    srv = _serve(graph_dir, SyntheticBackend())
    yield srv
    srv.shutdown()
    srv.server_close()


def request(srv, method: str, path: str, body=None, content_type="application/json", headers=None):
    """(status, parsed JSON or raw bytes) for one request sent verbatim."""
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=10)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    hdrs = dict(headers or {})
    if data is not None:
        hdrs.setdefault("Content-Type", content_type)
    conn.request(method, path, body=data, headers=hdrs)
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    if resp.getheader("Content-Type", "").startswith("application/json"):
        return resp.status, json.loads(raw)
    return resp.status, raw


def test_synthetic_graph_matches_schema():
    """Against cltrace's restatement of Neuronpedia's schema and the published file
    (shared/interop; fails under CI when it is missing)."""
    jsonschema = pytest.importorskip("jsonschema")
    from cltrace.attribution.export import NEURONPEDIA_GRAPH_SCHEMA

    jsonschema.validate(synthetic_graph(), NEURONPEDIA_GRAPH_SCHEMA)
    schema = shared_file("interop/neuronpedia-graph-schema.json")
    jsonschema.validate(synthetic_graph(), json.loads(schema.read_text()))


def test_list_graphs(server):
    status, body = request(server, "GET", "/api/graphs")
    assert status == 200
    by_name = {g["name"]: g for g in body["graphs"]}
    assert {"good", "sub/nested", "broken", "wrong"} <= by_name.keys()
    assert "escape" not in by_name  # symlink out of the folder is not listed
    good = synthetic_graph(seed=1)
    assert by_name["good"]["n_nodes"] == len(good["nodes"])
    assert by_name["good"]["n_links"] == len(good["links"])
    assert by_name["good"]["prompt"] == good["metadata"]["prompt"]
    assert by_name["broken"]["error"] and by_name["broken"]["n_nodes"] is None


def test_get_graph_and_pages(server):
    status, body = request(server, "GET", "/api/graph/good")
    assert status == 200 and body == synthetic_graph(seed=1)
    assert request(server, "GET", "/api/graph/sub/nested")[0] == 200
    status, page = request(server, "GET", "/graph/good")
    assert status == 200 and b"graph.js" in page
    status, page = request(server, "GET", "/")
    assert status == 200 and b"index.js" in page
    assert request(server, "GET", "/static/graph.js")[0] == 200


@pytest.mark.parametrize(
    "path",
    [
        "/api/graph/..%2F..%2Fetc%2Fpasswd",
        "/api/graph/../../etc/passwd",
        "/api/graph/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/api/graph/..%252F..%252Fetc%252Fpasswd",
        "/api/graph/%2Fetc%2Fpasswd",
        "/api/graph//etc/passwd",
        "/api/graph/sub%5C..%5C..%5Csecret",
        "/api/graph/..",
        "/api/graph/escape",
        "/api/graph/secret",
        "/api/graph/good%00",
        "/graph/..%2F..%2Fetc%2Fpasswd",
        "/static/..%2Fbackend.py",
        "/static/../api.py",
        "/api/graph/..%2Fsecret/supernodes",
        "/api/feature/0/1?graph=..%2Fsecret",
    ],
)
def test_path_traversal_is_refused(server, path):
    status, body = request(server, "GET", path)
    assert status in (400, 404), (path, status)
    assert isinstance(body, dict) and body["error"]


def test_malformed_graph_is_a_json_error(server):
    for name in ("broken", "wrong"):
        status, body = request(server, "GET", f"/api/graph/{name}")
        assert status == 422 and name in body["error"]
    # the page itself still loads and shows the error from the API
    assert request(server, "GET", "/graph/broken")[0] == 200
    assert request(server, "GET", "/api/graphs")[0] == 200  # server still alive


def test_unknown_routes(server):
    assert request(server, "GET", "/nope")[0] == 404
    assert request(server, "GET", "/api/graph/missing")[0] == 404
    assert request(server, "GET", "/graph/missing")[0] == 404
    assert request(server, "POST", "/api/graphs", body={})[0] == 405


def test_feature_null_backend(server):
    node = next(n for n in synthetic_graph(seed=1)["nodes"] if n["feature_type"] == "cross layer transcoder")
    layer, index = int(node["layer"]), int(node["node_id"].split("_")[1])
    status, card = request(server, "GET", f"/api/feature/{layer}/{index}?graph=good")
    assert status == 200 and card["layer"] == layer and card["index"] == index
    assert "no feature store" in card["message"]
    assert request(server, "GET", f"/api/feature/{layer}/{index}")[0] == 400
    assert request(server, "GET", "/api/feature/-1/2?graph=good")[0] == 404


def test_feature_fake_backend(fake_server):
    status, card = request(fake_server, "GET", "/api/feature/2/17?graph=good")
    assert status == 200 and card["label"] == "fake feature 2/17" and len(card["contexts"]) == 3


GOOD_INTERVENTION = {
    "graph": "good",
    "generate": 3,
    "interventions": [{"layer": 1, "feature": 5, "pos": 2, "mode": "scale", "value": 0}],
}


def test_intervene_null_backend_is_501(server):
    status, body = request(server, "POST", "/api/intervene", body=GOOD_INTERVENTION)
    assert status == 501 and "--transcoder" in body["error"]


def test_intervene_fake_backend(fake_server):
    status, body = request(fake_server, "POST", "/api/intervene", body=GOOD_INTERVENTION)
    assert status == 200 and body["before"] and body["after"]
    assert body["continuation"] == "and then the"


def _with(**change):
    item = {**GOOD_INTERVENTION["interventions"][0], **change}
    return {**GOOD_INTERVENTION, "interventions": [item]}


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        {},
        {"graph": "good", "interventions": []},
        {"graph": "good", "interventions": "x"},
        {"graph": 3, "interventions": GOOD_INTERVENTION["interventions"]},
        {**GOOD_INTERVENTION, "generate": -1},
        {**GOOD_INTERVENTION, "generate": 10_000},
        {**GOOD_INTERVENTION, "interventions": GOOD_INTERVENTION["interventions"] * 1000},
        _with(mode="add"),
        _with(value="big"),
        _with(value=1e12),
        _with(value=True),
        _with(layer=-1),
        _with(layer="1"),
        _with(feature=1.5),
        _with(pos=99),
        _with(pos=-1),
        {**GOOD_INTERVENTION, "graph": "../secret"},
    ],
)
def test_intervene_bad_bodies(fake_server, body):
    status, reply = request(fake_server, "POST", "/api/intervene", body=body)
    assert status == 400, reply
    assert reply["error"]


def test_post_needs_json_and_bounded_size(fake_server):
    body = json.dumps(GOOD_INTERVENTION).encode()
    as_text = request(fake_server, "POST", "/api/intervene", body=body, content_type="text/plain")
    assert as_text[0] == 415
    # announce an oversized body: the server answers before reading it
    too_long = {"Content-Length": str(2 << 20)}
    assert request(fake_server, "POST", "/api/intervene", body=b"{}", headers=too_long)[0] == 413


def test_foreign_host_header_is_refused(server):
    assert request(server, "GET", "/api/graphs", headers={"Host": "evil.example:8765"})[0] == 403


def test_supernodes_round_trip(server, graph_dir):
    ids = [n["node_id"] for n in synthetic_graph(seed=1)["nodes"][:3]]
    groups = {"supernodes": [{"name": "my group", "node_ids": ids}]}
    status, reply = request(server, "POST", "/api/graph/good/supernodes", body=groups)
    assert status == 200 and reply["saved"] == 1
    assert (graph_dir / "good.supernodes.json").is_file()
    status, saved = request(server, "GET", "/api/graph/good/supernodes")
    assert saved == {"supernodes": groups["supernodes"], "source": "sidecar"}
    listed = {g["name"] for g in request(server, "GET", "/api/graphs")[1]["graphs"]}
    assert "good.supernodes" not in listed


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"supernodes": "x"},
        {"supernodes": [{"name": "", "node_ids": ["E_100_0"]}]},
        {"supernodes": [{"name": "a", "node_ids": []}]},
        {"supernodes": [{"name": "a", "node_ids": ["not-a-node"]}]},
        {"supernodes": [{"name": "a" * 500, "node_ids": ["E_100_0"]}]},
        {"supernodes": [{"name": "a", "node_ids": [1]}]},
    ],
)
def test_supernodes_bad_bodies(server, body):
    assert request(server, "POST", "/api/graph/good/supernodes", body=body)[0] == 400


def test_suggest_groups_share_a_target(server):
    status, body = request(server, "GET", "/api/graph/good/supernodes/suggest")
    assert status == 200
    graph = synthetic_graph(seed=1)
    nodes = {n["node_id"]: n for n in graph["nodes"]}
    assert body["suggestions"] == suggest_by_shared_target(graph)
    for group in body["suggestions"]:
        assert len(group["node_ids"]) > 1
        assert len({nodes[i]["layer"] for i in group["node_ids"]}) == 1


def test_suggest_by_shared_target_ground_truth():
    def feat(layer, f):
        return {"node_id": f"{layer}_{f}_0", "layer": str(layer), "feature_type": "cross layer transcoder"}

    graph = {
        "nodes": [feat(0, 1), feat(0, 2), feat(0, 3), feat(1, 4), feat(1, 5)],
        "links": [
            {"source": "0_1_0", "target": "1_4_0", "weight": 2.0},
            {"source": "0_2_0", "target": "1_4_0", "weight": -3.0},
            {"source": "0_2_0", "target": "1_5_0", "weight": 1.0},
            {"source": "0_3_0", "target": "1_5_0", "weight": 1.0},
        ],
    }
    expected = [{"name": "L0 → 1_4_0", "node_ids": ["0_1_0", "0_2_0"]}]
    assert suggest_by_shared_target(graph) == expected


def test_serve_command_registers():
    from cltrace.cli import build_parser

    args = build_parser().parse_args(["serve", "--graphs", "a", "--graphs", "b", "--port", "0"])
    assert args.graphs == ["a", "b"] and args.port == 0 and args.host == "127.0.0.1"
    assert args.func.__module__ == "cltrace.commands.serve"


class _Store:
    def dashboard(self, layer, index):
        if index > 100:
            from cltrace.errors import CltraceError

            raise CltraceError(f"no feature L{layer}:{index} in this store")
        return {"layer": layer, "index": index, "label": "from store"}


class _Result:
    def __init__(self, payload):
        self.payload = payload

    def to_dict(self):
        return self.payload


class _Steerer:
    def __init__(self):
        self.calls = []

    def run(self, prompt, interventions, *, top_k, generate):
        self.calls.append((prompt, interventions, top_k, generate))
        return _Result(
            {
                "before": [{"token": "a", "prob": 0.5}],
                "after": [{"token": "b", "prob": 0.6}],
                "continuation": "x",
            }
        )


def test_model_backend_maps_requests(graph_dir):
    pytest.importorskip("torch")
    from cltrace.viewer.model_backend import ModelBackend

    steerer = _Steerer()
    srv = _serve(graph_dir, ModelBackend(store=_Store(), steerer=steerer))
    try:
        status, card = request(srv, "GET", "/api/feature/3/7?graph=good")
        assert status == 200 and card["label"] == "from store"
        assert request(srv, "GET", "/api/feature/3/700?graph=good")[0] == 404
        body = {
            **GOOD_INTERVENTION,
            "interventions": [
                {"layer": 1, "feature": 5, "pos": 2, "mode": "scale", "value": 0},
                {"layer": 2, "feature": 9, "pos": None, "mode": "set", "value": 3.5},
            ],
        }
        status, reply = request(srv, "POST", "/api/intervene", body=body)
        assert status == 200 and reply["after"][0]["token"] == "b"
        prompt, ivs, _, generate = steerer.calls[0]
        assert prompt == synthetic_graph(seed=1)["metadata"]["prompt"] and generate == 3
        assert [(i.layer, i.feature, i.positions, i.mode, i.value) for i in ivs] == [
            (1, 5, (2,), "scale", 0.0),
            (2, 9, None, "set", 3.5),
        ]
    finally:
        srv.shutdown()
        srv.server_close()


def test_make_backend_without_stores_is_null():
    from argparse import Namespace

    from cltrace.errors import CltraceError
    from cltrace.viewer.backend import make_backend

    assert isinstance(make_backend(Namespace(model=None, transcoder=None, features=None)), NullBackend)
    with pytest.raises(CltraceError):
        make_backend(Namespace(model="m", transcoder=None, features=None))
