"""One timed transcoder training step as the trainer takes it (loss, backward, clipping at 1.0
with no scaling pass under the limit, fused AdamW, zero_grad), shared by bench_train.py and
bench_auxk.py. Scripts in bench/ import it by name (their folder is on sys.path when run as
`python bench/<script>.py`)."""

from __future__ import annotations

import time
from typing import Any

import torch

from cltrace.transcoders.train import global_norm, step_clipped


def time_steps(
    tc, x, y, steps: int, autocast: torch.dtype | None, lr: float, **loss_kwargs: Any
) -> tuple[float, Any]:
    """(seconds per step, the last step's loss output): two warm-up steps (numba compiles, the
    heap grows to its working size), then the mean of `steps`. `loss_kwargs` go to
    `tc.loss` beside lambda_s = lambda_p = 0 (e.g. AuxK's dead, auxk, auxk_alpha)."""
    params = [p for p in tc.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, fused=True)

    def one():
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            out = tc.loss(x, y, lambda_s=0.0, lambda_p=0.0, **loss_kwargs)
        out.loss.backward()
        grads = [p.grad for p in params if p.grad is not None]
        step_clipped(opt, tc, global_norm(grads), 1.0)  # as the trainer clips
        opt.zero_grad(set_to_none=True)
        return out

    one()
    one()
    out = None
    t = time.perf_counter()
    for _ in range(steps):
        out = one()
    return (time.perf_counter() - t) / steps, out
