"""Seconds per end-to-end fine-tuning step (transcoders/finetune.py) on gemma-3-270m, the
session-preset shape (18 x F CLT, 8 contexts of 128 tokens, 32 predicted positions each), with
each of this session's changes added in turn, all measured in the same run:

    session 10   float32 encoder product, torch's decode (embedding bags, SparseDecode), the
                 KL written out over the whole [B, P, V] logits (V = 262,144)
    + KL         the KL in cache-sized row chunks with a closed-form backward
    + kernels    the decode by the numba kernels (PairsDecode), feature-major pairs
    + bf16       the encoder's product in bf16 (where the CPU has fast bf16: the default)

The transcoder is a trained run's (--run, a JumpReLU one) or a fresh JumpReLU CLT whose
features each fire on 1% of a real-activation sample (L0 ≈ 1% of F, as the session preset's).
Real corpus contexts; two warm-up steps, then the mean of --steps.

    .venv/bin/python bench/bench_finetune.py [--run RUN] [--features 4096] [--steps 3]
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import torch

from cltrace import hardware
from cltrace.activations.harvest import default_forward_dtype
from cltrace.models.loading import load_model
from cltrace.transcoders import finetune as ft
from cltrace.transcoders.config import TranscoderConfig
from cltrace.transcoders.model import Transcoder

WARMUP = 2


def plain_kl(real_logits: torch.Tensor, rep_logits: torch.Tensor) -> torch.Tensor:
    """The KL as session 10 wrote it: float32 log-softmaxes over the whole logits."""
    logp_real = real_logits.float().log_softmax(-1)
    logp_rep = rep_logits.float().log_softmax(-1)
    return (logp_real.exp() * (logp_real - logp_rep)).sum(-1).mean()


def fresh_transcoder(model, n_features: int) -> Transcoder:
    torch.manual_seed(0)
    cfg = TranscoderConfig(n_layers=model.n_layers, d_model=model.d_model, n_features=n_features)
    tc = Transcoder(cfg)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(100, 20_000, (16, 128), generator=gen)
    cap = model.capture(tokens)
    tc.init_from_sample(cap.mlp_in.flatten(0, 1), cap.mlp_out.flatten(0, 1), fire_frac=0.01)
    return tc


def seconds_per_step(tc, model, state, cfg: ft.FinetuneConfig, steps: int) -> float:
    tc.load_state_dict(state)
    quiet = lambda _msg: None  # noqa: E731
    contexts = ft.corpus_contexts(model, cfg)
    ft.finetune(tc, model, contexts, ft.FinetuneConfig(**{**vars(cfg), "max_steps": WARMUP}), log=quiet)
    t = time.perf_counter()
    result = ft.finetune(
        tc, model, contexts, ft.FinetuneConfig(**{**vars(cfg), "max_steps": steps}), log=quiet
    )
    return (time.perf_counter() - t) / result.steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=None, help="a trained JumpReLU run (default: a fresh 18 x F CLT)")
    ap.add_argument("--features", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()

    model = load_model("gemma-3-270m", device="cpu", dtype=default_forward_dtype("cpu"))
    if args.run:
        from cltrace.runs import load_transcoder, resolve_run

        tc = load_transcoder(resolve_run(args.run), "cpu")
    else:
        tc = fresh_transcoder(model, args.features)
    state = {k: v.clone() for k, v in tc.state_dict().items()}
    base = dict(minutes=1000.0, warmup_steps=10)
    variants = [
        ("session 10", dict(precision="fp32"), False, True),
        ("+ KL in row chunks", dict(precision="fp32"), False, False),
        ("+ kernel decode", dict(precision="fp32"), True, False),
        ("+ bf16 encoder (now)", dict(precision="auto"), True, False),
    ]
    rows = []
    for name, extra, use_kernels, old_kl in variants:
        cfg = ft.FinetuneConfig(**base, **extra)  # pyright: ignore[reportArgumentType]
        with (
            mock.patch.object(Transcoder, "use_kernels", use_kernels),
            mock.patch.object(ft, "kl_divergence", plain_kl if old_kl else ft.kl_divergence),
        ):
            rows.append((name, seconds_per_step(tc, model, state, cfg, args.steps)))
    tokens = 8 * 128
    bf16 = "fast bf16" if hardware.cpu_has_fast_bf16() else "no fast bf16 (the last row runs fp32)"
    print(f"\nfine-tuning step, 18 x {tc.cfg.n_features} {tc.cfg.kind.upper()}, {tokens} tokens/step, {bf16}")
    print(f"{'variant':<24} {'s/step':>7} {'tokens/s':>9} {'vs session 10':>14}")
    for name, sec in rows:
        print(f"{name:<24} {sec:7.2f} {tokens / sec:9.0f} {rows[0][1] / sec:13.2f}x")


if __name__ == "__main__":
    main()
