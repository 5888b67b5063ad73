"""The viewer's issue-13 views in headless Chromium: circuit first, zoom/pan/search/paths,
pinned subgraph (scores, save/load, Neuronpedia qParams), feature panel, interventions on
pins, compare, state in the URL, and bad input shown in the page.

Same set-up as tests/test_viewer_browser.py (Debian's /usr/bin/chromium, Playwright for
Python, the deterministic SyntheticBackend).
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from browser import CHROMIUM, serving
from cltrace.viewer.model_backend import ModelBackend
from cltrace.viewer.server import ViewerConfig, start_in_thread
from cltrace.viewer.synthetic import SyntheticBackend, synthetic_circuit, synthetic_graph
from shared_files import shared_file
from test_viewer_browser import click_node, count, features, open_graph

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium"),
]
# the browser and page fixtures: tests/conftest.py (tests/browser.py)
pytest.importorskip("playwright.sync_api", reason="needs playwright for Python")


def tiny_graph() -> dict:
    """emb -> f (w 1) -> logit (w 1), err -> logit (w 1), p(logit) = 1: scores by hand.

    All nodes: Â[logit] = (f .5, err .5); I(f) = I(err) = .5, I(emb) = .5 -> replacement .5;
    completeness = (.5·1 + .5 + .5 + .5) / (1 + .5 + .5 + .5) = .8.
    Without f (folded into the errors): I(emb) = 0 -> replacement 0; completeness = 1 / 2.
    """
    g = synthetic_graph(12, 0, n_layers=1, seed=0, slug="tiny")
    emb, logit = g["nodes"][0], next(n for n in g["nodes"] if n["feature_type"] == "logit")
    logit["token_prob"] = 1.0
    feat = {
        **g["nodes"][-1],
        "node_id": "0_7_0",
        "layer": "0",
        "ctx_idx": 0,
        "clerp": "tiny feature",
        "feature_type": "cross layer transcoder",
        "influence": 0.5,
    }
    err = {**feat, "node_id": "err_0_0", "feature_type": "mlp reconstruction error", "clerp": ""}
    g["nodes"] = [emb, feat, err, logit]
    g["links"] = [
        {"source": emb["node_id"], "target": "0_7_0", "weight": 1.0},
        {"source": "0_7_0", "target": logit["node_id"], "weight": 1.0},
        {"source": "err_0_0", "target": logit["node_id"], "weight": 1.0},
    ]
    return g


@pytest.fixture(scope="module")
def graph_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("graphs")
    demo = synthetic_graph(120, 600, seed=4)
    (folder / "demo.json").write_text(json.dumps(demo))
    (folder / "circ.json").write_text(json.dumps(demo))
    (folder / "circ.circuit.json").write_text(json.dumps(synthetic_circuit(demo)))
    (folder / "other.json").write_text(json.dumps(synthetic_graph(120, 600, seed=5)))
    (folder / "badcirc.json").write_text(json.dumps(demo))
    (folder / "badcirc.circuit.json").write_text('{"supernodes": [')
    (folder / "tiny.json").write_text(json.dumps(tiny_graph()))
    traced = synthetic_graph(60, 200, seed=6, slug="traced")
    traced["metadata"]["cltrace"] = {"transcoder": "run-b"}
    (folder / "traced.json").write_text(json.dumps(traced))
    return folder


def _start(folder, backend):
    server, _ = start_in_thread(ViewerConfig(graph_dirs=[folder], port=0), backend)
    return server


@pytest.fixture(scope="module")
def base_url(graph_dir):
    with serving(graph_dir, SyntheticBackend()) as url:
        yield url


def state(page) -> dict:
    return page.evaluate("window.__viewerState()")


def units(page) -> int:
    return page.locator("[data-testid=unit]").count()


# -- 1. circuit first ------------------------------------------------------------------------
def test_opens_on_circuit_and_expands(page, base_url, graph_dir):
    circuit = json.loads((graph_dir / "circ.circuit.json").read_text())
    open_graph(page, base_url, "circ")
    assert state(page)["mode"] == "circuit"
    assert units(page) == len(circuit["supernodes"])
    failed = page.locator("g.unit.failed")
    assert failed.count() == 1 and "group 1" in failed.text_content()
    assert "pred" in page.locator("g.unit[data-unit=sn0]").text_content()
    assert "not validated" in page.locator("g.unit[data-unit=sn2]").text_content()
    widths = {
        float(w)
        for w in page.eval_on_selector_all(
            "svg line.edge", "ls => ls.map(l => l.getAttribute('stroke-width'))"
        )
    }
    assert len(widths) > 3  # width by weight
    signs = page.eval_on_selector_all("svg line.edge", "ls => ls.map(l => l.classList.contains('pos'))")
    assert any(signs) and not all(signs)  # colour by sign
    n_members = len(circuit["supernodes"][[s["id"] for s in circuit["supernodes"]].index("sn0")]["node_ids"])
    before = units(page)
    page.click("g.unit[data-unit=sn0]")
    page.wait_for_function(
        f"document.querySelectorAll('[data-testid=unit]').length === {before - 1 + n_members}"
    )
    member = circuit["supernodes"][[s["id"] for s in circuit["supernodes"]].index("sn0")]["node_ids"][0]
    page.click(f"g.unit[data-unit='{member}']")
    page.wait_for_selector("#dashboard-label")
    page.click("#tab-graph")
    assert state(page)["mode"] == "graph" and page.is_visible("#overlay-canvas")
    assert count(page, "node-count") > 0
    assert page.errors == []


def test_bad_circuit_file_is_a_notice(page, base_url):
    open_graph(page, base_url, "badcirc")
    assert state(page)["mode"] == "graph"
    assert "circuit not shown" in page.text_content("#notice-box")
    assert page.is_hidden("#tab-circuit")


# -- 2. navigation -------------------------------------------------------------------------------
def test_zoom_pan_fit_labels(page, base_url):
    open_graph(page, base_url)
    assert state(page)["labels"] > 0
    node = features(page)[0]
    box = page.locator("#overlay-canvas").bounding_box()
    page.mouse.move(box["x"] + node["x"], box["y"] + node["y"])
    page.mouse.wheel(0, -400)
    page.wait_for_function("window.__viewerState().tf.k > 1.5")
    moved = next(n for n in features(page) if n["id"] == node["id"])
    assert abs(moved["x"] - node["x"]) < 1 and abs(moved["y"] - node["y"]) < 1  # zoom about the cursor
    other = features(page)[5]
    x0 = state(page)["tf"]["x"]
    page.mouse.move(box["x"] + 300, box["y"] + 300)
    page.mouse.down()
    page.mouse.move(box["x"] + 360, box["y"] + 340, steps=4)
    page.mouse.up()
    tf = state(page)["tf"]
    assert tf["x"] == pytest.approx(x0 + 60) and other["x"] != features(page)[5]["x"]
    page.click("#fit")
    page.wait_for_function("Math.abs(window.__viewerState().tf.k - 1) < 0.3")
    assert page.errors == []


def test_search_and_paths(page, base_url):
    open_graph(page, base_url)
    node = features(page)[3]
    layer, index, _ = node["id"].split("_")
    page.fill("#search", f"L{layer}:{index}")
    page.wait_for_selector("[data-testid=search-result]")
    page.press("#search", "Enter")
    page.wait_for_function(f"window.__viewerState().clicked === '{node['id']}'")
    page.wait_for_selector("#dashboard-label")
    page.fill("#path-threshold", "0")
    page.dispatch_event("#path-threshold", "input")
    all_paths = state(page)["paths"]
    assert all_paths > 0
    page.fill("#path-threshold", "0.5")
    page.dispatch_event("#path-threshold", "input")
    assert state(page)["paths"] < all_paths
    page.fill("#search", "Dallas")
    page.wait_for_function("window.__viewerState().matches > 0")
    page.fill("#search", "zzz-no-such-thing")
    page.wait_for_function("window.__viewerState().matches === 0")
    assert page.errors == []


# -- 3. pinned subgraph ----------------------------------------------------------------------
def test_pin_group_save_reload(page, base_url, graph_dir):
    open_graph(page, base_url)
    first, second = features(page)[:2]
    page.keyboard.down("Control")
    click_node(page, first)
    page.keyboard.up("Control")
    assert state(page)["pinned"] == [first["id"]]
    click_node(page, second)
    page.wait_for_selector("#pin-node")
    page.click("#pin-node")
    assert state(page)["pinned"] == [first["id"], second["id"]]
    page.click("#tab-subgraph")
    page.wait_for_selector("[data-testid=subgraph-svg]")
    assert units(page) == 2
    assert "replacement" in page.text_content("#subgraph-scores")
    page.click("#selection-clear")
    page.click(f"g.unit[data-unit='{first['id']}']", modifiers=["Shift"])
    page.click(f"g.unit[data-unit='{second['id']}']", modifiers=["Shift"])
    page.fill("#pin-group-name", "both")
    page.click("#pin-group")
    assert units(page) == 1 and "both" in page.text_content("[data-testid=subgraph-svg]")
    page.fill("#subgraph-name", "mine")
    page.click("#subgraph-save")
    page.wait_for_function("document.querySelector('#pin-status').textContent.startsWith('saved')")
    saved = json.loads((graph_dir / "demo.subgraphs.json").read_text())["subgraphs"]
    assert saved == [
        {
            "name": "mine",
            "pinnedIds": [first["id"], second["id"]],
            "supernodes": [["both", first["id"], second["id"]]],
        }
    ]
    page.goto(f"{base_url}/graph/demo?view=graph")
    page.wait_for_function("window.__viewerReady === true")
    assert state(page)["pinned"] == []
    page.wait_for_selector("[data-testid=saved-subgraph] button")
    page.click("[data-testid=saved-subgraph] button")
    assert state(page)["pinned"] == [first["id"], second["id"]]
    assert state(page)["groups"] == [["both", first["id"], second["id"]]]
    assert page.errors == []


def test_subgraph_scores_match_hand_values(page, base_url):
    open_graph(page, base_url, "tiny")
    scores = page.evaluate("""async () => {
      const { graphScores } = await import('/static/scores.js');
      const { buildModel } = await import('/static/model.js');
      const json = await (await fetch('/api/graph/tiny')).json();
      const m = buildModel(json);
      const noFeatures = new Set(m.nodes.filter(n => n.type !== 'feature').map(n => n.id));
      return [graphScores(m), graphScores(m, noFeatures)];
    }""")
    assert scores[0] == {"replacement": pytest.approx(0.5), "completeness": pytest.approx(0.8)}
    assert scores[1] == {"replacement": pytest.approx(0.0), "completeness": pytest.approx(0.5)}
    page.click("#qparams summary")
    page.fill("#qparams-text", json.dumps({"pinnedIds": ["0_7_0"]}))
    page.click("#qparams-import")
    assert page.text_content("#subgraph-scores") == "replacement 0.500 · completeness 0.800"


def test_qparams_export_validates_and_imports(page, base_url, graph_dir):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(shared_file("interop/neuronpedia-graph-schema.json").read_text())
    open_graph(page, base_url)
    ids = [n["id"] for n in features(page)[:3]]
    url = (
        f"https://www.neuronpedia.org/gemma-2-2b/graph?slug=x&pinnedIds={','.join(ids)}"
        f"&supernodes={json.dumps([['say Austin', ids[0], ids[1]]])}"
    )
    page.click("#qparams summary")
    page.fill("#qparams-text", url)
    page.click("#qparams-import")
    assert state(page)["pinned"] == ids and state(page)["groups"] == [["say Austin", ids[0], ids[1]]]
    page.click("#qparams-export")
    q = json.loads(page.input_value("#qparams-text"))
    assert q["pinnedIds"] == ids and q["supernodes"] == [["say Austin", ids[0], ids[1]]]
    doc = json.loads((graph_dir / "demo.json").read_text())
    doc["qParams"] = {**doc["qParams"], **q}
    jsonschema.validate(doc, schema)
    page.fill("#qparams-text", '{"pinnedIds": [1, 2]}')
    page.click("#qparams-import")
    assert "pinnedIds must be a list" in page.text_content("#pin-status")
    assert state(page)["pinned"] == ids  # a bad import changes nothing


# -- 4. feature panel ------------------------------------------------------------------------
def test_feature_panel_scores_and_connections(page, base_url):
    open_graph(page, base_url)
    node = next(n for n in features(page) if n["n_in"] and n["n_out"])
    click_node(page, node)
    page.wait_for_selector("#dashboard-score")
    assert page.text_content("#dashboard-score") == "label score: detection 0.91 · output 0.50"
    assert "reads: Dallas" in page.text_content("#dashboard-label-parts")
    assert page.locator("#dashboard-quantiles details").count() == 2
    assert "density 1.23%" in page.text_content("#dashboard")
    links = page.locator("#inputs-list a.node-link, #outputs-list a.node-link")
    assert links.count() > 0
    target = links.first.get_attribute("title")
    links.first.click()
    page.wait_for_function(f"window.__viewerState().clicked === '{target}'")
    assert page.errors == []


# -- 5. interventions ------------------------------------------------------------------------
def test_intervention_on_pins_with_freeze(page, base_url):
    open_graph(page, base_url)
    ids = [n["id"] for n in features(page)[:2]]
    page.click("#qparams summary")
    page.fill("#qparams-text", json.dumps({"pinnedIds": ids}))
    page.click("#qparams-import")
    page.check("input[name=intervene-on][value=pinned]")
    page.wait_for_function(
        "document.querySelector('#intervene-targets').textContent === '2 feature(s) will be steered'"
    )
    page.check("#intervene-freeze")
    with page.expect_request("**/api/intervene") as req:
        page.click("#intervene-ablate")
    body = json.loads(req.value.post_data)
    assert body["freeze_attention"] is True
    assert [(i["mode"], i["value"]) for i in body["interventions"]] == [("set", 0), ("set", 0)]
    page.wait_for_selector("[data-testid=intervene-history-item]")
    page.fill("#intervene-value", "4")
    page.select_option("#intervene-mode", "set")
    page.click("#intervene-run")
    page.wait_for_function("document.querySelectorAll('[data-testid=intervene-history-item]').length === 2")
    items = page.locator("[data-testid=intervene-history-item]").all_text_contents()
    assert "set to 4" in items[0] and "ablate" in items[1] and "frozen attention" in items[1]
    assert page.locator("[data-testid=intervene-row]").count() == 5


def test_intervention_without_model_is_a_message(page, graph_dir):
    server = _start(graph_dir, None)  # NullBackend: no model
    try:
        open_graph(page, server.url.rstrip("/"))
        click_node(page, features(page)[0])
        page.click("#intervene-run")
        page.wait_for_function("document.querySelector('#intervene-error').textContent.length > 0")
        assert "interventions need a loaded model" in page.text_content("#intervene-error")
        click_node(page, features(page)[1])  # the page (and server) keep working
        page.wait_for_selector("#dashboard-message")
    finally:
        server.shutdown()
        server.server_close()


class _OtherStore:
    meta = {"transcoder": "run-a"}

    def dashboard(self, layer, index):
        return {"layer": layer, "index": index, "label": "should not be shown"}


def test_store_from_another_transcoder_is_a_message(page, graph_dir):
    server = _start(graph_dir, ModelBackend(store=_OtherStore()))
    try:
        open_graph(page, server.url.rstrip("/"), "traced")
        click_node(page, features(page)[0])
        page.wait_for_selector("#dashboard-error")
        text = page.text_content("#dashboard-error")
        assert "run-a" in text and "run-b" in text
    finally:
        server.shutdown()
        server.server_close()


# -- 6. compare ------------------------------------------------------------------------------
def test_compare_difference_diff_file_and_side_by_side(page, base_url, graph_dir):
    page.goto(f"{base_url}/compare?a=demo&b=other")
    page.wait_for_function("window.__compareReady === true")
    rows = page.locator("[data-testid=compare-row]")
    assert rows.count() > 0
    assert "appeared" in page.text_content("#compare-counts")
    page.goto(f"{base_url}/compare?a=demo&b=circ")
    page.wait_for_function("window.__compareReady === true")
    assert "0 appeared · 0 vanished · 0 changed" == page.text_content("#compare-counts")
    from test_viewer_routes import DIFF_DOC

    (graph_dir / "diff-x.json").write_text(json.dumps(DIFF_DOC))
    page.goto(f"{base_url}/compare?mode=file&file=diff-x")
    page.wait_for_function("window.__compareReady === true")
    assert page.text_content("#compare-counts") == "1 appeared · 1 vanished · 0 changed · the answer changed"
    assert page.locator("[data-testid=compare-row]").count() == 2
    assert "E_9_0 → 3_212_0 → 5_70_2" in page.text_content("#compare-paths")
    assert page.text_content("#compare-delta") == "Δ influence"
    page.check("input[name=compare-mode][value=side]")
    page.wait_for_function("document.querySelector('#frame-b').src.endsWith('/graph/circ')")
    assert page.is_visible("#frame-a")


# -- 7. URL state ----------------------------------------------------------------------------
def test_state_in_url_reopens(page, base_url):
    open_graph(page, base_url)
    first, second = features(page)[:2]
    page.keyboard.down("Control")
    click_node(page, first)
    page.keyboard.up("Control")
    click_node(page, second)
    page.wait_for_function("location.search.includes('clickedId')")
    query = parse_qs(urlsplit(page.url).query)
    assert query["pinnedIds"] == [first["id"]] and query["clickedId"] == [second["id"]]
    page.goto(page.url)
    page.wait_for_function("window.__viewerReady === true")
    assert state(page)["pinned"] == [first["id"]] and state(page)["clicked"] == second["id"]
    page.wait_for_selector("#dashboard-label")
    page.goto(f"{base_url}/graph/circ?view=subgraph&pinnedIds={first['id']}")
    page.wait_for_function("window.__viewerReady === true")
    assert state(page)["mode"] == "subgraph" and units(page) == 1


def test_search_sorted_and_filtered_by_label_score(page, base_url):
    open_graph(page, base_url)
    page.wait_for_function("window.__labelScores > 0")
    page.select_option("#search-sort", "score")
    page.fill("#search", "synthetic")
    page.wait_for_selector("[data-testid=search-result] .score")
    scores = [float(x) for x in page.locator("[data-testid=search-result] .score").all_text_contents()]
    assert len(scores) > 3 and scores == sorted(scores, reverse=True)
    page.fill("#search-min", "0.5")
    page.dispatch_event("#search-min", "change")
    page.wait_for_function(
        "[...document.querySelectorAll('[data-testid=search-result] .score')]"
        ".every(s => Number(s.textContent) >= 0.5)"
    )
    kept = [float(x) for x in page.locator("[data-testid=search-result] .score").all_text_contents()]
    assert kept and min(kept) >= 0.5 and len(kept) <= len(scores)


def test_subgraph_scores_match_graph_scores(page, base_url, graph_dir):
    """Parity with cltrace.attribution.prune.graph_scores on a real (tiny) attribution graph,
    exported unpruned: the whole graph, and half of its features kept (the rest folded into
    their error nodes)."""
    torch = pytest.importorskip("torch")
    from cltrace.attribution.export import node_id, to_frontend_json
    from cltrace.attribution.graph import AttributionConfig, attribute
    from cltrace.attribution.prune import graph_scores, prune
    from test_attribution import PROMPT, make_transcoder
    from tiny import tiny_model

    lm = tiny_model("llama")
    cfg = AttributionConfig(max_feature_nodes=None, progress=False)
    graph = attribute(lm, make_transcoder(lm, "clt"), PROMPT, cfg, transcoder_id="tiny-clt")
    everything = prune(graph, 1.0, 1.0)
    strings = dict(zip(graph.logit_tokens.tolist(), lm.token_strings(graph.logit_tokens.tolist())))
    doc = to_frontend_json(graph, everything, slug="parity", logit_strings=strings)
    (graph_dir / "parity.json").write_text(json.dumps(doc))
    table = graph.nodes()
    mask = torch.ones(graph.n_nodes, dtype=torch.bool)
    mask[: graph.n_features : 2] = False
    keep = [
        node_id(
            graph,
            table.type[i],
            int(table.layer[i]),
            int(table.pos[i]),
            int(table.feature[i]),
            int(table.token_id[i]),
        )
        for i in range(graph.n_nodes)
        if mask[i]
    ]
    open_graph(page, base_url, "parity")
    got = page.evaluate(
        """async (keep) => {
      const { graphScores } = await import('/static/scores.js');
      const { buildModel } = await import('/static/model.js');
      const m = buildModel(await (await fetch('/api/graph/parity')).json());
      return [graphScores(m), graphScores(m, new Set(keep))];
    }""",
        keep,
    )
    for js, py in zip(got, (graph_scores(graph), graph_scores(graph, mask))):
        assert js["replacement"] == pytest.approx(py.replacement, abs=1e-5)
        assert js["completeness"] == pytest.approx(py.completeness, abs=1e-5)
    assert got[1]["replacement"] < got[0]["replacement"]


def test_circuit_supernode_ablated_from_its_panel(page, base_url, graph_dir):
    circuit = json.loads((graph_dir / "circ.circuit.json").read_text())
    members = next(s for s in circuit["supernodes"] if s["id"] == "sn0")["node_ids"]
    open_graph(page, base_url, "circ")
    page.click("g.unit[data-unit=sn0]")
    page.wait_for_selector("#group-ablate")
    assert page.locator("#group-members li").count() == len(members)
    with page.expect_request("**/api/intervene") as req:
        page.click("#group-ablate")
    body = json.loads(req.value.post_data)
    assert sorted(f"{i['layer']}_{i['feature']}_{i['pos']}" for i in body["interventions"]) == sorted(members)
    page.wait_for_selector("[data-testid=intervene-history-item]")
    assert "ablate" in page.text_content("[data-testid=intervene-history-item]")
    page.click("#group-pin")
    assert sorted(state(page)["pinned"]) == sorted(members)
