"""Memory checks: refuse, before allocating, a graph that cannot fit; size the batches.

Free memory is CUDA's ``mem_get_info`` or MemAvailable from /proc/meminfo. Each refusal names
the longest prompt that would fit.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cltrace.errors import CltraceError
from cltrace.models.loading import LoadedModel
from cltrace.transcoders.interface import TranscoderLike


def available_memory(device: torch.device) -> int:
    """Free bytes on `device`: CUDA's mem_get_info, or MemAvailable from /proc/meminfo."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def choose_batch_size(lm: LoadedModel, n_pos: int, free: int) -> int:
    """Largest sensible batch for the free memory: CPU 32 (matmuls stop gaining), GPU 256."""
    L, d = lm.n_layers, lm.d_model
    heads = int(getattr(lm.model.config.get_text_config(), "num_attention_heads", 8))
    per_row = 4 * (6 * L * n_pos * d + 2 * heads * n_pos * n_pos)  # grads per backward row
    cap = 256 if lm.device.type == "cuda" else 32
    return int(max(1, min(cap, free // 4 // max(per_row, 1))))


def check_graph_memory(n_rows: int, n_sources: int, n_pos: int, free: int) -> None:
    """The edge rows and the square adjacency must fit in the free memory."""
    need = 4 * n_rows * n_sources * 2  # edge rows, then the square adjacency
    if need > free * 0.8:
        max_len = max(1, int(n_pos * math.sqrt(free * 0.8 / need)))
        raise CltraceError(
            f"this graph needs about {need / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB is free",
            f"use a shorter prompt (at most about {max_len} tokens here) or fewer --max-feature-nodes",
        )


def forward_memory(lm: LoadedModel, n_pos: int) -> int:
    """Bytes the recorded forward (kept for the backward passes) needs for an n-token prompt:
    per layer, eager attention's [heads, n, n] scores/weights and a few [n, d]-wide tensors."""
    cfg = lm.model.config.get_text_config()
    heads = int(getattr(cfg, "num_attention_heads", 8))
    inner = int(getattr(cfg, "intermediate_size", None) or 4 * lm.d_model)
    per_layer = 4 * (4 * heads * n_pos * n_pos + n_pos * (12 * lm.d_model + 4 * inner))
    return lm.n_layers * per_layer


def check_forward_memory(lm: LoadedModel, n_pos: int, free: int) -> None:
    """A prompt whose recorded forward cannot fit is refused before anything is allocated."""
    if forward_memory(lm, n_pos) <= free * 0.6:
        return
    lo, hi = 1, n_pos
    while lo < hi:  # longest prompt that fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if forward_memory(lm, mid) <= free * 0.6 else (lo, mid - 1)
    raise CltraceError(
        f"a {n_pos}-token prompt needs about {forward_memory(lm, n_pos) / 2**30:.1f} GiB for its "
        f"forward pass but only {free / 2**30:.1f} GiB is free",
        f"use a prompt of at most about {lo} tokens on this machine",
    )


def check_source_memory(
    transcoder: TranscoderLike, layer: Tensor, pos: Tensor, n_pos: int, d: int, free: int
) -> None:
    """Refuse, before gathering them, source decoders that cannot fit: the gathered rows
    (one [T_l, d] block per active feature) plus the EdgeReader's per-position layout."""
    L = transcoder.cfg.n_layers
    need = 0
    for l in range(L):
        at = pos[layer == l]
        if at.numel() == 0:
            continue
        k_max = int(torch.bincount(at, minlength=n_pos).max())
        row = 4 * transcoder.cfg.n_targets(l) * d
        need += row * (at.numel() + n_pos * k_max)
    if need <= free * 0.85:
        return
    longest = max(1, int(n_pos * free * 0.85 / need))
    raise CltraceError(
        f"the {int(pos.numel()):,} active features of this {n_pos}-token prompt need about "
        f"{need / 2**30:.1f} GiB of decoder vectors but only {free / 2**30:.1f} GiB is free",
        f"use a prompt of at most about {longest} tokens with this transcoder on this machine",
    )
