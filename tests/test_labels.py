"""Labels and label scores against planted ground truth.

A tiny Gemma whose first attention layer writes nothing, so the layer-0 MLP input is a
function of the current token alone; a stand-in transcoder whose layer-0 features detect
planted token sets exactly (an encoder solved on every token's MLP input) and write towards
planted target words; a feature firing on a pseudo-random 5% of positions (a hash of the
context-dependent layer-1 input); one firing on ~60% of positions (broad). The store is built
with the real `build_feature_store` and relabelled; the labeller must recover the planted
sets and targets, score them well above the shuffled baseline, and score the random feature
near chance.
"""

from __future__ import annotations

import random

import pytest
import torch

from cltrace.errors import CltraceError
from cltrace.features.label_evidence import TextStats, read_items, split_examples
from cltrace.features.label_score import auc, shuffled_order
from cltrace.features.labels import DEAD_LABEL, LabelConfig, ReadItem, WriteItem, auto_label, compose
from cltrace.features.store import FeatureStore, FeatureStoreConfig, build_feature_store, write_auto_labels
from test_features_standin import StandInTranscoder
from tiny import WORDS, tiny_config, tiny_tokenizer

VOCAB = list(WORDS) + ["Osaka", "Japanese"]
SETS = [
    ("Tokyo", "Japan", "Osaka"),
    ("Paris", "France"),
    ("Texas", "Austin", "Dallas"),
    ("hot", "cold"),
    ("basketball", "Jordan", "sport"),
]
TARGETS = ["Japanese", "tower", "state", "opposite", "plays"]
N_SETS, BROAD, F = len(SETS), len(SETS), 8
CFG = FeatureStoreConfig(
    context_len=16, top_k=20, n_bins=3, per_bin=10, n_effects=5, batch_contexts=8, flush_tokens=2000
)


def documents(n=400, seed=0):
    rng = random.Random(seed)
    weights = [12 if w in ("the", "of", "a") else 1 for w in VOCAB]  # frequent function words
    return [" ".join(rng.choices(VOCAB, weights)[0] for _ in range(rng.randint(5, 25))) for _ in range(n)]


