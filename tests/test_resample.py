"""Resampling of dead features: each new feature fires on the token it was aimed at, decodes
that token's residual, restarts its optimizer state; features whose pre-activation is never
positive (beyond AuxK and load balancing) come back and the reconstruction improves."""

from __future__ import annotations

import json

import pytest
import torch

from cltrace.errors import CltraceError
from cltrace.transcoders.config import preset
from cltrace.transcoders.model import Transcoder
from cltrace.transcoders.resample import TARGET_OVER_THRESHOLD, resample_dead, selection_threshold
from cltrace.transcoders.train import Trainer, train
from test_train import D, Killed, L, config, data, killed_after, planted_run


@pytest.mark.parametrize("kind,activation", [("clt", "batchtopk"), ("plt", "topk")])
def test_resampled_feature_fires_on_its_token_and_decodes_its_residual(kind, activation):
    cfg = config(kind=kind, activation=activation, topk=4)
    torch.manual_seed(0)
    tc = Transcoder(cfg.transcoder_config(L, D))
    trainer = Trainer(tc, cfg, log=lambda _m: None)
    trainer.fit(data(3))  # a few steps, so AdamW has state to restart
    batch = next(data(1))
    xn = tc._normalise(batch.mlp_in, tc.in_scale)
    residual = torch.randn(L, xn.shape[1], D)
    dead = torch.zeros(L, 64, dtype=torch.bool)
    dead[0, [3, 10, 11]] = dead[2, [0, 63]] = True
    with torch.no_grad():
        pre_before = torch.stack([xn[l] @ tc.W_enc[l] + tc.b_enc[l] for l in range(L)])
    alive_dec = tc.W_dec[1].detach().clone()
    opt_state = trainer.optimizer.state[tc.W_enc]
    avg_before = opt_state["exp_avg"].clone()

    result = resample_dead(tc, trainer.optimizer, dead, xn, residual, torch.Generator().manual_seed(0))

    assert torch.equal(result.resampled, dead) and result.per_layer == [3, 0, 2]
    assert torch.equal(tc.W_dec[1], alive_dec)  # layer 1 had nothing dead
    for l, f in dead.nonzero().tolist():
        tau = selection_threshold(pre_before[l].relu(), 4, per_token=activation == "topk")
        assert result.threshold[l] == pytest.approx(tau)
        targets = slice(l, L) if kind == "clt" else slice(l, l + 1)
        r = residual[targets].transpose(0, 1).reshape(xn.shape[1], -1)  # [N, T·d]
        w = tc.W_dec[l][f].detach().reshape(-1)
        cos = (r @ w) / (r.norm(dim=1) * w.norm())
        n = int(cos.argmax())
        assert cos[n] == pytest.approx(1.0, abs=1e-5)  # the decoder is token n's residual
        alive_norms = torch.linalg.vector_norm(tc.W_dec[l][~dead[l]].detach(), dim=(1, 2))
        assert w.norm() == pytest.approx(alive_norms.mean().item(), rel=1e-5)
        with torch.no_grad():
            pre = xn[l] @ tc.W_enc[l][:, f] + tc.b_enc[l, f]
        assert pre[n] == pytest.approx(TARGET_OVER_THRESHOLD * tau, rel=1e-4)  # selected there
        assert torch.all(opt_state["exp_avg"][l, :, f] == 0)
    untouched = ~dead[:, None, :].expand_as(avg_before)
    assert torch.equal(opt_state["exp_avg"][untouched], avg_before[untouched])


def held_out_nmse(tc: Transcoder) -> float:
    batch = [b for b in list(data(200))[180:]]
    x, y = torch.cat([b.mlp_in for b in batch]), torch.cat([b.mlp_out for b in batch])
    with torch.no_grad():
        err = (tc(x).recon - y).pow(2).sum()
    return (err / (y - y.mean(0)).pow(2).sum()).item()


def test_resampling_revives_features_that_are_never_positive():
    """24 features per layer for a 16-code teacher; 4 planted with encoder columns 100x too
    small and a bias of -50: negative on every token, so neither the main loss, AuxK nor the
    selection bias can reach them. Measured: none of them fires on unseen tokens without
    resampling (all features: 78%), all with it (all: 100%), held-out NMSE 0.203 -> 0.116.
    (With 64 features, far more than the teacher needs, resampling still revives every planted
    feature but the held-out NMSE rises, 0.093 -> 0.134: the surplus features split codes.)"""
    results = {}
    for every in (0, 640):
        tc, _, fires = planted_run(
            4,
            0.01,
            1.0,
            bias_value=-50.0,
            n_features=24,
            dead_window_tokens=256,
            auxk_alpha=1 / 32,
            resample_every_tokens=every,
        )
        planted, overall = (fires[:, :4] > 0).float().mean().item(), (fires > 0).float().mean().item()
        results[every] = (planted, overall, held_out_nmse(tc))
    assert results[0][0] == 0 and results[0][1] < 0.85, results
    assert results[640][0] == 1 and results[640][1] >= 0.95, results
    assert results[640][2] < 0.75 * results[0][2], results


def train_logging_resamples(cfg, run_dir):
    """Train from the config's seed: (the result, the steps at which a resampling round ran)."""
    logs: list[str] = []
    torch.manual_seed(cfg.seed)
    result = train(cfg, data(), L, D, run_dir, log=logs.append)
    return result, [int(m.split()[1].rstrip(":")) for m in logs if "resampled" in m]


def test_resampling_stops_before_the_decay_and_resumes_the_same(tmp_path):
    cfg = config(
        activation="topk",
        topk=4,
        tokens=64 * 16,
        dead_window_tokens=128,
        resample_every_tokens=128,
        checkpoint_every=5,
    )
    result, steps = train_logging_resamples(cfg, tmp_path / "a")
    straight = result.transcoder
    assert steps and max(steps) < cfg.n_steps * (1 - cfg.lr_decay_frac)  # none in the decay

    torch.manual_seed(cfg.seed)
    tc = Transcoder(cfg.transcoder_config(L, D))
    with pytest.raises(Killed):
        Trainer(tc, cfg, tmp_path / "b", log=lambda _m: None).fit(killed_after(data(), 7))
    assert json.loads((tmp_path / "b" / "checkpoint.json").read_text())["step"] == 5
    tc = Transcoder(cfg.transcoder_config(L, D))
    resumed = Trainer(tc, cfg, tmp_path / "b", log=lambda _m: None).fit(data(), resume=True).transcoder
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), name


def test_resample_until_moves_the_stop_into_the_decay(tmp_path):
    """With resample_until = 0.9 rounds happen inside the decay (the default stops at its start)
    and none after 90% of the steps."""
    cfg = config(
        activation="topk",
        topk=4,
        tokens=64 * 40,
        dead_window_tokens=64,
        resample_every_tokens=64,
        resample_until=0.9,
    )
    _, steps = train_logging_resamples(cfg, tmp_path / "a")
    assert any(s >= cfg.n_steps * (1 - cfg.lr_decay_frac) for s in steps), steps
    assert max(steps) < 0.9 * cfg.n_steps, steps


def test_resample_settings_are_checked():
    with pytest.raises(CltraceError, match="resample_every_tokens"):
        config(resample_every_tokens=-1)
    with pytest.raises(CltraceError, match="topk"):
        config(resample_every_tokens=1000)  # JumpReLU
    switched = preset("session", activation="jumprelu")  # TopK-only settings dropped with TopK
    assert switched.resample_every_tokens == 0 and switched.resample_until is None
    with pytest.raises(CltraceError, match="resample_until"):
        config(activation="topk", topk=4, resample_until=1.5)
