"""Graph-predicted effects against ground truth (issue 11 item 4).

- On a linear toy (a tiny model whose transcoder features are all far above threshold, so
  the local replacement model is exactly linear), ablating a group of features in the frozen
  replacement model — run forward, not read from the graph — moves the answer's logit by
  exactly the graph's prediction: the total effect with every other feature responding, and
  the direct effect with them held.
- The batched ablation runner agrees with `Steerer` (constrained and not, scale and set).
- On the real tiny model with the clean attention patterns and norm scales replayed,
  constrained ablation moves the logit exactly as the graph's direct effect predicts.
- Spearman against hand-computed values; the failure rule; `validate_circuit` end to end.
"""

from __future__ import annotations

import math

import pytest
import torch

from cltrace.attribution.graph import AttributionConfig, attribute
from cltrace.attribution.replacement import _frozen_norm_hooks, frozen_attention, run_frozen, run_replacement
from cltrace.circuits.batched import Edit, demeaned, last_logits, run_edits
from cltrace.circuits.circuit import Circuit, CircuitNode
from cltrace.circuits.predict import (
    logit_index,
    predicted_ablation_effects,
    predicted_steering_effect,
    propagate,
    relative_changes,
)
from cltrace.circuits.validate import (
    ValidationConfig,
    edits_for,
    feature_index,
    is_failed,
    spearman,
    validate_circuit,
)
from cltrace.errors import CltraceError
from cltrace.interventions.steer import Intervention, Steerer
from test_attribution import PROMPT, make_transcoder
from tiny import tiny_model

