"""The fast training step of TopK / BatchTopK transcoders on CPU: autograd functions around the
numba kernels (transcoders/kernels.py).

Outside autograd, the encoder's dense product gives pre [L, N, F] (bf16 under bf16 autocast)
and the selection picks each layer's pairs (Selection, feature-major). Then only the pairs are
differentiated:

    SelectedPreacts   values_p = ReLU(pre[l, t_p, f_p]); backward, per layer,
                      ∂W_enc[l][:, f] = Σ_{p of f} g_p · x̃_l[t_p],  ∂b_enc[l, f] = Σ_{p of f} g_p
                      (g_p = 0 where pre ≤ 0): no dense [L, N, F] gradient, no second product
    KernelDecode      recon[t, l'] = Σ_{l ≤ l'} Σ_{p in l, t_p = t} values_p · W_dec_l[f_p, l' - l]
                      into one token-major [N, L·d] buffer (source layer l writes its columns
                      l·d onward); backward: ∂W_dec_l and ∂values_p by rows_grad

Both give the dense path's values and gradients (tests/test_kernels.py).

Gradient buffers: a fresh [F, T·d] gradient per step costs a page fault per 4 KiB on first
touch (0.35 s for the 1.8 GB of an 18 x 4096 CLT's decoders, a tenth of its step). With a
GradPool the backward writes into last step's storage instead, through a new tensor object
that autograd adopts as .grad (the optimiser's zero_grad(set_to_none=True) drops .grad, the
pool keeps the storage). Where .grad already holds a gradient (a second backward without
zero_grad, or AuxK's contribution that arrived first), a fresh buffer is used.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from cltrace.transcoders import kernels


class LayerSelection(NamedTuple):
    """One source layer's selected pairs, feature-major (CSC)."""

    tok: Tensor  # [P] long, token of each pair
    feat: Tensor  # [P] long, non-decreasing
    fstart: Tensor  # [F + 1] long, feature f owns pairs fstart[f] .. fstart[f + 1] - 1
    raw: Tensor  # [P] float32 pre-activations (no grad)


def feature_starts(feat: Tensor, n_features: int) -> Tensor:
    """fstart [F + 1] of feature-sorted pairs: feature f owns pairs fstart[f] .. fstart[f + 1] - 1."""
    counts = torch.bincount(feat, minlength=n_features)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def select_csc(tok: Tensor, feat: Tensor, raw: Tensor, n_tokens: int, n_features: int) -> LayerSelection:
    """Sort pairs by (feature, token) and index them by feature."""
    key = feat * n_tokens + tok
    order = (key.to(torch.int32) if n_features * n_tokens < 2**31 else key).sort().indices
    feat = feat[order]
    fstart = feature_starts(feat, n_features)
    return LayerSelection(tok[order].contiguous(), feat.contiguous(), fstart, raw[order].float().contiguous())


def selection_scores(pre: Tensor, bias: Tensor) -> Tensor:
    """What TopK / BatchTopK rank under a selection bias: pre + bias where pre > 0, pre
    elsewhere. Only a pair with a positive pre-activation can be active (ReLU after the
    selection), so the bias never spends a selection slot on one that cannot: a raised
    feature wins where it has something to give. In pre's dtype (bf16 pre under autocast:
    a float32 score tensor cost 0.1 s of an 18 x 2048 CLT's step)."""
    return torch.where(pre > 0, pre + bias.to(pre.dtype), pre)


