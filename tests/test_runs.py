"""cltrace.runs: one way to open a run (folder or name, transcoder, model name, device)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from cltrace import runs
from cltrace.errors import CltraceError
from cltrace.hardware import resolve_device
from cltrace.models import DEFAULT_MODEL
from cltrace.transcoders.config import TranscoderConfig
from cltrace.transcoders.model import Transcoder


def _transcoder(model_name: str | None = "my-model") -> Transcoder:
    torch.manual_seed(0)
    return Transcoder(TranscoderConfig(n_layers=2, d_model=8, n_features=4, model_name=model_name))


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CLTRACE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_a_trained_run_by_folder_by_name_and_by_its_transcoder_folder(home):
    run_dir = home / "runs" / "r1"
    saved = _transcoder()
    saved.save(run_dir / "transcoder")
    for spec in (run_dir, "r1", run_dir / "transcoder"):
        run = runs.resolve_run(spec)
        assert run.dir == run_dir.resolve() and run.name == "r1" and run.format == "cltrace"
        assert run.transcoder_dir == (run_dir / "transcoder").resolve()
        assert run.feature_store == run_dir.resolve() / "features.sqlite"
    tc = runs.load_transcoder("r1", "cpu")
    assert not tc.training and not any(p.requires_grad for p in tc.parameters())
    for name, value in saved.state_dict().items():
        assert torch.equal(tc.state_dict()[name], value)


def test_a_folder_holding_the_transcoder_directly(tmp_path, home):
    _transcoder().save(tmp_path / "tc")
    run = runs.resolve_run(tmp_path / "tc")
    assert run.dir == run.transcoder_dir == (tmp_path / "tc").resolve() and run.name == "tc"


def test_wrong_paths_are_clear_errors_with_hints(tmp_path, home):
    _transcoder().save(home / "runs" / "known" / "transcoder")
    with pytest.raises(CltraceError, match="no transcoder run at") as err:
        runs.resolve_run(tmp_path / "nothing")
    assert "known" in err.value.hint  # the runs that do exist are listed
    (tmp_path / "empty").mkdir()
    with pytest.raises(CltraceError, match="holds no transcoder"):
        runs.resolve_run(tmp_path / "empty")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CltraceError, match="is a file"):
        runs.resolve_run(tmp_path / "file.txt")


def test_a_corrupt_or_truncated_config_is_a_clear_error(tmp_path, home):
    _transcoder().save(tmp_path / "tc")
    (tmp_path / "tc" / "config.json").write_text("{not json")
    with pytest.raises(CltraceError, match="not valid JSON"):
        runs.load_transcoder(tmp_path / "tc", "cpu")
    (tmp_path / "tc" / "config.json").write_text('{"n_layers": 2}')
    with pytest.raises(CltraceError):
        runs.load_transcoder(tmp_path / "tc", "cpu")
    (tmp_path / "tc" / "config.json").write_text("[1, 2]")
    with pytest.raises(CltraceError, match="expected a JSON object"):
        runs.load_transcoder(tmp_path / "tc", "cpu")


def test_missing_or_corrupt_weights_are_clear_errors(tmp_path, home):
    _transcoder().save(tmp_path / "tc")
    weights = tmp_path / "tc" / "transcoder.safetensors"
    weights.unlink()
    with pytest.raises(CltraceError, match="no file"):
        runs.load_transcoder(tmp_path / "tc", "cpu")
    weights.write_bytes(b"garbage")
    with pytest.raises(CltraceError, match="not a readable safetensors file"):
        runs.load_transcoder(tmp_path / "tc", "cpu")


def test_the_model_is_named_by_the_override_then_the_config_then_the_default(tmp_path, home, capsys):
    _transcoder().save(tmp_path / "tc")
    run = runs.resolve_run(tmp_path / "tc")
    tc = runs.load_transcoder(run, "cpu")
    assert runs.model_name(run, tc, "other") == "other"
    assert runs.model_name(run, tc) == "my-model"
    tc.cfg = dataclasses.replace(tc.cfg, model_name=None)
    assert runs.model_name(run, tc) == DEFAULT_MODEL
    assert "does not say which model" in capsys.readouterr().err


def test_store_path(tmp_path, home):
    _transcoder().save(home / "runs" / "r" / "transcoder")
    db = tmp_path / "x.sqlite"
    db.write_bytes(b"")
    assert runs.store_path(db) == db
    assert runs.store_path("r", tmp_path / "other.db") == tmp_path / "other.db"
    assert runs.store_path("r") == (home / "runs" / "r").resolve() / "features.sqlite"
    assert (
        runs.store_path(home / "runs" / "r" / "transcoder")
        == (home / "runs" / "r").resolve() / "features.sqlite"
    )


def test_one_device_rule():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == resolve_device(None) == expected
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(CltraceError, match="unknown device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(CltraceError, match="no CUDA"):
            resolve_device("cuda")


def test_every_command_defaults_to_the_same_device():
    from cltrace.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    defaults = {
        name: next((a.default for a in p._actions if a.dest == "device"), "none")
        for name, p in sub.choices.items()
    }
    with_device = {n: d for n, d in defaults.items() if d != "none"}
    assert {"trace", "features", "eval", "intervene", "serve", "train", "harvest", "demo"} <= set(with_device)
    assert set(with_device.values()) == {"auto"}


def test_the_viewer_and_the_demo_do_not_import_the_cli_commands():
    code = (
        "import sys, cltrace.viewer.server, cltrace.viewer.backend, cltrace.viewer.model_backend, "
        "cltrace.demo, cltrace.runs; "
        "print(sorted(m for m in sys.modules if m.startswith('cltrace.commands') or m == 'cltrace.cli'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
