"""The viewer in a real headless Chromium: dashboard, thresholds, supernodes, interventions.

Needs Debian's chromium at /usr/bin/chromium and Playwright for Python (no `playwright
install`). The back-end is `SyntheticBackend` (the FakeBackend of these tests): it answers
deterministically so every panel can be driven. A screenshot goes to
$CLTRACE_ARTIFACTS/viewer.png when that is set, else to the test's temporary folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from browser import CHROMIUM, serving
from cltrace.viewer.synthetic import SyntheticBackend, synthetic_graph

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install -y chromium)"),
]
# the browser and page fixtures: tests/conftest.py (tests/browser.py)
pytest.importorskip("playwright.sync_api", reason="needs playwright for Python")

FakeBackend = SyntheticBackend


@pytest.fixture(scope="module")
def graph_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("graphs")
    (folder / "demo.json").write_text(json.dumps(synthetic_graph(120, 600, seed=4)))
    (folder / "broken.json").write_text('{"metadata": {}, "nodes": [')
    return folder


@pytest.fixture(scope="module")
def base_url(graph_dir):
    with serving(graph_dir, FakeBackend()) as url:
        yield url


def open_graph(page, base_url, name="demo"):
    page.goto(f"{base_url}/graph/{name}")
    page.wait_for_function("window.__viewerReady === true", timeout=15_000)


def count(page, element_id: str) -> int:
    return int(page.text_content(f"#{element_id}"))


def wait_count(page, element_id: str, test: str) -> None:
    """Wait until the number in #element_id satisfies the JS comparison `test` (e.g. '> 0')."""
    page.wait_for_function(
        f"Number(document.querySelector('#{element_id}').textContent) {test}", timeout=10_000
    )


def click_node(page, node, shift=False):
    box = page.locator("#overlay-canvas").bounding_box()
    page.mouse.move(box["x"] + node["x"], box["y"] + node["y"])
    if shift:
        page.keyboard.down("Shift")
    page.mouse.down()
    page.mouse.up()
    if shift:
        page.keyboard.up("Shift")


def features(page) -> list[dict]:
    return [n for n in page.evaluate("window.__viewerNodes()") if n["type"] == "feature"]


def test_index_lists_graphs(page, base_url):
    page.goto(base_url + "/")
    page.wait_for_selector("[data-testid=graph-row]")
    text = page.text_content("#graph-list")
    assert "demo" in text and "broken" in text
    assert "capital of the state" in text  # the prompt


def test_graph_loads_and_dashboard_opens(page, base_url):
    open_graph(page, base_url)
    assert page.evaluate("window.__viewerError") is None
    assert count(page, "node-count") > 0 and count(page, "edge-count") > 0
    node = features(page)[0]
    page.mouse.move(0, 0)
    box = page.locator("#overlay-canvas").bounding_box()
    page.mouse.move(box["x"] + node["x"], box["y"] + node["y"])
    page.wait_for_selector("#tooltip:not([hidden])")
    assert "strongest inputs" in page.text_content("#tooltip")
    click_node(page, node)
    page.wait_for_selector("#dashboard-label")
    assert page.text_content("#dashboard-label").startswith("fake feature")
    assert page.locator("#dashboard-contexts .tok.active").count() == 3
    assert page.locator("#dashboard-promoted li").count() == 3
    assert page.errors == []


def test_thresholds_change_counts(page, base_url):
    open_graph(page, base_url)
    nodes0, edges0 = count(page, "node-count"), count(page, "edge-count")
    page.fill("#node-threshold", "0.3")
    wait_count(page, "node-count", f"< {nodes0}")
    assert count(page, "edge-count") < edges0
    page.fill("#node-threshold", "1")
    page.fill("#edge-threshold", "0.5")
    wait_count(page, "edge-count", f"< {edges0}")
    page.fill("#edge-threshold", "1")
    wait_count(page, "edge-count", f"=== {edges0}")
    assert page.errors == []


def test_supernode_create_and_suggest(page, base_url, graph_dir):
    open_graph(page, base_url)
    first, second = features(page)[:2]
    click_node(page, first, shift=True)
    click_node(page, second, shift=True)
    wait_count(page, "selection-count", "=== 2")
    page.fill("#supernode-name", "my group")
    page.click("#supernode-create")
    page.wait_for_selector("[data-testid=supernode-item]")
    assert "my group" in page.text_content("#supernode-list")
    page.wait_for_function("document.querySelector('#supernode-status').textContent.startsWith('saved')")
    saved = json.loads((graph_dir / "demo.supernodes.json").read_text())
    assert saved["supernodes"] == [{"name": "my group", "node_ids": [first["id"], second["id"]]}]
    page.click("#supernode-suggest")
    page.wait_for_selector("[data-testid=suggestion-accept]")
    page.locator("[data-testid=suggestion-accept]").first.click()
    page.wait_for_function("document.querySelectorAll('[data-testid=supernode-item]').length === 2")
    page.reload()
    page.wait_for_function("document.querySelectorAll('[data-testid=supernode-item]').length === 2")
    assert page.errors == []


def test_box_select(page, base_url):
    """Shift-drag selects a box (a plain drag pans the view)."""
    open_graph(page, base_url)
    box = page.locator("#overlay-canvas").bounding_box()
    page.mouse.move(box["x"] + 75, box["y"] + 20)
    page.keyboard.down("Shift")
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, steps=5)
    page.mouse.up()
    page.keyboard.up("Shift")
    wait_count(page, "selection-count", "> 0")
    assert page.evaluate("window.__viewerState().tf") == {"k": 1, "x": 0, "y": 0}


def test_intervention_shows_new_probabilities(page, base_url, tmp_path):
    open_graph(page, base_url)
    click_node(page, features(page)[0])
    page.select_option("#intervene-mode", "set")
    page.fill("#intervene-value", "5")
    page.fill("#intervene-generate", "3")
    page.click("#intervene-run")
    page.wait_for_selector("[data-testid=intervene-row]")
    rows = page.locator("[data-testid=intervene-row]")
    assert rows.count() == 5
    after = [float(x) for x in page.locator("td.after-prob").all_text_contents()]
    assert after == sorted(after, reverse=True) and after[0] > 0
    assert "and then the" in page.text_content("#intervene-continuation")
    artifacts = Path(os.environ.get("CLTRACE_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(artifacts / "viewer.png"), full_page=True)
    assert page.errors == []


def test_malformed_graph_shows_error(page, base_url):
    open_graph(page, base_url, "broken")
    assert page.is_visible("#error-box")
    assert "not valid JSON" in page.text_content("#error-box")
