"""Closed-form finishing steps after gradient training.

`topk_to_jumprelu`: a TopK transcoder trains fast and never needs a sparsity coefficient,
but a feature's TopK activation depends on the whole layer, which interventions and the
attribution's per-feature linearisation do not allow. It becomes a JumpReLU transcoder with
one threshold per layer, chosen on a token sample so that as many pre-activations exceed it
as TopK kept active (positive among the k largest): the mean L0 stays the same (the
inference rule of BatchTopK SAEs). A BatchTopK transcoder is converted the same way.

`refit_decoder`: least-squares decoder refit, the best decoder for a fixed encoder.

With the encoder (and so every activation) fixed, the decoder part of the loss is an ordinary
ridge regression per target layer t, on the features of the layers that write to t
(CLT: layers 0..t; PLT: layer t), all in normalised scale:

    min_{W, b}  Σ_n ||a_n[≤t] · W + b - ỹ_{n,t}||² + ρ · ||W||²

Centre activations and targets (b absorbs the means), accumulate the Gram matrix
G = Σ (a - ā)ᵀ(a - ā) over the features of all layers, ordered layer by layer, and
C = Σ (a - ā)ᵀ(ỹ - ȳ). For a CLT the features feeding target t are a leading block of that
order, and the Cholesky factor of a leading block of G is the leading block of G's factor, so
one factorisation serves every target: W_t = solve(chol(G + ρI)[:k_t, :k_t], C[:k_t, t]).

Sums are kept in float64 over float32 products, so the result does not depend on how the
tokens are batched. A feature that never fired gets a zero row (ridge) and keeps its old
decoder; the sparsity penalty, thresholds and encoder are untouched, so L0 is unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch import Tensor

from cltrace.errors import CltraceError
from cltrace.progress import progress
from cltrace.transcoders.model import Transcoder


@torch.no_grad()
def topk_to_jumprelu(tc: Transcoder, x: Tensor) -> list[float]:
    """Make a TopK or BatchTopK transcoder a JumpReLU one in place, calibrated on raw MLP inputs x [N, L, d]
    (N·F values per layer; a few thousand tokens are plenty). Returns the layers' thresholds
    τ_l (floored at 1e-4: θ must be positive); with a selection bias β, feature f's threshold
    is τ_l - β_f."""
    cfg = tc.cfg
    if cfg.activation == "jumprelu":
        raise CltraceError("topk_to_jumprelu needs a TopK or BatchTopK transcoder, this one is jumprelu")
    pre = tc._encode(tc._normalise(x.to(tc.b_enc.device, torch.float32), tc.in_scale))  # [L, N, F]
    L, N, F = pre.shape
    # L0 is the number of *positive* selected values (ReLU after the selection): per token's k
    # largest (TopK) or the layer's k·N largest (BatchTopK); θ_l is chosen so that as many of
    # the layer's N·F pre-activations lie above it
    # A selection bias β [L, F] (the trainer's load balancing) chose by pre + β: the layer's
    # threshold τ_l is found on pre + β, and feature f fires where pre > τ_l - β_f
    bias = tc.select_bias[:, None, :]  # [L, 1, F]
    n_active = (tc._activate(pre, None, bias) > 0).sum(dim=(1, 2))  # [L]
    # the n_active largest scores among positive pre-activations are exactly the active pairs
    scores = (pre + bias).masked_fill(pre <= 0, float("-inf"))
    tau = torch.stack(
        [scores[l].flatten().kthvalue(max(1, N * F - int(n_active[l]))).values for l in range(L)]
    )
    theta = (tau[:, None] - tc.select_bias).clamp_min(1e-4)  # [L, F]
    tc.log_threshold.copy_(theta.log())
    tc.select_bias.zero_()
    tc.cfg = dataclasses.replace(cfg, activation="jumprelu", topk=None)
    return tau.clamp_min(1e-4).tolist()


class RefitStats:
    """Running sums for the regression: G [L·F, L·F], C [L·F, L, d], means, counts."""

    def __init__(self, tc: Transcoder):
        L, F, d = tc.cfg.n_layers, tc.cfg.n_features, tc.cfg.d_model
        dev = tc.b_dec.device
        self.plt = tc.cfg.kind == "plt"
        k = F if self.plt else L * F
        self.G = torch.zeros((L, F, F) if self.plt else (k, k), dtype=torch.float64, device=dev)
        self.C = (
            torch.zeros(L, F, d, dtype=torch.float64, device=dev)
            if self.plt
            else torch.zeros(k, L, d, dtype=torch.float64, device=dev)
        )
        self.sum_a = torch.zeros(L, F, dtype=torch.float64, device=dev)
        self.sum_y = torch.zeros(L, d, dtype=torch.float64, device=dev)
        self.fired = torch.zeros(L, F, dtype=torch.bool, device=dev)
        self.n = 0

    @torch.no_grad()
    def add(self, acts: Tensor, yn: Tensor) -> None:
        """acts [L, N, F], normalised targets yn [L, N, d] (both float32)."""
        L, N, F = acts.shape
        self.n += N
        self.sum_a += acts.sum(1).double()
        self.sum_y += yn.sum(1).double()
        self.fired |= (acts > 0).any(1)
        if self.plt:
            self.G += torch.bmm(acts.transpose(1, 2), acts).double()
            self.C += torch.bmm(acts.transpose(1, 2), yn).double()
            return
        # only the blocks that matter: G's lower block triangle (mirrored in _solve) and, for
        # layer l's features, the targets t >= l they write to: about half the products
        flat = acts.transpose(0, 1).reshape(N, L * F)  # [N, L·F], layer-major
        ys = yn.transpose(0, 1)  # [N, L, d]
        for l in range(L):
            rows = slice(l * F, (l + 1) * F)
            self.G[rows, : (l + 1) * F] += (acts[l].T @ flat[:, : (l + 1) * F]).double()
            self.C[rows, l:] += (acts[l].T @ ys[:, l:].reshape(N, -1)).double().view(F, L - l, -1)


@torch.no_grad()
def refit_decoder(
    tc: Transcoder, batches: Iterable, *, max_tokens: int, ridge: float = 1e-3, desc: str = "refit"
) -> int:
    """Replace `tc`'s decoders and b_dec by the ridge least-squares fit on up to `max_tokens`
    tokens of `batches` (`.mlp_in, .mlp_out` [B, L, d], raw scale). `ridge` is relative to
    the mean diagonal of the Gram matrix. Returns the tokens used."""
    if tc.W_skip is not None:
        raise CltraceError("refit_decoder does not handle skip transcoders")
    stats = RefitStats(tc)
    bar = progress(total=max_tokens, desc=desc, unit="tok")
    for batch in batches:
        x = batch.mlp_in[: max_tokens - stats.n].to(tc.b_dec.device, torch.float32)
        y = batch.mlp_out[: max_tokens - stats.n].to(tc.b_dec.device, torch.float32)
        xn, yn = tc._normalise(x, tc.in_scale), tc._normalise(y, tc.out_scale)
        stats.add(tc._activate(tc._encode(xn), tc.log_threshold.exp()[:, None, :]), yn)
        bar.update(x.shape[0])
        if stats.n >= max_tokens:
            break
    bar.close()
    if stats.n < 2:
        raise CltraceError("refit_decoder needs at least 2 tokens")
    _solve(tc, stats, ridge)
    return stats.n


def _solve(tc: Transcoder, s: RefitStats, ridge: float) -> None:
    L, F = tc.cfg.n_layers, tc.cfg.n_features
    n = s.n
    mean_a, mean_y = s.sum_a / n, s.sum_y / n  # [L, F], [L, d]
    if s.plt:
        G = s.G - n * mean_a[:, :, None] * mean_a[:, None, :]  # centred, [L, F, F]
        C = s.C - n * mean_a[:, :, None] * mean_y[:, None, :]  # [L, F, d]
        _add_ridge_(G, ridge)
        W = torch.cholesky_solve(C, torch.linalg.cholesky(G))  # [L, F, d]
        for l in range(L):
            keep = s.fired[l]
            tc.W_dec[l][keep, 0] = W[l][keep].to(tc.W_dec[l].dtype)
        b = mean_y - torch.einsum("lf,lfd->ld", mean_a, W)
        tc.b_dec.copy_(b.to(tc.b_dec.dtype))
        return
    flat_mean = mean_a.reshape(-1)  # [L·F]
    G = s.G.tril_()  # in place: [L·F, L·F] float64 is large (2.7 GB at 18k)
    G += G.tril(-1).T  # mirror the lower half
    G.addr_(flat_mean, flat_mean, alpha=-n)  # centre
    C = s.C - n * flat_mean[:, None, None] * mean_y[None]  # [L·F, L, d]
    _add_ridge_(G, ridge)
    chol = torch.linalg.cholesky(G)
    del G, s.G
    fired = s.fired.reshape(-1)
    for t in range(L):
        k = (t + 1) * F
        W = torch.cholesky_solve(C[:k, t], chol[:k, :k])  # [k, d]
        for l in range(t + 1):
            rows = W[l * F : (l + 1) * F]
            keep = fired[l * F : (l + 1) * F]
            tc.W_dec[l][keep, t - l] = rows[keep].to(tc.W_dec[l].dtype)
        tc.b_dec[t] = (mean_y[t] - flat_mean[:k] @ W).to(tc.b_dec.dtype)


def _add_ridge_(G: Tensor, ridge: float) -> None:
    """G += ρ·I in place (per matrix of a batch), ρ = ridge × mean diagonal, plus a floor for
    silent features."""
    diag = G.diagonal(dim1=-2, dim2=-1)
    diag += ridge * diag.mean(-1, keepdim=True).clamp_min(1e-12) + 1e-9


__all__ = ["refit_decoder", "RefitStats", "topk_to_jumprelu"]
