"""Circuits across a prompt set: roles, a planted recurring feature at full coverage, refusals, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from cltrace.attribution.graph import AttributionConfig
from cltrace.attribution.recurring import (
    assign_roles,
    expand_template,
    parse_fill,
    trace_prompt_set,
)
from cltrace.errors import CltraceError
from test_attribution import make_transcoder
from tiny import tiny_model

TEMPLATE = "the currency of the country whose capital is {city} is the"
CITIES = ["Tokyo", "Paris", "Dallas", "Austin", "Texas"]
CFG = AttributionConfig(max_feature_nodes=None, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py (module scope, as before)


def test_template_expansion_and_roles():
    prompts = expand_template(TEMPLATE, parse_fill(["city=Tokyo,Paris"]))
    assert prompts[1] == ("the currency of the country whose capital is Paris is the", {"city": "Paris"})
    toks = [[1, 5, 6, 7, 9, 8, 8], [1, 5, 6, 7, 10, 11, 8, 8]]
    strs = [[str(t) for t in x] for x in toks]
    roles = assign_roles(toks, strs, "{city}", template=True)
    assert roles[0] == ["pre0:1", "pre1:5", "pre2:6", "pre3:7", "{city}", "suf2:8", "last"]
    assert roles[1][4:6] == ["{city}", "{city}"] and roles[1][-1] == "last"
    with pytest.raises(CltraceError, match="changes the answer position"):
        assign_roles([[1, 5, 9], [1, 5, 10]], [["a"] * 3] * 2, "{x}", template=True)
    with pytest.raises(CltraceError, match="no fillers"):
        expand_template(TEMPLATE, {})
    with pytest.raises(CltraceError, match="same number"):
        expand_template("{a} and {b} x", {"a": ["1", "2"], "b": ["1"]})


def plant_filler_feature(lm, tc, prompts, feature: int = 0, layer: int = 0) -> None:
    """Make `feature` of `layer` fire at the filler token of every prompt, strongly."""
    idx = [len(lm.tokenize(TEMPLATE.split("{")[0].strip())[0]) for _ in prompts]
    xs = []
    for (p, _), i in zip(prompts, idx):
        cap = lm.capture(lm.tokenize(p))
        xs.append(cap.mlp_in[0, i, layer])
    X = torch.stack(xs)
    direction = (X / X.norm(dim=1, keepdim=True)).sum(0)
    with torch.no_grad():
        tc.W_enc[layer][:, feature] = direction * tc.in_scale[layer] / direction.norm() ** 2
        pre = tc.encode(X[:, None, :].expand(-1, lm.n_layers, -1))[:, layer, feature]
        theta = tc.log_threshold[layer, feature].exp()
        tc.b_enc[layer, feature] += theta + 1.0 - pre.min()
        tc.W_dec[layer][feature] *= 20
    pre = tc.encode(X[:, None, :].expand(-1, lm.n_layers, -1))[:, layer, feature]
    assert bool((pre > tc.log_threshold[layer, feature].exp()).all())


def test_planted_feature_recurs_at_full_coverage():
    lm = tiny_model("llama")
    tc = make_transcoder(lm, "clt")
    prompts = expand_template(TEMPLATE, {"city": CITIES})
    plant_filler_feature(lm, tc, prompts)
    report = trace_prompt_set(lm, tc, prompts, CFG, template=TEMPLATE, supernodes=False, node_threshold=0.95)
    n = len(prompts)
    top = {f.key: f for f in report.recurring}
    planted = top[(0, 0, "{city}")]
    assert len(planted.prompts) == n and planted.frequency(n) == 1.0
    assert any((0, 0, "{city}") in p.features and p.coverage > 0 for p in report.parts)
    part = next(p for p in report.parts if p.name.startswith("{city}"))
    assert all(x > 0 for x in part.per_prompt)
    from cltrace.attribution.recurring_diagram import merged_circuit

    circuit = merged_circuit(report, lm.n_layers)
    city = next(nd for nd in circuit.nodes if nd.name.startswith("{city}"))
    assert city.positions == [prompts[0][0].split().index("Tokyo") + 1]  # + BOS
    assert city.name.endswith("· 100%")
    assert any(e.target == "logit" for e in circuit.edges)
    doc = json.loads(json.dumps(report.to_dict()))
    entry = next(x for x in doc["recurring"] if (x["layer"], x["feature"], x["role"]) == (0, 0, "{city}"))
    assert entry["count"] == n and entry["frequency"] == 1.0
    assert all(0.0 <= p["explained"] <= 1.0 for p in doc["prompts"])
    assert doc["prompts"][0]["roles"][-1] == "last"


def test_unexplained_prompts_are_listed():
    from cltrace.attribution.recurring import PromptResult, summarize_set

    def result(features):
        return PromptResult("p", {}, "a", 0.5, [], [], features, {k: ["x"] for k in features})

    shared = {(1, 1, "last"): 0.5, (2, 2, "last"): 0.4}
    results = [result(dict(shared)) for _ in range(3)] + [result({(1, 1, "last"): 0.05, (3, 9, "last"): 0.9})]
    report = summarize_set(results, min_frequency=0.75, explain_threshold=0.5)
    assert report.unexplained == [3]
    assert results[0].explained == pytest.approx(1.0) and results[3].explained == pytest.approx(0.05 / 0.95)
    part = report.parts[0]
    assert part.per_prompt == [1.0, 1.0, 1.0, 0.5] and part.coverage == pytest.approx(0.875)


def test_circuits_cli(tmp_path, capsys):
    from cltrace.cli import main

    lm = tiny_model("gemma")
    lm.model.save_pretrained(tmp_path / "model")
    lm.tokenizer.save_pretrained(tmp_path / "model")
    make_transcoder(lm, "clt").save(tmp_path / "run1")
    base = ["circuits", "--transcoder", str(tmp_path / "run1"), "--model", str(tmp_path / "model")]
    out = tmp_path / "r.json"
    rc = main(
        base
        + [
            "--template",
            TEMPLATE,
            "--fill",
            "city=Tokyo,Paris,Dallas",
            "--out",
            str(out),
            "--max-feature-nodes",
            "30",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "3 prompts" in text and "merged circuit" in text
    doc = json.loads(out.read_text())
    assert doc["kind"] == "cltrace-recurring-circuit" and len(doc["prompts"]) == 3
    svg = (tmp_path / "r.circuit.svg").read_text()
    assert "<svg" in svg
    merged = json.loads((tmp_path / "r.circuit.json").read_text())
    assert merged["supernodes"][-1]["kind"] == "logit"
    rc = main(base + ["--template", "the capital of {city}", "--fill", "city=Tokyo,Paris"])
    assert rc == 2 and "changes the answer position" in capsys.readouterr().err
    (tmp_path / "p.txt").write_text("the capital of Texas is\nthe capital of France is\n")
    assert main(base + ["--prompts", str(tmp_path / "p.txt"), "--out", str(out), "--no-supernodes"]) == 0
