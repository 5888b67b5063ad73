"""The feature store against brute force on a tiny model + tiny transcoder: top-k, counters,
reservoirs, token effects; resuming after a stop; user labels surviving rebuilds."""

import json
import random
import time

import pytest
import torch

from cltrace.errors import CltraceError
from cltrace.features.dashboard import render
from cltrace.features.store import (
    FeatureStore,
    FeatureStoreConfig,
    build_feature_store,
    final_norm_gain,
    iter_contexts,
    token_effects,
)
from test_features_standin import make_transcoder
from tiny import WORDS, tiny_model

CFG = FeatureStoreConfig(
    context_len=12,
    top_k=6,
    n_bins=3,
    per_bin=2,
    n_effects=5,
    batch_contexts=3,
    flush_tokens=40,
    encode_elems=3 * 24 * 20,
)


def documents(n=60, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30))) for _ in range(n)]


@pytest.fixture(scope="module")
def lm():
    return tiny_model("gemma")


@pytest.fixture(scope="module")
def tc(lm):
    return make_transcoder(lm, n_features=24)


@pytest.fixture(scope="module")
def built(lm, tc, tmp_path_factory):
    path = tmp_path_factory.mktemp("fs") / "features.sqlite"
    build_feature_store(path, lm, tc, documents=documents(), config=CFG, show_progress=False)
    return path


def brute_force(lm, tc, store):
    """All activations over the stored contexts: acts [C, n-1, L, F], locations [C, n-1]."""
    rows = store.conn.execute("SELECT id, tokens FROM contexts ORDER BY id").fetchall()
    tokens = torch.tensor([list(torch.frombuffer(bytearray(b), dtype=torch.int32)) for _, b in rows])
    with torch.no_grad():
        acts = tc.activate(tc.encode(lm.capture(tokens).mlp_in[:, 1:]))
    n = store.context_len
    loc = torch.tensor([r[0] for r in rows])[:, None] * n + torch.arange(1, n)[None, :]
    return acts, loc


def test_contexts_pack_documents_with_bos_and_eos(lm):
    docs = documents(5)
    ctxs = list(iter_contexts(lm, docs, 7))
    stream = [
        t
        for d in docs
        for t in lm.tokenizer(d, add_special_tokens=False)["input_ids"] + [lm.tokenizer.eos_token_id]
    ]
    assert all(len(c) == 7 and c[0] == lm.bos_token_id for c in ctxs)
    assert [t for c in ctxs for t in c[1:]] == stream[: 6 * len(ctxs)]


def test_top_k_and_counters_match_brute_force(lm, tc, built):
    store = FeatureStore(built)
    acts, loc = brute_force(lm, tc, store)
    assert store.progress()[1] == acts.shape[0] * acts.shape[1]
    flat, flat_loc = acts.reshape(-1, lm.n_layers, 24), loc.reshape(-1)
    checked = 0
    for layer in range(lm.n_layers):
        for f in range(24):
            col = flat[:, layer, f]
            card = store.dashboard(layer, f)
            assert card["n_fires"] == int((col > 0).sum())
            if card["n_fires"] == 0:
                assert card["contexts"] == [] and card["density"] == 0
                continue
            assert card["density"] == pytest.approx(float((col > 0).float().mean()))
            assert card["mean_activation"] == pytest.approx(float(col[col > 0].mean()), rel=1e-5)
            assert card["max_activation"] == pytest.approx(float(col.max()), rel=1e-6)
            k = min(CFG.top_k, card["n_fires"])
            want_v, want_i = col.topk(k)
            got = [(c["value"], c["context_id"] * CFG.context_len + c["position"]) for c in card["contexts"]]
            assert [v for v, _ in got] == pytest.approx(want_v.tolist(), rel=1e-5)
            row_of = {int(l): r for r, l in enumerate(flat_loc)}  # ties: any tied location is right
            assert [float(col[row_of[l]]) for _, l in got] == pytest.approx(want_v.tolist(), rel=1e-5)
            assert len({l for _, l in got}) == k
            checked += 1
    assert checked > 40


def test_reservoir_examples_are_real_and_spread(lm, tc, built):
    store = FeatureStore(built)
    acts, loc = brute_force(lm, tc, store)
    value_at = {int(l): acts.reshape(-1, lm.n_layers, 24)[i] for i, l in enumerate(loc.reshape(-1))}
    for layer, f in ((0, 1), (1, 5), (2, 9)):
        card = store.dashboard(layer, f)
        bins = card["quantiles"]
        assert len(bins) >= 2
        for q in bins:
            assert 1 <= len(q["examples"]) <= CFG.per_bin
            for ex in q["examples"]:
                v = float(value_at[ex["context_id"] * CFG.context_len + ex["position"]][layer, f])
                assert ex["value"] == pytest.approx(v, rel=1e-5)
                assert q["low"] - 1e-6 <= v <= q["high"] + 1e-6


