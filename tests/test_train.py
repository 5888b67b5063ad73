"""Training: learns a sparse teacher; checkpoint + kill + resume follows the same trajectory."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from cltrace.errors import CltraceError
from cltrace.transcoders.config import TrainConfig, preset
from cltrace.transcoders.model import Transcoder
from cltrace.transcoders.refit import topk_to_jumprelu
from cltrace.transcoders.train import (
    SyntheticBatch,
    Trainer,
    clip_gradients,
    global_norm,
    lambda_s_at,
    lr_at,
    synthetic_batches,
    train,
    unscaled,
)

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
L, D = 3, 32


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: OpenMP threads only add latency (badly so on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def config(**kw) -> TrainConfig:
    base = dict(
        n_features=64,
        tokens=64 * 12,
        batch_size=64,
        lr=3e-3,
        lambda_s=3e-3,
        init_tokens=128,
        checkpoint_every=0,
        log_every=4,
        dead_window_tokens=2000,
        precision="fp32",
        lr_warmup_frac=0.1,
    )
    base.update(kw)
    return TrainConfig(**base)


def data(n=None):
    return synthetic_batches(L, D, 64, n_batches=n, n_teacher=16, active=3, seed=1)


def test_learns_sparse_teacher(tmp_path):
    cfg = config(tokens=64 * 120, log_every=20)
    result = train(cfg, data(), L, D, tmp_path / "run")
    first, last = result.history[0], result.history[-1]
    assert first.nmse > 0.9 and last.nmse < 0.05
    assert 0 < last.l0 < 64
    back = Transcoder.load(tmp_path / "run" / "transcoder")  # final weights saved
    x = next(data(1)).mlp_in
    assert torch.allclose(back(x).recon, result.transcoder(x).recon, atol=1e-5)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == cfg.n_steps


def test_refit_after_training_lowers_held_out_error_and_is_saved(tmp_path):
    cfg = config(tokens=64 * 30)
    plain = train(cfg, data(), L, D, tmp_path / "plain").transcoder
    refit = train(config(tokens=64 * 30, refit_tokens=64 * 20), data(), L, D, tmp_path / "refit")
    later = list(data(70))[60:]  # same teacher, unseen tokens
    held = SyntheticBatch(torch.cat([b.mlp_in for b in later]), torch.cat([b.mlp_out for b in later]))

    def err(tc):
        return (tc(held.mlp_in).recon - held.mlp_out).pow(2).sum().item()

    assert err(refit.transcoder) < 0.8 * err(plain)
    back = Transcoder.load(tmp_path / "refit" / "transcoder")
    assert err(back) == pytest.approx(err(refit.transcoder), rel=1e-5)
    with pytest.raises(CltraceError, match="skip"):
        config(refit_tokens=64, skip=True)


def test_topk_run_ends_as_a_jumprelu_transcoder_with_the_same_l0():
    cfg = config(tokens=64 * 30, activation="topk", topk=6)
    topk = train(cfg, data(), L, D).transcoder
    x = torch.cat([b.mlp_in for b in list(data(80))[70:]])  # unseen tokens
    l0_topk = (topk(x).acts > 0).float().sum(-1).mean(0)  # per layer
    thetas = topk_to_jumprelu(topk, torch.cat([b.mlp_in for b in list(data(60))[40:]]))
    assert topk.cfg.activation == "jumprelu" and topk.cfg.topk is None and min(thetas) > 0
    l0_jump = (topk(x).acts > 0).float().sum(-1).mean(0)
    torch.testing.assert_close(l0_jump, l0_topk, rtol=0.25, atol=0.5)
    logs = []
    full = train(
        config(
            tokens=64 * 30,
            activation="topk",
            topk=6,
            jumprelu_after_topk=True,
            init_tokens=128,
            refit_tokens=64 * 8,
        ),
        data(30 + 2 + 8),
        L,
        D,
        log=logs.append,
    ).transcoder
    assert full.cfg.activation == "jumprelu"
    assert any("on 512 tokens" in line for line in logs), logs  # no batch lost after training
    with pytest.raises(CltraceError, match="topk"):
        config(jumprelu_after_topk=True)


class Killed(Exception):
    pass


def killed_after(batches, n):
    """The batch stream of a process that dies (kill -9) while fetching batch n + 1."""
    for i, batch in enumerate(batches):
        if i == n:
            raise Killed
        yield batch


def test_resume_follows_the_same_trajectory(tmp_path):
    cfg = config(checkpoint_every=3)
    torch.manual_seed(cfg.seed)
    straight = train(cfg, data(), L, D, tmp_path / "a").transcoder

    torch.manual_seed(cfg.seed)
    tc = Transcoder(cfg.transcoder_config(L, D))
    with pytest.raises(Killed):
        Trainer(tc, cfg, tmp_path / "b").fit(killed_after(data(), 8))  # checkpoint at 6, dies at 8
    assert json.loads((tmp_path / "b" / "checkpoint.json").read_text())["step"] == 6
    torch.manual_seed(123)  # a fresh process
    tc = Transcoder(cfg.transcoder_config(L, D))
    trainer = Trainer(tc, cfg, tmp_path / "b")
    resumed = trainer.fit(data(), resume=True).transcoder
    assert trainer.step == cfg.n_steps
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), name
    assert sorted(p.name for p in (tmp_path / "b").glob("ckpt-*")) == ["ckpt-00000012"]


def test_resume_of_a_finished_run_reports_its_rate(tmp_path):
    """Resuming a run with nothing left to train (e.g. to redo its conversion) reports the
    earlier processes' rate, not 0 tokens/s."""
    cfg = config(checkpoint_every=4, tokens=64 * 4)
    first = train(cfg, data(), L, D, tmp_path / "r")
    assert first.tokens_per_s > 0
    tc = Transcoder(cfg.transcoder_config(L, D))
    again = Trainer(tc, cfg, tmp_path / "r").fit(data(), resume=True)
    assert again.tokens == first.tokens
    assert again.tokens_per_s > 0


