"""Training throughput of cltrace transcoders on this machine.

For each configuration: tokens/s of full training steps (loss, backward, clipping, AdamW)
on synthetic activations at gemma-3-270m shapes (18 layers, d=640), and the achieved matmul
FLOP/s of the step as a fraction of this machine's matmul rate in the step's precision
(bf16 or fp32), measured in the same run. TopK rows use k = 64 (the demo and session
presets; 6% of 1024 features, decoded densely). JumpReLU rows are initialised so L0 ≈ 2% of F
(a trained CLT's regime) with ≈ 1% more inside the STE window, so decoding is sparse; the
`dense` row forces the dense decoder for comparison.

    .venv/bin/python bench/bench_train.py [--steps 4] [--quick]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from cltrace.transcoders.config import TrainConfig
from cltrace.transcoders.model import Transcoder
from cltrace.transcoders.train import Trainer

warnings.filterwarnings("ignore")
L, D = 18, 640


def matmul_rate(dtype: torch.dtype, m=1024, k=640, n=2048, reps=10) -> float:
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * m * k * n * reps / (time.perf_counter() - t)


def step_flops(tc: Transcoder, acts: torch.Tensor, cand_frac: float, sparse: bool) -> float:
    """Executed matmul FLOPs of one step: encoder fwd + 2 bwd, decoder 3 products."""
    n = acts.shape[1]
    F = tc.cfg.n_features
    enc = 3 * 2 * n * L * D * F
    widths = [W.shape[1] * D for W in tc.W_dec]
    if sparse:
        pairs = [(acts[l] != 0).sum().item() + cand_frac * n * F for l in range(L)]
        dec = sum(3 * 2 * p * w for p, w in zip(pairs, widths))
    else:
        dec = sum(3 * 2 * n * F * w for w in widths)
    return enc + dec


def bench(name: str, F: int, batch: int, steps: int, dense: bool, kind: str = "clt",
          activation: str = "jumprelu", precision: str = "auto") -> dict:
    topk = 64 if activation == "topk" else None
    cfg = TrainConfig(n_features=F, kind=kind, tokens=batch * 1000, batch_size=batch, activation=activation,
                      topk=topk, bandwidth=0.02, checkpoint_every=0, log_every=10**9, precision=precision)
    torch.manual_seed(0)
    tc = Transcoder(cfg.transcoder_config(L, D))
    x, y = torch.randn(batch, L, D), torch.randn(batch, L, D)
    tc.init_from_sample(x, y, fire_frac=0.02)
    if dense:
        tc.sparse_max_density = -1.0
    trainer = Trainer(tc, cfg, log=lambda _m: None)
    trainer.initialised = True
    trainer.train_step(x, y)                                    # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        m = trainer.train_step(x, y)
    dt = (time.perf_counter() - t) / steps
    with torch.no_grad():
        xn = tc._normalise(x, tc.in_scale)
        acts = tc.activate(tc._encode(xn).transpose(0, 1)).transpose(0, 1)
    sparse = not dense and activation == "jumprelu"
    flops = step_flops(tc, acts, 0.01, sparse)
    prec = "bf16" if trainer.autocast_dtype is not None else "fp32"
    return dict(name=name, F=F, batch=batch, decode="sparse" if sparse else "dense", prec=prec,
                act=activation, tok_s=batch / dt, step_s=dt, l0=m.l0, gflops=flops / dt / 1e9)


RUNS = {  # name, F, batch, dense, kind, activation, precision
    "quick": [("demo CLT 18x1024", 1024, 1024, False, "clt", "topk", "auto")],
    "full": [("demo CLT 18x1024", 1024, 1024, False, "clt", "topk", "auto"),
             ("demo CLT 18x1024", 1024, 1024, False, "clt", "topk", "fp32"),
             ("demo PLT 18x1024", 1024, 1024, False, "plt", "topk", "auto"),
             ("CLT 18x1024", 1024, 1024, False, "clt", "jumprelu", "auto"),
             ("CLT 18x4096", 4096, 1024, False, "clt", "jumprelu", "auto"),
             ("CLT 18x4096", 4096, 1024, True, "clt", "jumprelu", "auto")],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    p.add_argument("--quick", action="store_true", help="only the demo preset")
    args = p.parse_args()
    bf16, fp32 = matmul_rate(torch.bfloat16), matmul_rate(torch.float32)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; matmul 1024x640x2048: "
          f"bf16 {bf16 / 1e9:.0f} GFLOP/s, fp32 {fp32 / 1e9:.0f} GFLOP/s")
    print(f"{'config':<18} {'act':>8} {'prec':>4} {'batch':>5} {'decode':>6} {'tok/s':>7} {'s/step':>7} "
          f"{'L0':>6} {'GFLOP/s':>8} {'of peak':>7}")
    for name, F, batch, dense, kind, act, prec in RUNS["quick" if args.quick else "full"]:
        r = bench(name, F, batch, args.steps, dense, kind, act, prec)
        peak = bf16 if r["prec"] == "bf16" else fp32
        print(f"{r['name']:<18} {r['act']:>8} {r['prec']:>4} {r['batch']:>5} {r['decode']:>6} {r['tok_s']:>7.0f} "
              f"{r['step_s']:>7.2f} {r['l0']:>6.1f} {r['gflops']:>8.0f} {r['gflops'] * 1e9 / peak:>7.1%}", flush=True)


if __name__ == "__main__":
    main()
