"""Transcoder math: the loss by hand, STE gradients, sparse == dense, raw-scale API, files."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from cltrace.errors import CltraceError
from cltrace.transcoders.config import TranscoderConfig
from cltrace.transcoders.model import JumpReLU, Transcoder

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def small(kind="clt", skip=False, activation="jumprelu", topk=None, L=3, d=8, F=32, seed=0):
    torch.manual_seed(seed)
    cfg = TranscoderConfig(
        n_layers=L,
        d_model=d,
        n_features=F,
        kind=kind,
        skip=skip,
        activation=activation,
        topk=topk,
        bandwidth=0.5,
    )
    tc = Transcoder(cfg)
    x, y = torch.randn(96, L, d) * 3, torch.randn(96, L, d) * 0.5
    tc.init_from_sample(x, y, fire_frac=0.1)
    with torch.no_grad():  # move pre-activations off the exact threshold set by the init
        tc.b_enc.add_(0.01 * torch.randn_like(tc.b_enc))
        if skip:
            tc.W_skip.normal_(0, 0.05)
        tc.b_dec.normal_(0, 0.1)
    return tc, x, y


def test_loss_by_hand():
    cfg = TranscoderConfig(n_layers=2, d_model=2, n_features=1, init_threshold=0.5)
    tc = Transcoder(cfg)
    with torch.no_grad():
        tc.W_enc.copy_(torch.tensor([[[1.0], [0.0]], [[0.0], [1.0]]]))
        tc.b_enc.zero_()
        tc.W_dec[0].copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))  # writes to layers 0 and 1
        tc.W_dec[1].copy_(torch.tensor([[[3.0, 4.0]]]))
        tc.b_dec.zero_()
    x = torch.tensor([[[2.0, 0.0], [0.0, 0.25]]])  # pre = (2, 0.25); θ = 0.5: only layer 0 fires
    y = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])  # recon = ([2, 0], [0, 2])
    out = tc.loss(x, y, lambda_s=0.1, lambda_p=0.01, c=4.0)
    assert out.mse.item() == pytest.approx(1.0 + 4.0)
    assert out.sparsity.item() == pytest.approx(math.tanh(4 * math.sqrt(2) * 2))
    assert out.preact.item() == pytest.approx((0.5 - 0.25) * 5.0)  # ReLU(θ - pre)·||W_dec||
    assert out.loss.item() == pytest.approx(5 + 0.1 * math.tanh(8 * math.sqrt(2)) + 0.01 * 1.25)


def test_jumprelu_ste_gradients():
    torch.manual_seed(1)
    eps = 0.4
    z = torch.randn(200, 5, dtype=torch.float64)
    log_theta = torch.full((5,), math.log(0.3), dtype=torch.float64, requires_grad=True)
    c = torch.randn(200, 5, dtype=torch.float64)
    zr = z.clone().requires_grad_()
    theta = log_theta.exp()
    (JumpReLU.apply(zr, theta, eps) * c).sum().backward()
    assert torch.equal(zr.grad, c * (z > 0.3))  # pass-through where active
    window = ((z - 0.3).abs() < eps / 2).double()
    expected_theta = (-(0.3 / eps) * window * c).sum(0)  # -(θ/ε) K((z-θ)/ε)
    assert torch.allclose(log_theta.grad, expected_theta * 0.3)  # chain rule through exp

    # The θ STE is the exact derivative of the smooth surrogate θ0 · H_ε(z - θ), where H_ε is
    # the rectangle kernel's integral: compare with central finite differences.
    def surrogate(t):
        return (c * 0.3 * ((z - t) / eps + 0.5).clamp(0, 1)).sum(0)

    h = 1e-6
    fd = (surrogate(0.3 + h) - surrogate(0.3 - h)) / (2 * h)
    assert torch.allclose(fd, expected_theta, atol=1e-5)

    # z gradient away from θ equals finite differences of the true function
    def f(zz):
        return (zz * (zz > 0.3) * c).sum()

    k = (z - 0.3).abs().argmax()
    dz = torch.zeros_like(z).view(-1)
    dz[k] = h
    fd_z = (f(z + dz.view_as(z)) - f(z - dz.view_as(z))) / (2 * h)
    assert fd_z.item() == pytest.approx(zr.grad.view(-1)[k].item(), abs=1e-6)


@pytest.mark.parametrize(
    "kind,skip,activation",
    [
        ("clt", False, "jumprelu"),
        ("plt", True, "jumprelu"),
        ("clt", True, "topk"),
        ("clt", False, "batchtopk"),
        ("plt", False, "topk"),
    ],
)
def test_sparse_decode_matches_dense(kind, skip, activation):
    """fp32: the sparse pairs decoders (torch's and, for TopK / BatchTopK, the numba kernels'),
    and the AuxK term's, give the dense values and gradients."""
    grads, values = [], []
    dead = torch.rand(3, 32, generator=torch.Generator().manual_seed(5)) < 0.3
    modes = [(1.0, False), (-1.0, False)] + ([(1.0, True)] if activation != "jumprelu" else [])
    for density, kernels in modes:  # always sparse, always dense, then the kernels
        tc, x, y = small(kind, skip, activation, topk=4 if activation != "jumprelu" else None)
        tc.sparse_max_density = density
        tc.use_kernels = kernels
        out = tc.loss(x, y, lambda_s=1e-2, lambda_p=1e-2, dead=dead, auxk=3, auxk_alpha=0.5)
        assert out.aux.item() > 0
        out.loss.backward()
        values.append(out.loss.detach())
        grads.append({n: p.grad.clone() for n, p in tc.named_parameters() if p.grad is not None})
    for other in range(1, len(modes)):
        assert torch.allclose(values[0], values[other], rtol=1e-6)
        assert grads[0].keys() == grads[other].keys()
        for name in grads[0]:
            assert torch.allclose(grads[0][name], grads[other][name], atol=1e-6, rtol=1e-5), (other, name)
    assert ("log_threshold" in grads[0]) == (activation == "jumprelu")  # TopK has no θ to train


