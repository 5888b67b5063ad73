"""`cltrace demo` end to end on a tiny saved model and transcoder: every step goes through the
library (no `cli.main` argv calls), and the report's graphs equal a direct trace."""

from __future__ import annotations

import dataclasses
import json

import torch

import cltrace.cli
from cltrace.attribution.graph import AttributionConfig, Graph, attribute
from cltrace.data import corpus
from cltrace.demo import DemoConfig, run_demo
from test_attribution import make_transcoder
from test_features import documents
from tiny import tiny_model


def test_demo_steps_run_through_the_library(tmp_path, monkeypatch, capsys):
    lm = tiny_model("gemma")
    model_dir, run_dir = tmp_path / "model", tmp_path / "run"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    tc = make_transcoder(lm, "clt")
    tc.cfg = dataclasses.replace(tc.cfg, model_name=str(model_dir))
    tc.save(run_dir / "transcoder")
    docs = documents(200)
    monkeypatch.setattr(corpus, "ensure_corpus", lambda *a, **k: tmp_path)
    monkeypatch.setattr(corpus, "iter_documents", lambda *a, **k: iter(docs))

    def no_cli(argv=None):
        raise AssertionError(f"the demo called the CLI with {argv}")

    monkeypatch.setattr(cltrace.cli, "main", no_cli)
    cfg = DemoConfig(
        model=str(model_dir),
        run=str(run_dir),
        feature_tokens=400,
        eval_tokens=600,
        max_feature_nodes=16,
        serve=False,
        out=tmp_path / "demo",
        device="cpu",
    )
    report = run_demo(cfg)
    out = capsys.readouterr().out
    assert "already trained" in out and "tokens scanned" in out and "see a feature" in out
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["activations"]["n_tokens"] == 600 and ev["replacement"]["n_tokens"] > 0
    assert (run_dir / "features.sqlite").is_file()
    text = report.read_text()
    assert text.startswith("# cltrace demo report") and "## Two-hop recall" in text and "## Antonyms" in text
    assert "Held-out quality" in text  # the eval written above is in the header
    sections = text.split("\n## ")[1:]  # each section opens with its circuit diagram
    for section, slug in zip(sections, ("two-hop-recall", "sport-of-an-athlete", "antonyms"), strict=True):
        assert section.split("\n\n")[1] == f"![circuit](graphs/{slug}.circuit.svg)"
        assert (tmp_path / "demo" / "graphs" / f"{slug}.circuit.json").is_file()
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert [r["name"] for r in results] == ["Two-hop recall", "Sport of an athlete", "Antonyms"]
    graph = Graph.load(tmp_path / "demo" / "graphs" / "antonyms.graph.safetensors")
    direct = attribute(
        lm,
        tc.requires_grad_(False),
        results[2]["prompt"],
        AttributionConfig(max_feature_nodes=16),
        transcoder_id="run",
    )
    assert graph.transcoder_id == "run"
    torch.testing.assert_close(graph.adjacency, direct.adjacency, rtol=1e-4, atol=1e-5)
