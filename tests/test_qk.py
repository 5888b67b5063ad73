"""QK attribution is exact in the local replacement model (METHOD.md §8).

On tiny random models of every family (Gemma 3 q/k norms and sliding windows, Gemma 2's
soft-capped attention, Llama/Qwen rotary, Qwen 2 q/k biases, GPT-2 learned positions and
biases), with a small random CLT:

- the pairs sum to the real pre-softmax score (read from the query and key the model's own
  eager attention receives) to 1e-4 relative, for every head and several (q, k);
- the scores rebuilt from the pairs give the model's own attention pattern
  (output_attentions) after the mask, soft-cap and softmax;
- scaling one source (a feature's activation, a token embedding) by 1 + δ in the frozen
  model moves the score by δ·(its row + its column) + δ²·(its diagonal pair), as predicted;
- the exact top pairs agree with the full pair matrix;
- bad heads, layers and positions (incl. outside Gemma 3's sliding window) are refused.
"""

from __future__ import annotations

import pytest
import torch

from cltrace.attribution.qk import QKTracer, _record_residuals, affine_map, top_pairs
from cltrace.attribution.replacement import run_frozen
from cltrace.errors import CltraceError
from test_attribution import PROMPT, make_transcoder
from tiny import FAMILIES, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py (module scope, as before)


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request):
    lm = tiny_model(request.param)
    tc = make_transcoder(lm, "clt")
    return lm, tc, QKTracer(lm, tc, PROMPT)


def full_pairs(tracer: QKTracer, layer: int, head: int, q: int, k: int) -> torch.Tensor:
    Q = tracer.side(layer, "q", head, q)
    K = tracer.side(layer, "k", tracer.kv_head(layer, head), k)
    return tracer.rec.scaling[layer] * Q.double() @ K.double().T


def edges(tracer: QKTracer):
    """(layer, head, q, k) covering every layer and head, near and far keys within windows."""
    n = tracer.n
    out = []
    for l in range(tracer.L):
        w = tracer.rec.window[l]
        for h in range(tracer.n_heads):
            q = n - 1 - h
            for k in (q, q - 2, 1 if not w else q - w + 1, 0 if not w else q - 1):
                out.append((l, h, q, k))
    return out


def test_pairs_sum_to_real_score(setup):
    lm, tc, tracer = setup
    assert tracer.feats.n > 20
    for l, h, q, k in edges(tracer):
        r = tracer.explain(l, h, q, k, top=5)
        P = full_pairs(tracer, l, h, q, k)
        assert abs(float(P.sum()) - r.score) <= 1e-4 * max(abs(r.score), 1e-3), (l, h, q, k)
        assert r.relative_error < 1e-4 or abs(r.score) < 1e-3
        assert r.n_pairs > 0 and r.summary.startswith(f"head {l}.{h} attends")
        m = len(tracer.source_ids) - len(tracer.constants)  # node rows; constants last
        assert float(P[:m, :m].sum()) + r.constant_part == pytest.approx(float(P.sum()), rel=1e-6, abs=1e-7)
        assert all(q in tracer.source_ids[:m] and k in tracer.source_ids[:m] for q, k, _ in r.pairs)
        if r.pairs:
            assert abs(r.pairs[0][2]) == pytest.approx(float(P[:m, :m].abs().max()), rel=1e-5)
        nf = tracer.feats.n
        if r.feature_pairs:
            assert abs(r.feature_pairs[0][2]) == pytest.approx(float(P[:nf, :nf].abs().max()), rel=1e-5)


def test_rebuilt_scores_give_the_models_pattern(setup):
    lm, tc, tracer = setup
    with torch.no_grad():
        out = lm.model(input_ids=tracer.tokens[None], output_attentions=True, use_cache=False)
    q = tracer.n - 1
    for l in range(tracer.L):
        real = out.attentions[l][0]  # [H, n, n]
        for h in range(tracer.n_heads):
            visible = [
                k for k in range(q + 1) if tracer.rec.window[l] is None or q - k < tracer.rec.window[l]
            ]
            scores = torch.tensor(
                [float(full_pairs(tracer, l, h, q, k).sum()) for k in visible], dtype=torch.float64
            )
            cap = tracer.rec.softcap[l]
            if cap:
                scores = torch.tanh(scores / cap) * cap
            pattern = torch.softmax(scores, 0)
            assert torch.allclose(pattern, real[h, q, visible].double(), atol=1e-5), (l, h)