def _hash(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A pseudo-random number in [0, 1) per input vector."""
    return torch.frac(torch.sin(x @ v) * 43758.5453).abs()


class PlantedTranscoder(StandInTranscoder):
    """Layer 0: features 0..4 fire on SETS[k] (values 0.6..2.6), feature 5 is broad; layer 1:
    feature 0 fires on a pseudo-random 5% of positions. Everything else never fires."""

    def __init__(self, lm, x_of_token: dict[int, torch.Tensor]):
        super().__init__(lm.n_layers, lm.d_model, F)
        L, d = lm.n_layers, lm.d_model
        g = torch.Generator().manual_seed(1)
        ids = sorted(x_of_token)
        X = torch.stack([x_of_token[i] for i in ids]).double()  # [V', d]
        Y = -torch.ones(len(ids), N_SETS, dtype=torch.float64)
        for k, words in enumerate(SETS):
            for w in words:
                Y[ids.index(lm.tokenizer.convert_tokens_to_ids(w)), k] = 1.0
        self.w_sets = torch.linalg.lstsq(X, Y).solution.float()  # [d, N_SETS], exact
        self.v = torch.randn(d, 4, generator=g)
        with torch.no_grad():
            self.log_threshold.fill_(torch.log(torch.tensor(0.5)))
            unembed = lm.adapter.unembed(lm.model).weight.detach()
            gain = _gain(lm)
            for l in range(L):
                self.w_dec[l].zero_()
            for k, target in enumerate(TARGETS):
                u = unembed[lm.tokenizer.convert_tokens_to_ids(target)] / gain
                self.w_dec[0][k, L - 1] = 3.0 * u / u.norm()
            self.w_dec[1][0, 0] = torch.randn(d, generator=g)

    def encode(self, x):
        pre = torch.full((*x.shape[:-1], F), -5.0)
        jitter = _hash(x[..., 1, :], self.v[:, 0])
        in_set = x[..., 0, :] @ self.w_sets > 0  # exact on every token
        pre[..., 0, :N_SETS] = torch.where(in_set, 0.6 + 2.0 * jitter[..., None], -1.0)
        pre[..., 0, BROAD] = torch.where(_hash(x[..., 1, :], 1000.0 * self.v[:, 1]) > 0.4, 2.0, -1.0)
        # the context-dependent part of the layer-1 input is small: a 1000x sharper hash is random
        pre[..., 1, 0] = torch.where(
            _hash(x[..., 1, :], 1000.0 * self.v[:, 2]) > 0.95, 1.0 + _hash(x[..., 1, :], self.v[:, 3]), -1.0
        )
        return pre


def _gain(lm):
    from cltrace.features.store import final_norm_gain

    return final_norm_gain(lm)


@pytest.fixture(scope="module")
def lm():
    from transformers import AutoModelForCausalLM

    from cltrace.models.loading import from_pretrained_objects

    torch.manual_seed(0)
    config = tiny_config("gemma", d=64)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.15) if p.dim() >= 2 else p.normal_(0, 0.05)
        model.model.layers[0].self_attn.o_proj.weight.zero_()  # layer-0 MLP input = f(token)
    return from_pretrained_objects(model, tiny_tokenizer(VOCAB), name="tiny-planted")


@pytest.fixture(scope="module")
def tc(lm):
    ids = sorted({lm.tokenizer.convert_tokens_to_ids(w) for w in VOCAB} | {2})
    tokens = torch.tensor([[1, i] for i in ids])
    x = lm.capture(tokens).mlp_in[:, 1, 0]  # [V', d]
    return PlantedTranscoder(lm, dict(zip(ids, x))).requires_grad_(False)


@pytest.fixture(scope="module")
def store_path(lm, tc, tmp_path_factory):
    path = tmp_path_factory.mktemp("labels") / "features.sqlite"
    build_feature_store(
        path,
        lm,
        tc,
        documents=documents(),
        config=CFG,
        show_progress=False,
        labels=LabelConfig(pool_contexts=32),
        score_output=None,
    )
    return path


@pytest.fixture
def copy(store_path, tmp_path):
    """A copy of the built store, for tests that change it."""
    import shutil

    return shutil.copy(store_path, tmp_path / "features.sqlite")


def test_planted_token_sets_and_targets_are_recovered(store_path):
    with FeatureStore(store_path) as store:
        for k, (words, target) in enumerate(zip(SETS, TARGETS)):
            card = store.dashboard(0, k)
            assert card["n_fires"] > 0
            assert set(card["label_reads"]) == set(words), card["label"]
            assert card["label_writes"] == [target], card["label"]
            assert card["label"] == " · ".join(card["label_reads"]) + " → " + " · ".join(card["label_writes"])
            assert all(r["kind"] == "token" for r in card["label_evidence"]["reads"])
        assert store.dashboard(0, 6)["label"] == DEAD_LABEL


def test_broad_feature_is_marked_not_named(store_path):
    with FeatureStore(store_path) as store:
        card = store.dashboard(0, BROAD)
        assert card["density"] > 0.5 and card["label_broad"]
        assert card["label"] == f"(broad: fires on {card['density']:.0%} of tokens)"
        assert card["label_detection"] is None


def test_planted_labels_score_above_the_shuffled_baseline(store_path):
    with FeatureStore(store_path) as store:
        det = [store.dashboard(0, k)["label_detection"] for k in range(N_SETS)]
        assert min(det) > 0.95, det
        summary = store.label_summary()
        shuffled = summary["detection_shuffled"]
        assert shuffled["n"] == summary["detection"]["n"] >= N_SETS and abs(shuffled["median"] - 0.5) < 0.1
        out = [store.dashboard(0, k)["label_output"] for k in range(N_SETS)]
        assert min(out) > 0.9, out
        assert abs(summary["output_shuffled"]["median"] - 0.5) < 0.25, summary["output_shuffled"]
        assert summary["output"]["median"] > summary["output_shuffled"]["median"] + 0.3


def test_random_feature_gets_no_name_and_a_forced_label_scores_near_chance(copy):
    with FeatureStore(copy) as store:
        card = store.dashboard(1, 0)
        assert 0.02 < card["density"] < 0.1
        assert card["label_reads"] == [] and card["label_detection"] is None  # nothing recurs by more
        assert store.dashboard(0, BROAD)["label_evidence"]["reads"] == []  # than chance
        loose = LabelConfig(pool_contexts=32, min_lift=1.0, min_share=0.0, min_count=2, significance=1.0)
        write_auto_labels(store, loose)  # uses the stored pool
        card = store.dashboard(1, 0)
        assert card["label_reads"], "the loose labeller names whatever recurs"
        assert abs(card["label_detection"] - 0.5) < 0.15, card["label_detection"]
        assert min(store.dashboard(0, k)["label_detection"] for k in range(N_SETS)) > 0.95
        assert store.dashboard(0, 0)["label_output"] is not None  # kept: same writes


def test_labels_table_sorts_filters_and_keeps_user_labels(copy):
    with FeatureStore(copy) as store:
        rows = store.labels_table()
        scores = [r["detection"] for r in rows if r["detection"] is not None]
        assert scores == sorted(scores, reverse=True) and len(scores) >= N_SETS
        assert all(not r["broad"] for r in rows)
        good = store.labels_table(min_score=0.9)
        assert {(r["layer"], r["index"]) for r in good} >= {(0, k) for k in range(N_SETS)}
        assert all(r["detection"] >= 0.9 for r in good)
        store.set_label(0, 0, "Japan things")
        row = next(r for r in store.labels_table() if (r["layer"], r["index"]) == (0, 0))
        assert row["label"] == "Japan things" and row["source"] == "user" and "Tokyo" in row["auto_label"]
        assert any(r["broad"] for r in store.labels_table(include_broad=True))
        by_output = [r["output"] for r in store.labels_table(order="output") if r["output"] is not None]
        assert by_output == sorted(by_output, reverse=True)
        ev = store.label_evidence([(0, 1), (0, 0), (0, BROAD), (0, 6)])
        assert set(ev[(0, 1)][0]) == {"Paris", "France"} and ev[(0, 1)][1] == ["tower"]
        assert ev[(0, 0)] == (["Japan things"], []) and ev[(0, BROAD)] == ([], []) and (0, 6) not in ev


def test_an_old_store_asks_for_a_relabel(copy):
    with FeatureStore(copy) as store:
        store.conn.execute("DELETE FROM meta WHERE key = 'labels_version'")
        store.conn.execute("DELETE FROM label_scores")
        store._meta = None
        assert store.dashboard(0, 0)["label_detection"] is None
        with pytest.raises(CltraceError, match="relabel"):
            store.labels_table()
        write_auto_labels(store)
        assert store.labels_table(min_score=0.9)


# -- units ------------------------------------------------------------------------------------


def test_read_items_weigh_tokens_against_their_base_rate():
    # text: "the" everywhere, "Tokyo" rare; the feature fires on both equally often
    vocab = {1: "<bos>", 5: " the", 6: " Tokyo", 7: " x", 8: "The"}
    rows = [[1] + [5, 7, 5, 7, 5, 7, 5, 7] for _ in range(50)] + [[1, 6, 5, 7, 5, 7, 5, 7, 8]]
    import numpy as np

    stats = TextStats.from_tokens(np.array(rows), vocab, list(range(len(rows))), 9)
    assert stats.key_of_norm["the"] == stats.token_key[5] == stats.token_key[8]  # spellings merged
    n = 9
    locs = [50 * n + 1] * 2 + [0 * n + 1, 1 * n + 1]  # Tokyo x2, the x2
    items = read_items(stats, locs, LabelConfig(min_lift=3.0))
    assert [i.text for i in items] == ["Tokyo"]
    assert items[0].lift > 50


def test_split_examples_holds_out_half_of_every_slice():
    top = [(3.0, 10), (2.9, 11)]
    res = [(0.5, 1), (0.6, 2), (1.5, 3), (1.6, 4), (2.9, 11), (2.5, 12)]
    build, held = split_examples(top, res, max_act=3.0, n_bins=3)
    assert set(build) == {10, 11, 2, 4} and set(held) == {1, 3, 12}


def test_auc_and_shuffle():
    import numpy as np

    assert auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert auc(np.array([0.0]), np.array([0.0, 0.0])) == 0.5
    perm = shuffled_order(50, 0)
    assert sorted(perm.tolist()) == list(range(50)) and not (perm == np.arange(50)).any()


def test_compose_formats_parts_and_fits_the_width():
    reads = [ReadItem("token", t, (t.lower(),), 0.3, 10.0) for t in ("Tokyo", "Japan", "Osaka")]
    lab = compose(reads, [WriteItem("Japanese", 9, 1.0)], density=0.01)
    assert lab.text == "Tokyo · Japan · Osaka → Japanese" and lab.reads_text == "Tokyo · Japan · Osaka"
    assert compose(reads, [], density=0.31).text == "(broad: fires on 31% of tokens)"
    assert compose([], [WriteItem("Austin", 3, 1.0)], density=0.01).text == "→ Austin"
    long = [ReadItem("token", "x" * 25, ("x",), 0.3, 10.0), ReadItem("token", "y" * 25, ("y",), 0.3, 10.0)]
    assert compose(long, [WriteItem("z" * 20, 1, 1.0)], cfg=LabelConfig(max_chars=40)).text == "x" * 25
    assert (
        compose(long[:1], [WriteItem("z" * 10, 1, 1.0)], cfg=LabelConfig(max_chars=40)).text
        == "x" * 25 + " → " + "z" * 10
    )
    assert auto_label(["Texas", " Texas", "Dallas", "Texas"], [" Austin"]) == "Texas · Dallas → Austin"
    assert auto_label([], []) == DEAD_LABEL


def test_cli_lists_sorted_filtered_labels_and_relabels_in_place(copy, capsys):
    from cltrace.cli import main

    db = str(copy)
    assert main(["features", db, "--sort", "score", "--min-score", "0.9"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = out[1:-1]
    assert len(rows) >= N_SETS and all("→" in r for r in rows[:N_SETS])
    assert all(float(r.split()[1]) >= 0.9 for r in rows)
    assert "detection median" in out[-1] and "shuffled labels: 0.4" in out[-1]
    assert main(["features", db, "--relabel", "--broad-density", "0.7"]) == 0  # pool stored: no model
    assert "relabelled" in capsys.readouterr().out
    with FeatureStore(db) as store:
        assert not store.dashboard(0, BROAD)["label_broad"]  # 60% < 70%
    assert main(["feature", db, "0:0"]) == 0
    assert "label score: detection 1.00" in capsys.readouterr().out


def test_word_logits_equal_the_models_logits_with_and_without_steering(lm, tc):
    from cltrace.features.label_score import OutputJob, _steering_deltas, _word_logits

    tokens = lm.tokenize("the capital of Texas is Austin")
    ref = [5, 9, 17, 30]
    w_ref = lm.adapter.unembed(lm.model).weight[ref]
    torch.testing.assert_close(_word_logits(lm, tokens, None, w_ref), lm.run(tokens)[:, 1:, ref])
    delta = _steering_deltas(lm, tc, [OutputJob(0, 0, 2.0, (), ())])
    w = tc.decoder_weight(0)[0]  # [L, d]: the feature writes every layer

    def add(layer, _mlp_in, out):
        out = out.clone()
        out[:, 1:] += 2.0 * w[layer]
        return out

    with lm.patch_mlp_outputs(add):
        want = lm.run(tokens)[:, 1:, ref]
    torch.testing.assert_close(_word_logits(lm, tokens, delta, w_ref), want)
