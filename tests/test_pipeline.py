"""The whole CLI pipeline on a tiny model saved to disk and the user's own text files:
harvest → train (from the store, bf16 activations) → eval → trace → features → intervene."""

import json

import pytest
import torch
from safetensors.torch import load_file

from cltrace.cli import main
from tiny import WORDS, tiny_model


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    lm = tiny_model("gemma", d=32)
    model_dir = root / "model"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    text = root / "text"
    text.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(30):
        words = [WORDS[int(j)] for j in torch.randint(len(WORDS), (120,), generator=g)]
        (text / f"doc{i}.txt").write_text(" ".join(words))
    return root, model_dir, text


def test_cli_pipeline(workspace, monkeypatch, capsys):
    root, model_dir, text = workspace
    monkeypatch.setenv("CLTRACE_HOME", str(root / "home"))
    store, run = root / "store", root / "run"
    assert (
        main(
            [
                "harvest",
                "--model",
                str(model_dir),
                "--text",
                str(text),
                "--tokens",
                "3000",
                "--out",
                str(store),
                "--ctx-len",
                "32",
                "--shard-tokens",
                "1000",
                "--dtype",
                "float32",
            ]
        )
        == 0
    )
    assert json.loads((store / "manifest.json").read_text())["shards"]
    train = [
        "train",
        "--preset",
        "demo",
        "--model",
        str(model_dir),
        "--store",
        str(store),
        "--features",
        "64",
        "--tokens",
        "2048",
        "--batch",
        "256",
        "--resample-every",
        "512",
        "--balance-rate",
        "0.02",
        "--out",
        str(run),
    ]
    assert main(train) == 0
    assert (run / "transcoder" / "config.json").exists()
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["resample_every_tokens"] == 512 and saved["balance_rate"] == 0.02
    # resuming a finished run is allowed and refuses to overwrite without --resume
    assert main(train) == 2
    assert (
        main(
            [
                "eval",
                str(run),
                "--store",
                str(store),
                "--tokens",
                "1000",
                "--replacement-tokens",
                "200",
                "--text",
                str(text),
                "--model",
                str(model_dir),
                "--json",
                str(root / "eval.json"),
            ]
        )
        == 0
    )
    metrics = json.loads((root / "eval.json").read_text())
    assert metrics  # per-layer and replacement metrics were written
    tuned = root / "tuned"
    finetune = ["finetune", str(run), "--model", str(model_dir), "--text", str(text), "--out", str(tuned)]
    assert main([*finetune, "--minutes", "0.05", "--lr", "1e-3"]) == 0
    record = json.loads((tuned / "finetune.json").read_text())
    assert record["steps"] >= 1 and record["history"][0]["kl"] >= 0
    before = load_file(run / "transcoder" / "transcoder.safetensors")
    after = load_file(tuned / "transcoder" / "transcoder.safetensors")
    assert torch.equal(before["log_threshold"], after["log_threshold"])  # thresholds stay
    assert not torch.equal(before["b_dec"], after["b_dec"])
    graph_json = root / "graph.json"
    assert (
        main(
            [
                "trace",
                "the capital of Texas is",
                "--transcoder",
                str(run),
                "--model",
                str(model_dir),
                "--max-feature-nodes",
                "64",
                "--out",
                str(graph_json),
            ]
        )
        == 0
    )
    doc = json.loads(graph_json.read_text())
    assert doc["nodes"] and doc["metadata"]["prompt_tokens"]
    db = root / "features.sqlite"
    assert (
        main(
            [
                "features",
                str(run),
                "--model",
                str(model_dir),
                "--text",
                str(text),
                "--tokens",
                "1500",
                "--db",
                str(db),
            ]
        )
        == 0
    )
    assert main(["feature", str(db), "0:0", "--json"]) in (0, 2)
    assert (
        main(
            [
                "intervene",
                "the capital of Texas is",
                "--transcoder",
                str(run),
                "--model",
                str(model_dir),
                "--scale",
                "0:1=0",
                "--generate",
                "2",
            ]
        )
        == 0
    )
    assert "before" in capsys.readouterr().out