@pytest.mark.parametrize("activation", ["jumprelu", "topk"])
def test_bf16_decoder_rows_within_tolerance(activation):
    """With decode_bf16 (off by default) under bf16 autocast the sparse decoder reads bf16 rows
    (8-bit mantissa, relative rounding ≤ 2⁻⁹ per weight): the loss stays within 1e-2 relative of fp32
    decoding and every parameter gradient within 3e-2 (relative L2); the backward itself is fp32 in both."""
    results = []
    for bf16_rows in (False, True):
        tc, x, y = small(activation=activation, topk=4 if activation == "topk" else None)
        tc.use_kernels = False  # the torch decoder's option (the kernels read float32 rows)
        tc.decode_bf16 = bf16_rows
        tc.sparse_max_density = 1.0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = tc.loss(x, y, lambda_s=1e-2, lambda_p=1e-2)
        out.loss.backward()
        results.append(
            (out.loss.item(), {n: p.grad.clone() for n, p in tc.named_parameters() if p.grad is not None})
        )
    (loss32, g32), (loss16, g16) = results
    assert loss16 != loss32  # the bf16 rows were used
    assert loss16 == pytest.approx(loss32, rel=1e-2)
    for name in g32:
        assert (g16[name] - g32[name]).norm() <= 3e-2 * g32[name].norm(), name


def test_batch_topk_keeps_k_per_token_on_average_and_matches_pairs():
    tc, x, _ = small(activation="batchtopk", topk=4)
    acts = tc(x).acts  # [N, L, F]
    assert torch.equal((acts > 0).sum((0, 2)), torch.full((3,), 4 * 96))  # k·N per layer
    assert (acts > 0).sum(-1).float().std() > 0  # but not k for every token
    pre = tc._encode(tc._normalise(x, tc.in_scale))
    from cltrace.transcoders.model import pairs_batch_topk, pairs_to_dense

    for l, p in enumerate(pairs_batch_topk(pre, 4)):
        assert torch.all(p.tok[1:] >= p.tok[:-1])  # token-major
        assert torch.equal(pairs_to_dense(p, 96, 32), acts[:, l])