def perturbed_score(tracer: QKTracer, layer, head, q, k, feature=None, embed_pos=None, delta=0.5):
    """Score in the frozen model (frozen patterns, norm and q/k-norm denominators) with one
    source scaled by 1 + delta; everything else, downstream features included, held fixed."""
    fwd = tracer._forwards[tracer.n][0]
    y = fwd.mlp_out_values.clone()  # [n, L, d]
    embed = fwd.embed_values.clone()
    if feature is not None:
        f = tracer.feats
        l_s, p_s, i_s = int(f.layer[feature]), int(f.pos[feature]), int(f.index[feature])
        dec = tracer.transcoder.decoder_weight(l_s)[i_s]  # [T, d]
        y[p_s, l_s : l_s + dec.shape[0]] += delta * float(f.activation[feature]) * dec
    if embed_pos is not None:
        embed[embed_pos] *= 1 + delta
    residuals = [None] * tracer.L
    with _record_residuals(tracer.lm, residuals):
        run_frozen(tracer.lm, tracer.tokens, fwd.frozen, embed, lambda l, x: y[:, l][None])
    kv = tracer.kv_head(layer, head)
    Wq, bq, _ = affine_map(tracer.lm, layer, "q", head, q, tracer.residual[layer][q], tracer.rec.rope[layer])
    Wk, bk, _ = affine_map(tracer.lm, layer, "k", kv, k, tracer.residual[layer][k], tracer.rec.rope[layer])
    qv = Wq @ residuals[layer][0, q].float() + bq
    kvv = Wk @ residuals[layer][0, k].float() + bk
    return tracer.rec.scaling[layer] * float(qv.double() @ kvv.double())


def test_perturbing_a_source_moves_the_score_as_its_pairs_predict(setup):
    lm, tc, tracer = setup
    delta = 0.5
    layer = tracer.L - 1
    head, q = 1, tracer.n - 1
    k = q - 1
    P = full_pairs(tracer, layer, head, q, k)
    base = float(P.sum())
    f = tracer.feats
    early = ((f.layer < layer) & (f.pos <= k)).nonzero().squeeze(1)
    assert early.numel() > 0
    # the feature with the largest pair terms, and the embedding at the key position
    strength = P.abs().sum(0)[early] + P.abs().sum(1)[early]
    s = int(early[strength.argmax()])
    e = f.n + tracer.L * tracer.n + k  # column of token k
    for kwargs, col in ((dict(feature=s), s), (dict(embed_pos=k), e)):
        predicted = base + delta * float(P[col].sum() + P[:, col].sum()) + delta**2 * float(P[col, col])
        measured = perturbed_score(tracer, layer, head, q, k, delta=delta, **kwargs)
        assert abs(measured - base) > 1e-4, "the perturbation should matter"
        assert measured == pytest.approx(predicted, rel=1e-4, abs=1e-5), kwargs


def test_top_pairs_are_exact():
    torch.manual_seed(1)
    Q = torch.randn(300, 8) * torch.rand(300, 1) ** 3
    K = torch.randn(250, 8) * torch.rand(250, 1) ** 3
    Q[::7] = 0
    pairs, n = top_pairs(Q, K, 0.5, 12, chunk=37)
    full = 0.5 * Q @ K.T
    vals, idx = torch.topk(full.abs().flatten(), 12)
    assert [abs(v) for _, _, v in pairs] == pytest.approx(vals.tolist(), rel=1e-6)
    assert {(s, t) for s, t, _ in pairs} == {(int(i) // 250, int(i) % 250) for i in idx}
    assert n == int((Q.norm(dim=1) > 0).sum()) * 250


def test_bad_edges_are_refused():
    lm = tiny_model("gemma")
    tracer = QKTracer(lm, make_transcoder(lm, "clt"), PROMPT)
    n, H = tracer.n, tracer.n_heads
    with pytest.raises(CltraceError, match="head 4 does not exist"):
        tracer.explain(0, H, n - 1, 0)
    with pytest.raises(CltraceError, match="layer 9 does not exist"):
        tracer.explain(9, 0, n - 1, 0)
    with pytest.raises(CltraceError, match="after query position"):
        tracer.explain(1, 0, 3, 5)
    with pytest.raises(CltraceError, match="outside the prompt"):
        tracer.explain(1, 0, n, 0)
    assert tracer.rec.window[0] == 4 and tracer.rec.window[1] is None
    with pytest.raises(CltraceError, match="sliding-window"):
        tracer.explain(0, 0, n - 1, n - 5)
    assert tracer.explain(1, 0, n - 1, n - 5).relative_error < 1e-4  # full layer: fine


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pairs_sum_to_real_score_on_cuda():
    lm = tiny_model("gemma")
    tc = make_transcoder(lm, "clt")
    lm.model.to("cuda")
    tc.to("cuda")
    tracer = QKTracer(lm, tc, PROMPT)
    for l, h, q, k in edges(tracer)[:8]:
        r = tracer.explain(l, h, q, k)
        assert r.relative_error < 1e-4 or abs(r.score) < 1e-3


@pytest.mark.parametrize("family", ["gemma", "gpt2"])
@pytest.mark.parametrize("kind", ["plt", "skip"])
def test_pairs_sum_with_other_transcoders(family, kind):
    lm = tiny_model(family)
    tracer = QKTracer(lm, make_transcoder(lm, kind), PROMPT)
    for l, h, q, k in edges(tracer)[::3]:
        r = tracer.explain(l, h, q, k)
        assert abs(float(full_pairs(tracer, l, h, q, k).sum()) - r.score) <= 1e-4 * max(abs(r.score), 1e-3)
