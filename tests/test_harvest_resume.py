"""`cltrace harvest` and a store already in --out: --resume, --overwrite, a full disk, a
corrupt shard. Saved work is never lost, and the command says what it does."""

from __future__ import annotations

import errno

import pytest

import test_store
from cltrace import cli
from cltrace.activations import store as store_mod
from cltrace.activations.store import ActivationStore, is_disk_full
from cltrace.errors import CltraceError
from test_store import N_TOKENS, SHARD, cfg, harvest, make_docs, shard_files, shard_list

# test_store's fixtures: the tiny model and an uninterrupted store; CLTRACE_HOME in tmp_path (conftest)
lm, reference = test_store.lm, test_store.reference
pytestmark = pytest.mark.usefixtures("tmp_home")


def fill_disk_after(monkeypatch, n_shards: int) -> None:
    """Shard writes fail with ENOSPC once `n_shards` shards were written."""
    real = store_mod.atomic_save_tensors
    written = []

    def save(*args, **kw):
        if len(written) == n_shards:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(store_mod, "atomic_save_tensors", save)


def test_disk_full_mid_harvest_keeps_the_shards_and_says_what_to_do(lm, reference, tmp_path, monkeypatch):
    fill_disk_after(monkeypatch, 2)
    with pytest.raises(CltraceError) as info:
        harvest(lm, tmp_path)
    text = str(info.value)
    assert text.startswith(f"disk full while writing the store in {tmp_path}")
    assert "free space and rerun the same command with --resume to continue" in text
    store = ActivationStore(tmp_path)
    assert len(store.manifest.shards) == 2 and store.verify() == [] and not store.complete
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "manifest.json",
        "shard_00000.safetensors",
        "shard_00001.safetensors",
    ]  # no temp file left
    monkeypatch.undo()
    harvest(lm, tmp_path)  # the rerun continues to the same store as an uninterrupted one
    assert shard_files(tmp_path) == shard_files(reference)
    assert shard_list(tmp_path) == shard_list(reference)


def test_disk_full_through_the_cli_is_not_an_internal_error(lm, tmp_path, monkeypatch, capsys):
    patch_cli(monkeypatch, lm)
    fill_disk_after(monkeypatch, 1)
    assert cli.main(harvest_argv(tmp_path / "s")) == 2
    err = capsys.readouterr().err
    assert "error: disk full while writing the store" in err and "internal error" not in err
    assert "free space and rerun the same command with --resume to continue" in err
    assert len(ActivationStore(tmp_path / "s").manifest.shards) == 1


def test_disk_full_is_recognised_in_wrapped_errors():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_disk_full(RuntimeError("I/O error: No space left on device (os error 28)"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))


def patch_cli(monkeypatch, lm):
    monkeypatch.setattr("cltrace.models.loading.load_model", lambda *a, **k: lm)
    monkeypatch.setattr("cltrace.commands.harvest._documents", lambda args: (make_docs(), {"name": "test"}))


def harvest_argv(out, *extra: str, tokens: int = N_TOKENS) -> list[str]:
    return [
        "harvest",
        "--out",
        str(out),
        "--tokens",
        str(tokens),
        "--ctx-len",
        "16",
        "--batch",
        "3",
        "--dtype",
        "float32",
        "--store-dtype",
        "float32",
        "--shard-tokens",
        str(SHARD),
        *extra,
    ]


def test_an_existing_store_needs_resume_or_overwrite(lm, reference, tmp_path, monkeypatch, capsys):
    patch_cli(monkeypatch, lm)
    out = tmp_path / "s"
    assert cli.main(harvest_argv(out, "--resume")) == 2
    assert "nothing to resume in" in capsys.readouterr().err
    assert cli.main(harvest_argv(out, tokens=120)) == 0
    saved = shard_files(out)
    assert cli.main(harvest_argv(out)) == 2  # a plain rerun touches nothing
    err = capsys.readouterr().err
    assert f"{out} already holds a complete harvest of 120 tokens" in err
    assert "add --resume to continue or extend it" in err and "--overwrite" in err
    assert shard_files(out) == saved
    assert cli.main(harvest_argv(out, "--resume")) == 0  # extends to N_TOKENS
    assert "continuing the store" in capsys.readouterr().err
    assert shard_files(out) == shard_files(reference)
    (out / "notes.txt").write_text("mine")
    assert cli.main(harvest_argv(out, "--overwrite", tokens=60)) == 0
    assert "deleting the store" in capsys.readouterr().out
    assert ActivationStore(out).n_tokens == 60 and len(shard_list(out)) == 1
    assert (out / "notes.txt").read_text() == "mine"  # only the store's own files go


def test_a_corrupt_shard_is_redone_and_said_so(lm, reference, tmp_path):
    harvest(lm, tmp_path)
    victim = tmp_path / "shard_00001.safetensors"
    victim.write_bytes(victim.read_bytes()[:100])
    notes = []
    store_mod.write_store(
        lm,
        make_docs(),
        tmp_path,
        N_TOKENS,
        cfg(),
        shard_tokens=SHARD,
        corpus={"name": "test"},
        log=notes.append,
    )
    assert notes[0] == (
        "note: shard_00001.safetensors is missing, truncated or corrupt (size or "
        "sha256 differ from the manifest): harvesting it and the 3 shards after it "
        "again"
    )
    assert "60 tokens in 1 complete shards are kept" in notes[1]
    assert shard_files(tmp_path) == shard_files(reference)
