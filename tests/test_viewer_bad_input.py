"""The viewer under bad input: odd file names, deeply nested JSON, out-of-range interventions
and handler bugs all get a JSON reply; one bad graph never hides the good ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cltrace.viewer.api import ViewerApp
from cltrace.viewer.backend import NullBackend
from cltrace.viewer.graphs import GraphStore
from cltrace.viewer.synthetic import SyntheticBackend, synthetic_graph
from test_viewer_api import _serve, request

DEEP = 100_000  # far past Python's recursion limit


@pytest.fixture()
def odd_dir(tmp_path) -> Path:
    folder = tmp_path / "graphs"
    folder.mkdir()
    (folder / "good.json").write_text(json.dumps(synthetic_graph(seed=1)))
    (folder / "my graph (1).json").write_text(json.dumps(synthetic_graph(seed=2)))
    (folder / "bad#name.json").write_text(json.dumps(synthetic_graph(seed=3)))
    (folder / "deep.json").write_text("[" * DEEP + "]" * DEEP)
    return folder


def test_listing_survives_odd_names_and_deep_json(odd_dir):
    srv = _serve(odd_dir, NullBackend())
    try:
        status, reply = request(srv, "GET", "/api/graphs")
        assert status == 200
        by_name = {g["name"]: g for g in reply["graphs"]}
        assert set(by_name) == {"good", "my graph (1)", "bad#name", "deep"}
        assert by_name["good"]["error"] is None and by_name["good"]["n_nodes"] > 0
        assert by_name["my graph (1)"]["error"] is None  # a browser's copy name is fine
        assert "rename the file" in by_name["bad#name"]["error"]
        assert "nested too deeply" in by_name["deep"]["error"]
        status, graph = request(srv, "GET", "/api/graph/my%20graph%20%281%29")
        assert status == 200 and graph["metadata"] == synthetic_graph(seed=2)["metadata"]
        status, reply = request(srv, "GET", "/api/graph/deep")
        assert status == 422 and "nested too deeply" in reply["error"]
    finally:
        srv.shutdown()
        srv.server_close()


def test_deeply_nested_body_is_a_400(odd_dir):
    srv = _serve(odd_dir, SyntheticBackend())
    try:
        body = b'{"graph": "good", "interventions": ' + b"[" * DEEP + b"]" * DEEP + b"}"
        status, reply = request(srv, "POST", "/api/intervene", body=body)
        assert status == 400 and "nested too deeply" in reply["error"]
        status, _ = request(srv, "GET", "/api/graphs")  # still serving
        assert status == 200
    finally:
        srv.shutdown()
        srv.server_close()


class _Broken(SyntheticBackend):
    def feature(self, graph, layer, index):
        raise ZeroDivisionError("a bug")


def test_a_handler_bug_is_a_json_500_not_a_dropped_connection(odd_dir):
    srv = _serve(odd_dir, _Broken())
    try:
        status, reply = request(srv, "GET", "/api/feature/1/2?graph=good")
        assert status == 500 and "ZeroDivisionError: a bug" in reply["error"]
        assert request(srv, "GET", "/api/graphs")[0] == 200
    finally:
        srv.shutdown()
        srv.server_close()
    app = ViewerApp(GraphStore([odd_dir]), _Broken())
    assert app.handle("GET", "/api/feature/1/2", {"graph": ["good"]}).status == 500


@pytest.fixture(scope="module")
def steered_graph_dir(tmp_path_factory):
    """A graph whose prompt a tiny model with a 24-feature transcoder can re-run."""
    from cltrace.interventions.steer import Steerer
    from cltrace.viewer.model_backend import ModelBackend
    from test_features_standin import make_transcoder
    from tiny import tiny_model

    lm = tiny_model("llama")
    steerer = Steerer(lm, make_transcoder(lm, n_features=24, kind="clt"))
    folder = tmp_path_factory.mktemp("steer") / "graphs"
    folder.mkdir()
    graph = synthetic_graph(seed=1)
    graph["metadata"]["prompt"] = "the capital of Texas is"
    graph["metadata"]["prompt_tokens"] = ["<bos>", "the", "capital", "of", "Texas", "is"]
    (folder / "g.json").write_text(json.dumps(graph))
    return folder, ModelBackend(steerer=steerer), lm.n_layers


@pytest.mark.parametrize(
    "layer, feature, expected",
    [(99, 0, "layers are 0-2"), (1, 24, "features 0-23"), (2, 10_000, "features 0-23")],
)
def test_intervene_out_of_range_is_a_400_with_the_valid_ranges(steered_graph_dir, layer, feature, expected):
    folder, backend, n_layers = steered_graph_dir
    assert n_layers == 3
    srv = _serve(folder, backend)
    try:
        body = {
            "graph": "g",
            "generate": 0,
            "interventions": [{"layer": layer, "feature": feature, "pos": None, "mode": "set", "value": 1.0}],
        }
        status, reply = request(srv, "POST", "/api/intervene", body=body)
        assert status == 400 and expected in reply["error"], reply
        body["interventions"][0].update(layer=1, feature=23)  # the edge of the range works
        status, reply = request(srv, "POST", "/api/intervene", body=body)
        assert status == 200 and reply["after"]
    finally:
        srv.shutdown()
        srv.server_close()
