"""Bad input a new user tries: a model folder of an unknown architecture, a binary file given
as --text. Each is a one-line error saying what is wrong, never "internal error"."""

from __future__ import annotations

import json
import random

import pytest

from cltrace import cli
from cltrace.data.corpus import MAX_INVALID_UTF8, iter_documents
from cltrace.errors import CltraceError
from cltrace.models.adapters import ADAPTERS
from cltrace.models.loading import load_model

pytestmark = pytest.mark.usefixtures("tmp_home")  # tests/conftest.py: CLTRACE_HOME under tmp_path


@pytest.mark.parametrize("model_type", ["foonet", "bert"])  # unknown to transformers / to cltrace
def test_unknown_model_type_names_the_supported_ones(tmp_path, model_type, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, "hidden_size": 8}))
    supported = ", ".join(sorted(ADAPTERS))
    with pytest.raises(CltraceError, match=f"unsupported model_type '{model_type}'; supported: "):
        load_model(str(folder))
    rc = cli.main(["harvest", "--model", str(folder), "--tokens", "10", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert rc == 2 and "internal error" not in err
    assert f"error: unsupported model_type '{model_type}'; supported: {supported}" in err


def test_unreadable_config_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(CltraceError, match="cannot read .*config.json"):
        load_model(str(tmp_path))


def random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.mark.parametrize(
    "name, payload",
    [
        ("noise.txt", random_bytes(5000)),  # NUL bytes among them
        ("noise.jsonl", random_bytes(5000)),
        ("latin.txt", bytes(b for b in random_bytes(20_000, 1) if b >= 0x80)),  # no NUL, not UTF-8
    ],
)
def test_binary_text_files_are_refused(tmp_path, name, payload):
    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(CltraceError, match=f"{path} is a binary file"):
        list(iter_documents(paths=[str(path)]))
    folder = tmp_path / "folder"  # also inside a folder
    folder.mkdir()
    (folder / "good.txt").write_text("plain text\n")
    (folder / name).write_bytes(payload)
    with pytest.raises(CltraceError, match="is a binary file"):
        list(iter_documents(paths=[str(folder)]))


def test_a_few_bad_bytes_are_read_with_a_warning(tmp_path, capsys):
    text = "café au lait " * 100
    data = text.encode("utf-8").replace("é".encode(), b"\xe9", 3)  # three Latin-1 bytes
    assert 3 / len(data) < MAX_INVALID_UTF8
    (tmp_path / "a.txt").write_bytes(data)
    (doc,) = iter_documents(paths=[str(tmp_path / "a.txt")])
    assert doc.count("\ufffd") == 3 and doc.count("café") == 97
    assert "warning: 3 bytes of" in capsys.readouterr().err


def test_harvest_refuses_a_binary_text_file(tmp_path, capsys, monkeypatch):
    """Through the CLI (eval and features read --text through the same iter_documents)."""
    from tiny import tiny_model

    lm = tiny_model("gemma")
    monkeypatch.setattr("cltrace.models.loading.load_model", lambda *a, **k: lm)
    noise = tmp_path / "noise.bin.txt"
    noise.write_bytes(random_bytes(4000))
    rc = cli.main(
        [
            "harvest",
            "--text",
            str(noise),
            "--tokens",
            "50",
            "--ctx-len",
            "16",
            "--dtype",
            "float32",
            "--out",
            str(tmp_path / "s"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and f"error: {noise} is a binary file" in err


def test_a_full_disk_in_any_command_is_not_an_internal_error(monkeypatch, capsys):
    import errno

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("cltrace.commands.models.run", full)
    assert cli.main(["models"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: disk full: [Errno 28] No space left on device")
    assert "free space and rerun the same command" in err and "internal error" not in err