CFG = AttributionConfig(max_feature_nodes=None, batch_size=16, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py (module scope, as before)


@pytest.fixture(scope="module")
def linear_toy():
    """Every feature active at every non-BOS position with a wide margin above threshold."""
    lm = tiny_model("gemma")
    tc = make_transcoder(lm, "clt", n_features=12)
    tokens = lm.tokenize(PROMPT)[0]
    with torch.no_grad():
        x = run_replacement(lm, tokens).mlp_in_values[1:]  # [n-1, L, d]
        margin = tc.encode(x) - tc.log_threshold.exp()  # [n-1, L, F], normalised
        tc.b_enc.add_((-margin.amin(0)).clamp_min(0) + 10.0)
        for W in tc.W_dec:
            W.mul_(1.0)  # keep the writes moderate
    graph = attribute(lm, tc, tokens, CFG)
    assert graph.n_features == lm.n_layers * 12 * (tokens.numel() - 1)
    return lm, tc, tokens, graph


def replacement_delta(lm, tc, tokens, graph, members, hold_others: bool):
    """Change of the answer's demeaned logit when `members` are ablated in the local replacement
    model run forward: frozen patterns and norms, MLP output = true output + Σ decoder writes of
    the feature changes, each feature recomputed (JumpReLU) from its current input unless held.
    Returns (delta, smallest margin above threshold among responding features)."""
    fwd = run_replacement(lm, tokens, record_frozen=True)
    a_clean = tc.activate(tc.encode(fwd.mlp_in_values))  # [n, L, F]
    a_clean[0] = 0  # zero_bos
    feats = graph.active_features[graph.selected_features]
    kill = [tuple(feats[i].tolist()) for i in members]  # (layer, pos, feature)
    acts: dict[int, torch.Tensor] = {}
    margins = []

    def mlp_out(layer, x):
        if hold_others:
            a = a_clean[:, layer].clone()
        else:
            pre = x[0] @ tc.encoder_weight(layer) + tc.encoder_bias(layer)
            margins.append(float((pre[1:] - tc.threshold(layer)).min()))
            a = tc.activate_layer(pre, layer)
            a[0] = 0
        for l, p, f in kill:
            if l == layer:
                a[p, f] = 0
        acts[layer] = a
        out = fwd.mlp_out_values[:, layer].clone()
        for src in range(layer + 1):
            out += (acts[src] - a_clean[:, src]) @ tc.decoder_weight(src)[:, layer - src]
        return out[None]

    with torch.no_grad():
        run = run_frozen(lm, tokens, fwd.frozen, fwd.embed_values, mlp_out)
    answer = int(graph.logit_tokens[0])
    W = lm.adapter.unembed(lm.model).weight.float()
    direction = W[answer] - W.mean(0)
    delta = float(direction @ (run.final[-1] - fwd.final_values[-1]))
    return delta, (min(margins) if margins else math.inf)


def test_predicted_ablation_equals_linear_replacement_model(linear_toy):
    lm, tc, tokens, graph = linear_toy
    feats = graph.active_features[graph.selected_features]
    groups = [
        [i for i in range(graph.n_features) if feats[i, 1] == p and feats[i, 0] == 0]
        for p in (2, 5, tokens.numel() - 1)
    ]
    groups += [[0, 7, 40, 90], [int(graph.n_features) - 1]]
    total = predicted_ablation_effects(graph, groups, 0)
    direct = predicted_ablation_effects(graph, groups, 0, constrain_until=lm.n_layers - 1)
    for g, t, d in zip(groups, total, direct):
        got, margin = replacement_delta(lm, tc, tokens, graph, g, hold_others=False)
        assert margin > 0, "a responding feature crossed its threshold: the toy is not linear"
        assert abs(got - t) <= 1e-4 * max(1.0, abs(t)), (g, got, t)
        got_d, _ = replacement_delta(lm, tc, tokens, graph, g, hold_others=True)
        assert abs(got_d - d) <= 1e-4 * max(1.0, abs(d)), (g, got_d, d)
    # propagation matters in this toy, so the two predictions must differ
    assert max(abs(t - d) for t, d in zip(total, direct)) > 1e-2


def test_direct_effect_is_minus_the_edge_sum_and_steering_is_linear(linear_toy):
    _, _, _, graph = linear_toy
    L, row = graph.n_layers, graph.logit_offset
    group = [3, 11, 50]
    direct = predicted_ablation_effects(graph, [group], 0, constrain_until=L - 1)[0]
    assert direct == pytest.approx(-float(graph.adjacency[row, group].sum()), rel=1e-5)
    total = predicted_ablation_effects(graph, [[50]], 0)[0]
    assert predicted_steering_effect(graph, 50, 3.0, 0) == pytest.approx(-2.0 * total, rel=1e-5)
    # feature rows: the change of every feature's pre-activation; a feature upstream of the
    # intervention does not move
    delta = propagate(graph, relative_changes(graph, [[50]]))
    layer_50 = int(graph.active_features[graph.selected_features][50, 0])
    below = graph.active_features[graph.selected_features][:, 0] <= layer_50
    assert delta[0, : graph.n_features][below].abs().max() == 0


@pytest.mark.parametrize("family", ["llama", "gemma", "gpt2"])
def test_batched_edits_match_the_steerer(family):
    """Each row equals the Steerer's run of the same interventions, with the clean prefix
    before a batch's first edited position taken from a shared cache or recomputed."""
    lm = tiny_model(family)
    tc = make_transcoder(lm, "clt", n_features=16)
    st = Steerer(lm, tc)
    tokens = lm.tokenize(PROMPT)
    acts = st.activations(tokens)
    on = (acts[1:] > 0).nonzero().tolist()  # (pos-1, layer, feature)
    late = [x for x in on if x[0] + 1 >= 6]
    rows = [
        [Edit(l, p + 1, f) for p, l, f in on[:3]],
        [Edit(on[5][1], on[5][0] + 1, on[5][2], "scale", -2.0), Edit(1, -1, 4, "set", 3.0)],
        [],
        [Edit(l, p + 1, f, "scale", 3.0) for p, l, f in late[:4]],  # a late first position: cached prefix
        [Edit(2, -1, 7, "set", 2.0)],
    ]
    for constrain in (False, True):
        got = run_edits(lm, tc, tokens, rows, constrain=constrain, batch_size=2)
        full = run_edits(lm, tc, tokens, rows, constrain=constrain, batch_size=2, reuse_prefix=False)
        torch.testing.assert_close(got, full, rtol=0, atol=2e-4)
        for row, out in zip(rows, got):
            ivs = [Intervention(e.layer, e.feature, (e.pos,), e.mode, e.value) for e in row]
            want = st.logits(tokens, ivs, constrain_until=lm.n_layers - 1 if constrain else None)[0, -1]
            torch.testing.assert_close(out, want.float(), rtol=0, atol=2e-4)
        assert (got[3] - got[2]).abs().max() > 1e-3 and (got[4] - got[2]).abs().max() > 1e-3
    assert (got[0] - got[2]).abs().max() > 1e-3  # the edits did act


def test_constrained_ablation_with_frozen_attention_and_norms_equals_the_direct_effect():
    """Replaying the clean attention patterns and norm scales makes the real model, with every
    MLP output clamped (constrained patching), exactly the graph's frozen linear model: the
    measured change of the answer's logit equals the predicted direct effect."""
    lm = tiny_model("gemma")
    tc = make_transcoder(lm, "clt", n_features=16)
    tokens = lm.tokenize(PROMPT)
    graph = attribute(lm, tc, tokens[0], CFG)
    fwd = run_replacement(lm, tokens[0], record_frozen=True)
    row = graph.adjacency[graph.logit_offset, : graph.n_features]
    order = row.abs().argsort(descending=True).tolist()
    groups = [order[:1], order[1:4], order[4:12], [order[-1]]]
    answer = int(graph.logit_tokens[0])
    want = predicted_ablation_effects(graph, groups, 0, constrain_until=lm.n_layers - 1)
    rows = [[]] + [edits_for(graph, g) for g in groups]
    with frozen_attention(replay=fwd.frozen), lm.hooks(_frozen_norm_hooks(lm, replay=fwd.frozen)):
        d = demeaned(
            run_edits(lm, tc, tokens, rows, constrain=True, batch_size=3, reuse_prefix=False), answer
        )
    got = (d[1:] - d[0]).tolist()
    assert got == pytest.approx(want, abs=2e-5, rel=1e-4)
    assert max(abs(w) for w in want) > 0.05
    # without the freezes the model departs from the graph (norms and patterns move)
    d = demeaned(run_edits(lm, tc, tokens, rows, constrain=True), answer)
    live = (d[1:] - d[0]).tolist()
    assert max(abs(a - b) for a, b in zip(live, want)) > 1e-4


def test_spearman_against_hand_computed_values():
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)  # 1 - 6·4/(5·24)
    # ties: y ranks (1, 2, 3.5, 5, 3.5) -> 8 / sqrt(10 · 9.5)
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert spearman([3, 1, 2], [30, 10, 20]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) is None
    assert spearman([1, 1, 1], [1, 2, 3]) is None
    assert spearman([1, 2, float("nan"), 3], [1, 2, 5, 3]) == pytest.approx(1.0)


