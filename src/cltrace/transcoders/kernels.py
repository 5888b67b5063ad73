"""CPU kernels for the sparse parts of a transcoder training step (numba: compiled on first use,
a few seconds, and cached beside this file or in numba's user cache).

A source layer's active (token, feature) pairs come sorted by feature (CSC): feature f owns
pairs fstart[f] .. fstart[f+1] - 1 of `tok` [P] (token of each pair) and `coef` [P]. The
kernels split the columns of the dense operands into blocks (a block per task, tasks shared
among threads) and walk all the pairs inside each block: a feature's slice of W is read once
per step, not once per pair as an embedding bag per token reads it, and the [N, block] slice
of the operand it scatters into or gathers from stays in the core's cache. Tasks own disjoint
columns: no races, no atomics. bench/bench_train.py measures them against torch's kernels.

    decode_into(out, col0, W, fstart, tok, coef)       out[t_p, col0 + j] += coef_p · W[f_p, j]
    rows_grad(gW, G, col0, fstart, tok, coef[, W])     gW[f, j] = Σ_{p of f} coef_p · G[t_p, col0 + j]
        (every row written, 0 where f has no pairs) and, given W, the pairs' dot products
        dots_p = Σ_j G[t_p, col0 + j] · W[f_p, j]

Arrays are float32 / int64 numpy views of contiguous CPU tensors (no copies); out and G are
[N, C] with C ≥ col0 + W.shape[1].
"""

from __future__ import annotations

import os

import numba
import numpy as np


def available() -> bool:
    """Whether the numba kernels run (CLTRACE_KERNELS=torch turns them off: the torch
    kernels, model.SparseDecode, as on CUDA)."""
    return os.environ.get("CLTRACE_KERNELS", "numba") != "torch"


def block_size(n_cols: int) -> int:
    """Columns per task: 256 where the row is long enough (fewer per-pair overheads), down to
    32, so that both threads of a 2-core machine get several tasks."""
    for b in (256, 128, 64):
        if n_cols >= 8 * b:
            return b
    return 32


prange = numba.prange


@numba.njit(parallel=True, fastmath=True, cache=True, nogil=True, boundscheck=False)
def _decode_into(out, col0, W, fstart, tok, coef, block):  # pragma: no cover - compiled
    n_feat, n_cols = W.shape
    for b in prange((n_cols + block - 1) // block):
        j0 = b * block
        j1 = min(j0 + block, n_cols)
        c0, c1 = col0 + j0, col0 + j1
        for f in range(n_feat):
            w = W[f, j0:j1]
            p, end = fstart[f], fstart[f + 1]
            while p + 1 < end:  # two pairs per pass share the loads of w
                o1, o2 = out[tok[p], c0:c1], out[tok[p + 1], c0:c1]
                v1, v2 = coef[p], coef[p + 1]
                for j in range(j1 - j0):
                    o1[j] += v1 * w[j]
                    o2[j] += v2 * w[j]
                p += 2
            if p < end:
                o = out[tok[p], c0:c1]
                v = coef[p]
                for j in range(j1 - j0):
                    o[j] += v * w[j]


@numba.njit(parallel=True, fastmath=True, cache=True, nogil=True, boundscheck=False)
def _rows_grad(gW, G, col0, W, fstart, tok, coef, dots, block, want_dots):  # pragma: no cover
    n_feat, n_cols = gW.shape
    for b in prange((n_cols + block - 1) // block):
        j0 = b * block
        j1 = min(j0 + block, n_cols)
        c0, c1 = col0 + j0, col0 + j1
        for f in range(n_feat):
            gw = gW[f, j0:j1]
            gw[:] = 0.0
            w = W[f, j0:j1]
            p, end = fstart[f], fstart[f + 1]
            while p + 1 < end:  # two pairs per pass share the loads and stores of gw
                g1, g2 = G[tok[p], c0:c1], G[tok[p + 1], c0:c1]
                v1, v2 = coef[p], coef[p + 1]
                if want_dots:
                    s1 = s2 = np.float32(0.0)
                    for j in range(j1 - j0):
                        s1 += g1[j] * w[j]
                        s2 += g2[j] * w[j]
                        gw[j] += v1 * g1[j] + v2 * g2[j]
                    dots[b, p], dots[b, p + 1] = s1, s2
                else:
                    for j in range(j1 - j0):
                        gw[j] += v1 * g1[j] + v2 * g2[j]
                p += 2
            if p < end:
                g = G[tok[p], c0:c1]
                v = coef[p]
                s = np.float32(0.0)
                for j in range(j1 - j0):
                    s += g[j] * w[j]
                    gw[j] += v * g[j]
                if want_dots:
                    dots[b, p] = s


def _match_torch_threads() -> None:
    """The kernels use as many threads as torch does (capped at numba's pool)."""
    import torch

    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))  # type: ignore[attr-defined]


def decode_into(
    out: np.ndarray, col0: int, W: np.ndarray, fstart: np.ndarray, tok: np.ndarray, coef: np.ndarray
) -> None:
    """out[t_p, col0 + j] += coef_p · W[f_p, j] for every pair p and j < W.shape[1], in place."""
    _match_torch_threads()
    _decode_into(out, col0, W, fstart, tok, coef, block_size(W.shape[1]))


def rows_grad(
    gW: np.ndarray,
    G: np.ndarray,
    col0: int,
    fstart: np.ndarray,
    tok: np.ndarray,
    coef: np.ndarray,
    W: np.ndarray | None = None,
) -> np.ndarray | None:
    """Fill gW [F, M] with Σ_{p of f} coef_p · G[t_p, col0:col0 + M]; given W [F, M], also
    return the pairs' dot products <G[t_p, col0:col0 + M], W[f_p]> as float32 [P]."""
    _match_torch_threads()
    block = block_size(gW.shape[1])
    n_blocks = (gW.shape[1] + block - 1) // block
    want = W is not None
    dots = np.zeros((n_blocks if want else 1, tok.shape[0]), dtype=np.float32)
    _rows_grad(gW, G, col0, W if want else gW, fstart, tok, coef, dots, block, want)
    return dots.sum(0) if want else None
