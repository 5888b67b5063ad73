"""Feature interventions on tiny models: no-ops are exact, ablation leaves error + b_dec,
steering moves downstream features as the model's linear response predicts."""

import pytest
import torch

from cltrace.interventions.steer import Intervention, Steerer, distinctive_features, resolve_positions
from test_features_standin import make_transcoder
from tiny import tiny_model

PROMPT = "Fact : the capital of the state containing Dallas is"
OTHER = "the currency of the country whose capital is Tokyo is the"


@pytest.fixture(scope="module", params=["gemma", "llama"])
def setup(request):
    lm = tiny_model(request.param)
    tc = make_transcoder(lm, n_features=24, kind="clt")
    return lm, tc, Steerer(lm, tc)


def clean_logits(lm, tokens):
    with torch.no_grad():
        return lm.run(tokens)


def test_setting_features_to_their_own_values_changes_nothing(setup):
    lm, tc, st = setup
    tokens = st.tokens(PROMPT)
    acts = st.activations(tokens)  # [n, L, F]
    ivs = [
        Intervention(l, i, (p,), "set", float(acts[p, l, i]))
        for l in range(lm.n_layers)
        for i in range(0, 24, 5)
        for p in range(tokens.shape[1])
    ]
    ivs += [Intervention(1, 3, None, "scale", 1.0), Intervention(2, 7, None, "add", 0.0)]
    out = st.logits(tokens, ivs)
    torch.testing.assert_close(out, clean_logits(lm, tokens), rtol=0, atol=1e-5)
    out = st.logits(tokens, ivs, constrain_until=lm.n_layers - 1)
    torch.testing.assert_close(out, clean_logits(lm, tokens), rtol=0, atol=1e-5)


def error_plus_bias_logits(lm, tc, tokens):
    """Reference: every MLP output replaced by (true output - reconstruction) + b_dec, with the
    reconstruction from tc.decode of the activations at the current (patched) inputs."""
    L = lm.n_layers
    acts_so_far = torch.zeros(1, tokens.shape[1], L, tc.cfg.n_features)

    def patch(layer, mlp_in, mlp_out):
        x = torch.zeros(*mlp_in.shape[:2], L, mlp_in.shape[-1])
        x[:, :, layer] = mlp_in
        acts_so_far[:, :, layer] = tc.activate(tc.encode(x))[:, :, layer]
        recon = tc.decode(acts_so_far)[:, :, layer]
        return mlp_out - recon + tc.decoder_bias()[layer]

    with torch.no_grad(), lm.patch_mlp_outputs(patch):
        return lm.run(tokens)


def test_zero_ablating_every_feature_leaves_error_plus_bias(setup):
    lm, tc, st = setup
    tokens = st.tokens(PROMPT)
    ivs = [Intervention(l, i, None, "set", 0.0) for l in range(lm.n_layers) for i in range(tc.cfg.n_features)]
    ablated = st.logits(tokens, ivs)
    reference = error_plus_bias_logits(lm, tc, tokens)
    torch.testing.assert_close(ablated, reference, rtol=0, atol=1e-4)
    assert (ablated - clean_logits(lm, tokens)).abs().max() > 1e-2  # the ablation did act


def linear_prediction(lm, tc, tokens, src_layer, src_feat, pos, tgt_layer, tgt_feat):
    """d pre(target) / d a(source) through the real model: Σ_l' ∂pre/∂mlp_out_l'[pos] · W_dec_{src→l'}."""
    eps = {l: torch.zeros(1, tokens.shape[1], lm.d_model, requires_grad=True) for l in range(lm.n_layers)}
    seen = {}

    def patch(layer, mlp_in, mlp_out):
        seen[layer] = mlp_in
        return mlp_out + eps[layer]

    with lm.patch_mlp_outputs(patch):
        lm.run(tokens, with_logits=False)
    pre = (
        seen[tgt_layer][0, pos] @ tc.encoder_weight(tgt_layer)[:, tgt_feat]
        + tc.encoder_bias(tgt_layer)[tgt_feat]
    )
    pre.backward()
    dec = tc.decoder_weight(src_layer)[src_feat]  # [T, d]
    return sum(
        float(eps[src_layer + t].grad[0, pos] @ dec[t])
        for t in range(dec.shape[0])
        if src_layer + t < tgt_layer
    ), float(pre.detach())


def steered_pre(lm, st, tokens, ivs, tgt_layer, tgt_feat, pos):
    seen = {}
    hook = (lm.adapter.mlp_in_module(lm.blocks[tgt_layer]), lambda _m, _i, out: seen.update(x=out))
    with st.applied(ivs, tokens), lm.hooks([hook]):
        lm.run(tokens)
    w, b = st.tc.encoder_weight(tgt_layer)[:, tgt_feat], st.tc.encoder_bias(tgt_layer)[tgt_feat]
    return float(seen["x"][0, pos] @ w + b)