def topk_selected(pre: Tensor, k: int, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(values, index) of each row's k largest of pre [..., F], ranked by
    selection_scores(pre, bias) when a selection bias is given; the values stay pre's."""
    if bias is None:
        values, index = pre.topk(k, dim=-1)
        return values, index
    index = selection_scores(pre, bias).topk(k, dim=-1).indices
    return pre.gather(-1, index), index


def select_topk(pre: Tensor, k: int, bias: Tensor | None = None) -> list[LayerSelection]:
    """TopK: each token's k largest pre-activations per layer (`topk_selected`; bias
    [L, 1, F]). pre [L, N, F], no grad."""
    L, N, n_feat = pre.shape
    values, index = topk_selected(pre, k, bias)  # [L, N, k]
    tok = torch.arange(N, device=pre.device).repeat_interleave(k)
    return [select_csc(tok, index[l].reshape(-1), values[l].reshape(-1), N, n_feat) for l in range(L)]


def select_batch_topk(pre: Tensor, k: int, bias: Tensor | None = None) -> list[LayerSelection]:
    """BatchTopK: per layer the k·N largest of the batch's N·F pre-activations (of
    selection_scores(pre, bias) when a selection bias is given; the values stay pre's).

    Exact, without a top-(k·N) over all N·F values: a threshold tau_l a little below the
    k·N-th score is estimated on every 8th token, the pairs that can score above it are the
    candidates, and the top k·N of the candidates' scores is taken. It is exact when the
    k·N-th of them scores above tau_l (no pair left out can beat it); a layer where it does
    not falls back to the full top-(k·N) (torch.topk over [L, N·F] was 15% of an 18 x 4096
    CLT's step). Under a bias the candidates come from one comparison of pre with a
    per-feature floor (`candidate_floor`): scoring all N·F pairs first took 0.23 s of the
    0.48 s selection of an 18 x 4096 CLT (bf16, 2 cores)."""
    L, N, n_feat = pre.shape
    keep = min(k * N, N * n_feat)
    values_of = pre.reshape(L, N * n_feat)
    stride = 8
    sample = pre[:, ::stride] if bias is None else selection_scores(pre[:, ::stride], bias)
    sample = sample.reshape(L, -1)
    rank = min(sample.shape[1], int(1.5 * keep * sample.shape[1] / (N * n_feat)) + 16)
    out = []
    if N >= 4 * stride and rank < sample.shape[1]:
        tau = sample.topk(rank, dim=-1).values[:, -1:]  # [L, 1]
        floor = candidate_floor(tau, bias, pre.dtype)
        above = (pre > floor).reshape(L, N * n_feat) if floor is not None else None
        for l in range(L):
            cand = above[l].nonzero().squeeze(1) if above is not None else None
            if cand is None or cand.numel() < keep:
                break
            scores = values_of[l, cand]
            if bias is not None:
                scores = selection_scores(scores, bias[l, 0, cand % n_feat])
            top = scores.topk(keep)
            if not bool(top.values[-1] > tau[l, 0]):
                break
            idx = cand[top.indices]
            out.append(select_csc(idx // n_feat, idx % n_feat, values_of[l, idx], N, n_feat))
    flat = None
    for l in range(len(out), L):
        if flat is None:
            flat = values_of if bias is None else selection_scores(pre, bias).reshape(L, N * n_feat)
        idx = flat[l].topk(keep).indices
        out.append(select_csc(idx // n_feat, idx % n_feat, values_of[l, idx], N, n_feat))
    return out


def candidate_floor(tau: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """[L, 1, F] (or [L, 1, 1]) in pre's dtype: a pair with pre ≤ floor[l, f] cannot score
    above tau_l [L, 1] under selection_scores. Without a bias, tau itself. With one, where
    tau ≥ 0, only a positive pre can get past it, by pre + β_f > tau: the floor is
    max(0, tau - β_f), lowered by 1/128 of itself and 1e-6 so that neither rounding (of the
    floor to pre's dtype, of the score pre + β_f to it: both monotone) can leave out a pair
    that scores above tau; the few extra pairs are scored and ranked with the others. None
    where a layer's tau is negative (not at BatchTopK's k ≪ F): the caller scores every pair."""
    if bias is None:
        return tau[:, :, None].to(dtype)
    if bool((tau < 0).any()):
        return None
    floor = (tau[:, :, None].float() - bias.float()).clamp_min(0)
    return (floor - floor / 128 - 1e-6).to(dtype)


def select_dead_topk(pre: Tensor, dead: Tensor, k: int) -> list[LayerSelection]:
    """AuxK's pairs: per layer and token, the k largest pre-activations among the layer's dead
    features (dead [L, F] bool), kept where positive (ReLU'd to 0 they decode nothing and get
    no gradient). Only the dead columns are ranked: no [L, N, F] mask."""
    L, N, n_feat = pre.shape
    out = []
    for l in range(L):
        cols = dead[l].nonzero().squeeze(1)
        kl = min(k, cols.numel())
        if kl == 0:
            empty = torch.empty(0, dtype=torch.long, device=pre.device)
            out.append(select_csc(empty, empty, pre.new_empty(0), N, n_feat))
            continue
        values, index = pre[l][:, cols].topk(kl, dim=-1)  # [N, kl]
        keep = values > 0
        tok = torch.arange(N, device=pre.device)[:, None].expand(N, kl)[keep]
        out.append(select_csc(tok, cols[index[keep]], values[keep], N, n_feat))
    return out


def stack_selections(
    main: list[LayerSelection], extra: list[LayerSelection], n_tokens: int
) -> list[LayerSelection]:
    """One selection per layer over 2·N rows: main's pairs on rows 0..N-1, extra's on rows
    N..2N-1, so that a single decode (and a single pass over each decoder in the backward)
    serves both; SelectedPreacts maps row r to token r mod N for the encoder."""
    n_feat = main[0].fstart.numel() - 1
    out = []
    for m, e in zip(main, extra):
        tok, feat = torch.cat([m.tok, e.tok + n_tokens]), torch.cat([m.feat, e.feat])
        out.append(select_csc(tok, feat, torch.cat([m.raw, e.raw]), 2 * n_tokens, n_feat))
    return out


def _np(t: Tensor):
    return t.detach().numpy()


class GradPool:
    """Reusable gradient storage, one buffer per key (module docstring)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, int], Tensor] = {}

    def take(self, key: tuple[str, int], param: Tensor, shape: tuple[int, ...]) -> Tensor:
        """A float32 buffer of `shape` to return as param's gradient: pooled unless param
        already has a gradient to be added to."""
        if param.grad is not None:
            return torch.empty(shape)
        buf = self._buffers.get(key)
        if buf is None or tuple(buf.shape) != shape:
            buf = self._buffers[key] = torch.empty(shape)
        return buf.view(shape)  # a new tensor object on the pooled storage


def _fresh(key: tuple[str, int], param: Tensor, shape: tuple[int, ...], pool: GradPool | None) -> Tensor:
    return pool.take(key, param, shape) if pool is not None else torch.empty(shape)


class SelectedPreacts(torch.autograd.Function):
    """Concatenated ReLU'd pre-activations of the selected pairs of every layer [Σ P_l];
    gradients for W_enc [L, d, F] and b_enc [L, F] (module docstring); xn [L, N, d] is data."""

    @staticmethod
    def forward(
        ctx, W_enc: Tensor, b_enc: Tensor, xn: Tensor, sel: list[LayerSelection], pool: GradPool | None
    ) -> Tensor:
        ctx.sel, ctx.xn, ctx.pool, ctx.W_enc = sel, xn, pool, W_enc
        return torch.cat([s.raw for s in sel]).relu()

    @staticmethod
    def backward(ctx, grad: Tensor):
        sel: list[LayerSelection] = ctx.sel
        L, N, d = ctx.xn.shape
        n_feat = sel[0].fstart.numel() - 1
        gW = _fresh(("enc", 0), ctx.W_enc, (L, d, n_feat), ctx.pool) if ctx.needs_input_grad[0] else None
        gb = torch.zeros(L, n_feat) if ctx.needs_input_grad[1] else None
        gT = torch.empty(n_feat, d)
        for l, (s, g) in enumerate(zip(sel, grad.float().split([s.raw.numel() for s in sel]))):
            g = (g * (s.raw > 0)).contiguous()
            if gb is not None:
                gb[l].index_add_(0, s.feat, g)
            if gW is not None:
                # stacked selections (stack_selections) address rows N..2N-1: token r mod N
                tok = s.tok if not s.tok.numel() or int(s.tok.max()) < N else s.tok.remainder(N)
                kernels.rows_grad(
                    _np(gT), _np(ctx.xn[l].float().contiguous()), 0, _np(s.fstart), _np(tok), _np(g)
                )
                gW[l].copy_(gT.T)
        return gW, gb, None, None, None


def mask_pairs(mask: Tensor) -> LayerSelection:
    """The True entries of a [N, F] mask as feature-major pairs (raw left empty: the caller
    gathers the values it differentiates, values = pre[sel.tok, sel.feat])."""
    feat, tok = mask.T.contiguous().nonzero(as_tuple=True)  # sorted by (feature, token); on the
    # transposed view itself nonzero ran 15x slower
    fstart = feature_starts(feat, mask.shape[1])
    return LayerSelection(tok.contiguous(), feat.contiguous(), fstart, mask.new_empty(0, dtype=torch.float32))


class PairsDecode(torch.autograd.Function):
    """One source layer's decode, out [N, T·d] = Σ_p values_p · W[f_p] (W [F, T, d], flattened)
    over the pairs of `sel` (feature-major; `mask_pairs`): the kernel counterpart of
    model.SparseDecode, each feature's row read once per call, not once per pair. Backward:
    ∂W[f] = Σ_{p of f} values_p · g[t_p] and ∂values_p = <g[t_p], W[f_p]> in one pass
    (kernels.rows_grad); the ∂W buffer comes from `pool` under `key` where one is given."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, values: Tensor, W: Tensor, sel: LayerSelection, n_tokens: int, pool: GradPool | None, key: tuple
    ) -> Tensor:
        W2 = W.detach().reshape(W.shape[0], -1)
        out = torch.zeros(n_tokens, W2.shape[1])
        coef = values.detach().float().contiguous()
        if sel.tok.numel():
            kernels.decode_into(_np(out), 0, _np(W2), _np(sel.fstart), _np(sel.tok), _np(coef))
        ctx.sel, ctx.pool, ctx.key, ctx.W = sel, pool, key, W
        ctx.save_for_backward(coef)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (coef,) = ctx.saved_tensors
        sel: LayerSelection = ctx.sel
        W: Tensor = ctx.W
        W2 = W.detach().reshape(W.shape[0], -1)
        want_v, want_W = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gW = _fresh(ctx.key, W, tuple(W2.shape), ctx.pool) if want_W else torch.empty(W2.shape)
        dots = kernels.rows_grad(
            _np(gW),
            _np(grad.float().contiguous()),
            0,
            _np(sel.fstart),
            _np(sel.tok),
            _np(coef),
            _np(W2) if want_v else None,
        )
        g_values = torch.from_numpy(dots) if want_v and dots is not None else None
        return g_values, gW.view_as(W) if want_W else None, None, None, None, None


class KernelDecode(torch.autograd.Function):
    """Σ over source layers of values @ W_dec -> [L, N, d] float32 (accumulated in a
    token-major buffer), no biases. Inputs: sel, N, a GradPool or None, then L value tensors
    [P_l], then L decoders W_dec_l [F, T_l, d]."""

    @staticmethod
    def forward(
        ctx, sel: list[LayerSelection], n_tokens: int, pool: GradPool | None, *tensors: Tensor
    ) -> Tensor:
        L = len(sel)
        values, Ws = tensors[:L], tensors[L:]
        d = Ws[0].shape[-1]
        out = torch.zeros(n_tokens, L * d)
        for l, (s, v, W) in enumerate(zip(sel, values, Ws)):
            if s.tok.numel():
                W2 = W.detach().reshape(W.shape[0], -1)
                kernels.decode_into(
                    _np(out), l * d, _np(W2), _np(s.fstart), _np(s.tok), _np(v.float().contiguous())
                )
        ctx.sel, ctx.pool, ctx.Ws = sel, pool, Ws
        ctx.save_for_backward(*values, *Ws)
        # layer-major and contiguous: elementwise ops on the strided view ran 5x slower
        return out.view(n_tokens, L, d).transpose(0, 1).contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor):
        sel: list[LayerSelection] = ctx.sel
        L = len(sel)
        saved = ctx.saved_tensors
        values, Ws = saved[:L], saved[L:]
        N, d = grad.shape[1], grad.shape[2]
        G = grad.float().transpose(0, 1).contiguous().view(N, L * d)
        g_values: list[Tensor | None] = []
        g_Ws: list[Tensor | None] = []
        for l, (s, v, W) in enumerate(zip(sel, values, Ws)):
            want_v, want_W = ctx.needs_input_grad[3 + l], ctx.needs_input_grad[3 + L + l]
            W2 = W.detach().reshape(W.shape[0], -1)
            gW = _fresh(("dec", l), ctx.Ws[l], tuple(W2.shape), ctx.pool)
            dots = kernels.rows_grad(
                _np(gW),
                _np(G),
                l * d,
                _np(s.fstart),
                _np(s.tok),
                _np(v.detach().float().contiguous()),
                _np(W2) if want_v else None,
            )
            g_values.append(torch.from_numpy(dots).to(v.dtype) if want_v and dots is not None else None)
            g_Ws.append(gW.view_as(W) if want_W else None)
        return (None, None, None, *g_values, *g_Ws)
