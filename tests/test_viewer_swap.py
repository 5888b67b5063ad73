"""Swaps from the viewer (issue 13 item 5) on a tiny model: POST /api/swap runs the library's
graph-guided swap restricted to the pinned features, and the page shows before/after, the
pairs touched and a history item.

Ground truth: every suppressed feature is a pinned one at A's differing token; injected features
are the members of B's same-named circuit supernode when there is one; the reply's "after"
probabilities are what the applied interventions do on the model (re-run independently).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from browser import CHROMIUM, launch, open_page
from cltrace.viewer.server import ViewerConfig, start_in_thread
from test_viewer_api import request
from test_viewer_browser import open_graph

PROMPT_A, PROMPT_B = "the capital of Texas is", "the capital of France Paris is"
SPAN_A = 4  # "Texas"; B's subject is "France Paris" (positions 4-5)


@pytest.fixture(scope="module")
def tiny():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    from cltrace.interventions.steer import Steerer
    from test_attribution import make_transcoder
    from tiny import tiny_model

    lm = tiny_model("gemma")
    tc = make_transcoder(lm, "clt", n_features=24)
    return lm, tc, Steerer(lm, tc)


def _features(doc: dict) -> list[str]:
    return [n["node_id"] for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder"]


@pytest.fixture(scope="module")
def folder(tiny, tmp_path_factory) -> Path:
    """Graphs a (Texas) and b (France Paris), full graphs beside them; b has a circuit file with a
    supernode "subject" (three of B's features at its last subject token)."""
    from cltrace.attribution.graph import AttributionConfig
    from cltrace.attribution.pipeline import trace_to_files

    lm, tc, _ = tiny
    root = tmp_path_factory.mktemp("swap")
    cfg = AttributionConfig(max_feature_nodes=None, progress=False)
    for name, prompt in (("a", PROMPT_A), ("b", PROMPT_B)):
        trace_to_files(
            lm,
            tc,
            prompt,
            cfg,
            root / f"{name}.json",
            transcoder_id="tiny",
            node_threshold=1.0,
            edge_threshold=1.0,
        )
    b_subject = supportive_tail(root / "b.graph.safetensors")
    circuit = {
        "supernodes": [
            {"id": "sn0", "name": "Subject", "kind": "features", "node_ids": b_subject, "positions": [5]}
        ],
        "edges": [],
    }
    (root / "b.circuit.json").write_text(json.dumps(circuit))
    return root


def supportive_tail(path: Path, n: int = 3) -> list[str]:
    """The `n` weakest of B's features at its last subject token (position 5, the one aligned
    with A's) that the library's ranking keeps: a supernode of them changes what is injected."""
    from cltrace.attribution.graph import Graph
    from cltrace.circuits.swap import SwapConfig, ranked_span_features

    graph = Graph.load(path)
    ranked = ranked_span_features(graph, (5, 6), int(graph.logit_tokens[0]), SwapConfig().rank)
    feats = graph.active_features[graph.selected_features]
    ids = [f"{int(feats[i, 0])}_{int(feats[i, 2])}_{int(feats[i, 1])}" for i in ranked]
    assert len(ids) > n, "the tiny graph should have more supportive features than the supernode"
    return ids[-n:]


@pytest.fixture(scope="module")
def server(tiny, folder):
    from cltrace.viewer.model_backend import ModelBackend

    srv, _ = start_in_thread(ViewerConfig(graph_dirs=[folder], port=0), ModelBackend(steerer=tiny[2]))
    yield srv
    srv.shutdown()
    srv.server_close()


def pinned_at_subject(folder: Path) -> list[str]:
    return [i for i in _features(json.loads((folder / "a.json").read_text())) if i.endswith(f"_{SPAN_A}")]


def check_reply(reply: dict, pinned: list[str], steerer, injected_from: set | None = None) -> None:
    """The swap touched only pinned features at A's subject, and "after" is what it does."""
    import torch

    from cltrace.interventions.steer import Intervention

    applied = reply["applied"]
    assert applied and len(applied) == reply["swap"]["pairs_touched"]
    assert all(a["pos"] == SPAN_A for a in applied)
    suppressed = {f"{a['layer']}_{a['feature']}_{a['pos']}" for a in applied if a["mode"] == "scale"}
    assert suppressed <= set(pinned) and suppressed == set(reply["swap"]["suppressed"])
    if injected_from is not None:
        assert {(a["layer"], a["feature"]) for a in applied if a["mode"] == "set"} <= injected_from
    ivs = [Intervention(a["layer"], a["feature"], (a["pos"],), a["mode"], a["value"]) for a in applied]
    logits = steerer.logits(steerer.tokens(PROMPT_A), ivs)[0, -1].float()
    p = torch.softmax(logits, -1)
    assert [r["prob"] for r in reply["after"][:5]] == pytest.approx(p.topk(5).values.tolist(), abs=1e-5)
    id_a, id_b = reply["swap"]["answer_ids"]
    assert reply["swap"]["p_b"][1] == pytest.approx(float(p[id_b]), abs=1e-5)
    assert reply["swap"]["p_a"][1] == pytest.approx(float(p[id_a]), abs=1e-5)
    assert reply["swap"]["flipped"] == (int(p.argmax()) == id_b)


def test_swap_route_restricted_to_pins_and_exact(server, folder, tiny):
    pinned = pinned_at_subject(folder)
    assert len(pinned) >= 3
    body = {"graph": "a", "node_ids": pinned[:4], "source_graph": "b", "generate": 2}
    status, reply = request(server, "POST", "/api/swap", body=body)
    assert status == 200, reply
    assert reply["swap"]["span_a"] == [4, 5] and reply["swap"]["span_b"] == [4, 6]
    assert reply["swap"]["source"] == "B's features at its differing tokens"
    assert reply["swap"]["n_candidates"][0] <= 4
    assert reply["continuation"] is not None
    check_reply(reply, pinned[:4], tiny[2])
    # named like B's circuit supernode (case-insensitive): only its members are injected
    b_circuit = json.loads((folder / "b.circuit.json").read_text())["supernodes"][0]["node_ids"]
    members = {(int(i.split("_")[0]), int(i.split("_")[1])) for i in b_circuit}
    status, reply = request(server, "POST", "/api/swap", body={**body, "name": "subject"})
    assert status == 200 and reply["swap"]["source"] == "supernode “subject” of B's circuit"
    assert reply["swap"]["n_candidates"][1] == len(b_circuit)
    assert any(a["mode"] == "set" for a in reply["applied"])  # something was injected ...
    check_reply(reply, pinned[:4], tiny[2], injected_from=members)  # ... and only those members


def test_swap_with_a_typed_prompt(server, folder, tiny):
    pinned = pinned_at_subject(folder)
    body = {"graph": "a", "node_ids": pinned, "source_prompt": "the capital of Ohio is"}
    status, reply = request(server, "POST", "/api/swap", body=body)
    assert status == 200, reply
    assert reply["swap"]["prompt_b"] == "the capital of Ohio is" and reply["swap"]["span_b"] == [4, 5]
    check_reply(reply, pinned, tiny[2])


def test_swap_errors_are_messages(server, folder):
    pinned = pinned_at_subject(folder)
    elsewhere = [i for i in _features(json.loads((folder / "a.json").read_text())) if i.endswith("_2")]
    cases = [
        ({"node_ids": elsewhere, "source_graph": "b"}, 422, "none of the pinned features is at the tokens"),
        ({"node_ids": pinned, "source_prompt": PROMPT_A}, 422, "do not differ"),
        ({"node_ids": pinned}, 400, "source_graph"),
        ({"node_ids": pinned, "source_graph": "b", "source_prompt": "x"}, 400, "not both"),
        ({"node_ids": ["9_9_9"], "source_graph": "b"}, 400, "not in the graph"),
        ({"node_ids": pinned, "source_graph": "nope"}, 404, "nope"),
    ]
    for extra, status, words in cases:
        got, reply = request(server, "POST", "/api/swap", body={"graph": "a", **extra})
        assert got == status and words in reply["error"], (extra, reply)


def test_swap_without_a_model_is_a_501(folder):
    srv, _ = start_in_thread(ViewerConfig(graph_dirs=[folder], port=0), None)
    try:
        body = {"graph": "a", "node_ids": pinned_at_subject(folder), "source_graph": "b"}
        status, reply = request(srv, "POST", "/api/swap", body=body)
        assert status == 501 and "need a loaded model" in reply["error"]
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium")
def test_swap_from_the_page(server, folder, tiny):
    pytest.importorskip("playwright.sync_api", reason="needs playwright for Python")
    pinned = pinned_at_subject(folder)
    with launch() as browser, open_page(browser, console_errors=False) as page:
        open_graph(page, server.url.rstrip("/"), "a")
        page.click("#qparams summary")
        page.fill("#qparams-text", json.dumps({"pinnedIds": pinned, "supernodes": [["Subject", *pinned]]}))
        page.click("#qparams-import")
        page.check("input[name=intervene-on][value=pinned]")
        page.wait_for_function("document.querySelector('#swap-name').textContent.includes('Subject')")
        page.wait_for_function("document.querySelectorAll('#swap-source option').length === 2")
        page.select_option("#swap-source", "b")
        with page.expect_response("**/api/swap") as resp:
            page.click("#swap-run")
        sent = json.loads(resp.value.request.post_data)
        assert sent["node_ids"] == pinned and sent["name"] == "Subject" and sent["source_graph"] == "b"
        reply = resp.value.json()
        page.wait_for_selector("[data-testid=intervene-history-item].swap")
        check_reply(reply, pinned, tiny[2])
        shown = [float(x) for x in page.locator(".after-prob").all_text_contents()]
        assert shown == pytest.approx([r["prob"] for r in reply["after"]], abs=1e-4)
        summary = page.text_content("#swap-summary")
        assert f"{reply['swap']['pairs_touched']} (feature, position) pairs touched" in summary
        assert "supernode “Subject” of B's circuit" in summary
        item = page.text_content("[data-testid=intervene-history-item]")
        assert "swap “Subject”" in item and PROMPT_B in item
        # a typed prompt: a second run kept in the list
        page.select_option("#swap-source", "")
        page.fill("#swap-prompt", "the capital of Ohio is")
        page.click("#swap-run")
        page.wait_for_function(
            "document.querySelectorAll('[data-testid=intervene-history-item]').length === 2"
        )
        assert "Ohio" in page.locator("[data-testid=intervene-history-item]").first.text_content()
        # pins elsewhere: the server's message is shown, the page keeps working
        page.check("input[name=intervene-on][value=selection]")
        page.click("#swap-run")
        page.wait_for_function(
            "document.querySelector('#intervene-error').textContent.includes('pin or select')"
        )
        assert page.errors == []
