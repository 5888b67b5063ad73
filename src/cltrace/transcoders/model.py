"""Cross-layer, per-layer and skip transcoders: the math, in one file.

Notation: L layers, d = d_model, F features per layer, N tokens; x_l is the MLP input and
y_l the MLP output of layer l. Inside, activations are normalised per layer by scalars
(x̃_l = s_in_l · x_l, ỹ_l = s_out_l · y_l, chosen so the mean norm is √d); every public
method takes and returns the model's raw scale and applies the scalars itself.

    pre_l = x̃_l · W_enc_l + b_enc_l                                   [N, F]
    a_l   = JumpReLU_θ_l(pre_l) = pre_l · 1[pre_l > θ_l]    (TopK: k largest of pre_l, ReLU'd;
            BatchTopK: the k·N largest of the batch's N·F values, ReLU'd; both train only)
    ỹ̂_t   = Σ_{l ≤ t} a_l · W_dec_{l→t} + b_dec_t  (+ x̃_t · W_skip_t)     CLT; PLT: only l = t
    ŷ_t   = ỹ̂_t / s_out_t

Straight-through estimator, rectangle kernel K(u) = 1[|u| < ½] of width ε (`bandwidth`):
    ∂a/∂pre = 1[pre > θ]            ∂a/∂θ = -(θ/ε) · K((pre - θ)/ε)

Loss per token (averaged over tokens), in normalised space:
    Σ_t ||ỹ̂_t - ỹ_t||²
    + λ_S Σ_{l,i} tanh(c · ||W_dec_{l,i}|| · a_{l,i})
    + λ_P Σ_{l,i} ReLU(θ_{l,i} - pre_{l,i}) · ||W_dec_{l,i}||
where ||W_dec_{l,i}|| is the norm of feature i's decoder vectors over all its targets.
TopK transcoders train on the reconstruction term alone (k fixes L0; there is no θ).

Decoding is sparse where it pays: per source layer, only the (token, feature) pairs that are
active, or that fall inside the STE window so θ needs their gradient, are decoded, with an
embedding-bag (sum of weighted decoder rows; optionally bf16 rows). TopK and
BatchTopK hand their selected pairs straight to the decoder (no dense [L, N, F] activations,
masks or nonzero scans). Decoder gradients exist only for rows with pairs. Layers whose active
set is dense fall back to a matmul. Both paths give the same values and parameter gradients.
TopK / BatchTopK training on CPU goes further (`_kernel_loss`, transcoders/kernel_step.py):
the encoder's product runs outside autograd, and numba kernels differentiate only the
selected pairs, decoders and encoder alike (the torch path stays for CUDA and JumpReLU).

AuxK (dead features, `aux_loss`): the k_aux largest pre-activations among dead features
reconstruct the main residual; weighted by α (1/32 in the TopK SAE literature).

Parameters are stored in normalised scale: W_enc [L, d, F], b_enc [L, F], log_threshold
[L, F], W_dec[l] [F, n_targets(l), d] (CLT: L - l targets, PLT: 1), b_dec [L, d],
W_skip [L, d, d] (skip transcoders), buffers in_scale [L], out_scale [L].
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from cltrace.errors import CltraceError
from cltrace.transcoders import kernels
from cltrace.transcoders.config import TranscoderConfig
from cltrace.transcoders.kernel_step import (
    GradPool,
    KernelDecode,
    LayerSelection,
    SelectedPreacts,
    select_batch_topk,
    select_dead_topk,
    select_topk,
    selection_scores,
    stack_selections,
    topk_selected,
)

WEIGHTS_FILE = "transcoder.safetensors"
CONFIG_FILE = "config.json"


class TranscoderOutput(NamedTuple):
    pre: Tensor  # [..., L, F] pre-activations
    acts: Tensor  # [..., L, F] feature activations
    recon: Tensor  # [..., L, d] reconstructed MLP outputs (raw scale)


class LossOutput(NamedTuple):
    loss: Tensor  # scalar, per token: mse + λ_S·sparsity + λ_P·preact
    mse: Tensor  # scalar, Σ_t ||ỹ̂_t - ỹ_t||² per token (normalised scale)
    sparsity: Tensor  # scalar, Σ tanh(c·||W_dec||·a) per token
    preact: Tensor  # scalar, Σ ReLU(θ - pre)·||W_dec|| per token
    aux: Tensor  # scalar, the AuxK term (0 when off), detached
    counts: Tensor  # [L, F] tokens of the batch each feature is active on (detached)
    recon: Tensor  # [L, N, d] detached reconstruction (normalised scale)
    target: Tensor  # [L, N, d] normalised targets


class JumpReLU(torch.autograd.Function):
    """a = pre · 1[pre > θ]; STE gradients as in the module docstring. θ broadcasts to pre."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > theta)
        in_window = (pre - theta).abs() < eps / 2
        grad_theta = (-(theta / eps) * grad * in_window).sum_to_size(theta.shape)
        return grad_pre, grad_theta, None


