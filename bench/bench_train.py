"""Training throughput of cltrace transcoders on this machine, in one run.

Full training steps (loss, backward, gradient clipping, fused AdamW) on synthetic activations
at gemma-3-270m shapes (18 layers, d = 640), batch 1024, for CLTs and PLTs of 1024, 4096 and
8192 features per layer, BatchTopK with k = 1% of the width (the session preset's regime).
Modes:
    kernels      the default on CPU: the numba kernels (transcoders/kernels.py, kernel_step.py)
    torch        torch's sparse pairs decoder (embedding bags; use_kernels = False), as on CUDA
    dense        every layer decoded by a matmul (use_kernels = False, sparse_max_density = -1)
    old          the code before issue 12 (commit 7a29743, read with `git show`), TopK with the
                 same k; its sparse decoder took over below 5% density
The machine's matmul rate is measured in the same run at the encoder's shape (a batched
[18, 1024, 640] x [18, 640, F] product) in the step's precision; the encoder-only roofline is
that rate / (6·L·d·F) tokens/s (forward and two backward products of the encoder, nothing
else), and each row reports its fraction of it. Rows whose memory (parameters, gradients and
AdamW state: 16 bytes per parameter, plus activations) would not fit in the available memory
are skipped with a note.

    .venv/bin/python bench/bench_train.py [--steps 2] [--sizes 1024 4096 8192] [--no-old]

Each row runs two warm-up steps (numba compiles, the heap grows to its working size), then
times --steps steps; the process keeps freed memory (hardware.keep_freed_memory), as
training does.

Throughput on a shared machine is noisy: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from git_module import model_at
from train_step import time_steps

from cltrace.hardware import enable_huge_pages, keep_freed_memory
from cltrace.transcoders.config import TranscoderConfig
from cltrace.transcoders.model import Transcoder
from cltrace.transcoders.train import resolve_precision

warnings.filterwarnings("ignore")
L, D, BATCH = 18, 640, 1024
OLD_COMMIT = "7a29743"


def matmul_rate(F: int, dtype: torch.dtype, reps: int = 3) -> float:
    """FLOP/s of the encoder's batched product [L, N, d] x [L, d, F] in `dtype`."""
    a, b = torch.randn(L, BATCH, D).to(dtype), torch.randn(L, D, F).to(dtype)
    torch.bmm(a, b)
    t = time.perf_counter()
    for _ in range(reps):
        torch.bmm(a, b)
    return 2 * L * BATCH * D * F * reps / (time.perf_counter() - t)


def old_module():
    """The transcoder module as of OLD_COMMIT, or None outside a git checkout."""
    return model_at(OLD_COMMIT)


def n_params(kind: str, F: int) -> int:
    targets = L * (L + 1) // 2 if kind == "clt" else L
    return F * targets * D + L * D * F + 2 * L * F


def fits(kind: str, F: int) -> bool:
    """Parameters + grads + AdamW state (16 B each) + ~4 [L, N, F] float32 temporaries, with 1 GB spare."""
    need = 16 * n_params(kind, F) + 4 * 4 * L * BATCH * F + 2**30
    try:
        avail = next(
            int(line.split()[1]) * 1024
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemAvailable")
        )
    except (OSError, StopIteration):
        return True
    return need < avail


def build(kind: str, F: int, mode: str, old):
    k = max(1, F // 100)
    if mode == "old":
        cfg = TranscoderConfig(n_layers=L, d_model=D, n_features=F, kind=kind, activation="topk", topk=k)
        tc = old.Transcoder(cfg)
    else:
        cfg = TranscoderConfig(n_layers=L, d_model=D, n_features=F, kind=kind, activation="batchtopk", topk=k)
        tc = Transcoder(cfg)
        tc.use_kernels = mode == "kernels"
        if mode == "dense":
            tc.sparse_max_density = -1.0
    return tc


def main() -> None:
    enable_huge_pages()  # as the CLI does (THP_MEM_ALLOC_ENABLE=0 to time without)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2, help="timed steps per row (after two warm-up steps)")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 8192], help="features per layer")
    p.add_argument("--kinds", nargs="+", default=["clt", "plt"], choices=["clt", "plt"])
    p.add_argument(
        "--modes",
        nargs="+",
        default=["kernels", "torch", "dense", "old"],
        choices=["kernels", "torch", "dense", "old"],
    )
    p.add_argument("--no-old", action="store_true", help="skip the pre-issue-12 code")
    args = p.parse_args()
    keep_freed_memory()
    autocast = resolve_precision("auto", torch.device("cpu"))
    prec = "bf16" if autocast is not None else "fp32"
    old = None if args.no_old or "old" not in args.modes else old_module()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, precision {prec} "
        f"(CPU flags; CLTRACE_PRECISION=fp32 forces fp32), batch {BATCH}, BatchTopK k = 1% of F"
    )
    print(
        f"{'kind':>4} {'F':>5} {'k':>3} {'mode':>11} {'tok/s':>7} {'s/step':>7} {'matmul GF/s':>11} "
        f"{'roofline tok/s':>14} {'of roofline':>11}"
    )
    torch.manual_seed(0)
    x, y = torch.randn(BATCH, L, D), torch.randn(BATCH, L, D)
    for F in args.sizes:
        rate = matmul_rate(F, autocast or torch.float32)
        roof = rate / (6 * L * D * F)
        for kind in args.kinds:
            if not fits(kind, F):
                print(
                    f"{kind:>4} {F:>5}   skipped: {16 * n_params(kind, F) / 2**30:.0f} GiB of parameters, "
                    "gradients and AdamW state do not fit in the available memory",
                    flush=True,
                )
                continue
            for mode in args.modes:
                if mode == "old" and (old is None or F > 4096):  # the old code: 1024 and 4096 only
                    continue
                tc = build(kind, F, mode, old)
                tc.init_from_sample(x, y)
                dt, _ = time_steps(tc, x, y, args.steps, autocast, lr=1e-4)
                print(
                    f"{kind:>4} {F:>5} {max(1, F // 100):>3} {mode:>11} {BATCH / dt:>7.0f} {dt:>7.2f} "
                    f"{rate / 1e9:>11.0f} {roof:>14.0f} {BATCH / dt / roof:>11.1%}",
                    flush=True,
                )
                del tc


if __name__ == "__main__":
    sys.exit(main())
