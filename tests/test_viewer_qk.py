"""The viewer shows a node's QK attribution (`qk_tracing_results`) in its connections panel.

The graph is traced for real: `cltrace trace --qk` on the tiny Gemma-like model of tests/tiny.py
with a calibrated CLT (a few seconds). In headless Chromium (same set-up as
tests/test_viewer_browser.py) the panel of an explained node lists every explained head with its
positions, score, summary and top pairs exactly as the JSON has them; clicking a pair's source
selects that node; a node without QK data shows no QK section.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from browser import CHROMIUM, open_page, serving
from cltrace.viewer.synthetic import SyntheticBackend
from test_attribution import PROMPT

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium"),
]
pytest.importorskip("playwright.sync_api", reason="needs playwright for Python")  # browser fixture: conftest


@pytest.fixture(scope="module")
def graph_dir(tmp_path_factory) -> Path:
    import torch

    from cltrace.cli import main
    from tiny import saved_run

    saved = saved_run(tmp_path_factory.mktemp("qk_run"))
    folder = tmp_path_factory.mktemp("graphs")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = ["trace", PROMPT, "--transcoder", str(saved / "run1"), "--model", str(saved / "model")]
        assert main(args + ["--out", str(folder / "qk.json"), "--qk", "--qk-edges", "3"]) == 0
    finally:
        torch.set_num_threads(before)
    return folder


@pytest.fixture(scope="module")
def doc(graph_dir) -> dict:
    return json.loads((graph_dir / "qk.json").read_text())


@pytest.fixture(scope="module")
def base_url(graph_dir):
    with serving(graph_dir, SyntheticBackend()) as url:
        yield url


@pytest.fixture
def page(browser):
    """As tests/conftest.py's `page`, but only uncaught page errors collect in `page.errors` (as before)."""
    with open_page(browser, console_errors=False) as page:
        yield page


def open_node(page, base_url, node_id: str) -> None:
    page.goto(f"{base_url}/graph/qk?view=graph&clickedId={node_id}")
    page.wait_for_function("window.__viewerReady === true", timeout=15_000)
    page.wait_for_selector("#connections")


def richest(doc) -> dict:
    """The explained node whose panel says most: a head with layer != head (so a swapped
    `layer.head` shows), listed sources outside the graph, then the most pairs."""
    ids = {n["node_id"] for n in doc["nodes"]}

    def key(node):
        heads = node["qk_tracing_results"]["heads"]
        listed = [s for h in heads for p in h["pair_wise_contributors"][:8] for s in p[:2]]
        return (any(h["layer"] != h["head"] for h in heads), len(set(listed) - ids), len(listed))

    return max((n for n in doc["nodes"] if "qk_tracing_results" in n), key=key)


def explained(doc) -> tuple[dict, dict, list]:
    """The richest node, its head, and a listed pair with a source that is another node of the
    graph (so clicking it must change the selection), preferably not the top pair."""
    ids = {n["node_id"] for n in doc["nodes"]}
    node = richest(doc)
    for head in node["qk_tracing_results"]["heads"]:
        pairs = head["pair_wise_contributors"][:8]
        for pair in pairs[1:] + pairs[:1]:
            if {pair[0], pair[1]} & (ids - {node["node_id"]}):
                return node, head, pair
    raise AssertionError("the traced graph should have a QK pair with a source in the graph")


def test_panel_shows_heads_and_pairs_and_sources_select(page, base_url, doc):
    node, head, pair = explained(doc)
    tokens = doc["metadata"]["prompt_tokens"]
    heads = node["qk_tracing_results"]["heads"]
    open_node(page, base_url, node["node_id"])
    page.wait_for_selector("#qk-section")
    shown = page.locator("#qk-heads > li.qk-head")
    assert shown.count() == len(heads)
    assert [shown.nth(i).get_attribute("data-head") for i in range(len(heads))] == [
        f"{h['layer']}.{h['head']}" for h in heads
    ]
    item = page.locator(f"#qk-heads > li.qk-head[data-head='{head['layer']}.{head['head']}']").first
    text = item.text_content()
    assert f"head {head['layer']}.{head['head']}" in text
    q, k = head["q_pos"], head["k_pos"]
    assert f"q {q} “{tokens[q]}” → k {k} “{tokens[k]}”" in text
    assert f"score {head['score']:.3f}" in text
    assert head["summary"] in text
    # the top pair, as the JSON lists it: both sources (ids as data-source) and the contribution
    rows = item.locator("ol.qk-pairs > li.qk-pair")
    assert rows.count() == min(8, len(head["pair_wise_contributors"]))
    top = head["pair_wise_contributors"][0]
    first = rows.nth(0)
    assert [first.locator(".qk-source").nth(i).get_attribute("data-source") for i in (0, 1)] == top[:2]
    assert first.locator(".value").text_content().strip() == f"{top[2]:.3f}"
    # clicking a source that is a graph node selects it and opens its panel
    row = rows.nth(head["pair_wise_contributors"].index(pair))
    ids = {n["node_id"] for n in doc["nodes"]}
    target = pair[0] if pair[0] in ids and pair[0] != node["node_id"] else pair[1]
    row.locator(f"a.qk-source[data-source='{target}']").first.click()
    page.wait_for_function(f"window.__viewerState().clicked === {json.dumps(target)}")
    assert page.evaluate("window.__viewerState().selected") == [target]
    assert page.errors == []


def test_sources_not_in_the_graph_are_not_links(page, base_url, doc):
    ids = {n["node_id"] for n in doc["nodes"]}
    node = richest(doc)
    open_node(page, base_url, node["node_id"])
    page.wait_for_selector("#qk-section")
    links = page.eval_on_selector_all("#qk-section a.qk-source", "xs => xs.map(x => x.dataset.source)")
    plain = page.eval_on_selector_all("#qk-section span.qk-source", "xs => xs.map(x => x.dataset.source)")
    assert set(links) <= ids and plain  # the richest node lists sources pruned away
    assert not set(plain) & ids
    heads = node["qk_tracing_results"]["heads"]
    listed = {s for h in heads for p in h["pair_wise_contributors"][:8] for s in p[:2]}
    assert set(links) | set(plain) == listed


def test_node_without_qk_shows_nothing_new(page, base_url, doc):
    node = next(n for n in doc["nodes"] if "qk_tracing_results" not in n)
    open_node(page, base_url, node["node_id"])
    assert page.locator("#qk-section").count() == 0
    assert page.locator("#inputs-list").count() == 1
    assert page.errors == []
