"""Editable labels in the feature panel (issue 13 item 4): POST /api/feature/<l>/<i>/label saves
the user's label in a real feature store (built on a tiny model), "" restores the automatic label;
a server without a store, a read-only store and bad bodies answer with a message."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from browser import CHROMIUM, launch, open_page
from cltrace.viewer.backend import FEATURE_TYPE
from cltrace.viewer.model_backend import ModelBackend
from cltrace.viewer.server import ViewerConfig, start_in_thread
from cltrace.viewer.synthetic import SyntheticBackend, synthetic_graph
from test_viewer_api import request
from test_viewer_browser import click_node, features, open_graph

FEATURES = [(0, 2, 1), (1, 5, 2), (2, 7, 3)]  # (layer, index, position), all < 24 features


def store_graph() -> dict:
    """Embeddings -> three features -> the top logit, features the tiny store has."""
    g = synthetic_graph(40, 0, n_layers=3, seed=0, slug="labels")
    template = next(n for n in g["nodes"] if n["feature_type"] == FEATURE_TYPE)
    emb = [n for n in g["nodes"] if n["feature_type"] == "embedding"]
    logit = next(n for n in g["nodes"] if n["feature_type"] == "logit")
    feats = [
        {
            **template,
            "node_id": f"{l}_{f}_{p}",
            "feature": f,
            "layer": str(l),
            "ctx_idx": p,
            "clerp": f"graph label {l}/{f}",
            "influence": 0.2 * (k + 1),
        }
        for k, (l, f, p) in enumerate(FEATURES)
    ]
    g["nodes"] = [*emb, *feats, logit]
    g["links"] = [
        {"source": emb[p]["node_id"], "target": n["node_id"], "weight": 1.0}
        for n, (_, _, p) in zip(feats, FEATURES)
    ]
    g["links"] += [{"source": n["node_id"], "target": logit["node_id"], "weight": 0.5} for n in feats]
    return g


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    from cltrace.features.store import build_feature_store
    from test_features import CFG, documents
    from test_features_standin import make_transcoder
    from tiny import tiny_model

    lm = tiny_model("gemma")
    path = tmp_path_factory.mktemp("labels") / "features.sqlite"
    build_feature_store(
        path, lm, make_transcoder(lm, n_features=24), documents=documents(30), config=CFG, show_progress=False
    )
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    (tmp_path / "g.json").write_text(json.dumps(store_graph()))
    return tmp_path


def serve(folder: Path, backend):
    srv, _ = start_in_thread(ViewerConfig(graph_dirs=[folder], port=0), backend)
    return srv


def label_of(path: Path, layer: int, index: int) -> tuple[str, str | None]:
    from cltrace.features.store import FeatureStore

    with FeatureStore(path) as store:
        return store.label(layer, index), store.user_label(layer, index)


def test_label_saved_in_the_store_and_cleared(built, folder):
    from cltrace.features.store import FeatureStore

    auto = label_of(built, 1, 5)[0]
    store = FeatureStore(built)
    srv = serve(folder, ModelBackend(store=store))
    try:
        status, card = request(
            srv, "POST", "/api/feature/1/5/label", body={"graph": "g", "label": "  Texas cities "}
        )
        assert status == 200 and card["label"] == "Texas cities" and card["label_source"] == "user"
        assert label_of(built, 1, 5) == ("Texas cities", "Texas cities")  # on disk, another connection
        status, again = request(srv, "GET", "/api/feature/1/5?graph=g")
        assert status == 200 and again["label"] == "Texas cities"
        assert label_of(built, 0, 2)[1] is None  # only that feature
        status, card = request(srv, "POST", "/api/feature/1/5/label", body={"graph": "g", "label": ""})
        assert status == 200 and card["label_source"] == "auto" and card["label"] == auto
        assert label_of(built, 1, 5) == (auto, None)
    finally:
        srv.shutdown()
        srv.server_close()
        store.close()


def test_label_errors_are_messages(built, folder):
    from cltrace.features.store import FeatureStore

    store = FeatureStore(built)
    srv = serve(folder, ModelBackend(store=store))
    try:
        cases = [
            ("/api/feature/1/5/label", {"graph": "g", "label": "two\nlines"}, 400, "one line"),
            ("/api/feature/1/5/label", {"graph": "g", "label": "x" * 201}, 400, "at most 200"),
            ("/api/feature/1/5/label", {"graph": "g"}, 400, "label must be"),
            ("/api/feature/1/5/label", {"label": "x"}, 400, "graph must be"),
            ("/api/feature/1/24/label", {"graph": "g", "label": "x"}, 404, "24"),
            ("/api/feature/1/5/label", {"graph": "nope", "label": "x"}, 404, "nope"),
        ]
        for path, body, want, words in cases:
            status, reply = request(srv, "POST", path, body=body)
            assert status == want and words in reply["error"], (body, reply)
        assert label_of(built, 1, 5)[1] is None
    finally:
        srv.shutdown()
        srv.server_close()
        store.close()
    for backend in (None, SyntheticBackend(), ModelBackend()):  # no store at all
        srv = serve(folder, backend)
        try:
            status, reply = request(srv, "POST", "/api/feature/1/5/label", body={"graph": "g", "label": "x"})
            assert status == 501 and "cltrace serve --features DB" in reply["error"], reply
        finally:
            srv.shutdown()
            srv.server_close()


def read_only(path: Path):
    """The store opened on a read-only SQLite connection (as on a read-only file or mount)."""
    from cltrace.features.store import FeatureStore

    store = FeatureStore(path)
    store.conn.close()
    store.conn = sqlite3.connect(
        f"file:{path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None
    )
    return store


def test_read_only_store_is_a_403_and_unchanged(built, folder):
    store = read_only(built)
    srv = serve(folder, ModelBackend(store=store))
    try:
        status, reply = request(srv, "POST", "/api/feature/0/2/label", body={"graph": "g", "label": "nope"})
        assert status == 403 and "read-only" in reply["error"] and str(built) in reply["error"]
        status, card = request(srv, "GET", "/api/feature/0/2?graph=g")  # still serving dashboards
        assert status == 200 and card["label"] != "nope"
        assert label_of(built, 0, 2)[1] is None
    finally:
        srv.shutdown()
        srv.server_close()
        store.close()


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium")
def test_edit_label_in_the_panel(built, folder):
    pytest.importorskip("playwright.sync_api", reason="needs playwright for Python")
    from cltrace.features.store import FeatureStore

    auto = label_of(built, 2, 7)[0]
    store, ro = FeatureStore(built), read_only(built)
    servers = [
        serve(folder, ModelBackend(store=store)),
        serve(folder, None),
        serve(folder, ModelBackend(store=ro)),
    ]
    try:
        with launch() as browser, open_page(browser, console_errors=False) as page:
            open_graph(page, servers[0].url.rstrip("/"), "g")
            node = next(n for n in features(page) if n["id"] == "2_7_3")
            click_node(page, node)
            page.wait_for_selector("#dashboard-label")
            assert page.text_content("#dashboard-label") == auto
            page.click("#label-editor summary")
            page.fill("#label-input", "capital cities")
            page.click("#label-save")
            page.wait_for_function("document.querySelector('#label-status').textContent === 'saved'")
            assert page.text_content("#dashboard-label") == "capital cities (your label)"
            assert label_of(built, 2, 7)[1] == "capital cities"
            labels = {n["id"]: n["label"] for n in page.evaluate("window.__viewerNodes()")}
            assert labels["2_7_3"] == "capital cities"  # the graph's node follows
            page.fill("#search", "capital cit")
            page.wait_for_selector("[data-testid=search-result]")
            page.keyboard.press("Escape")
            page.click("#label-editor summary")
            page.click("#label-clear")
            page.wait_for_function(
                "document.querySelector('#label-status').textContent === 'automatic label restored'"
            )
            assert page.text_content("#dashboard-label") == auto and label_of(built, 2, 7)[1] is None
            for srv, words in ((servers[1], "cltrace serve --features DB"), (servers[2], "read-only")):
                open_graph(page, srv.url.rstrip("/"), "g")
                click_node(page, next(n for n in features(page) if n["id"] == "2_7_3"))
                page.wait_for_selector("#label-editor")
                page.click("#label-editor summary")
                page.fill("#label-input", "x")
                page.press("#label-input", "Enter")
                page.wait_for_function(
                    f"document.querySelector('#label-status').textContent.includes('{words}')"
                )
                assert page.get_attribute("#label-status", "class") == "error"
            assert page.errors == []
    finally:
        for srv in servers:
            srv.shutdown()
            srv.server_close()
        store.close()
        ro.close()


def test_store_recording_the_transcoder_folder_matches_the_run_name():
    """A store built by `cltrace features` records the transcoder folder; graphs record the run's
    name: the same run is not "another transcoder", a different run still is (409)."""
    from cltrace.viewer.backend import BackendError, GraphRef
    from cltrace.viewer.model_backend import check_same_transcoder

    class Store:
        meta = {"transcoder": "/x/runs/demo-clt/transcoder"}

    graph = lambda run: GraphRef("g", Path("g.json"), {"metadata": {"cltrace": {"transcoder": run}}})  # noqa: E731
    check_same_transcoder(Store(), graph("demo-clt"))
    check_same_transcoder(Store(), graph("/x/runs/demo-clt"))
    with pytest.raises(BackendError) as err:
        check_same_transcoder(Store(), graph("other-clt"))
    assert err.value.status == 409