def test_failure_rule():
    assert is_failed(-1.0, -0.8) is False  # same sign, within a factor of 2
    assert is_failed(-1.0, -0.45) is True  # too small by more than 2x
    assert is_failed(-1.0, -2.5) is True  # too large by more than 2x
    assert is_failed(-1.0, 0.3) is True  # sign disagrees
    assert is_failed(0.05, -0.05) is None  # both below the floor: not judged
    assert is_failed(0.05, 0.5) is True  # predicted ~0, measured large
    with pytest.raises(CltraceError):
        ValidationConfig(rel_tol=1.5)


def traced_gemma():
    """The tiny Gemma-like model, a 16-feature CLT, PROMPT's tokens, its unpruned graph, the graph's
    feature indices and its selected (layer, position, feature) rows."""
    lm = tiny_model("gemma")
    tc = make_transcoder(lm, "clt", n_features=16)
    tokens = lm.tokenize(PROMPT)
    graph = attribute(lm, tc, tokens[0], CFG)
    ids = list(feature_index(graph))
    return lm, tc, tokens, graph, ids, graph.active_features[graph.selected_features]


def test_validate_circuit_fills_nodes_and_faithfulness():
    lm, tc, tokens, graph, ids, feats = traced_gemma()
    nodes = []
    for p in sorted(set(feats[:, 1].tolist())):
        members = [ids[i] for i in range(graph.n_features) if feats[i, 1] == p]
        nodes.append(CircuitNode(f"sn{p}", f"pos {p}", "features", members, [p], (0, 2), [], 0.1))
    nodes.append(CircuitNode("logit", "answer", "logit", [], [len(ids)], None, [], 1.0))
    answer = int(graph.logit_tokens[0])
    circuit = Circuit(
        PROMPT,
        graph.token_strings,
        "x",
        answer,
        float(graph.logit_probabilities[0]),
        lm.name,
        "tc",
        nodes,
        [],
        0.5,
    )
    for constrain in (True, False):
        out = validate_circuit(
            circuit,
            graph,
            lm,
            tc,
            constrain=constrain,
            cfg=ValidationConfig(constrain=constrain, top_features=12),
        )
        fn = out.feature_nodes
        assert all(n.measured is not None and n.predicted is not None for n in fn)
        # each supernode's measurement is the Steerer's ablation of its members
        st = Steerer(lm, tc)
        n0 = fn[-1]
        ivs = [
            Intervention(int(a), int(b), (int(c),), "scale", 0.0)
            for a, b, c in (i.split("_") for i in n0.node_ids)
        ]
        after = st.logits(tokens, ivs, constrain_until=lm.n_layers - 1 if constrain else None)[0, -1].float()
        before = last_logits(lm, tokens)[0]
        want = float(demeaned(after, answer) - demeaned(before, answer))
        assert n0.measured == pytest.approx(want, abs=2e-4)
        members = [[ids.index(i) for i in n0.node_ids]]
        until = lm.n_layers - 1 if constrain else None
        pred = predicted_ablation_effects(graph, members, logit_index(graph, answer), constrain_until=until)
        assert n0.predicted == pytest.approx(pred[0], rel=1e-6)
        steer = {s["id"]: s for s in out.stats["validation"]["steering"]["supernodes"]}
        # ×2 is r = +1 against the ablation's r = -1: the linear graph predicts the mirror image
        assert steer[n0.id]["predicted"] == pytest.approx(-n0.predicted, rel=1e-5, abs=1e-7)
        ivs2 = [Intervention(i.layer, i.feature, i.positions, "scale", 2.0) for i in ivs]
        after2 = st.logits(tokens, ivs2, constrain_until=until)[0, -1].float()
        want2 = float(demeaned(after2, answer) - demeaned(before, answer))
        assert steer[n0.id]["measured"] == pytest.approx(want2, abs=2e-4)
        f = out.faithfulness
        assert f["n_supernodes"] == len(fn) and f["n_features"] == 12
        assert f["spearman_features"] is not None and -1 <= f["spearman_features"] <= 1
        assert out.stats["validation"]["mode"] == ("constrained" if constrain else "unconstrained")
    # the graph's direct effects should rank single features decently even on a random tiny model
    out = validate_circuit(circuit, graph, lm, tc, cfg=ValidationConfig(top_features=12))
    assert out.faithfulness["spearman_features"] > 0.5


