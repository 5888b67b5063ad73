"""`cltrace trace` end to end on a tiny saved model and transcoder."""

from __future__ import annotations

import json

import pytest

from cltrace.attribution.graph import Graph
from cltrace.cli import main


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from tiny import saved_run

    return saved_run(tmp_path_factory.mktemp("trace"))


def test_trace_writes_graph_and_pruned_json(saved, tmp_path, capsys):
    out = tmp_path / "dallas.json"
    rc = main(
        [
            "trace",
            "Fact : the capital of the state containing Dallas is",
            "--transcoder",
            str(saved / "run1"),
            "--model",
            str(saved / "model"),
            "--out",
            str(out),
            "--max-feature-nodes",
            "40",
            "--batch-size",
            "8",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "top logits" in text and "pruned graph" in text and "replacement" in text
    doc = json.loads(out.read_text())
    assert doc["metadata"]["slug"] == "dallas" and doc["nodes"] and doc["links"]
    graph = Graph.load(tmp_path / "dallas.graph.safetensors")
    assert graph.n_features == 40 and graph.transcoder_id == "run1"


def test_output_target_must_be_one_token(saved, tmp_path, capsys):
    trace = [
        "trace",
        "the capital of Texas is",
        "--transcoder",
        str(saved / "run1"),
        "--model",
        str(saved / "model"),
        "--out",
        str(tmp_path / "x.json"),
        "--output-target",
    ]
    rc = main([*trace, "Austin Dallas"])
    assert rc == 2
    assert "not one" in capsys.readouterr().err
    rc = main([*trace, "Austin", "--max-feature-nodes", "5"])
    assert rc == 0


def test_mismatched_or_missing_transcoder_is_a_clear_error(saved, tmp_path, capsys):
    from tiny import save_model, tiny_model

    save_model(tiny_model("gemma", n_layers=2), tmp_path / "m2")
    rc = main(["trace", "the city", "--transcoder", str(saved / "run1"), "--model", str(tmp_path / "m2")])
    assert rc == 2 and "3 layers" in capsys.readouterr().err
    rc = main(["trace", "the city", "--transcoder", str(tmp_path / "nothing")])
    assert rc == 2 and "no transcoder" in capsys.readouterr().err
    rc = main(["trace", "   ", "--transcoder", str(saved / "run1"), "--model", str(saved / "model")])
    assert rc == 2 and "empty" in capsys.readouterr().err
