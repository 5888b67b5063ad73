"""The on-disk store: round trip, resume after interruption or corruption, disk-full check."""

from __future__ import annotations

import json
import random
from collections import Counter, namedtuple

import pytest
import torch

from cltrace.activations import store as store_mod
from cltrace.activations.harvest import HarvestConfig, iter_contexts, iter_token_rows, limit_contexts
from cltrace.activations.store import ActivationStore, write_store
from cltrace.errors import CltraceError
from tiny import WORDS, tiny_model

N_TOKENS = 300
SHARD = 60  # 4 contexts of 15 tokens


def make_docs(n: int = 40, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 50))) for _ in range(n)]


def cfg() -> HarvestConfig:
    return HarvestConfig(ctx_len=16, batch_contexts=3, forward_dtype="float32", store_dtype="float32")


def keys(batch) -> list[bytes]:
    both = torch.cat([batch.mlp_in, batch.mlp_out], dim=1).float()
    return [r.numpy().tobytes() for r in both]


def harvest(lm, out, n_tokens=N_TOKENS, docs=None):
    return write_store(
        lm,
        make_docs() if docs is None else docs,
        out,
        n_tokens,
        cfg(),
        shard_tokens=SHARD,
        corpus={"name": "test"},
    )


def shard_files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard_*"))}


def shard_list(folder) -> list[dict]:
    return json.loads((folder / "manifest.json").read_text())["shards"]


pytestmark = pytest.mark.usefixtures("tmp_home")  # tests/conftest.py: CLTRACE_HOME under tmp_path


@pytest.fixture(scope="module")
def lm():
    return tiny_model("gemma")


@pytest.fixture(scope="module")
def reference(lm, tmp_path_factory):
    """An uninterrupted harvest."""
    out = tmp_path_factory.mktemp("ref")
    harvest(lm, out)
    return out


def test_round_trip(lm, reference):
    store = ActivationStore(reference)
    contexts = limit_contexts(iter_contexts(lm, make_docs(), cfg()), N_TOKENS)
    expect = Counter(k for chunk in iter_token_rows(lm, contexts, cfg()) for k in keys(chunk))
    for shuffle in (False, True):
        batches = list(store.iter_batches(32, shuffle=shuffle, seed=3))
        assert [b.n_tokens for b in batches[:-1]] == [32] * (len(batches) - 1)
        assert Counter(k for b in batches for k in keys(b)) == expect
    m = store.manifest
    assert store.n_tokens == N_TOKENS and store.complete and store.verify() == []
    assert m.layers == [0, 1, 2] and m.d_model == 32 and m.dtype == "float32"
    assert m.tokens_per_shard == SHARD and len(m.shards) == 5 and m.corpus == {"name": "test"}
    assert m.config["ctx_len"] == 16 and m.config["forward_dtype"] == "float32"
    first = store.load_shard(0)
    assert first.mlp_in.shape == (SHARD, 3, 32)


def test_reading_order_depends_on_seed(reference):
    store = ActivationStore(reference)
    a = next(store.iter_batches(32, seed=0)).mlp_in
    assert torch.equal(a, next(store.iter_batches(32, seed=0)).mlp_in)
    assert not torch.equal(a, next(store.iter_batches(32, seed=1)).mlp_in)


def test_several_epochs_visit_every_token_once_per_epoch_in_new_orders(reference):
    store = ActivationStore(reference)
    once = Counter(k for b in store.iter_batches(32, seed=5) for k in keys(b))
    batches = list(store.iter_batches(32, seed=5, epochs=3))
    assert all(b.n_tokens == 32 for b in batches[:-1])
    seen = [k for b in batches for k in keys(b)]
    assert Counter(seen) == Counter({k: 3 * n for k, n in once.items()})
    n = store.n_tokens
    assert seen[:n] != seen[n : 2 * n] != seen[2 * n :]  # each pass reshuffled
    with pytest.raises(CltraceError, match="epochs"):
        store.iter_batches(32, epochs=0)