def test_validate_circuit_is_exact_in_the_frozen_model_logit_and_supernode_edges():
    """With the clean attention patterns and norm scales replayed, constrained validation is the
    graph's own linear model: every supernode's measured logit change and every supernode
    edge's measured change of the target's summed pre-activations equal the predictions."""
    from cltrace.circuits.circuit import CircuitEdge

    lm, tc, tokens, graph, ids, feats = traced_gemma()
    nodes = []
    for layer in range(lm.n_layers):
        for half in (0, 1):
            members = [
                ids[i]
                for i in range(graph.n_features)
                if feats[i, 0] == layer and (feats[i, 1] >= 6) == bool(half)
            ]
            if members:
                nodes.append(
                    CircuitNode(f"sn{len(nodes)}", "g", "features", members, [0], (layer, layer), [], 0.1)
                )
    edges = [CircuitEdge(a.id, b.id, 1.0) for a in nodes for b in nodes if a.layers[0] < b.layers[0]]
    answer = int(graph.logit_tokens[0])
    circuit = Circuit(PROMPT, graph.token_strings, "x", answer, 0.5, lm.name, "tc", nodes, edges, 0.5)
    fwd = run_replacement(lm, tokens[0], record_frozen=True)
    with frozen_attention(replay=fwd.frozen), lm.hooks(_frozen_norm_hooks(lm, replay=fwd.frozen)):
        out = validate_circuit(circuit, graph, lm, tc, cfg=ValidationConfig(top_features=10, steer=None))
    for n in out.feature_nodes:
        assert n.measured == pytest.approx(n.predicted, abs=2e-5, rel=1e-4)
    checked = out.stats["validation"]["edges"]
    assert len(checked) == len(edges)
    assert max(abs(e["predicted"]) for e in checked) > 0.05
    for e in checked:
        assert e["measured"] == pytest.approx(e["predicted"], abs=2e-5, rel=1e-4), e
    assert out.stats["validation"]["spearman_edges"] == pytest.approx(1.0, abs=1e-6)
