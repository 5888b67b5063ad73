"""End-to-end (KL) fine-tuning: the differentiable replacement forward equals the evaluation's,
its gradients equal a dense autograd reference, and fine-tuning lowers the replacement model's
KL on contexts it never saw."""

from __future__ import annotations

import itertools

import pytest
import torch

from cltrace.errors import CltraceError
from cltrace.transcoders.config import TranscoderConfig
from cltrace.transcoders.evaluate import evaluate_replacement, replacement_patch
from cltrace.transcoders.finetune import FinetuneConfig, ReplacementForward, finetune, kl_divergence
from cltrace.transcoders.model import Transcoder
from tiny import tiny_model


def _setup(kind: str = "clt", skip: bool = False, seed: int = 1, n_features: int = 24):
    model = tiny_model("gemma", n_layers=3, d=32)
    torch.manual_seed(seed)
    tc = Transcoder(TranscoderConfig(n_layers=3, d_model=32, n_features=n_features, kind=kind, skip=skip))
    tokens = torch.randint(4, 40, (16, 12))
    cap = model.capture(tokens)
    tc.init_from_sample(cap.mlp_in.flatten(0, 1), cap.mlp_out.flatten(0, 1), fire_frac=0.3)
    return model, tc


def _dense_patch(tc: Transcoder, nmse: list):
    """Reference: every layer decoded densely, acts = pre · 1[pre > θ] over all features."""
    acts: list[torch.Tensor] = []

    def fn(layer, mlp_in, mlp_out):
        if layer == 0:
            acts.clear()
        B, n, d = mlp_in.shape
        xn = mlp_in[:, 1:].reshape(-1, d) * tc.in_scale[layer]
        pre = xn @ tc.W_enc[layer] + tc.b_enc[layer]
        acts.append(pre * (pre > tc.log_threshold[layer].exp()).detach())
        recon = tc.b_dec[layer].expand(xn.shape[0], d)
        for src in range(layer + 1) if tc.cfg.kind == "clt" else [layer]:
            recon = recon + acts[src] @ tc.W_dec[src][:, layer - src if tc.cfg.kind == "clt" else 0]
        if tc.W_skip is not None:
            recon = recon + xn @ tc.W_skip[layer]
        target = mlp_out[:, 1:].reshape(-1, d).detach() * tc.out_scale[layer]
        nmse.append((recon - target).pow(2).sum(-1).mean() / target.pow(2).sum(-1).mean())
        return torch.cat([mlp_out[:, :1], (recon / tc.out_scale[layer]).view(B, n - 1, d)], dim=1)

    return fn


@pytest.fixture(params=["kernels", "torch"])
def decode_path(request, monkeypatch):
    """Both decodes of ReplacementForward: the numba kernels (PairsDecode, CPU) and torch's
    (SparseDecode, as on CUDA)."""
    monkeypatch.setattr(Transcoder, "use_kernels", request.param == "kernels")
    return request.param


@pytest.mark.parametrize("kind,skip", [("clt", False), ("plt", True)])
def test_replacement_forward_equals_evaluation_patch(kind, skip, decode_path):
    model, tc = _setup(kind, skip)
    tokens = torch.randint(4, 40, (3, 10))
    with torch.no_grad(), model.patch_mlp_outputs(replacement_patch(tc)):
        expected = model.run(tokens)
    with torch.no_grad(), model.patch_mlp_outputs(ReplacementForward(tc)):
        got = model.run(tokens)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        real = model.run(tokens)
    assert not torch.allclose(real, expected, atol=1e-3)  # the replacement does change the output


@pytest.mark.parametrize("kind,skip", [("clt", False), ("plt", True)])
def test_gradients_equal_dense_autograd(kind, skip, decode_path):
    model, tc = _setup(kind, skip)
    tokens = torch.randint(4, 40, (3, 10))
    with torch.no_grad():
        real = model.run(tokens)
    params = [p for p in tc.parameters() if p.dtype.is_floating_point and p is not tc.log_threshold]
    grads = []
    for make in (lambda nmse: ReplacementForward(tc), lambda nmse: _dense_patch(tc, nmse)):
        nmse: list = []
        patch = make(nmse)
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        with model.patch_mlp_outputs(patch):
            rep = model.run(tokens)
        terms = patch.nmse if isinstance(patch, ReplacementForward) else nmse
        loss = kl_divergence(real, rep) + 0.7 * torch.stack(terms).mean()
        loss.backward()
        grads.append([p.grad.clone() for p in params])
    for p, sparse, dense in zip(params, *grads):
        assert dense.abs().max() > 0
        assert torch.allclose(sparse, dense, atol=1e-6, rtol=1e-4), p.shape


