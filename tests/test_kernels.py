"""The numba kernels of the TopK / BatchTopK training step (transcoders/kernels.py,
kernel_step.py) against dense torch products: values, gradients, the exact BatchTopK
selection, bf16 autocast within a stated tolerance, and the pooled gradient buffers."""

from __future__ import annotations

import pytest
import torch

from cltrace import hardware
from cltrace.transcoders import kernels
from cltrace.transcoders.config import TranscoderConfig
from cltrace.transcoders.kernel_step import (
    GradPool,
    PairsDecode,
    candidate_floor,
    mask_pairs,
    select_batch_topk,
    select_csc,
    select_dead_topk,
    selection_scores,
    stack_selections,
)
from cltrace.transcoders.model import SparseDecode, Transcoder

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba kernels unavailable")


def random_pairs(N: int, F: int, P: int, seed: int):
    """P distinct (token, feature) pairs, CSC-sorted, with features that own none."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(N * (F - 3), generator=g)[:P]  # the last 3 features never fire
    tok, feat = flat // (F - 3), flat % (F - 3)
    values = torch.rand(P, generator=g) + 0.1
    return select_csc(tok, feat, values, N, F)


@pytest.mark.parametrize(
    "N,F,M,col0,C", [(37, 50, 40, 0, 40), (64, 20, 700, 96, 1000), (200, 300, 640, 640, 1280)]
)
def test_decode_and_rows_grad_match_dense(N, F, M, col0, C):
    """out[:, col0:col0+M] += A @ W; gW = Aᵀ G; dots_p = (G Wᵀ)[t_p, f_p]; columns not a
    multiple of the block, a column offset into a wider buffer, features without pairs."""
    s = random_pairs(N, F, P=min(N * F // 4, 3000), seed=N)
    g = torch.Generator().manual_seed(1)
    W, G = torch.randn(F, M, generator=g), torch.randn(N, C, generator=g)
    A = torch.zeros(N, F)
    A[s.tok, s.feat] = s.raw
    out = torch.randn(N, C, generator=g)
    expected = out.clone()
    expected[:, col0 : col0 + M] += A @ W
    kernels.decode_into(out.numpy(), col0, W.numpy(), s.fstart.numpy(), s.tok.numpy(), s.raw.numpy())
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-5)

    gW = torch.full((F, M), float("nan"))  # every row must be written
    dots = kernels.rows_grad(
        gW.numpy(), G.numpy(), col0, s.fstart.numpy(), s.tok.numpy(), s.raw.numpy(), W.numpy()
    )
    torch.testing.assert_close(gW, A.T @ G[:, col0 : col0 + M], atol=1e-4, rtol=1e-5)
    assert torch.all(gW[-3:] == 0)
    assert dots is not None
    torch.testing.assert_close(
        torch.from_numpy(dots), (G[:, col0 : col0 + M] @ W.T)[s.tok, s.feat], atol=1e-4, rtol=1e-5
    )


@pytest.mark.parametrize("N", [16, 256])
@pytest.mark.parametrize("biased", [False, True])
def test_batch_topk_selection_is_exact(N, biased):
    """The candidate-threshold BatchTopK picks exactly torch.topk's pairs (fp32, no ties), on
    batches that take the sampled threshold (256 tokens) and the fallback (16), with and
    without a selection bias (ranked by selection_scores, values kept as pre)."""
    pre = torch.randn(4, N, 96, generator=torch.Generator().manual_seed(N))
    bias = torch.rand(4, 1, 96, generator=torch.Generator().manual_seed(1)) * 1.5 if biased else None
    sel = select_batch_topk(pre, 5, bias)
    scores = pre if bias is None else selection_scores(pre, bias)
    top = scores.reshape(4, -1).topk(5 * N, dim=-1)
    for l, s in enumerate(sel):
        assert set((s.tok * 96 + s.feat).tolist()) == set(top.indices[l].tolist())
        assert torch.all(s.feat[1:] >= s.feat[:-1])  # feature-major
        torch.testing.assert_close(s.raw, pre[l, s.tok, s.feat])


@pytest.mark.parametrize("negative_scores", [False, True])
def test_batch_topk_selection_is_exact_in_bf16_under_a_bias(negative_scores):
    """bf16 pre-activations under a bias (as in training under autocast): the candidates
    come from a per-feature floor compared with pre, where torch rounds pre + bias to bf16;
    the selected scores are torch.topk's (compared as values: bf16 has ties). With k close
    to F the threshold is negative and every pair is scored."""
    g = torch.Generator().manual_seed(3)
    pre = torch.randn(3, 512, 128, generator=g).bfloat16()
    bias = torch.rand(3, 1, 128, generator=g) * 0.8
    k = 60 if negative_scores else 6
    sel = select_batch_topk(pre, k, bias)
    scores = selection_scores(pre, bias).reshape(3, -1)
    top = scores.topk(k * 512, dim=-1).values
    for l, s in enumerate(sel):
        got = scores[l, s.tok * 128 + s.feat].float().sort(descending=True).values
        assert torch.equal(got, top[l].float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def testcandidate_floor_never_leaves_out_a_pair_that_scores_above_tau(dtype):
    """The floor's guarantee at the boundary: pre-activations within a few rounding steps of
    tau - bias (where rounding pre + bias, or the floor, could flip a comparison) score above
    tau only if they are above the floor."""
    g = torch.Generator().manual_seed(5)
    L, N, F = 3, 400, 64
    tau = (torch.rand(L, 1, generator=g) * 3).to(dtype).float()  # a value of pre's dtype
    bias = torch.rand(L, 1, F, generator=g) * 2
    pre = (tau[:, :, None] - bias + torch.randn(L, N, F, generator=g) * 1e-2).to(dtype)
    floor = candidate_floor(tau.to(dtype), bias, dtype)
    assert floor is not None
    above_tau = selection_scores(pre, bias) > tau[:, :, None].to(dtype)
    assert above_tau.any() and not (above_tau & (pre <= floor)).any()
    assert candidate_floor(tau.to(dtype) - 5, bias, dtype) is None  # negative tau: score all


def make(activation: str, kind: str = "clt", F: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    cfg = TranscoderConfig(n_layers=4, d_model=16, n_features=F, kind=kind, activation=activation, topk=6)
    tc = Transcoder(cfg)
    x, y = torch.randn(128, 4, 16) * 2, torch.randn(128, 4, 16)
    tc.init_from_sample(x, y)
    return tc, x, y


def loss_and_grads(tc: Transcoder, x, y, use_kernels: bool, autocast: bool = False):
    tc.use_kernels = use_kernels
    tc.zero_grad(set_to_none=True)
    dead = torch.zeros(4, tc.cfg.n_features, dtype=torch.bool)
    dead[:, ::3] = True
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = tc.loss(x, y, lambda_s=0.0, lambda_p=0.0, dead=dead, auxk=8, auxk_alpha=0.25)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in tc.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("activation,kind", [("batchtopk", "clt"), ("topk", "clt"), ("batchtopk", "plt")])
def test_bf16_kernel_step_within_tolerance(activation, kind):
    """Under bf16 autocast both paths select on the same bf16 pre-activations (ties at the
    k·N-th value broken differently); the kernel path differentiates the pairs in float32
    where autograd runs the encoder's backward in bf16. Against the float32 gradients, the
    kernel path's bf16 error is at most 1.5x autograd's + 0.02 for every parameter (both are
    5-8% relative L2 on this small model, from the selection); TopK (no batch-wide ties)
    agrees with autograd's bf16 within 1% and the loss within 1e-2 relative."""
    tc, x, y = make(activation, kind)
    ref, g_ref = loss_and_grads(tc, x, y, use_kernels=False, autocast=True)
    out, g = loss_and_grads(tc, x, y, use_kernels=True, autocast=True)
    _, g32 = loss_and_grads(tc, x, y, use_kernels=False, autocast=False)
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-2)
    assert (out.counts - ref.counts).abs().sum() <= 0.02 * ref.counts.sum()
    for name in g_ref:
        err_kernel = (g[name] - g32[name]).norm() / g32[name].norm()
        err_autograd = (g_ref[name] - g32[name]).norm() / g32[name].norm()
        assert err_kernel <= 1.5 * err_autograd + 0.02, name
        if activation == "topk":
            assert (g[name] - g_ref[name]).norm() <= 1e-2 * g_ref[name].norm(), name


