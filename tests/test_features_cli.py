"""`cltrace feature` / `cltrace intervene` wiring, with the model loading replaced by tiny pieces."""

import argparse
import json

import pytest

from cltrace.cli import main
from cltrace.commands.intervene import parse_assignment, parse_feature_list, parse_named_value
from cltrace.features.store import build_feature_store
from test_features import CFG, documents
from test_features_standin import make_transcoder
from tiny import tiny_model


@pytest.fixture(scope="module")
def pieces():
    lm = tiny_model("llama")
    return lm, make_transcoder(lm, n_features=24)


def test_parsers():
    assert parse_assignment("3:12@-1=2.5") == (3, 12, (-1,), 2.5)
    assert parse_assignment("L0:7@1,2=0") == (0, 7, (1, 2), 0.0)
    assert parse_assignment("0:7=-1") == (0, 7, None, -1.0)
    assert parse_feature_list("1:2, 3:4") == [(1, 2), (3, 4)]
    assert parse_named_value("say a capital=-2") == ("say a capital", -2.0)
    for bad in ("3:12", "3=1", "a:b=1", "3:1=x"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_assignment(bad)


def test_feature_command_prints_and_labels(pieces, tmp_path, capsys):
    lm, tc = pieces
    db = tmp_path / "features.sqlite"
    build_feature_store(db, lm, tc, documents=documents(20), config=CFG, show_progress=False)
    assert main(["feature", str(db), "1:3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("feature L1:3") and " ms)" in out
    assert main(["feature", str(db), "1:3", "--label", "Texas"]) == 0
    assert "Texas  (your label)" in capsys.readouterr().out
    assert main(["feature", str(db), "--search", "texas"]) == 0
    assert capsys.readouterr().out.startswith("1:3\tTexas")
    assert main(["feature", str(db), "1:3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["label"] == "Texas"
    assert main(["feature", str(db), "9:0"]) == 2
    assert "no feature L9:0" in capsys.readouterr().err


def test_intervene_command(pieces, tmp_path, monkeypatch, capsys):
    lm, tc = pieces
    from cltrace import runs

    loaded = runs.LoadedRun(runs.Run(tmp_path, tmp_path, "cltrace"), lm, tc, "tiny", "cpu")
    monkeypatch.setattr(runs, "open_run", lambda *a, **k: loaded)
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"Texas": ["0_1_2", "1_3_2", "4_9_0"]}))
    argv = [
        "intervene",
        "the capital of Texas is",
        "--transcoder",
        "x",
        "--scale",
        "0:3=0",
        "--set",
        "1:4@-1=5",
        "--supernodes",
        str(groups),
        "--supernode",
        "Texas=-1",
        "--generate",
        "2",
        "--top",
        "3",
        "--json",
    ]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["after"]) == 3 and len(res["interventions"]) == 4 and res["continuation"] is not None
    assert (
        main(
            [
                "intervene",
                "the capital of Texas is",
                "--transcoder",
                "x",
                "--swap-from",
                "the currency of Japan is",
                "--n-auto",
                "3",
            ]
        )
        == 0
    )
    assert "before" in capsys.readouterr().out
    assert main(["intervene", "the capital", "--transcoder", "x"]) == 2
    assert main(["intervene", "the capital", "--transcoder", "x", "--set", "0:999=1"]) == 2


def test_end_to_end_from_saved_model_and_run(pieces, tmp_path, capsys):
    """`cltrace features RUN` -> `cltrace feature RUN L:I` -> `cltrace intervene` on files on disk;
    the run's config names the model it was trained on."""
    import dataclasses

    lm, tc = pieces
    model_dir, run_dir = tmp_path / "model", tmp_path / "run"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    saved = make_transcoder(lm, n_features=24, impl="real")
    saved.cfg = dataclasses.replace(saved.cfg, model_name=str(model_dir))
    saved.save(run_dir)
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(documents(40)))
    assert (
        main(["features", str(run_dir), "--tokens", "300", "--text", str(text), "--context-len", "16"]) == 0
    )
    assert "300 tokens scanned" in capsys.readouterr().out
    assert (run_dir / "features.sqlite").is_file()
    assert (
        main(["features", str(run_dir), "--tokens", "600", "--text", str(text), "--context-len", "16"]) == 0
    )
    assert "600 tokens scanned (300 now" in capsys.readouterr().out
    assert main(["feature", str(run_dir), "2:5"]) == 0
    assert capsys.readouterr().out.startswith("feature L2:5")
    assert (
        main(
            [
                "intervene",
                "the capital of Texas is",
                "--transcoder",
                str(run_dir),
                "--scale",
                "1:2=0",
                "--top",
                "2",
            ]
        )
        == 0
    )
    assert "L1:2 × 0" in capsys.readouterr().out
