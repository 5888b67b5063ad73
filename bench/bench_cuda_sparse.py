"""The sparse CLT decoder on a GPU: exactness against the dense path, then training throughput.

1. Exactness, on the device, at a small size (4 layers, d = 64, 256 features; TopK, BatchTopK,
   JumpReLU, with the AuxK term): the loss and every parameter gradient of the sparse pairs
   decoder against the dense decoder, in fp32 with TF32 off (relative error ≤ 1e-4 expected).
2. Throughput: full training steps (bf16 autocast, loss, backward, clipping, fused AdamW) of
   CLTs at gemma-3-270m shapes (18 layers, d = 640), BatchTopK with k = 1% of the width, sparse
   against dense decoding, at 18 x 4096 and 18 x 16384 (batch 4096 tokens).

    python bench/bench_cuda_sparse.py                       # on CUDA: a few minutes
    python bench/bench_cuda_sparse.py --device cpu --sizes 256 --batch 256   # a CPU smoke run

Without a GPU (and no --device cpu) it says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch

from cltrace.transcoders.config import TranscoderConfig
from cltrace.transcoders.model import Transcoder

warnings.filterwarnings("ignore")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def small(activation: str, device: torch.device, seed: int = 0):
    torch.manual_seed(seed)
    L, d, F = 4, 64, 256
    cfg = TranscoderConfig(
        n_layers=L,
        d_model=d,
        n_features=F,
        activation=activation,
        bandwidth=0.5,
        topk=8 if activation != "jumprelu" else None,
    )
    tc = Transcoder(cfg).to(device)
    x, y = torch.randn(512, L, d, device=device) * 3, torch.randn(512, L, d, device=device) * 0.5
    tc.init_from_sample(x, y, fire_frac=0.03)
    with torch.no_grad():
        tc.b_enc.add_(0.01 * torch.randn_like(tc.b_enc))
        tc.b_dec.normal_(0, 0.1)
    return tc, x, y


def check_exact(device: torch.device) -> bool:
    """Sparse == dense (loss and every gradient, fp32) for each activation; prints the errors."""
    ok = True
    dead = torch.rand(4, 256, device=device, generator=torch.Generator(device).manual_seed(1)) < 0.2
    for activation in ("topk", "batchtopk", "jumprelu"):
        runs = []
        for density in (1.0, -1.0):  # always sparse, then always dense (torch's kernels)
            tc, x, y = small(activation, device)
            tc.sparse_max_density = density
            tc.use_kernels = False  # the numba kernels are CPU-only; tests/test_kernels.py checks them
            if activation != "jumprelu":  # with the load-balancing selection bias in play
                with torch.no_grad():
                    tc.select_bias.copy_(
                        torch.randn(tc.select_bias.shape, generator=torch.Generator().manual_seed(2)) * 0.3
                    )
            out = tc.loss(x, y, lambda_s=1e-2, lambda_p=1e-2, dead=dead, auxk=4, auxk_alpha=1 / 32)
            out.loss.backward()
            grads = {n: p.grad for n, p in tc.named_parameters() if p.grad is not None}
            runs.append((out.loss.detach(), grads))
        (ls, gs), (ld, gd) = runs
        errs = {"loss": ((ls - ld).abs() / ld.abs()).item()}
        errs.update({n: ((gs[n] - gd[n]).norm() / gd[n].norm().clamp_min(1e-30)).item() for n in gd})
        worst = max(errs, key=errs.get)
        good = gs.keys() == gd.keys() and errs[worst] <= 1e-4
        ok &= good
        print(
            f"  {activation:>9}: {'ok' if good else 'MISMATCH'}  largest relative error {errs[worst]:.1e} "
            f"({worst}; {len(gd)} gradients)"
        )
    return ok


def throughput(F: int, batch: int, mode: str, device: torch.device, steps: int) -> float:
    L, d = 18, 640
    cfg = TranscoderConfig(n_layers=L, d_model=d, n_features=F, activation="batchtopk", topk=max(1, F // 100))
    tc = Transcoder(cfg).to(device)
    tc.use_kernels = False  # the torch path, as on CUDA (the CPU kernels: bench_train.py)
    if mode == "dense":
        tc.sparse_max_density = -1.0
    x, y = torch.randn(batch, L, d, device=device), torch.randn(batch, L, d, device=device)
    tc.init_from_sample(x, y)
    params = list(tc.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")

    def one():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = tc.loss(x, y, lambda_s=0.0, lambda_p=0.0)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    one()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        one()
    sync(device)
    return batch * steps / (time.perf_counter() - t)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="torch device (cuda, cuda:N, or cpu for a smoke run)")
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384], help="features per layer")
    p.add_argument("--batch", type=int, default=4096, help="tokens per step")
    p.add_argument("--steps", type=int, default=3, help="timed steps per row (after one warm-up)")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU visible to torch: nothing to check here (use --device cpu for a smoke run)")
        return 0
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        print(f"device {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    else:
        print(f"device cpu ({torch.get_num_threads()} threads), torch {torch.__version__}")
    print("1. sparse vs dense decoding, fp32, loss and parameter gradients:")
    ok = check_exact(device)
    print(f"2. training steps, bf16 autocast, batch {args.batch}, BatchTopK k = 1% of F:")
    print(f"  {'CLT':>10} {'mode':>6} {'tokens/s':>10}")
    for F in args.sizes:
        for mode in ("sparse", "dense"):
            try:
                rate = throughput(F, args.batch, mode, device, args.steps)
                print(f"  {'18x' + str(F):>10} {mode:>6} {rate:>10,.0f}", flush=True)
            except torch.OutOfMemoryError:
                print(f"  {'18x' + str(F):>10} {mode:>6}  out of memory")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print("exactness: " + ("ok" if ok else "MISMATCH"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