def test_pooled_gradients_reused_and_accumulated():
    """The pooled buffers give each step its own gradient (same as the torch path), and a
    second backward without zero_grad adds to it like autograd does."""
    tc, x, y = make("batchtopk")
    _, ref = loss_and_grads(tc, x, y, use_kernels=False)
    for _ in range(2):  # the second step reuses the first step's storage
        _, g = loss_and_grads(tc, x, y, use_kernels=True)
        for name in ref:
            torch.testing.assert_close(g[name], ref[name], atol=1e-5, rtol=1e-5)
    tc.zero_grad(set_to_none=True)
    for _ in range(2):  # accumulate twice
        out = tc.loss(x, y, lambda_s=0.0, lambda_p=0.0)
        out.loss.backward()
    tc.use_kernels = False
    doubled = {n: p.grad.clone() for n, p in tc.named_parameters() if p.grad is not None}
    _, single = loss_and_grads(tc, x, y, use_kernels=False, autocast=False)
    # (loss_and_grads adds AuxK; compare the reconstruction-only part by hand)
    tc.zero_grad(set_to_none=True)
    tc.loss(x, y, lambda_s=0.0, lambda_p=0.0).loss.backward()
    for name, p in tc.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(doubled[name], 2 * p.grad, atol=1e-5, rtol=1e-5)


