"""The one context packer (activations/contexts.py): its rules, and the harvest and the feature
store reading the same contexts from the same text."""

from __future__ import annotations

import random
import sqlite3

import numpy as np
import pytest

from cltrace.activations.contexts import iter_contexts, pack_contexts
from cltrace.activations.harvest import HarvestConfig
from cltrace.activations.harvest import iter_contexts as harvest_contexts
from cltrace.features.build import build_feature_store
from cltrace.features.build import iter_contexts as store_contexts
from cltrace.features.config import FeatureStoreConfig
from test_features_standin import make_transcoder
from tiny import WORDS, tiny_model

BOS, EOS = 1, 2


class WordTokenizer:
    """Whitespace words -> ids 10, 11, ... (no special tokens of its own)."""

    def __init__(self, eos: int | None):
        self.eos_token_id = eos
        self.vocab: dict[str, int] = {}

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [self.vocab.setdefault(w, 10 + len(self.vocab)) for w in text.split()]}


class StubModel:
    """What the packer reads of a LoadedModel: the tokenizer and the BOS id."""

    def __init__(self, bos: int | None, eos: int | None):
        self.bos_token_id, self.tokenizer = bos, WordTokenizer(eos)


def documents(n: int = 12, seed: int = 0, empties: bool = True) -> list[str]:
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 25))) for _ in range(n)]
    if empties:
        docs[1:1] = ["", "   \n\t"]
        docs.append("")
    return docs


def stream(model, docs: list[str], sep: int | None) -> list[int]:
    ids = [model.tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    return [t for d in ids if d for t in d + ([sep] if sep is not None else [])]


# ------------------------------------------------------------------------------ the rules


@pytest.mark.parametrize(
    "bos, eos, first, sep",
    [
        (BOS, EOS, BOS, EOS),  # Gemma-like
        (None, EOS, EOS, EOS),  # no BOS: EOS starts
        (BOS, None, BOS, BOS),  # no EOS: BOS separates
        (None, None, None, None),
    ],
)
def test_bos_and_separator_rules(bos, eos, first, sep):
    model, docs = StubModel(bos, eos), documents()
    contexts = list(iter_contexts(model, docs, 8))
    if first is not None:
        assert all(c[0] == first for c in contexts)
    body = [c[1:] for c in contexts] if first is not None else contexts
    assert [t for c in body for t in c] == stream(model, docs, sep)  # no token lost or added
    assert all(len(c) == 8 for c in contexts[:-1])


def test_empty_documents_are_skipped():
    model = StubModel(BOS, EOS)
    with_empty = list(iter_contexts(model, documents(empties=True), 6))
    assert with_empty == list(iter_contexts(model, documents(empties=False), 6))
    assert list(iter_contexts(model, ["", "  "], 6)) == []


def test_last_short_context_is_kept_or_dropped():
    docs = [list(range(100, 113))]  # 13 tokens, 5 per context
    kept = list(pack_contexts(docs, 6, BOS))
    assert kept == [[BOS, *range(100, 105)], [BOS, *range(105, 110)], [BOS, 110, 111, 112]]
    assert list(pack_contexts(docs, 6, BOS, partial=False)) == kept[:2]
    exact = [list(range(100, 110))]  # a multiple: nothing left over
    assert list(pack_contexts(exact, 6, BOS)) == list(pack_contexts(exact, 6, BOS, partial=False))


# ------------------------------------------------------------------------------ harvest = store


@pytest.fixture(scope="module", params=["bos", "no-bos"])
def lm(request):
    model = tiny_model("gemma")
    if request.param == "no-bos":
        model.__dict__["bos_token_id"] = None  # the cached property: a tokenizer adding none
    return model


def test_harvest_and_store_pack_the_same_contexts(lm):
    docs = documents(40)
    harvested = list(harvest_contexts(lm, docs, HarvestConfig(ctx_len=9, forward_dtype="float32")))
    stored = list(store_contexts(lm, docs, 9))
    assert len(harvested[-1]) < 9  # this text leaves a short last context ...
    assert stored == harvested[:-1]  # ... which only the store leaves out
    assert harvested[0][0] == (lm.bos_token_id if lm.bos_token_id is not None else EOS)


def test_a_built_store_holds_the_harvested_contexts(lm, tmp_path):
    docs = documents(30)
    cfg = FeatureStoreConfig(context_len=9, top_k=2, n_bins=1, per_bin=1, batch_contexts=4)
    path = build_feature_store(
        tmp_path / "f.sqlite",
        lm,
        make_transcoder(lm, n_features=8),
        documents=docs,
        config=cfg,
        effects=False,
        show_progress=False,
    ).path
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT tokens FROM contexts ORDER BY id").fetchall()
    stored = [np.frombuffer(blob, "<i4").tolist() for (blob,) in rows]
    harvested = list(harvest_contexts(lm, docs, HarvestConfig(ctx_len=9, forward_dtype="float32")))
    assert stored == [c for c in harvested if len(c) == 9] and len(stored) == len(harvested) - 1