def _contexts(n: int, length: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield [1] + torch.randint(4, 40, (length - 1,), generator=g).tolist()


def _heldout_kl(tc, model) -> float:
    batches = [torch.tensor(list(_contexts(8, 16, 99)))]
    return evaluate_replacement(tc, model, batches).kl


def test_finetune_lowers_heldout_kl():
    model, tc = _setup(seed=3, n_features=32)
    before = _heldout_kl(tc, model)
    cfg = FinetuneConfig(minutes=5, max_steps=40, lr=3e-3, batch_contexts=4, context_len=16, positions=8)
    result = finetune(tc, model, _contexts(400, 16, 0), cfg, log=lambda s: None)
    after = _heldout_kl(tc, model)
    assert result.steps == 40 and result.tokens == 40 * 4 * 16
    assert after < 0.7 * before, (before, after)
    assert all(not p.requires_grad for p in tc.parameters())


def test_decoder_only_keeps_the_features():
    model, tc = _setup(seed=4)
    enc = (tc.W_enc.clone(), tc.b_enc.clone(), tc.log_threshold.clone())
    dec = tc.W_dec[0].clone()
    cfg = FinetuneConfig(minutes=5, max_steps=5, lr=1e-2, context_len=16, positions=8, train_encoder=False)
    finetune(tc, model, _contexts(100, 16, 0), cfg, log=lambda s: None)
    assert all(torch.equal(a, b) for a, b in zip(enc, (tc.W_enc, tc.b_enc, tc.log_threshold)))
    assert not torch.equal(dec, tc.W_dec[0])


def test_wall_time_budget_and_decay():
    model, tc = _setup(seed=5)
    ticks = itertools.count()
    clock = lambda: 6.0 * next(ticks)  # noqa: E731  each call is 6 s later: about 2 calls a step
    cfg = FinetuneConfig(minutes=2, lr=1e-3, decay_frac=0.5, warmup_steps=1, context_len=16, positions=8)
    result = finetune(tc, model, _contexts(1000, 16, 0), cfg, log=lambda s: None, clock=clock)
    assert 0 < result.steps < 15 and result.seconds <= 120 * 1.1
    lrs = [h.lr for h in result.history]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] < 0.5e-3 and lrs == sorted(lrs, reverse=True)


def test_needs_jumprelu_and_matching_shapes():
    model, tc = _setup()
    topk = Transcoder(TranscoderConfig(n_layers=3, d_model=32, n_features=24, activation="topk", topk=4))
    with pytest.raises(CltraceError, match="JumpReLU"):
        finetune(topk, model, _contexts(10, 16, 0), FinetuneConfig(context_len=16))
    wide = Transcoder(TranscoderConfig(n_layers=3, d_model=16, n_features=24))
    with pytest.raises(CltraceError, match="d_model 16"):
        finetune(wide, model, _contexts(10, 16, 0), FinetuneConfig(context_len=16))
    for bad in (dict(lr=-1.0), dict(mse_weight=-1.0), dict(decay_frac=2.0), dict(mse_on="both")):
        with pytest.raises(CltraceError, match="fine-tuning needs|mse_on"):
            FinetuneConfig(**bad)
    with pytest.raises(CltraceError, match="no full 16-token context"):
        finetune(tc, model, _contexts(10, 8, 0), FinetuneConfig(context_len=16), log=lambda s: None)


