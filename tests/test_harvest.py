"""Harvest: packing, exact parity with LoadedModel.capture, the shuffle buffer, the CLI."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from cltrace.activations.buffer import ActivationBatch, ShuffleBuffer, rebatch, repeat_later
from cltrace.activations.harvest import (
    HarvestConfig,
    batch_contexts,
    iter_activation_batches,
    iter_contexts,
    iter_token_rows,
    pack_contexts,
)
from cltrace.errors import CltraceError
from tiny import WORDS, tiny_model

BOS, EOS = 1, 2


def make_docs(n: int = 40, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 50))) for _ in range(n)]


def fp32_cfg(**kw) -> HarvestConfig:
    return HarvestConfig(
        **(
            {
                "ctx_len": 16,
                "batch_contexts": 4,
                "buffer_tokens": 128,
                "forward_dtype": "float32",
                "store_dtype": "float32",
            }
            | kw
        )
    )


def row_keys(acts: ActivationBatch) -> list[bytes]:
    """One exact key per token row (MLP input and output together)."""
    both = torch.cat([acts.mlp_in, acts.mlp_out], dim=1).float()
    return [row.numpy().tobytes() for row in both]


pytestmark = pytest.mark.usefixtures("tmp_home")  # tests/conftest.py: CLTRACE_HOME under tmp_path


@pytest.fixture(scope="module")
def gemma():
    return tiny_model("gemma")


# ------------------------------------------------------------------------------ packing


def test_packing_puts_bos_first_and_loses_no_token():
    docs = [list(range(100 + 10 * i, 100 + 10 * i + n)) for i, n in enumerate([5, 40, 1, 17, 33])]
    stream = [t for d in docs for t in d]
    contexts = list(pack_contexts(docs, ctx_len=8, bos=BOS))
    assert all(c[0] == BOS for c in contexts)
    assert all(len(c) == 8 for c in contexts[:-1]) and 2 <= len(contexts[-1]) <= 8
    assert [t for c in contexts for t in c[1:]] == stream


def test_documents_are_separated_by_eos(gemma):
    contexts = list(iter_contexts(gemma, ["the city", "", "Paris is hot"], fp32_cfg(ctx_len=4)))
    ids = gemma.tokenizer
    expect = ids("the city", add_special_tokens=False)["input_ids"] + [EOS]
    expect += ids("Paris is hot", add_special_tokens=False)["input_ids"] + [EOS]
    assert [c[0] for c in contexts] == [BOS] * len(contexts)
    assert [t for c in contexts for t in c[1:]] == expect


def test_models_without_bos_start_contexts_with_eos():
    """SmolLM2-like: no BOS is added, so contexts start with the document separator (EOS)."""
    lm = tiny_model("llama")
    lm.__dict__["bos_token_id"] = None  # the cached property, as for a tokenizer adding none
    contexts = list(iter_contexts(lm, make_docs(5), fp32_cfg(ctx_len=8)))
    assert all(c[0] == EOS for c in contexts) and all(len(c) == 8 for c in contexts[:-1])


def test_batches_hold_equal_length_contexts():
    contexts = [[1] * 8] * 5 + [[1] * 3]
    groups = list(batch_contexts(contexts, 2))
    assert [len(g) for g in groups] == [2, 2, 1, 1]
    assert all(len({len(c) for c in g}) == 1 for g in groups)


# ------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("family", ["gemma", "llama", "gpt2"])
def test_harvested_rows_equal_capture_exactly(family):
    lm = tiny_model(family)
    cfg = fp32_cfg()
    contexts = list(iter_contexts(lm, make_docs(12), cfg))
    rows = list(iter_token_rows(lm, contexts, cfg))
    for group, got in zip(batch_contexts(contexts, cfg.batch_contexts), rows):
        cap = lm.capture(torch.tensor(group))
        for b, ctx in enumerate(group):
            n = len(ctx) - 1
            sl = slice(b * n, (b + 1) * n)
            assert torch.equal(got.mlp_in[sl], cap.mlp_in[b, 1:])
            assert torch.equal(got.mlp_out[sl], cap.mlp_out[b, 1:])
    # and a context alone (batch of one) agrees to float32 rounding
    single = lm.capture(torch.tensor([contexts[1]]))
    torch.testing.assert_close(rows[0].mlp_in[15:30], single.mlp_in[0, 1:], rtol=1e-5, atol=1e-5)


def test_stream_emits_every_token_once_and_mixes_contexts(gemma):
    cfg = fp32_cfg()
    docs = make_docs()
    contexts = list(iter_contexts(gemma, docs, cfg))
    reference = [r for chunk in iter_token_rows(gemma, contexts, cfg) for r in row_keys(chunk)]
    owner = {key: i // (cfg.ctx_len - 1) for i, key in enumerate(reference)}
    batches = list(iter_activation_batches(gemma, docs, cfg, batch_tokens=50))
    emitted = [k for b in batches for k in row_keys(b)]
    assert Counter(emitted) == Counter(reference)
    assert all(b.n_tokens == 50 for b in batches[:-1])
    assert len({owner[k] for k in row_keys(batches[0])}) >= 5  # many contexts in one batch


def test_max_tokens_is_exact(gemma):
    batches = list(iter_activation_batches(gemma, make_docs(), fp32_cfg(), batch_tokens=32, max_tokens=100))
    assert sum(b.n_tokens for b in batches) == 100


def test_repeats_emit_every_token_twice_in_different_batches(gemma):
    cfg = fp32_cfg()
    docs = make_docs(80)
    reference = [
        r for chunk in iter_token_rows(gemma, iter_contexts(gemma, docs, cfg), cfg) for r in row_keys(chunk)
    ]
    batches = list(iter_activation_batches(gemma, docs, cfg, batch_tokens=50, repeats=2))
    emitted = [row_keys(b) for b in batches]
    assert Counter(k for keys in emitted for k in keys) == Counter(reference + reference)
    same_batch = sum(len(keys) - len(set(keys)) for keys in emitted)
    assert same_batch <= 0.05 * len(reference)  # the copies pass through the buffer apart
    # without the gap the copies follow each other and often share a batch
    cfg0 = fp32_cfg(buffer_tokens=128)
    rows = iter_token_rows(gemma, iter_contexts(gemma, docs, cfg0), cfg0)
    gen = torch.Generator().manual_seed(0)
    buffer = ShuffleBuffer(128, gemma.n_layers, gemma.d_model, torch.float32, gen)
    adjacent = []
    for chunk in repeat_later(rows, 2, gap_tokens=0):
        while chunk.n_tokens:
            chunk = buffer.push(chunk)
            if buffer.full:
                adjacent.append(row_keys(buffer.pop_half()))
    assert sum(len(k) - len(set(k)) for k in adjacent) > 4 * max(same_batch, 1)


def test_repeats_read_half_the_tokens_for_max_tokens(gemma):
    batches = list(
        iter_activation_batches(gemma, make_docs(), fp32_cfg(), batch_tokens=10, max_tokens=101, repeats=2)
    )
    keys = [k for b in batches for k in row_keys(b)]
    assert len(keys) == 102 and all(n % 2 == 0 for n in Counter(keys).values())  # 51 harvested, twice


def test_repeat_later_spacing_and_order():
    chunks = [ActivationBatch(torch.full((3, 1, 1), float(i)), torch.zeros(3, 1, 1)) for i in range(6)]
    out = [int(c.mlp_in[0, 0, 0]) for c in repeat_later(chunks, 3, gap_tokens=6)]
    # fresh chunks in order; chunk i again once 6 and 12 more fresh tokens (2 and 4 chunks) came
    # after it, the earlier-queued first on a tie; the repeats still due at the end in due order
    assert out == [0, 1, 2, 0, 3, 1, 4, 0, 2, 5, 1, 3, 2, 4, 3, 5, 4, 5]
    assert [int(c.mlp_in[0, 0, 0]) for c in repeat_later(chunks, 1, gap_tokens=6)] == list(range(6))
    with pytest.raises(ValueError, match="times"):
        list(repeat_later(chunks, 0, gap_tokens=6))


def test_bf16_forward_and_storage_dtype():
    lm = tiny_model("llama")
    lm.model.to(torch.bfloat16)
    cfg = HarvestConfig(ctx_len=16, forward_dtype="bfloat16", buffer_tokens=64)
    batch = next(iter_activation_batches(lm, make_docs(), cfg, batch_tokens=20))
    assert batch.mlp_in.dtype == torch.bfloat16 and batch.mlp_in.shape == (20, 3, 32)
    assert batch.to(dtype=torch.float32).mlp_out.dtype == torch.float32


def test_layer_subset(gemma):
    cfg = fp32_cfg(layers=(0, 2))
    batch = next(iter_activation_batches(gemma, make_docs(), cfg, batch_tokens=10))
    assert batch.mlp_in.shape == (10, 2, 32)
    with pytest.raises(CltraceError, match="layer 5 does not exist"):
        next(iter_activation_batches(gemma, make_docs(), fp32_cfg(layers=(5,)), batch_tokens=10))


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("docs", [[], ["", "   \n"]])
def test_empty_corpus_is_a_clear_error(gemma, docs):
    with pytest.raises(CltraceError, match="no text"):
        next(iter_activation_batches(gemma, docs, fp32_cfg()))


def test_model_dtype_must_match_forward_dtype(gemma):
    with pytest.raises(CltraceError, match="loaded in float32"):
        next(iter_activation_batches(gemma, make_docs(), fp32_cfg(forward_dtype="bfloat16")))


def test_float16_storage_warns_for_gemma(gemma):
    with pytest.warns(UserWarning, match="float16"):
        next(iter_activation_batches(gemma, make_docs(), fp32_cfg(store_dtype="float16")))


@pytest.mark.parametrize(
    "bad",
    [
        dict(ctx_len=1),
        dict(batch_contexts=0),
        dict(buffer_tokens=1),
        dict(forward_dtype="float16"),
        dict(store_dtype="int8"),
        dict(layers=(2, 1)),
        dict(layers=()),
    ],
)
def test_config_checks(bad):
    with pytest.raises(ValueError):
        HarvestConfig(**bad)


# ------------------------------------------------------------------------------ buffer


def doc_chunks(sizes: list[int]) -> list[ActivationBatch]:
    """Chunk k holds one document: mlp_in = document id, mlp_out = global token index."""
    chunks, start = [], 0
    for doc, n in enumerate(sizes):
        ids = torch.arange(start, start + n, dtype=torch.float32)
        chunks.append(ActivationBatch(torch.full((n, 1, 1), float(doc)), ids.view(n, 1, 1)))
        start += n
    return chunks


def test_shuffle_buffer_mixes_documents_emits_each_token_once_and_stays_bounded():
    rng = random.Random(1)
    sizes = [rng.randint(20, 120) for _ in range(60)]
    buf = ShuffleBuffer(256, 1, 1, torch.float32, torch.Generator().manual_seed(0))
    emitted = []
    for chunk in doc_chunks(sizes):
        while chunk.n_tokens:
            chunk = buf.push(chunk)
            assert len(buf) <= buf.capacity
            if buf.full:
                emitted.append(buf.pop_half())
    emitted.append(buf.drain())
    assert len(buf) == 0 and buf._in.shape[0] == 256
    ids = torch.cat([e.mlp_out.flatten() for e in emitted])
    assert sorted(ids.tolist()) == list(range(sum(sizes)))
    for half in emitted[1:-1]:
        assert half.n_tokens == 128
        assert half.mlp_in.unique().numel() >= 4  # several documents in every emission


def test_harvest_buffer_never_exceeds_capacity(gemma, monkeypatch):
    peak = []

    class Watched(ShuffleBuffer):
        def push(self, acts):
            rest = super().push(acts)
            peak.append(len(self))
            return rest

    monkeypatch.setattr("cltrace.activations.harvest.ShuffleBuffer", Watched)
    list(iter_activation_batches(gemma, make_docs(), fp32_cfg(buffer_tokens=100), batch_tokens=30))
    assert peak and max(peak) <= 100


def test_rebatch_cuts_exact_sizes():
    chunks = doc_chunks([7, 3, 20, 1, 9])
    out = list(rebatch(chunks, 8))
    assert [b.n_tokens for b in out] == [8, 8, 8, 8, 8]
    assert torch.cat([b.mlp_out.flatten() for b in out]).tolist() == list(range(40))
    assert [b.n_tokens for b in rebatch(doc_chunks([5, 6]), 4, drop_last=True)] == [4, 4]


# ------------------------------------------------------------------------------ CLI


def test_cli_harvest_writes_a_store(tmp_path, monkeypatch, gemma):
    from cltrace import cli
    from cltrace.activations.store import ActivationStore

    monkeypatch.setattr("cltrace.models.loading.load_model", lambda *a, **k: gemma)
    monkeypatch.setattr("cltrace.commands.harvest._documents", lambda args: (make_docs(), {"split": "t"}))
    out = tmp_path / "store"
    rc = cli.main(
        [
            "harvest",
            "--out",
            str(out),
            "--tokens",
            "200",
            "--ctx-len",
            "16",
            "--dtype",
            "float32",
            "--shard-tokens",
            "64",
        ]
    )
    assert rc == 0
    store = ActivationStore(out)
    assert store.n_tokens == 200 and store.complete and len(store.manifest.shards) == 4


def test_cli_help_mentions_flags(capsys):
    from cltrace import cli

    with pytest.raises(SystemExit):
        cli.main(["harvest", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--model",
        "--text",
        "--split",
        "--tokens",
        "--out",
        "--dtype",
        "--store-dtype",
        "--ctx-len",
        "--batch",
    ):
        assert flag in text