def test_resume_refuses_other_settings(tmp_path):
    cfg = config(checkpoint_every=4, tokens=64 * 4)
    train(cfg, data(), L, D, tmp_path / "run")
    other = config(checkpoint_every=4, tokens=64 * 4, lr=1e-2)
    with pytest.raises(CltraceError, match="other settings"):
        train(other, data(), L, D, tmp_path / "run", resume=True)
    refinished = config(checkpoint_every=4, tokens=64 * 4, refit_tokens=128)  # finishing may change
    logs = []
    train(refinished, data(), L, D, tmp_path / "run", resume=True, log=logs.append)
    assert any("refit" in line for line in logs)
    paced = config(checkpoint_every=0, checkpoint_minutes=5.0, tokens=64 * 4, refit_tokens=128, log_every=1)
    train(paced, data(), L, D, tmp_path / "run", resume=True, log=lambda _m: None)  # pacing may change


def test_schedules():
    cfg = config(
        tokens=64 * 100, lr=1.0, lr_warmup_frac=0.1, lr_decay_frac=0.2, lambda_s=2.0, lambda_s_warmup_frac=0.5
    )
    assert lr_at(cfg, 0) == pytest.approx(0.1)
    assert lr_at(cfg, 9) == pytest.approx(1.0) and lr_at(cfg, 50) == 1.0
    assert lr_at(cfg, 90) == pytest.approx(0.5) and lr_at(cfg, 99) == pytest.approx(0.05)
    assert lambda_s_at(cfg, 0) == 0 and lambda_s_at(cfg, 25) == pytest.approx(1.0)
    assert lambda_s_at(cfg, 80) == 2.0


def test_global_norm_matches_a_float64_reference():
    """The clipping norm: chunked dot products over tensors of odd sizes (a chunk boundary
    inside a tensor, a tensor smaller than a chunk, a 3-d one) equal the float64 norm."""
    g = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(37, 29, generator=g) * 5,
        torch.randn(3, generator=g),
        torch.randn(4, 7, 11, generator=g),
    ]
    exact = torch.cat([t.double().reshape(-1) for t in tensors]).norm()
    for chunk in (1, 100, 1 << 20):
        assert abs(float(global_norm(tensors, chunk=chunk)) - float(exact)) <= 1e-6 * float(exact)
    assert float(global_norm([])) == 0.0