def test_public_decode_sparse_and_dense_agree():
    tc, x, _ = small()
    out = tc(x)
    acts = out.acts.detach().requires_grad_()
    dense = tc.decode(acts)  # wants grads w.r.t. acts: dense path
    with torch.no_grad():
        sparse = tc.decode(acts)
    assert torch.allclose(dense, sparse, atol=1e-5)
    assert torch.allclose(out.recon, sparse, atol=1e-5)


@pytest.mark.parametrize("kind,skip", [("clt", False), ("plt", True)])
def test_raw_scale_accessors_reproduce_forward(kind, skip):
    tc, x, _ = small(kind, skip)
    with torch.no_grad():
        out = tc(x)
        L = tc.cfg.n_layers
        recon = tc.decoder_bias().expand(x.shape[0], L, -1).clone()
        for l in range(L):
            pre = x[:, l] @ tc.encoder_weight(l) + tc.encoder_bias(l)
            assert torch.allclose(pre, out.pre[:, l], atol=1e-4)
            acts = pre * (pre > tc.threshold(l))
            assert torch.allclose(acts, out.acts[:, l], atol=1e-4)
            W = tc.decoder_weight(l)  # [F, T, d]
            recon[:, l : l + W.shape[1]] += torch.einsum("nf,ftd->ntd", acts, W)
            if skip:
                recon[:, l] += x[:, l] @ tc.skip_weight(l)
        assert torch.allclose(recon, out.recon, atol=1e-4)
        tc.fold_scales()
        assert torch.allclose(tc(x).recon, out.recon, atol=1e-4)
        assert torch.equal(tc.in_scale, torch.ones(L))


def test_init_from_sample_sets_scales_and_firing_rate():
    torch.manual_seed(0)
    tc = Transcoder(TranscoderConfig(n_layers=2, d_model=16, n_features=64))
    x, y = torch.randn(2000, 2, 16) * 7, torch.randn(2000, 2, 16) * 0.1
    tc.init_from_sample(x, y, fire_frac=0.05)
    xn = x * tc.in_scale[None, :, None]
    assert torch.allclose(xn.norm(dim=-1).mean(0), torch.full((2,), 4.0), rtol=1e-4)
    fired = (tc(x).acts > 0).float().mean()
    assert 0.04 < fired < 0.06


def test_topk_keeps_k():
    tc, x, _ = small(activation="topk", topk=3)
    acts = tc(x).acts
    assert ((acts > 0).sum(-1) <= 3).all()
    assert tc.threshold(0).abs().sum() == 0


def test_save_load_roundtrip_and_errors(tmp_path):
    tc, x, _ = small(skip=True)
    tc.save(tmp_path / "tc")
    back = Transcoder.load(tmp_path / "tc")
    assert back.cfg == tc.cfg
    assert torch.equal(back(x).recon, tc(x).recon)

    cfg = json.loads((tmp_path / "tc" / "config.json").read_text())
    cfg["d_model"] = 9
    (tmp_path / "tc" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CltraceError, match="has shape .* the config needs"):
        Transcoder.load(tmp_path / "tc")
    (tmp_path / "tc" / "config.json").write_text("{not json")
    with pytest.raises(CltraceError, match="not valid JSON"):
        Transcoder.load(tmp_path / "tc")
    tc.save(tmp_path / "tc")
    (tmp_path / "tc" / "transcoder.safetensors").write_bytes(b"garbage")
    with pytest.raises(CltraceError, match="transcoder.safetensors"):
        Transcoder.load(tmp_path / "tc")
    with pytest.raises(CltraceError, match="no file"):
        Transcoder.load(tmp_path / "missing")


def test_config_checks():
    with pytest.raises(CltraceError):
        TranscoderConfig(n_layers=2, d_model=4, n_features=8, activation="topk")
    with pytest.raises(CltraceError):
        TranscoderConfig(n_layers=0, d_model=4, n_features=8)
    with pytest.raises(CltraceError, match="unknown field"):
        TranscoderConfig.from_dict({"n_layers": 2, "d_model": 4, "n_features": 8, "bogus": 1})