def test_resume_after_kill_between_shards(lm, reference, tmp_path, monkeypatch):
    real_save = store_mod._save_shard
    calls = []

    def dying_save(*args, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed before the third shard is written
        calls.append(1)
        return real_save(*args, **kw)

    monkeypatch.setattr(store_mod, "_save_shard", dying_save)
    with pytest.raises(KeyboardInterrupt):
        harvest(lm, tmp_path)
    assert len(shard_list(tmp_path)) == 2 and not ActivationStore(tmp_path).complete
    monkeypatch.setattr(store_mod, "_save_shard", real_save)
    harvest(lm, tmp_path)
    assert shard_files(tmp_path) == shard_files(reference)
    assert shard_list(tmp_path) == shard_list(reference)


def test_resume_after_kill_between_shard_and_manifest(lm, reference, tmp_path, monkeypatch):
    real = store_mod.Manifest.save
    calls = []

    def dying_save(self, folder):
        calls.append(1)
        if len(calls) == 4:  # initial manifest, shard 0, shard 1, then die after shard 2's rename
            raise KeyboardInterrupt
        real(self, folder)

    monkeypatch.setattr(store_mod.Manifest, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        harvest(lm, tmp_path)
    (tmp_path / "shard_00003.safetensors.tmp").write_bytes(b"half a shard")  # a leftover temp file
    monkeypatch.setattr(store_mod.Manifest, "save", real)
    harvest(lm, tmp_path)
    assert shard_files(tmp_path) == shard_files(reference)
    assert shard_list(tmp_path) == shard_list(reference)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupt_shard_is_rebuilt(lm, reference, tmp_path, damage):
    harvest(lm, tmp_path)
    victim = tmp_path / "shard_00002.safetensors"
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        victim.write_bytes(data[:-5] + bytes([data[-5] ^ 1]) + data[-4:])
    else:
        victim.unlink()
    assert ActivationStore(tmp_path).verify() == ["shard_00002.safetensors"]
    harvest(lm, tmp_path)
    assert shard_files(tmp_path) == shard_files(reference)
    assert ActivationStore(tmp_path).verify() == []


def test_more_tokens_extends_the_store(lm, reference, tmp_path):
    harvest(lm, tmp_path, n_tokens=130)  # ends with a short shard (10 tokens), rebuilt on extension
    harvest(lm, tmp_path, n_tokens=N_TOKENS)
    assert shard_files(tmp_path) == shard_files(reference)


def test_different_settings_are_refused(lm, tmp_path):
    harvest(lm, tmp_path, n_tokens=60)
    other = HarvestConfig(ctx_len=32, forward_dtype="float32", store_dtype="float32")
    with pytest.raises(CltraceError, match="different harvest"):
        write_store(lm, make_docs(), tmp_path, 60, other, shard_tokens=SHARD, corpus={"name": "test"})


def test_disk_full_is_a_clear_error_and_the_store_stays_whole(lm, reference, tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    real = store_mod.shutil.disk_usage
    shards_before_full = []

    def fake_usage(path):
        if len(list(tmp_path.glob("shard_*.safetensors"))) >= 2:
            shards_before_full.append(1)
            return Usage(10**12, 10**12 - 1000, 1000)
        return real(path)

    monkeypatch.setattr(store_mod.shutil, "disk_usage", fake_usage)
    with pytest.raises(
        CltraceError,
        match=r"not enough disk space in .*: need ~.* GB for 180 tokens, "
        r"0\.00 GB free; use --tokens fewer or another --out",
    ):
        harvest(lm, tmp_path)
    store = ActivationStore(tmp_path)
    assert store.n_tokens == 120 and store.verify() == [] and not store.complete
    monkeypatch.setattr(store_mod.shutil, "disk_usage", real)
    harvest(lm, tmp_path)
    assert shard_files(tmp_path) == shard_files(reference)


def test_empty_corpus_is_a_clear_error(lm, tmp_path):
    with pytest.raises(CltraceError, match="no text"):
        harvest(lm, tmp_path, docs=["", " "])


def test_not_a_store(tmp_path):
    with pytest.raises(CltraceError, match="not an activation store"):
        ActivationStore(tmp_path)