def test_clipping_inside_fused_adamw_equals_scaling_the_gradients():
    """clip_gradients hands the scale to a fused AdamW (applied as it reads each gradient):
    three clipped steps give the parameters and moments of a plain AdamW whose gradients were
    scaled first; the scale is dropped after each step, and it matters (unclipped differs)."""
    g = torch.Generator().manual_seed(0)
    grads = [(torch.randn(5, 6, generator=g), torch.randn(5, generator=g)) for _ in range(3)]

    def run(fused: bool | None, scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        module = torch.nn.Linear(6, 5)
        torch.nn.init.ones_(module.weight), torch.nn.init.zeros_(module.bias)
        opt = torch.optim.AdamW(module.parameters(), lr=0.1, fused=fused)
        for gw, gb in grads:
            module.weight.grad, module.bias.grad = gw.clone(), gb.clone()
            if scale is not None:
                clip_gradients(opt, module, torch.tensor(scale))
                assert (getattr(opt, "grad_scale", None) is not None) == bool(fused)  # no pass
            opt.step()
            unscaled(opt)
            assert getattr(opt, "grad_scale", None) is None
        return module.weight.detach().clone(), opt.state[module.weight]["exp_avg_sq"].clone()

    fused, plain = run(True, 0.3), run(None, 0.3)
    torch.testing.assert_close(fused[0], plain[0])
    torch.testing.assert_close(fused[1], plain[1])
    assert not torch.allclose(fused[1], run(True, None)[1])


def test_presets_and_checks():
    assert preset("demo").model == "gemma-3-270m"
    assert preset("demo", n_features=512).n_features == 512
    assert preset("demo").minutes == 10 and preset("demo").auxk_alpha == 1 / 32  # a wall-time budget
    assert preset("demo", tokens=50_000).minutes is None  # tokens asked for: no budget
    assert preset("demo", tokens=50_000, minutes=3).minutes == 3
    session = preset("session")
    assert session.activation == "batchtopk" and session.topk * 100 <= session.n_features  # L0 ≤ 1%
    assert session.minutes + session.finetune_minutes <= 45  # training and fine-tuning: 45 min
    switched = preset("demo", activation="jumprelu")  # TopK preset, JumpReLU asked for
    assert switched.activation == "jumprelu" and switched.topk is None and not switched.jumprelu_after_topk
    with pytest.raises(CltraceError, match="unknown preset"):
        preset("nope")
    with pytest.raises(CltraceError):
        config(tokens=10)  # less than one batch


@pytest.mark.parametrize(
    "bad",
    [
        dict(balance_rate=-0.1),
        dict(balance_max_bias=0.0),
        dict(balance_max_density=1.5),
        dict(balance_window_tokens=0),
    ],
)
def test_balance_settings_are_checked(bad):
    with pytest.raises(CltraceError, match="balance"):
        config(**bad)


def test_empty_stream_is_a_clear_error():
    with pytest.raises(CltraceError, match="empty"):
        train(config(), iter([]), L, D)


def test_dead_features_reported():
    logs = []
    cfg = config(tokens=64 * 12, dead_window_tokens=256)
    trainer = Trainer(Transcoder(cfg.transcoder_config(L, D)), cfg, log=logs.append)
    trainer.fit(data())
    with torch.no_grad():
        trainer.last_active.fill_(trainer.tokens)
        trainer.last_active[1, :5] = trainer.tokens - 256  # silent for exactly the window
    trainer.n_dead = 0
    assert trainer.dead_features().sum() == 5
    trainer._report_dead()
    assert "5 dead features" in logs[-1] and "[0, 5, 0]" in logs[-1]


def planted_run(
    n_planted: int, encoder_scale: float, bias_scale: float, bias_value: float | None = None, **settings
):
    """Train a TopK CLT (k = 4 of 64) whose first `n_planted` features per layer start with
    encoder columns scaled by `encoder_scale` and biases by `bias_scale` (or set to
    `bias_value`). Returns the
    transcoder, the planted encoder columns before training, and each (layer, feature)'s
    firing count on unseen tokens [L, F]."""
    cfg = config(tokens=64 * 150, activation="topk", topk=4, log_every=50, **settings)
    torch.manual_seed(cfg.seed)
    tc = Transcoder(cfg.transcoder_config(L, D))
    trainer = Trainer(tc, cfg, log=lambda _m: None)
    it = trainer._init_from(iter(data()))
    with torch.no_grad():
        tc.W_enc[:, :, :n_planted] *= encoder_scale
        tc.b_enc[:, :n_planted] *= bias_scale
        if bias_value is not None:
            tc.b_enc[:, :n_planted] = bias_value
    before = tc.W_enc[:, :, :n_planted].clone()
    trainer.fit(it)
    x = torch.cat([b.mlp_in for b in list(data(200))[180:]])  # unseen tokens
    return tc, before, (tc(x).acts > 0).sum(0)


def planted_dead_run(auxk_alpha: float, n_planted: int = 16):
    """Planted encoder columns 100x too small: never among a token's top k, so without help
    they never fire or learn."""
    tc, before, fires = planted_run(n_planted, 0.01, 1.0, dead_window_tokens=256, auxk_alpha=auxk_alpha)
    return fires[:, :n_planted], before, tc


def test_auxk_revives_planted_dead_features():
    fires, before, tc = planted_dead_run(auxk_alpha=0.0)
    assert fires.sum() == 0  # dead without AuxK ...
    moved_without = (tc.W_enc[:, :, :16] - before).abs().max()  # ... and hardly trained
    fires, _, tc = planted_dead_run(auxk_alpha=1 / 32)
    alive = (fires > 0).float().mean().item()
    assert moved_without < 0.2 * (tc.W_enc[:, :, :16] - before).abs().max()
    # alive with it: 27% measured after 150 steps with centred initial pre-activations (46%
    # before they were centred); the 16-code teacher needs few of the 64 features
    assert alive >= 0.2, f"only {alive:.0%} of the planted dead features revived"


def test_load_balancing_revives_starved_features():
    """Planted encoder columns and biases 10x smaller than the rest: positive on some tokens
    but never among a token's top k. The selection bias (no loss) brings them back: measured
    0% of the planted ones (45% of all features) firing on unseen tokens without it, 92% (97%
    of all) with it."""
    for rate in (0.0, 0.05):
        _, _, fires = planted_run(16, 0.1, 0.1, balance_rate=rate, balance_window_tokens=256)
        planted, overall = (fires[:, :16] > 0).float().mean().item(), (fires > 0).float().mean().item()
        if rate == 0.0:
            assert planted == 0 and overall < 0.6
        else:
            assert planted >= 0.75 and overall >= 0.9, (planted, overall)


def test_auxk_loss_by_definition():
    """aux = s·Σ||ê - e||²/Σ||e - ē||²·Σ||ỹ - ȳ||²/N with ê the dead features' top-k_aux decode."""
    tc = Transcoder(config(n_features=8).transcoder_config(2, 4))
    x, y = torch.randn(5, 2, 4), torch.randn(5, 2, 4)
    tc.init_from_sample(x, y)
    dead = torch.zeros(2, 8, dtype=torch.bool)
    dead[0, :3] = True  # 3 dead in layer 0, none in 1
    pre = tc._encode(tc._normalise(x, tc.in_scale))
    e = torch.randn(2, 5, 4)
    got = tc.aux_loss(pre, dead, 2, e, torch.tensor(7.0))
    a = torch.zeros(5, 8)
    top = pre[0].masked_fill(~dead[0], float("-inf")).topk(2, dim=-1)
    a.scatter_(-1, top.indices, top.values.relu())
    e_hat = torch.stack([a @ tc.W_dec[0][:, 0], a @ tc.W_dec[0][:, 1]])  # layer 0 writes to 0 and 1
    s = (min(1.0, 3 / 2) + 0.0) / 2
    want = s * (e_hat - e).pow(2).sum() / (e - e.mean(1, keepdim=True)).pow(2).sum() * 7.0
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_minutes_budget_stops_within_ten_percent():
    import time

    budget_s = 12.0  # long enough that one step is a small share of it on a noisy 2-core machine
    cfg = config(tokens=64 * 1_000_000, minutes=budget_s / 60, log_every=10**6)
    logs = []
    t = time.perf_counter()
    result = train(cfg, data(), L, D, log=logs.append)
    took = time.perf_counter() - t
    assert 0.9 * budget_s <= took <= 1.1 * budget_s, took
    assert 20 < result.history[-1].step < cfg.n_steps  # sized to the budget, not tokens
    assert result.history[-1].lr < 0.1 * cfg.lr  # the schedule fit: lr decayed
    assert result.tokens == result.history[-1].tokens
    assert any("wall-time budget" in line and f"{result.tokens:,} tokens" in line for line in logs), logs


def test_minutes_budget_still_decays_when_the_machine_slows_down_late():
    import time

    budget_s = 8.0
    cfg = config(tokens=64 * 1_000_000, minutes=budget_s / 60, log_every=10**6)
    t = time.perf_counter()

    def slowing(batches):  # after 85% of the budget (inside the decay) every batch costs 5 ms more
        for batch in batches:
            if time.perf_counter() - t > 0.85 * budget_s:
                time.sleep(0.005)
            yield batch

    result = train(cfg, slowing(data()), L, D)
    took = time.perf_counter() - t
    assert 0.9 * budget_s <= took <= 1.1 * budget_s, took
    assert result.history[-1].lr < 0.1 * cfg.lr  # the decay was steepened, not cut off
    lrs = [h.lr for h in result.history]
    peak = lrs.index(max(lrs))
    assert all(b <= a + 1e-12 for a, b in zip(lrs[peak:], lrs[peak + 1 :]))  # never rises again


def test_batch_topk_run_ends_as_jumprelu_with_the_same_l0():
    cfg = config(tokens=64 * 30, activation="batchtopk", topk=6)
    btk = train(cfg, data(), L, D).transcoder
    x = torch.cat([b.mlp_in for b in list(data(80))[70:]])
    l0_btk = (btk(x).acts > 0).float().sum(-1).mean(0)
    topk_to_jumprelu(btk, torch.cat([b.mlp_in for b in list(data(60))[40:]]))
    assert btk.cfg.activation == "jumprelu"
    torch.testing.assert_close((btk(x).acts > 0).float().sum(-1).mean(0), l0_btk, rtol=0.25, atol=0.5)


def test_precision_env_forces_fp32(monkeypatch):
    from cltrace.hardware import _cpu_flags_bf16, fast_dtype
    from cltrace.transcoders.train import resolve_precision

    cpu = torch.device("cpu")
    monkeypatch.delenv("CLTRACE_PRECISION", raising=False)
    assert resolve_precision("auto", cpu) == (torch.bfloat16 if _cpu_flags_bf16() else None)
    monkeypatch.setenv("CLTRACE_PRECISION", "fp32")
    assert resolve_precision("auto", cpu) is None and fast_dtype(cpu) == torch.float32
    assert resolve_precision("bf16", cpu) == torch.bfloat16  # an explicit choice wins


def counting_saves(trainer: Trainer, steps: list[int], monkeypatch) -> Trainer:
    """The trainer, recording the step of every checkpoint it writes into `steps`."""
    save = trainer.save_checkpoint
    monkeypatch.setattr(trainer, "save_checkpoint", lambda: (steps.append(trainer.step), save()))
    return trainer


def test_checkpoint_minutes_paces_checkpoints_by_wall_time(tmp_path, monkeypatch):
    """checkpoint_minutes: a checkpoint once that much wall time passed since the last one
    (here every step, the clock being pushed a minute per read), none before the final one
    when the interval is long; the final step is saved exactly once either way."""
    clock = iter(range(0, 10**6, 60))
    monkeypatch.setattr("cltrace.transcoders.train.time.perf_counter", lambda: float(next(clock)))
    steps: list[int] = []
    cfg = config(checkpoint_minutes=1.0)
    trainer = Trainer(Transcoder(cfg.transcoder_config(L, D)), cfg, tmp_path / "a")
    counting_saves(trainer, steps, monkeypatch).fit(data())
    assert steps == list(range(1, cfg.n_steps + 1))
    steps.clear()
    slow = config(checkpoint_minutes=10**9)
    trainer = Trainer(Transcoder(slow.transcoder_config(L, D)), slow, tmp_path / "b")
    counting_saves(trainer, steps, monkeypatch).fit(data())
    assert steps == [slow.n_steps]
    with pytest.raises(CltraceError, match="checkpoint_minutes"):
        config(checkpoint_minutes=-1.0)


def offset_batches(n=None, offset: float = 4.0):
    """The sparse teacher with a constant vector added to every target: layer l's has norm
    `offset` x (l + 1) x the first batch's RMS target norm, so most of a target is its mean."""
    direction = torch.randn(L, D, generator=torch.Generator().manual_seed(7))
    direction /= direction.norm(dim=-1, keepdim=True)
    shift = None
    for b in data(n):
        if shift is None:
            rms = b.mlp_out.pow(2).sum(-1).mean().sqrt()
            shift = offset * rms * torch.arange(1, L + 1)[:, None] * direction  # [L, D]
        yield SyntheticBatch(b.mlp_in, b.mlp_out + shift)


def test_centre_targets_starts_at_the_mean_and_weighs_layers_by_variance():
    batch = next(offset_batches(1))
    x, y = batch.mlp_in, batch.mlp_out
    tc = Transcoder(config(activation="batchtopk", topk=4).transcoder_config(L, D))
    tc.init_from_sample(x, y, centre_targets=True)
    assert torch.allclose(tc.decoder_bias(), y.mean(0), atol=1e-4)  # raw units: the mean target
    yn = (y - y.mean(0)) * tc.out_scale[None, :, None]
    assert torch.allclose(yn.pow(2).sum(-1).mean(0), torch.full((L,), float(D)), rtol=1e-4)
    tc.init_from_sample(x, y)  # default: mean norm √d, b_dec 0
    assert torch.allclose((y * tc.out_scale[None, :, None]).norm(dim=-1).mean(0), torch.full((L,), D**0.5))
    assert tc.b_dec.abs().max() == 0


def test_centre_targets_learns_targets_with_a_large_mean_better():
    """On targets that are mostly a constant offset, the per-layer NMSE (what `cltrace eval`
    reports) after the same steps is lower with centred targets."""
    from cltrace.transcoders.evaluate import evaluate_activations

    held = list(offset_batches(120))[100:]  # unseen tokens
    nmse = {}
    for centre in (False, True):
        cfg = config(tokens=64 * 60, activation="batchtopk", topk=4, centre_targets=centre)
        tc = train(cfg, offset_batches(), L, D).transcoder
        nmse[centre] = evaluate_activations(tc, held).nmse
    assert sum(nmse[True]) < 0.7 * sum(nmse[False]), nmse


def test_cli_backs_large_tensors_with_huge_pages():
    """The CLI sets torch's huge-page switch before torch loads: a 64 MiB tensor made after
    `cltrace.cli.main` ran is backed by transparent huge pages, as it is not without the
    switch. Linux with THP in "madvise" mode (the default; in "always" mode every process
    gets them, in "never" none)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not mode.exists() or "[madvise]" not in mode.read_text():
        pytest.skip("transparent huge pages are not in madvise mode here")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}

    def huge_kib(call_cli: bool) -> int:
        code = (
            ("from cltrace.cli import main; main([])\n" if call_cli else "")
            + "import torch; t = torch.ones(16 << 20)\n"
            + "print(next(l.split()[1] for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHuge')))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
        )
        return int(out.stdout.strip().splitlines()[-1])

    assert huge_kib(call_cli=True) >= 32 * 1024
    assert huge_kib(call_cli=False) < 32 * 1024