def _sort_order(key: Tensor, bound: int) -> Tensor:
    """Indices sorting the distinct non-negative keys (< bound). int32 keys where they fit: on
    CPU torch's int64 sort was 20-250x slower than its int32 one on a busy 2-core machine."""
    if bound < 2**31:
        return key.to(torch.int32).sort().indices
    return key.sort().indices


def _offsets(index: Tensor, n_bags: int) -> Tensor:
    """Start of each bag in a sorted index: [n_bags]."""
    counts = torch.bincount(index, minlength=n_bags)
    return torch.cumsum(counts, 0) - counts


class Pairs(NamedTuple):
    """The active (token, feature) pairs of one source layer, token-major (tok non-decreasing)."""

    tok: Tensor  # [P] long
    feat: Tensor  # [P] long
    values: Tensor  # [P] activations (carry the autograd graph)


def pairs_from_mask(a: Tensor, mask: Tensor) -> Pairs:
    """Pairs of a [N, F] activation where `mask` holds (one nonzero, row-major = token-major)."""
    tok, feat = mask.nonzero(as_tuple=True)
    return Pairs(tok, feat, a[tok, feat])


def pairs_topk(pre: Tensor, k: int, bias: Tensor | None = None) -> list[Pairs]:
    """TopK per token: pre [L, N, F] -> per layer the k largest of each token, ReLU'd (chosen
    by selection_scores(pre, bias), bias [L, 1, F], when a selection bias is given; the values
    stay pre's)."""
    L, N, _ = pre.shape
    values, index = topk_selected(pre, k, bias)  # [L, N, k]
    values = values.relu()
    tok = torch.arange(N, device=pre.device).repeat_interleave(k)
    return [Pairs(tok, index[l].reshape(-1), values[l].reshape(-1)) for l in range(L)]