def test_token_effects_follow_the_frozen_final_norm(lm, tc):
    layer, f = 1, 3
    p_ids, p_val, s_ids, s_val = token_effects(lm, tc, layer, 5)
    direction = tc.decoder_weight(layer)[f].sum(0)  # total write [d]
    norm, unembed = lm.adapter.final_norm(lm.model), lm.adapter.unembed(lm.model)
    r = torch.randn(lm.d_model)
    scale = torch.rsqrt(r.pow(2).mean() + 1e-6)
    delta = unembed(lm.adapter.frozen_norm(norm, r + direction, scale)) - unembed(
        lm.adapter.frozen_norm(norm, r, scale)
    )
    torch.testing.assert_close(p_val[f] * scale, delta.topk(5).values, rtol=1e-4, atol=1e-5)
    assert p_ids[f].tolist() == delta.topk(5).indices.tolist()
    assert s_ids[f].tolist() == (-delta).topk(5).indices.tolist()
    assert final_norm_gain(lm).shape == (lm.d_model,)


def test_dashboard_is_json_and_renders(built):
    store = FeatureStore(built)
    card = store.dashboard(1, 5)
    json.dumps(card)
    assert card["promoted"] and card["suppressed"] and card["label"]
    text = render(card)
    assert "[[" in text and "promotes:" in text
    t0 = time.perf_counter()
    for f in range(24):
        store.dashboard(2, f)
    assert (time.perf_counter() - t0) / 24 < 0.1


def dump(path):
    """Everything a build writes, for equality checks."""
    store = FeatureStore(path)
    tables = {
        t: store.conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()
        for t in ("contexts", "vocab", "features", "layer_stats", "effects", "auto_labels")
    }
    tables["progress"] = store.progress()
    store.close()
    return tables


def test_resumed_build_equals_uninterrupted_build(lm, tc, built, tmp_path):
    path = tmp_path / "f.sqlite"
    per_batch = CFG.batch_contexts * (CFG.context_len - 1)
    s1 = build_feature_store(
        path, lm, tc, documents=documents(), config=CFG, max_tokens=2 * per_batch, show_progress=False
    )
    assert s1.tokens == 2 * per_batch

    def stops_early():
        for i, d in enumerate(documents()):
            if i == 30:
                raise RuntimeError("killed")
            yield d

    with pytest.raises(RuntimeError):
        build_feature_store(path, lm, tc, documents=stops_early(), config=CFG, show_progress=False)
    assert 2 * per_batch < FeatureStore(path).progress()[1] < dump(built)["progress"][1]
    s3 = build_feature_store(path, lm, tc, documents=documents(), config=CFG, show_progress=False)
    assert s3.tokens == dump(built)["progress"][1]
    assert dump(path) == dump(built)


def test_user_labels_survive_rebuilds(lm, tc, tmp_path):
    path = tmp_path / "f.sqlite"
    kw = dict(documents=documents(20), config=CFG, show_progress=False)
    build_feature_store(path, lm, tc, max_tokens=40, **kw)
    store = FeatureStore(path)
    auto = store.label(0, 2)
    store.set_label(0, 2, "Texas")
    store.close()
    build_feature_store(path, lm, tc, **kw)
    build_feature_store(path, lm, tc, fresh=True, **kw)
    store = FeatureStore(path)
    assert store.label(0, 2) == "Texas" and store.dashboard(0, 2)["label_source"] == "user"
    assert store.search("tex")[0] == (0, 2, "Texas")
    assert store.labels([(0, 2), (0, 3)])[(0, 2)] == "Texas"
    store.set_label(0, 2, None)
    assert store.label(0, 2) != "Texas" and store.label(0, 2) == FeatureStore(path).label(0, 2)
    assert auto


def test_a_different_build_is_refused(lm, tc, tmp_path):
    path = tmp_path / "f.sqlite"
    build_feature_store(path, lm, tc, documents=documents(5), config=CFG, show_progress=False)
    other = FeatureStoreConfig(**{**CFG.__dict__, "top_k": 3})
    with pytest.raises(CltraceError, match="different settings"):
        build_feature_store(path, lm, tc, documents=documents(5), config=other, show_progress=False)
    build_feature_store(path, lm, tc, documents=documents(5), config=other, fresh=True, show_progress=False)
    with pytest.raises(CltraceError, match="no feature store"):
        FeatureStore(tmp_path / "missing.sqlite")
