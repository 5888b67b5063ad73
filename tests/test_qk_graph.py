"""QK attributions for a graph's attention edges: head flows, selection, JSON, CLI.

- head flows split each layer's attention output (as the target reads it) exactly over
  heads and key positions;
- `qk_for_graph` explains the pruned graph's cross-position edges; every explained head's
  pairs sum to its real score; the graph JSON with `qk_tracing_results` still fits
  Neuronpedia's schema and the field fits Neuronpedia's shape;
- `--qk-node` picks a chosen node; an unknown node id is a clear error.
"""

from __future__ import annotations

import json

import pytest
import torch

from cltrace.attribution.export import to_frontend_json, validate
from cltrace.attribution.graph import AttributionConfig, attribute
from cltrace.attribution.prune import prune
from cltrace.attribution.qk import QKTracer
from cltrace.attribution.qk_graph import (
    attach,
    attention_edges,
    json_id,
    qk_for_graph,
    target_direction,
    validate_qk,
)
from cltrace.errors import CltraceError
from test_attribution import PROMPT, make_transcoder
from tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py (module scope, as before)


@pytest.fixture(scope="module", params=["gemma", "qwen2"])
def traced(request):
    lm = tiny_model(request.param)
    tc = make_transcoder(lm, "clt")
    graph = attribute(lm, tc, PROMPT, AttributionConfig(max_feature_nodes=None, progress=False))
    pruned = prune(graph, 0.9, 0.99)
    tracer = QKTracer(lm, tc, graph.input_tokens)
    return lm, tc, graph, pruned, tracer


def test_head_flows_split_the_attention_output(traced):
    lm, tc, graph, pruned, tracer = traced
    index = graph.logit_offset
    layer, pos, direction = target_direction(graph, tc, lm, index)
    flows = tracer.head_flows(layer, pos, direction)
    fwd, _, attn_in = tracer._covering(pos)
    root = fwd.final
    g = torch.zeros_like(root)
    g[0, pos] = direction
    for l in range(tracer.L):
        (grad,) = torch.autograd.grad([root], [attn_in[l]], [g], retain_graph=True)
        read = float(grad[0, pos] @ attn_in[l][0, pos].detach())
        assert float(flows[l].sum()) == pytest.approx(read, rel=1e-4, abs=1e-5)
        assert float(flows[l, :, pos + 1 :].abs().sum()) == 0.0


def test_graph_attention_edges_are_explained_and_exported(traced):
    lm, tc, graph, pruned, tracer = traced
    edges = attention_edges(graph, pruned)
    assert edges, "the tiny graph should have cross-position links"
    table = graph.nodes()
    for e in edges:
        assert int(table.pos[e.target]) > e.k_pos
    att = qk_for_graph(lm, tc, graph, pruned, max_edges=4, heads_per_edge=2, tracer=tracer)
    assert att.n_heads_explained >= 4
    heads = {(r.layer, r.head, r.q_pos, r.k_pos) for rs in att.results.values() for r in rs}
    assert len(heads) == att.n_heads_explained  # distinct heads, shared results not recounted
    for results in att.results.values():
        for r in results:
            assert r.relative_error < 1e-4 or abs(r.score) < 1e-3
            assert all(q in tracer.source_ids and k in tracer.source_ids for q, k, _ in r.pairs)
    strings = dict(zip(graph.logit_tokens.tolist(), lm.token_strings(graph.logit_tokens.tolist())))
    doc = to_frontend_json(graph, pruned, slug="t", logit_strings=strings)
    n = attach(doc, att)
    assert n >= 1
    doc = json.loads(json.dumps(doc))  # what a reader sees
    validate(doc)
    validate_qk(doc)
    node = next(x for x in doc["nodes"] if "qk_tracing_results" in x)
    assert node["qk_tracing_results"]["pair_wise_contributors"][0][2] != 0
    assert node["qk_tracing_results"]["heads"][0]["summary"].startswith("head ")


def test_chosen_node_and_unknown_node(traced):
    lm, tc, graph, pruned, tracer = traced
    nid = json_id(graph, graph.logit_offset)
    att = qk_for_graph(lm, tc, graph, node_ids=[nid], heads_per_edge=3, tracer=tracer)
    results = att.results[nid]
    assert len(results) == 3 and all(r.q_pos == graph.n_pos - 1 and r.k_pos < r.q_pos for r in results)
    with pytest.raises(CltraceError, match="no node"):
        qk_for_graph(lm, tc, graph, node_ids=["99_1_1"], tracer=tracer)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from tiny import saved_run

    return saved_run(tmp_path_factory.mktemp("qk_trace"))


def test_trace_qk_cli(saved, tmp_path, capsys):
    from cltrace.cli import main

    out = tmp_path / "dallas.json"
    base = ["trace", PROMPT, "--transcoder", str(saved / "run1"), "--model", str(saved / "model")]
    assert main(base + ["--out", str(out), "--qk", "--qk-edges", "3"]) == 0
    text = capsys.readouterr().out
    assert "QK attribution:" in text and " attends from " in text
    doc = json.loads(out.read_text())
    validate(doc)
    validate_qk(doc)
    assert any("qk_tracing_results" in n for n in doc["nodes"])
    assert doc["metadata"]["cltrace"]["qk"]["n_heads_explained"] >= 1
    rc = main(base + ["--out", str(tmp_path / "x.json"), "--qk-node", "7_1_1"])
    assert rc == 2 and "no node '7_1_1'" in capsys.readouterr().err