def test_training_ends_with_the_finetune_stage(monkeypatch, tmp_path):
    """train_run hands a finished JumpReLU run to the fine-tuning stage, once."""
    from cltrace.transcoders import launch
    from cltrace.transcoders.config import TrainConfig
    from cltrace.transcoders.train import synthetic_batches

    calls = []
    monkeypatch.setattr(
        launch,
        "training_data",
        lambda cfg, device, split: launch.TrainingData(synthetic_batches(3, 16, 64), 3, 16),
    )
    monkeypatch.setattr(launch, "finetune_stage", lambda tc, name, out, fcfg, **kw: calls.append((tc, fcfg)))
    cfg = TrainConfig(
        n_features=32, tokens=256, batch_size=64, activation="topk", topk=4, init_tokens=64,
        jumprelu_after_topk=True, finetune_minutes=2.5, finetune_lr=3e-4, checkpoint_every=0,
    )  # fmt: skip
    result = launch.train_run(cfg, tmp_path / "run", device="cpu")
    assert len(calls) == 1 and calls[0][0] is result.transcoder
    assert calls[0][1].minutes == 2.5 and calls[0][1].lr == 3e-4
    (tmp_path / "run" / launch.FINETUNE_FILE).write_text("{}")
    launch._finetune_after_training(result, cfg, tmp_path / "run", "cpu", "train", single=True)
    assert len(calls) == 1  # fine-tuned already: not again
    with pytest.raises(CltraceError, match="JumpReLU"):
        TrainConfig(activation="topk", topk=4, finetune_minutes=1.0)


def test_real_input_nmse_is_the_evaluation_nmse():
    """mse_on="real": the term is `cltrace eval`'s per-layer NMSE on the real run's inputs."""
    from types import SimpleNamespace

    from cltrace.transcoders.evaluate import evaluate_activations

    model, tc = _setup(seed=6)
    tokens = torch.randint(4, 40, (4, 12))
    cap = model.capture(tokens)
    on_real = ReplacementForward(tc, centred=True)
    for layer in range(3):
        on_real(layer, cap.mlp_in[:, :, layer], cap.mlp_out[:, :, layer])
    batch = SimpleNamespace(mlp_in=cap.mlp_in[:, 1:].flatten(0, 1), mlp_out=cap.mlp_out[:, 1:].flatten(0, 1))
    expected = evaluate_activations(tc, [batch]).nmse
    assert [v.item() for v in on_real.nmse] == pytest.approx(expected, rel=1e-4)
    cfg = FinetuneConfig(minutes=5, max_steps=3, context_len=16, positions=8, mse_on="real", mse_contexts=2)
    result = finetune(tc, model, _contexts(100, 16, 0), cfg, log=lambda s: None)
    assert result.steps == 3 and all(h.nmse > 0 for h in result.history)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_bytes", [4 * 50, 4 * 50 * 3, 1 << 21])
def test_chunked_kl_equals_the_formula(dtype, chunk_bytes):
    """Values and gradients of the cache-chunked KL against the plain float64 formula, with
    chunks of 1 row, 3 rows (7 rows: a ragged last chunk) and all rows at once."""
    g = torch.Generator().manual_seed(0)
    real = (3 * torch.randn(7, 50, generator=g)).to(dtype)
    rep = (3 * torch.randn(7, 50, generator=g)).to(dtype).requires_grad_(True)
    got = kl_divergence(real.view(7, 1, 50), rep.view(7, 1, 50), chunk_bytes=chunk_bytes)
    got.backward()
    ref_rep = rep.detach().double().requires_grad_(True)
    lp, lq = real.double().log_softmax(-1), ref_rep.log_softmax(-1)
    ref = (lp.exp() * (lp - lq)).sum(-1).mean()
    ref.backward()
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert ref.item() > 0.5  # the two distributions differ
    assert abs(got.item() - ref.item()) < 1e-5 * max(1.0, ref.item())
    assert rep.grad is not None and rep.grad.dtype == dtype
    assert torch.allclose(rep.grad.double(), ref_rep.grad, atol=tol, rtol=tol)


def test_bf16_encoder_within_tolerance():
    """The encoder's product in bf16 (FinetuneConfig.precision on a fast-bf16 CPU): the
    replacement model's logits and the encoder's gradient stay within bf16's precision of the
    float32 forward's."""
    model, tc = _setup("clt", n_features=64)
    tokens = torch.randint(4, 40, (3, 10))
    with torch.no_grad():
        real = model.run(tokens)
    out = []
    for bf16 in (False, True):
        tc.W_enc.requires_grad_(True)
        tc.W_enc.grad = None
        with model.patch_mlp_outputs(ReplacementForward(tc, bf16_encoder=bf16)):
            rep = model.run(tokens)
        kl_divergence(real, rep).backward()
        out.append((rep.detach(), tc.W_enc.grad.clone()))
    (rep32, g32), (rep16, g16) = out
    assert (rep16 - rep32).abs().max() < 0.03 * rep32.abs().max()
    assert (g16 - g32).norm() < 0.05 * g32.norm()
    assert not torch.equal(rep16, rep32)  # the bf16 product did run
