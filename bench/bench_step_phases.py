"""Where a kernel-path training step's time goes: encode, select, decode, backward, clipping
norm, AdamW. Synthetic activations at gemma-3-270m shapes (18 layers, d = 640), BatchTopK
k = 1% of F, bf16 autocast where the CPU has it; two warm-up steps, then the mean of three.
It also prints the optimizer's memory traffic (AdamW reads parameter, gradient and both
moments and writes three of them: 28 bytes per fp32 parameter) and the rate it ran at.

    .venv/bin/python bench/bench_step_phases.py --kind clt --features 4096 [--batch 1024] [--balanced]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from cltrace import hardware
from cltrace.transcoders.config import TranscoderConfig
from cltrace.transcoders.model import Transcoder
from cltrace.transcoders.train import global_norm, resolve_precision, step_clipped

L, D = 18, 640
WARMUP, TIMED = 2, 3


class Phases:
    """Accumulates wall time per named phase."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.t = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] += now - self.t
        self.t = now


def step(tc: Transcoder, opt: torch.optim.Optimizer, x, y, dtype, phases: Phases) -> None:
    n_tokens, n_feat = x.shape[0], tc.cfg.n_features
    params = [p for p in tc.parameters() if p.requires_grad]
    phases.t = time.perf_counter()
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        xn, yn = tc._normalise(x, tc.in_scale), tc._normalise(y, tc.out_scale)
        with torch.no_grad():
            pre = torch.baddbmm(tc.b_enc[:, None, :], xn, tc.W_enc)  # [L, N, F]
        phases.mark("encode")
        sel = tc._select(pre)
        phases.mark("select")
        recon = tc._finish_decode(tc._decode_selected(sel, xn, pooled=True), xn)
        phases.mark("decode forward")
        loss = (recon - yn.float()).pow(2).sum() / n_tokens
        torch.stack([torch.bincount(s.feat[s.raw > 0], minlength=n_feat) for s in sel])
        phases.mark("loss, counts")
    loss.backward()
    phases.mark("backward")
    norm = global_norm([p.grad for p in params if p.grad is not None])
    phases.mark("clipping norm")
    step_clipped(opt, tc, norm, 1.0)  # as the trainer clips (it does on most steps of real training)
    phases.mark("AdamW (and clipping)")
    opt.zero_grad(set_to_none=True)
    phases.mark("zero_grad")


def main() -> None:
    hardware.enable_huge_pages()  # as the CLI does (THP_MEM_ALLOC_ENABLE=0 to time without)
    ap = argparse.ArgumentParser(description="Where a kernel-path training step's time goes")
    ap.add_argument("--kind", choices=["clt", "plt"], default="clt")
    ap.add_argument("--features", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument(
        "--balanced",
        action="store_true",
        help="a selection bias as load balancing leaves it (the session preset): BatchTopK ranks pre + bias",
    )
    args = ap.parse_args()
    hardware.keep_freed_memory()
    cfg = TranscoderConfig(
        L, D, args.features, kind=args.kind, activation="batchtopk", topk=max(1, args.features // 100)
    )
    tc = Transcoder(cfg)
    x, y = torch.randn(args.batch, L, D), torch.randn(args.batch, L, D)
    tc.init_from_sample(x, y)
    if args.balanced:
        tc.select_bias.copy_(torch.rand(L, args.features, generator=torch.Generator().manual_seed(0)) * 0.1)
    params = [p for p in tc.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    dtype = resolve_precision("auto", torch.device("cpu"))
    for _ in range(WARMUP):
        step(tc, opt, x, y, dtype, Phases())
    phases = Phases()
    for _ in range(TIMED):
        step(tc, opt, x, y, dtype, phases)
    total = sum(phases.seconds.values()) / TIMED
    n_params = sum(p.numel() for p in params)
    print(
        f"{args.kind} 18 x {args.features}, batch {args.batch}, {torch.get_num_threads()} threads: "
        f"{total:.3f} s/step, {args.batch / total:,.0f} tokens/s"
    )
    print(f"{'phase':22} {'ms/step':>8} {'share':>6}")
    for name, seconds in phases.seconds.items():
        print(f"{name:22} {seconds / TIMED * 1e3:8.1f} {seconds / TIMED / total:6.1%}")
    adam = phases.seconds["AdamW (and clipping)"] / TIMED
    moved = 28 * n_params / 1e9
    print(f"AdamW: {n_params / 1e6:.0f}M parameters, {moved:.1f} GB moved, {moved / adam:.0f} GB/s")


if __name__ == "__main__":
    main()