def test_steering_moves_downstream_preactivations_as_predicted(setup):
    lm, tc, st = setup
    tokens = st.tokens(PROMPT)
    pos = tokens.shape[1] - 1
    # the most sensitive layer-2 target of feature (0, 5)
    slopes = [linear_prediction(lm, tc, tokens, 0, 5, pos, 2, j)[0] for j in range(tc.cfg.n_features)]
    j = max(range(len(slopes)), key=lambda k: abs(slopes[k]))
    slope, base = linear_prediction(lm, tc, tokens, 0, 5, pos, 2, j)
    assert abs(slope) > 1e-3
    for delta, tol in ((1e-3, 0.02), (1.0, 0.3)):  # exact to first order; rough at a typical size
        got = steered_pre(lm, st, tokens, [Intervention(0, 5, (pos,), "add", delta)], 2, j, pos) - base
        want = slope * delta
        assert got * want > 0, (got, want)
        assert abs(got - want) <= tol * abs(want), (delta, got, want)


def test_constrained_patching_clamps_the_range_and_adds_decoder_writes(setup):
    lm, tc, st = setup
    tokens = st.tokens(PROMPT)
    clean = lm.capture(tokens)
    iv = Intervention(0, 2, (-1,), "add", 2.0)
    outs = {}

    def record(l):
        return lambda _m, _i, o: outs.__setitem__(l, o)

    hooks = [(lm.adapter.mlp_out_module(b), record(l)) for l, b in enumerate(lm.blocks)]
    with st.applied([iv], tokens, constrain_until=1), lm.hooks(hooks):
        lm.run(tokens)
    # hooks registered after the patch see the patched outputs
    dec = tc.decoder_weight(0)[2]  # [L, d]
    for l in (0, 1):
        want = clean.mlp_out[:, :, l].clone()
        want[0, -1] += 2.0 * dec[l]
        torch.testing.assert_close(outs[l], want, rtol=0, atol=1e-5)
    assert (outs[2] - clean.mlp_out[:, :, 2]).abs().max() > 0  # real MLP after the range


def test_generation_matches_transformers_greedy_and_noop_interventions(setup):
    lm, tc, st = setup
    tokens = st.tokens(PROMPT)
    ours = st.generate(tokens, 6)
    ref = lm.model.generate(tokens, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)[
        0, tokens.shape[1] :
    ].tolist()
    assert ours == ref[: len(ours)] and len(ours) > 0
    acts = st.activations(tokens)
    same = st.generate(tokens, 6, [Intervention(1, 4, (-1,), "set", float(acts[-1, 1, 4]))])
    assert same == ours


def test_run_reports_before_and_after(setup):
    lm, tc, st = setup
    res = st.run(PROMPT, [Intervention(0, i, None, "scale", 10.0) for i in range(24)], top_k=5, generate=3)
    assert len(res.before) == len(res.after) == 5
    assert (
        abs(
            sum(t.prob for t in res.before) - float(torch.softmax(res.logits_before, -1).topk(5).values.sum())
        )
        < 1e-6
    )
    assert res.before != res.after
    d = res.to_dict()
    assert set(d) >= {"before", "after", "continuation_before", "continuation"}
    assert "before" in res.table()


def test_swap_injects_the_other_prompts_activations(setup):
    lm, tc, st = setup
    ivs = st.swap_interventions(PROMPT, OTHER, n_auto=4)
    acts_b = st.activations(st.tokens(OTHER))
    injected = [iv for iv in ivs if iv.mode == "set"]
    suppressed = [iv for iv in ivs if iv.mode == "scale"]
    assert injected and suppressed
    for iv in injected:
        assert iv.positions == (-1,) and iv.value == pytest.approx(float(acts_b[-1, iv.layer, iv.feature]))
    res = st.swap(PROMPT, OTHER, n_auto=4, top_k=3)
    assert (res.logits_after - res.logits_before).abs().max() > 0


def test_swap_sweep_scores_every_grid_point_as_a_direct_run_would(setup):
    lm, tc, st = setup
    target = int(lm.tokenize(" Austin")[0, -1])
    trials = st.swap_sweep(PROMPT, OTHER, target, n_autos=(2, 6), scales=(1.0, 3.0))
    same_len = st.tokens(PROMPT).shape[1] == st.tokens(OTHER).shape[1]
    assert len(trials) == 4 * (2 if same_len else 1)
    assert [t.p_target for t in trials] == sorted((t.p_target for t in trials), reverse=True)
    for t in trials[:2]:
        direct = st.run(PROMPT, t.interventions, top_k=1)
        assert t.p_target == pytest.approx(direct.prob(target), rel=1e-5, abs=1e-9)
        assert t.top_id == direct.after[0].token_id


def test_distinctive_features_and_positions():
    a = torch.zeros(2, 2, 3)
    b = torch.zeros(1, 2, 3)
    a[0, 1, 2], a[1, 0, 1], a[1, 1, 0] = 3.0, 2.0, 1.0
    b[0, 0, 1] = 0.5
    assert distinctive_features(a, b, 5) == [(1, 2), (1, 0)]
    assert resolve_positions((-1, 0), 5, 7, False) == [4, 0]
    assert resolve_positions(None, 5, 7, True) == list(range(7))
    with pytest.raises(ValueError):
        resolve_positions((5,), 5, 7, False)