def test_keep_freed_memory_is_harmless():
    assert isinstance(hardware.keep_freed_memory(), bool)
    assert torch.ones(1000, 1000).sum().item() == 1e6


def test_topk_init_centres_each_feature_on_the_sample():
    """init_from_sample gives TopK / BatchTopK features pre-activations of mean 0 on the sample
    (inputs with a large shared mean direction would otherwise leave half the features below
    every other at the start)."""
    torch.manual_seed(0)
    cfg = TranscoderConfig(n_layers=2, d_model=16, n_features=32, activation="batchtopk", topk=4)
    tc = Transcoder(cfg)
    x = torch.randn(512, 2, 16) + 5.0  # a shared offset
    tc.init_from_sample(x, torch.randn(512, 2, 16))
    pre = tc.encode(x)  # [N, L, F]
    assert pre.mean(0).abs().max() < 1e-3 * pre.std(0).mean()
    fired = (tc.activate(pre) > 0).any(0)  # BatchTopK over the sample: [L, F]
    assert fired.float().mean() > 0.9
    with torch.no_grad():
        tc.b_enc.zero_()  # without the centring, the shared offset decides who fires
    assert (tc.activate(tc.encode(x)) > 0).any(0).float().mean() < 0.8


@pytest.mark.parametrize("activation", ["batchtopk", "jumprelu"])
def test_normalize_decoder_keeps_outputs_and_sets_unit_norms(activation):
    torch.manual_seed(0)
    cfg = TranscoderConfig(
        n_layers=3,
        d_model=8,
        n_features=16,
        activation=activation,
        topk=3 if activation != "jumprelu" else None,
    )
    tc = Transcoder(cfg)
    x = torch.randn(64, 3, 8)
    tc.init_from_sample(x, torch.randn(64, 3, 8))
    with torch.no_grad():
        for W in tc.W_dec:
            W.mul_(torch.rand(W.shape[0], 1, 1) * 3 + 0.1)  # uneven decoder norms
    norms = tc.decoder_norms()  # [L, F]
    before = tc(x)
    tc.normalize_decoder_()
    after = tc(x)
    torch.testing.assert_close(tc.decoder_norms(), torch.ones(3, 16))
    torch.testing.assert_close(after.pre, before.pre * norms, atol=1e-5, rtol=1e-4)
    if activation == "jumprelu":  # thresholds scale with the pre-activations: same outputs
        torch.testing.assert_close(after.recon, before.recon, atol=1e-5, rtol=1e-4)
        assert torch.equal(after.acts > 0, before.acts > 0)
    else:  # the selection is now by contribution: the same as selecting a·||W_dec|| before
        scored = tc.activate(before.pre * norms)
        assert torch.equal(after.acts > 0, scored > 0)


