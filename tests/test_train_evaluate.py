"""Evaluation: activation metrics by definition; the replacement closure equals forward()."""

from __future__ import annotations

import pytest
import torch

from cltrace.transcoders.config import TranscoderConfig
from cltrace.transcoders.evaluate import evaluate_activations, evaluate_replacement, replacement_patch, report
from cltrace.transcoders.model import Transcoder
from cltrace.transcoders.train import synthetic_batches
from tiny import tiny_model


def test_activation_metrics_by_definition():
    torch.manual_seed(0)
    tc = Transcoder(TranscoderConfig(n_layers=3, d_model=16, n_features=32))
    batches = list(synthetic_batches(3, 16, 50, n_batches=3, n_teacher=8))
    tc.init_from_sample(batches[0].mlp_in, batches[0].mlp_out, fire_frac=0.2)
    m = evaluate_activations(tc, batches, max_tokens=120)
    x = torch.cat([b.mlp_in for b in batches])[:120]
    y = torch.cat([b.mlp_out for b in batches])[:120]
    out = tc(x)
    for l in range(3):
        err = (out.recon[:, l] - y[:, l]).pow(2).sum()
        var = (y[:, l] - y[:, l].mean(0)).pow(2).sum()
        assert m.nmse[l] == pytest.approx((err / var).item(), rel=1e-4)
        assert m.l0[l] == pytest.approx((out.acts[:, l] > 0).sum().item() / 120)
        assert m.dead[l] == int(((out.acts[:, l] > 0).sum(0) == 0).sum())
        density = sorted(((out.acts[:, l] > 0).sum(0) / 120).tolist())
        assert m.median_density[l] == pytest.approx((density[15] + density[16]) / 2)  # 32 features
        assert m.dense[l] == sum(d > 0.1 for d in density)
    assert m.n_tokens == 120
    every = sorted(((out.acts > 0).sum(0) / 120).flatten().tolist())
    s = m.summary()
    assert s["median_density"] == pytest.approx((every[47] + every[48]) / 2)
    assert s["dense_share"] == pytest.approx(sum(d > 0.1 for d in every) / 96)
    assert s["dead_share"] == pytest.approx(sum(d == 0 for d in every) / 96)
    assert s["dense_share"] > 0 and "median density" in report(m)  # fire_frac 0.2: dense ones exist
    assert "nan" not in report(m).splitlines()[4]  # the "all" row


@pytest.mark.parametrize("kind,skip", [("clt", False), ("plt", True)])
def test_replacement_closure_matches_forward(kind, skip):
    model = tiny_model("gemma", n_layers=3, d=32)
    torch.manual_seed(1)
    tc = Transcoder(TranscoderConfig(n_layers=3, d_model=32, n_features=24, kind=kind, skip=skip))
    tokens = torch.randint(4, 40, (2, 7))
    cap = model.capture(tokens)
    tc.init_from_sample(cap.mlp_in.flatten(0, 1), cap.mlp_out.flatten(0, 1), fire_frac=0.3)
    seen_in, seen_out = [], []
    patch = replacement_patch(tc)

    def spy(layer, mlp_in, mlp_out):
        out = patch(layer, mlp_in, mlp_out)
        seen_in.append(mlp_in)
        seen_out.append(out)
        return out

    with torch.no_grad(), model.patch_mlp_outputs(spy):
        model.run(tokens)
    x = torch.stack(seen_in, dim=2)  # [B, n, L, d] as the replacement saw it
    expected = tc(x).recon
    got = torch.stack(seen_out, dim=2)
    assert torch.allclose(got[:, 1:], expected[:, 1:], atol=1e-4)
    assert torch.equal(got[:, 0], cap.mlp_out[:, 0])  # BOS position keeps the real output

    m = evaluate_replacement(tc, model, [tokens])
    assert 0 <= m.top1_agreement <= 1 and m.kl >= 0 and m.n_tokens == 2 * 5