def pairs_batch_topk(pre: Tensor, k: int, bias: Tensor | None = None) -> list[Pairs]:
    """BatchTopK: per layer the k·N largest of all N·F pre-activations, ReLU'd (a token may
    get more or fewer than k; chosen by selection_scores(pre, bias) when a selection bias is
    given)."""
    L, N, n_feat = pre.shape
    keep = min(k * N, N * n_feat)
    if bias is None:
        values, flat = pre.reshape(L, N * n_feat).topk(keep, dim=-1)  # [L, k·N]
    else:
        flat = selection_scores(pre, bias).reshape(L, N * n_feat).topk(keep, dim=-1).indices
        values = pre.reshape(L, N * n_feat).gather(-1, flat)
    order = torch.stack([_sort_order(f, N * n_feat) for f in flat])  # token-major
    flat, values = flat.gather(-1, order), values.gather(-1, order).relu()
    return [Pairs(flat[l] // n_feat, flat[l] % n_feat, values[l]) for l in range(L)]


def _batch_topk(flat: Tensor, k: int, n_tokens: int, scores: Tensor | None = None) -> Tensor:
    """Rows of flat [G, N·F]: keep the k·N largest of each row (of `scores` when given),
    ReLU'd, zero elsewhere."""
    index = (flat if scores is None else scores).topk(min(k * n_tokens, flat.shape[-1]), dim=-1).indices
    return torch.zeros_like(flat).scatter(-1, index, flat.gather(-1, index).relu())


def pairs_to_dense(p: Pairs, n_tokens: int, n_features: int) -> Tensor:
    """[N, F] activations from pairs (differentiable in the values)."""
    dense = p.values.new_zeros(n_tokens, n_features)
    return dense.index_put((p.tok, p.feat), p.values)


def _wants_bf16(device: torch.device) -> bool:
    return torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == torch.bfloat16


class SparseDecode(torch.autograd.Function):
    """out[n] = Σ_k values[k] · W[feat[k]] over the pairs k with tok[k] = n (tok sorted).

    Forward: an embedding bag per token over the active rows (bf16 rows when `low_precision`:
    W is cast once per call, then the bag reads half the bytes). Backward, with only the given
    pairs read or given gradients:
      ∂values[k] = <g[tok_k], W[feat_k]>   a sampled dense-dense product (float32)
      ∂W[f]      = Σ_{k: feat_k = f} values[k] · g[tok_k]   a bag per feature over g's rows,
    with the pairs put in feature order by sorting (feat, tok) keys (rows without pairs get 0).
    """

    @staticmethod
    def forward(
        ctx, values: Tensor, W: Tensor, tok: Tensor, feat: Tensor, n_tokens: int, low_precision: bool
    ) -> Tensor:
        offsets = _offsets(tok, n_tokens)
        ctx.save_for_backward(values, W, tok, feat, offsets)
        table = W.to(torch.bfloat16) if low_precision else W
        out = F.embedding_bag(feat, table, offsets, mode="sum", per_sample_weights=values.to(table.dtype))
        return out.float()

    @staticmethod
    def backward(ctx, grad: Tensor):
        values, W, tok, feat, offsets = ctx.saved_tensors
        n_tokens, n_features = grad.shape[0], W.shape[0]
        grad = grad.to(W.dtype).contiguous()
        grad_values = grad_W = None
        if ctx.needs_input_grad[0]:
            crow = torch.cat([offsets, offsets.new_tensor([tok.numel()])])
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore")
                pattern = torch.sparse_csr_tensor(
                    crow, feat, W.new_ones(tok.numel()), size=(n_tokens, n_features), check_invariants=False
                )
            grad_values = torch.sparse.sampled_addmm(pattern, grad, W.T, beta=0.0)
            grad_values = grad_values.values().to(values.dtype)
        if ctx.needs_input_grad[1]:
            order = _sort_order(feat * n_tokens + tok, n_features * n_tokens)  # (feature, token)
            by_feature = _offsets(feat[order], n_features)
            grad_W = F.embedding_bag(
                tok[order],
                grad,
                by_feature,
                mode="sum",
                per_sample_weights=values.detach()[order].to(W.dtype),
            )
        return grad_values, grad_W, None, None, None, None


class AccumulateTargets(torch.autograd.Function):
    """recon[t] = Σ_{l ≤ t} outs[l][:, t - l]: each source layer's [N, T·d] decode added into
    the targets it writes (layer-major [L, N, d]); backward hands each its slab, no zero-fills."""

    @staticmethod
    def forward(ctx, shape: tuple[int, int, int], *outs: Tensor) -> Tensor:
        L, N, d = shape
        recon = torch.zeros(shape, device=outs[0].device, dtype=torch.float32)
        for l, out in enumerate(outs):
            T = out.shape[1] // d
            recon[l : l + T] += out.view(N, T, d).transpose(0, 1)
        ctx.widths = [out.shape[1] // d for out in outs]
        ctx.dtypes = [out.dtype for out in outs]
        return recon

    @staticmethod
    def backward(ctx, grad: Tensor):
        N = grad.shape[1]
        slabs = [
            grad[l : l + T].transpose(0, 1).reshape(N, -1).to(dt)
            for l, (T, dt) in enumerate(zip(ctx.widths, ctx.dtypes))
        ]
        return (None, *slabs)


class Transcoder(nn.Module):
    """CLT / PLT / skip transcoder with JumpReLU or TopK features (see module docstring)."""

    sparse_max_density = 0.05  # decode a source layer sparsely below this fraction of pairs
    # sparse decode reads bf16 rows under bf16 autocast: off, since casting W per step cost more
    # than the halved row reads saved (bench_train: CLT 18x1024 108-115 tokens/s fp32 rows vs
    # 63-74 bf16 rows, same run, Sapphire Rapids AMX); kept as an option for other machines
    decode_bf16 = False
    # TopK / BatchTopK training on CPU takes the numba kernels (transcoders/kernel_step.py);
    # False forces the torch path (SparseDecode / matmuls), as on CUDA
    use_kernels = True

    # buffers (registered in __init__), declared so their type is Tensor rather than nn.Module's
    # `__getattr__` result (Tensor | Module)
    in_scale: Tensor
    out_scale: Tensor
    select_bias: Tensor

    def __init__(self, cfg: TranscoderConfig):
        super().__init__()
        self.cfg = cfg
        L, d, n_feat = cfg.n_layers, cfg.d_model, cfg.n_features
        self.W_enc = nn.Parameter(torch.empty(L, d, n_feat))
        self.b_enc = nn.Parameter(torch.zeros(L, n_feat))
        self.log_threshold = nn.Parameter(torch.full((L, n_feat), math.log(cfg.init_threshold)))
        self.W_dec = nn.ParameterList(
            [nn.Parameter(torch.empty(n_feat, cfg.n_targets(l), d)) for l in range(L)]
        )
        self.b_dec = nn.Parameter(torch.zeros(L, d))
        self.W_skip = nn.Parameter(torch.zeros(L, d, d)) if cfg.skip else None
        self.register_buffer("in_scale", torch.ones(L))
        self.register_buffer("out_scale", torch.ones(L))
        # TopK / BatchTopK training: added to the pre-activations for the selection only (the
        # trainer's load balancing, `balance_rate`); folded into JumpReLU thresholds at the end
        self.register_buffer("select_bias", torch.zeros(L, n_feat), persistent=False)
        self._grad_pool = GradPool()  # gradient storage reused by the kernel path's backward
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """W_enc ~ U(±1/√F), W_dec ~ U(±1/√(L·d)), θ = init_threshold, biases 0."""
        cfg = self.cfg
        bound_enc = 1 / math.sqrt(cfg.n_features)
        self.W_enc.uniform_(-bound_enc, bound_enc, generator=generator)
        bound_dec = 1 / math.sqrt(cfg.n_layers * cfg.d_model)
        for W in self.W_dec:
            W.uniform_(-bound_dec, bound_dec, generator=generator)
        self.b_enc.zero_()
        self.b_dec.zero_()
        self.log_threshold.fill_(math.log(cfg.init_threshold))
        if self.W_skip is not None:
            self.W_skip.zero_()

    @torch.no_grad()
    def init_from_sample(
        self,
        x: Float[Tensor, "N L d"],
        y: Float[Tensor, "N L d"],
        fire_frac: float | None = None,
        *,
        centre_targets: bool = False,
    ) -> None:
        """Set the norm scalars from a raw sample, and b_enc: so each JumpReLU feature fires
        on `fire_frac` of the sample (default min(10⁴/F, 0.05)) at the initial θ; so each
        TopK / BatchTopK feature's pre-activation has mean 0 over the sample.

        Targets are scaled so that each layer's mean norm is √d. With `centre_targets`, b_dec
        starts at each layer's mean target and the scale makes each layer's *centred* targets'
        mean squared norm d: the features start from the mean instead of having to carry it,
        and every layer's squared error weighs 1 / its variance, so the summed loss is the
        sum of the per-layer normalised MSEs `evaluate_activations` reports. (Gemma 3's MLP
        outputs: layer 7's mean is 82% of its mean square; layer 0's variance, in the mean-norm
        scale, is 15x layer 7's.)"""
        d = self.cfg.d_model
        x, y = x.float(), y.float()
        self.in_scale.copy_(math.sqrt(d) / x.norm(dim=-1).mean(0).clamp_min(1e-12))
        if centre_targets:
            mean = y.mean(0)  # [L, d]
            centred_rms = (y - mean).pow(2).sum(-1).mean(0).sqrt()  # [L]
            self.out_scale.copy_(math.sqrt(d) / centred_rms.clamp_min(1e-12))
            self.b_dec.copy_((mean * self.out_scale[:, None]).to(self.b_dec.device))
        else:
            self.out_scale.copy_(math.sqrt(d) / y.norm(dim=-1).mean(0).clamp_min(1e-12))
            self.b_dec.zero_()
        xn = self._normalise(x.to(self.W_enc.device), self.in_scale)
        if self.cfg.activation != "jumprelu":
            # centre each feature's pre-activation on the sample, so that no feature starts out
            # of the selection for the mean direction MLP inputs share
            self.b_enc.copy_(-torch.einsum("lnd,ldf->lf", xn, self.W_enc) / xn.shape[1])
            return
        p = fire_frac if fire_frac is not None else min(1e4 / self.cfg.n_features, 0.05)
        n = xn.shape[1]
        k = min(n - 1, max(1, math.ceil((1 - p) * n))) if n > 1 else 1
        theta = self.log_threshold.exp()
        for l in range(self.cfg.n_layers):
            z = xn[l] @ self.W_enc[l]  # [N, F]
            lo = z.kthvalue(k, dim=0).values
            hi = z.kthvalue(k + 1, dim=0).values if n > 1 else lo + 1e-3
            self.b_enc[l] = theta[l] - (lo + hi) / 2  # θ midway between two sample values

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every feature so that its decoder vectors (all its targets together) have
        norm 1, folding the norm into its encoder column, bias and threshold. A JumpReLU
        transcoder's outputs are unchanged; TopK / BatchTopK then select by each feature's
        contribution a·||W_dec|| rather than by an activation whose scale the encoder and
        decoder can trade (a feature winning the selection with a grown encoder and a shrunk
        decoder)."""
        for l in range(self.cfg.n_layers):
            n = torch.linalg.vector_norm(self.W_dec[l], dim=(1, 2)).clamp_min(1e-12)  # [F]
            self.W_dec[l].div_(n[:, None, None])
            self.W_enc[l].mul_(n)
            self.b_enc[l].mul_(n)
            self.log_threshold[l].add_(n.log())

    # ---- internal, normalised, layer-major [L, N, ...] ----

    @staticmethod
    def _normalise(v: Tensor, scale: Tensor) -> Tensor:
        """[N, L, d] raw -> [L, N, d] normalised (contiguous)."""
        return (v.transpose(0, 1) * scale[:, None, None].to(v.dtype)).contiguous()

    def _encode(self, xn: Tensor) -> Tensor:
        """[L, N, d] -> pre [L, N, F] (float32; the matmul follows autocast)."""
        return torch.baddbmm(self.b_enc[:, None, :], xn, self.W_enc).float()

    def _k(self) -> int:
        """k of a TopK / BatchTopK transcoder (TranscoderConfig checks it is set for those)."""
        if self.cfg.topk is None:
            raise CltraceError(f"activation={self.cfg.activation!r} needs topk, got None")
        return self.cfg.topk

    def _activate(self, pre: Tensor, theta: Tensor | None, bias: Tensor | None = None) -> Tensor:
        """Dense activations of layer-major pre [L, N, F] (or one layer's [N, F]); θ is used
        (and needed) by JumpReLU only; TopK / BatchTopK select by selection_scores(pre, bias)
        (bias broadcast to pre) when a selection bias is given."""
        act = self.cfg.activation
        if act == "jumprelu":
            if theta is None:
                raise CltraceError("a JumpReLU transcoder needs its threshold θ to activate")
            return JumpReLU.apply(pre, theta, self.cfg.bandwidth)
        if act == "batchtopk":
            scores = None if bias is None else selection_scores(pre, bias)
            rows = pre.shape[-2] * pre.shape[-1]
            return _batch_topk(
                pre.reshape(-1, rows),
                self._k(),
                pre.shape[-2],
                None if scores is None else scores.reshape(-1, rows),
            ).view_as(pre)
        values, index = topk_selected(pre, self._k(), bias)
        return torch.zeros_like(pre).scatter(-1, index, values.relu())

    def _pairs(self, pre: Tensor, theta: Tensor) -> tuple[list[Pairs], Tensor | None]:
        """(per-layer pairs to decode, dense activations or None) for pre [L, N, F].
        JumpReLU under autograd: the active pairs and those inside the STE window (θ needs
        their gradient); TopK / BatchTopK: the selected pairs, without a dense [L, N, F]."""
        act = self.cfg.activation
        bias = self._selection_bias()
        if act == "topk":
            return pairs_topk(pre, self._k(), bias), None
        if act == "batchtopk":
            return pairs_batch_topk(pre, self._k(), bias), None
        acts = self._activate(pre, theta)
        mask = pre > theta - self.cfg.bandwidth / 2 if torch.is_grad_enabled() else acts != 0
        return [pairs_from_mask(acts[l], mask[l]) for l in range(pre.shape[0])], acts

    def _decode_layer(self, p: Pairs, n_tokens: int, W: Tensor, dense: bool) -> Tensor:
        """One source layer's pairs @ W [F, T·d] -> [N, T·d], sparse where it pays."""
        n_feat = W.shape[0]
        if dense or p.tok.numel() > self.sparse_max_density * n_tokens * n_feat:
            return pairs_to_dense(p, n_tokens, n_feat) @ W
        low = self.decode_bf16 and _wants_bf16(W.device)
        return SparseDecode.apply(p.values, W, p.tok, p.feat, n_tokens, low)

    def _decode_pairs(self, pairs: list[Pairs], n_tokens: int, dense: bool = False) -> Tensor:
        """Σ over source layers of the decoded pairs: [L, N, d] float32, no biases."""
        L, d = self.cfg.n_layers, self.cfg.d_model
        outs = [
            self._decode_layer(p, n_tokens, W.view(W.shape[0], -1), dense) for p, W in zip(pairs, self.W_dec)
        ]  # [N, T·d] each
        return AccumulateTargets.apply((L, n_tokens, d), *outs)

    def _decode_dense(self, acts: Tensor) -> Tensor:
        """acts [L, N, F] @ decoders, every entry (gradients w.r.t. all of acts): [L, N, d]."""
        L, N, d = self.cfg.n_layers, acts.shape[1], self.cfg.d_model
        outs = [a @ W.view(W.shape[0], -1) for a, W in zip(acts.unbind(0), self.W_dec)]
        return AccumulateTargets.apply((L, N, d), *outs)

    def _finish_decode(
        self, recon: Tensor, xn: Tensor | None, reduce: Callable[[Tensor], Tensor] | None = None
    ) -> Tensor:
        """Feature part [L, N, d] -> normalised reconstruction: `reduce` sums the features' part
        over feature shards (distributed training), then the biases and the skip term."""
        if reduce is not None:
            recon = reduce(recon)
        recon = recon + self.b_dec[:, None, :]
        if self.W_skip is not None:
            if xn is None:
                raise CltraceError("a skip transcoder needs the MLP input x to decode")
            recon = recon + torch.bmm(xn, self.W_skip).float()
        return recon

    def _decode(self, acts: Tensor, xn: Tensor | None, dense: bool = False) -> Tensor:
        """acts [L, N, F] -> normalised reconstruction [L, N, d] (float32); sparse over the
        nonzero entries unless `dense`."""
        if dense:
            return self._finish_decode(self._decode_dense(acts), xn)
        pairs = [pairs_from_mask(a, a != 0) for a in acts.unbind(0)]
        return self._finish_decode(self._decode_pairs(pairs, acts.shape[1]), xn)

    def decoder_norms(self) -> Tensor:
        """||W_dec_{l,i}|| over all targets, normalised scale: [L, F]."""
        return torch.stack([torch.linalg.vector_norm(W, dim=(1, 2)) for W in self.W_dec])

    def loss(
        self,
        x: Float[Tensor, "N L d"],
        y: Float[Tensor, "N L d"],
        *,
        lambda_s: float,
        lambda_p: float,
        c: float = 4.0,
        reduce: Callable[[Tensor], Tensor] | None = None,
        dead: Tensor | None = None,
        auxk: int = 0,
        auxk_alpha: float = 0.0,
    ) -> LossOutput:
        """The training loss on raw-scale MLP inputs x and outputs y (module docstring), plus
        the AuxK term when `dead` [L, F] marks dead features and auxk_alpha > 0 (see `aux_loss`).
        TopK / BatchTopK on CPU run through the numba kernels (`_kernel_loss`).
        Penalties cover this module's features only (a shard's, under feature sharding)."""
        n_tokens = x.shape[0]
        xn, yn = self._normalise(x, self.in_scale), self._normalise(y, self.out_scale)
        if self._kernel_path(xn):
            return self._kernel_loss(xn, yn, reduce=reduce, dead=dead, auxk=auxk, auxk_alpha=auxk_alpha)
        theta = self.log_threshold.exp()[:, None, :]  # [L, 1, F]
        pre = self._encode(xn)  # [L, N, F]
        pairs, acts = self._pairs(pre, theta)
        recon = self._finish_decode(self._decode_pairs(pairs, n_tokens), xn, reduce)
        mse = (recon - yn.float()).pow(2).sum() / n_tokens
        zero = mse.new_zeros(())
        jump = self.cfg.activation == "jumprelu"  # TopK fixes L0 itself and has no θ
        use_s, use_p = bool(lambda_s) and jump, bool(lambda_p) and jump
        sparsity = preact = zero
        if use_s or use_p:
            norms = self.decoder_norms()[:, None, :]  # [L, 1, F]
            if use_s:
                if acts is None:  # _pairs returns dense activations for JumpReLU, the only use_s case
                    raise CltraceError("the sparsity penalty needs dense JumpReLU activations")
                sparsity = torch.tanh(c * norms * acts).sum() / n_tokens
            if use_p:
                preact = (F.relu(theta - pre) * norms).sum() / n_tokens
        aux = zero
        if auxk_alpha and auxk and dead is not None and bool(dead.any()):
            target_var = (yn - yn.mean(dim=1, keepdim=True)).pow(2).sum() / n_tokens
            aux = self.aux_loss(pre, dead, auxk, (yn - recon).detach(), target_var)
        loss = mse + lambda_s * sparsity + lambda_p * preact + auxk_alpha * aux
        counts = torch.stack(
            [torch.bincount(p.feat[p.values > 0], minlength=pre.shape[-1]) for p in pairs]
        ).detach()
        return LossOutput(loss, mse, sparsity, preact, aux.detach(), counts, recon.detach(), yn)

    def _kernel_path(self, xn: Tensor) -> bool:
        """TopK / BatchTopK on CPU with the numba kernels available (transcoders/kernel_step.py)."""
        return (
            self.use_kernels
            and self.cfg.activation != "jumprelu"
            and xn.device.type == "cpu"
            and kernels.available()
        )

    def _selection_bias(self) -> Tensor | None:
        """select_bias as [L, 1, F], or None while it is all zero."""
        return self.select_bias[:, None, :] if bool(self.select_bias.any()) else None

    def _select(self, pre: Tensor) -> list[LayerSelection]:
        bias = self._selection_bias()
        if self.cfg.activation == "topk":
            return select_topk(pre, self._k(), bias)
        return select_batch_topk(pre, self._k(), bias)

    def _decode_selected(
        self, sel: list[LayerSelection], xn: Tensor, pooled: bool, n_rows: int | None = None
    ) -> Tensor:
        """The selected pairs' ReLU'd pre-activations decoded (kernels; gradients for the
        encoder and the decoders, in pooled storage if `pooled`): [L, n_rows, d] float32, no
        biases; n_rows is N, or 2·N for stacked selections (`stack_selections`)."""
        pool = self._grad_pool if pooled else None
        values = SelectedPreacts.apply(self.W_enc, self.b_enc, xn, sel, pool)
        parts = values.split([s.raw.numel() for s in sel])
        return KernelDecode.apply(sel, n_rows or xn.shape[1], pool, *parts, *self.W_dec)

    def _kernel_loss(
        self,
        xn: Tensor,
        yn: Tensor,
        *,
        reduce: Callable[[Tensor], Tensor] | None,
        dead: Tensor | None,
        auxk: int,
        auxk_alpha: float,
    ) -> LossOutput:
        """`loss` for TopK / BatchTopK through the kernels: the encoder's product runs without
        autograd, only the selected pairs are differentiated."""
        n_tokens, n_feat = xn.shape[1], self.cfg.n_features
        with torch.no_grad():
            pre = torch.baddbmm(self.b_enc[:, None, :], xn, self.W_enc)  # [L, N, F], autocast dtype
        sel = self._select(pre)
        counts = torch.stack([torch.bincount(s.feat[s.raw > 0], minlength=n_feat) for s in sel])
        with_aux = bool(auxk_alpha and auxk and dead is not None and bool(dead.any()))
        if not with_aux:
            recon = self._finish_decode(self._decode_selected(sel, xn, pooled=True), xn, reduce)
            mse = (recon - yn.float()).pow(2).sum() / n_tokens
            zero = mse.new_zeros(())
            return LossOutput(mse, mse, zero, zero, zero, counts, recon.detach(), yn)
        # AuxK's pairs decode in the same pass as the main ones (rows N..2N-1): each decoder is
        # read once in the forward and its gradient written once in the backward
        assert dead is not None
        aux_sel = select_dead_topk(pre, dead, auxk)
        both = self._decode_selected(stack_selections(sel, aux_sel, n_tokens), xn, True, 2 * n_tokens)
        recon = self._finish_decode(both[:, :n_tokens], xn, reduce)
        mse = (recon - yn.float()).pow(2).sum() / n_tokens
        target_var = (yn - yn.mean(dim=1, keepdim=True)).pow(2).sum() / n_tokens
        aux = self._aux_value(both[:, n_tokens:], (yn - recon).detach(), target_var, dead, auxk)
        zero = mse.new_zeros(())
        loss = mse + auxk_alpha * aux
        return LossOutput(loss, mse, zero, zero, aux.detach(), counts, recon.detach(), yn)

    def aux_loss(self, pre: Tensor, dead: Tensor, k_aux: int, residual: Tensor, target_var: Tensor) -> Tensor:
        """AuxK (Gao et al. 2024): the dead features' k_aux largest pre-activations per token and
        layer (ReLU'd) decode, without biases, the main reconstruction's residual e [L, N, d]:
            aux = s · Σ||ê - e||² / Σ||e - ē||² · Σ||ỹ - mean ỹ||² / N,   s = mean_l min(1, dead_l / k_aux)
        i.e. the residual's normalised error, in the units of the main mse term (per token, summed
        over layers), so that α = 1/32 weighs it as in the TopK SAE literature. (The kernel path,
        `_kernel_loss`, decodes the same pairs together with the main ones.)"""
        L, N, _ = pre.shape
        k = int(min(k_aux, int(dead.sum(-1).max())))
        masked = pre.masked_fill(~dead[:, None, :], float("-inf"))
        values, index = masked.topk(k, dim=-1)  # [L, N, k]
        tok = torch.arange(N, device=pre.device).repeat_interleave(k)
        values = values.relu().nan_to_num(0.0)
        pairs = [Pairs(tok, index[l].reshape(-1), values[l].reshape(-1)) for l in range(L)]
        return self._aux_value(self._decode_pairs(pairs, N), residual, target_var, dead, k_aux)

    @staticmethod
    def _aux_value(e_hat: Tensor, residual: Tensor, target_var: Tensor, dead: Tensor, k_aux: int) -> Tensor:
        """The AuxK term (`aux_loss`) from the dead features' decode ê [L, N, d]."""
        centred = residual - residual.mean(dim=1, keepdim=True)
        scale = (dead.sum(-1).float() / k_aux).clamp(max=1.0).mean()
        return scale * (e_hat - residual).pow(2).sum() / centred.pow(2).sum().clamp_min(1e-12) * target_var

    # ---- public API, raw scale, token-major [..., L, ...] ----

    def encode(self, x: Float[Tensor, "... L d"]) -> Float[Tensor, "... L F"]:
        lead = x.shape[:-2]
        xn = self._normalise(x.reshape(-1, *x.shape[-2:]), self.in_scale)
        return self._encode(xn).transpose(0, 1).reshape(*lead, *self.log_threshold.shape)

    def activate(self, pre: Float[Tensor, "... L F"]) -> Float[Tensor, "... L F"]:
        """BatchTopK selects over all the tokens given (it is converted to JumpReLU after training)."""
        if self.cfg.activation == "batchtopk":
            flat = pre.reshape(-1, *pre.shape[-2:]).transpose(0, 1)  # [L, N, F]
            return self._activate(flat, None, self._selection_bias()).transpose(0, 1).reshape(pre.shape)
        bias = self.select_bias if self.cfg.activation == "topk" and bool(self.select_bias.any()) else None
        return self._activate(pre, self.log_threshold.exp(), bias)

    def activate_layer(self, pre: Float[Tensor, "... F"], layer: int) -> Float[Tensor, "... F"]:
        """The activation function of one layer's features."""
        bias = self.select_bias[layer] if bool(self.select_bias[layer].any()) else None
        if self.cfg.activation == "batchtopk":
            return self._activate(pre.reshape(-1, pre.shape[-1]), None, bias).view_as(pre)
        return self._activate(
            pre, self.log_threshold[layer].exp(), bias if self.cfg.activation == "topk" else None
        )

    def decode(
        self, acts: Float[Tensor, "... L F"], x: Float[Tensor, "... L d"] | None = None
    ) -> Float[Tensor, "... L d"]:
        """Raw-scale reconstruction. Sparse unless gradients w.r.t. `acts` are wanted."""
        lead, L = acts.shape[:-2], self.cfg.n_layers
        a = acts.reshape(-1, L, acts.shape[-1]).transpose(0, 1)
        xn = None if x is None else self._normalise(x.reshape(-1, L, x.shape[-1]), self.in_scale)
        dense = acts.requires_grad and torch.is_grad_enabled()
        recon = self._decode(a, xn, dense=dense) / self.out_scale[:, None, None]
        return recon.transpose(0, 1).reshape(*lead, L, self.cfg.d_model)

    def forward(self, x: Float[Tensor, "... L d"]) -> TranscoderOutput:
        pre = self.encode(x)
        acts = self.activate(pre)
        return TranscoderOutput(pre, acts, self.decode(acts, x if self.W_skip is not None else None))

    @torch.no_grad()
    def encoder_weight(self, layer: int) -> Float[Tensor, "d F"]:
        return self.W_enc[layer] * self.in_scale[layer]

    @torch.no_grad()
    def encoder_bias(self, layer: int) -> Float[Tensor, "F"]:
        return self.b_enc[layer].clone()

    @torch.no_grad()
    def threshold(self, layer: int) -> Float[Tensor, "F"]:
        """θ comparable with raw-scale pre-activations (0 for TopK / BatchTopK, which have none)."""
        if self.cfg.activation != "jumprelu":
            return torch.zeros_like(self.log_threshold[layer])
        return self.log_threshold[layer].exp()

    @torch.no_grad()
    def decoder_weight(self, layer: int) -> Float[Tensor, "F T d"]:
        T = self.cfg.n_targets(layer)
        return self.W_dec[layer] / self.out_scale[layer : layer + T][None, :, None]

    @torch.no_grad()
    def decoder_bias(self) -> Float[Tensor, "L d"]:
        return self.b_dec / self.out_scale[:, None]

    @torch.no_grad()
    def skip_weight(self, layer: int) -> Float[Tensor, "d d"] | None:
        """Raw scale: ŷ_l gains x_l @ skip_weight(l)."""
        if self.W_skip is None:
            return None
        return self.W_skip[layer] * (self.in_scale[layer] / self.out_scale[layer])

    @torch.no_grad()
    def fold_scales(self) -> "Transcoder":
        """Fold the normalisation scalars into the weights (scalars become 1); outputs unchanged."""
        for l in range(self.cfg.n_layers):
            self.W_dec[l].copy_(self.decoder_weight(l))
            skip = self.skip_weight(l)
            if self.W_skip is not None and skip is not None:
                self.W_skip[l].copy_(skip)
            self.W_enc[l].mul_(self.in_scale[l])
        self.b_dec.copy_(self.decoder_bias())
        self.in_scale.fill_(1.0)
        self.out_scale.fill_(1.0)
        return self

    # ---- persistence ----

    def save(self, directory: str | Path) -> Path:
        """Write transcoder.safetensors and config.json atomically into `directory`."""
        from cltrace.transcoders.checkpoint import atomic_save_tensors, atomic_write_json

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_save_tensors(tensors, directory / WEIGHTS_FILE, {"format": "cltrace-transcoder-1"})
        atomic_write_json(self.cfg.to_dict(), directory / CONFIG_FILE)
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> "Transcoder":
        """Load a transcoder saved by `save`; CltraceError on missing, corrupt or mismatched files."""
        from cltrace.transcoders.checkpoint import load_tensors, read_json

        directory = Path(directory)
        cfg = TranscoderConfig.from_dict(read_json(directory / CONFIG_FILE))
        tc = cls(cfg)
        tensors = load_tensors(directory / WEIGHTS_FILE)
        load_state_checked(tc, tensors, directory / WEIGHTS_FILE)
        return tc.to(device)


def load_state_checked(module: nn.Module, tensors: dict[str, Tensor], path: Path) -> None:
    """Copy `tensors` into `module`'s state, with a CltraceError naming `path` on any mismatch."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CltraceError(
            f"{path}: tensors do not match the config (missing {missing[:5]}, unexpected {extra[:5]})"
        )
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CltraceError(
                f"{path}: tensor {key} has shape {tuple(value.shape)}, "
                f"the config needs {tuple(expected[key].shape)}"
            )
        if not value.dtype.is_floating_point:
            raise CltraceError(f"{path}: tensor {key} has dtype {value.dtype}, expected a float type")
    module.load_state_dict({k: v.float() for k, v in tensors.items()})


__all__ = [
    "Transcoder",
    "TranscoderConfig",
    "TranscoderOutput",
    "LossOutput",
    "JumpReLU",
    "load_state_checked",
    "WEIGHTS_FILE",
    "CONFIG_FILE",
]