@pytest.mark.parametrize("activation", ["batchtopk", "topk"])
def test_selection_bias_same_on_both_paths_and_folded_by_conversion(activation):
    """A selection bias (load balancing) chooses by pre + β but keeps pre as the values: the
    kernel and torch paths agree (fp32), and topk_to_jumprelu turns it into per-feature
    thresholds τ_l - β_f that fire on the same pairs as the biased selection."""
    from cltrace.transcoders.refit import topk_to_jumprelu

    tc, x, y = make(activation)
    with torch.no_grad():
        tc.select_bias.copy_(torch.randn(4, 64) * 0.5)
    out_k, g_k = loss_and_grads(tc, x, y, use_kernels=True)
    out_t, g_t = loss_and_grads(tc, x, y, use_kernels=False)
    torch.testing.assert_close(out_k.loss, out_t.loss, rtol=1e-6, atol=1e-5)
    assert torch.equal(out_k.counts, out_t.counts)
    for name in g_t:
        torch.testing.assert_close(g_k[name], g_t[name], atol=1e-5, rtol=1e-5)
    selected = tc.activate(tc.encode(x)) > 0  # the biased selection [N, L, F]
    if activation == "batchtopk":
        topk_to_jumprelu(tc, x)
        assert not tc.select_bias.any()
        fired = tc.activate(tc.encode(x)) > 0
        assert (fired != selected).float().mean() < 1e-3
        assert tc.log_threshold.std() > 0


def test_dead_topk_pairs_and_stacked_selection():
    """AuxK's pairs are each token's k largest dead pre-activations per layer, positive ones
    only (a layer without dead features gives none); stacking puts them on rows N..2N-1 of one
    feature-major selection, beside the main pairs, all of both kept."""
    N, F, k = 32, 40, 3
    pre = torch.randn(3, N, F, generator=torch.Generator().manual_seed(0))
    dead = torch.zeros(3, F, dtype=torch.bool)
    dead[0, ::4] = True
    dead[2, :2] = True  # fewer dead features than k
    sel = select_dead_topk(pre, dead, k)
    for l in range(3):
        want = set()
        if dead[l].any():
            masked = pre[l].masked_fill(~dead[l], float("-inf"))
            top = masked.topk(min(k, int(dead[l].sum())), dim=-1)
            want = {(t, int(f)) for t in range(N) for v, f in zip(top.values[t], top.indices[t]) if v > 0}
        got = set(zip(sel[l].tok.tolist(), sel[l].feat.tolist()))
        assert got == want
        torch.testing.assert_close(sel[l].raw, pre[l, sel[l].tok, sel[l].feat])
    main = select_batch_topk(pre, 2)
    both = stack_selections(main, sel, N)
    for m, a, s in zip(main, sel, both):
        assert s.tok.numel() == m.tok.numel() + a.tok.numel()
        assert torch.all(s.feat[1:] >= s.feat[:-1])
        assert set(zip(s.tok.tolist(), s.feat.tolist())) == set(zip(m.tok.tolist(), m.feat.tolist())) | {
            (t + N, f) for t, f in zip(a.tok.tolist(), a.feat.tolist())
        }


def test_pairs_decode_equals_sparse_decode():
    """The fine-tuning's kernel decode (mask_pairs + PairsDecode) against model.SparseDecode
    (token-major embedding bags): outputs, value and decoder gradients, features without pairs
    and a token without pairs; the pooled gradient buffer is reused on the next step."""
    g = torch.Generator().manual_seed(3)
    N, F, T, d = 41, 30, 3, 16
    pre = torch.randn(N, F, generator=g).requires_grad_(True)
    mask = pre.detach() > 0.8
    mask[:, -2:] = False  # features that never fire
    mask[5] = False  # a token without pairs
    W = torch.randn(F, T, d, generator=g).requires_grad_(True)
    G = torch.randn(N, T * d, generator=g)
    sel = mask_pairs(mask)
    assert torch.equal(sel.feat, sel.feat.sort().values) and sel.fstart[-1] == mask.sum()
    pool = GradPool()
    got = PairsDecode.apply(pre[sel.tok, sel.feat], W, sel, N, pool, ("dec", 0))
    (got * G).sum().backward()
    grads = pre.grad.clone(), W.grad.clone()
    storage = W.grad.untyped_storage().data_ptr()
    pre.grad = W.grad = None
    tok, feat = mask.nonzero(as_tuple=True)
    expected = SparseDecode.apply(pre[tok, feat], W.view(F, -1), tok, feat, N, False)
    (expected * G).sum().backward()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert got[5].abs().max() == 0
    torch.testing.assert_close(grads[0], pre.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1], W.grad, atol=1e-5, rtol=1e-5)
    assert grads[1][-2:].abs().max() == 0 and grads[0].abs().max() > 0
    W.grad = None
    PairsDecode.apply(pre[sel.tok, sel.feat], W, sel, N, pool, ("dec", 0)).sum().backward()
    assert W.grad.untyped_storage().data_ptr() == storage  # the pooled buffer, not a fresh one
