"""Cross-layer, per-layer and skip transcoders: the math, in one file.

Notation: L layers, d = d_model, F features per layer, N tokens; x_l is the MLP input and
y_l the MLP output of layer l. Inside, activations are normalised per layer by scalars
(x̃_l = s_in_l · x_l, ỹ_l = s_out_l · y_l, chosen so the mean norm is √d); every public
method takes and returns the model's raw scale and applies the scalars itself.

    pre_l = x̃_l · W_enc_l + b_enc_l                                   [N, F]
    a_l   = JumpReLU_θ_l(pre_l) = pre_l · 1[pre_l > θ_l]    (TopK: k largest of pre_l, ReLU'd)
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
embedding-bag (sum of weighted decoder rows). Layers whose active set is dense fall back to a
bf16 matmul. Both paths give the same values and parameter gradients.

Parameters are stored in normalised scale: W_enc [L, d, F], b_enc [L, F], log_threshold
[L, F], W_dec[l] [F, n_targets(l), d] (CLT: L - l targets, PLT: 1), b_dec [L, d],
W_skip [L, d, d] (skip transcoders), buffers in_scale [L], out_scale [L].
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from cltrace.errors import CltraceError
from cltrace.transcoders.config import TranscoderConfig

WEIGHTS_FILE = "transcoder.safetensors"
CONFIG_FILE = "config.json"


class TranscoderOutput(NamedTuple):
    pre: Tensor    # [..., L, F] pre-activations
    acts: Tensor   # [..., L, F] feature activations
    recon: Tensor  # [..., L, d] reconstructed MLP outputs (raw scale)


class LossOutput(NamedTuple):
    loss: Tensor      # scalar, per token: mse + λ_S·sparsity + λ_P·preact
    mse: Tensor       # scalar, Σ_t ||ỹ̂_t - ỹ_t||² per token (normalised scale)
    sparsity: Tensor  # scalar, Σ tanh(c·||W_dec||·a) per token
    preact: Tensor    # scalar, Σ ReLU(θ - pre)·||W_dec|| per token
    acts: Tensor      # [L, N, F] detached activations
    recon: Tensor     # [L, N, d] detached reconstruction (normalised scale)
    target: Tensor    # [L, N, d] normalised targets


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


def _offsets(index: Tensor, n_bags: int) -> Tensor:
    """Start of each bag in a sorted index: [n_bags]."""
    counts = torch.bincount(index, minlength=n_bags)
    return torch.cumsum(counts, 0) - counts


class SparseDecode(torch.autograd.Function):
    """out[n] = Σ_k values[k] · W[feat[k]] over pairs k with tok[k] = n.

    The pairs come twice: token-major (tok, feat) for the forward bag and the value gradient
    <g[tok_k], W[feat_k]> (a sampled dense-dense product), and feature-major
    (tok_f, feat_f, index of each pair in the token-major list) for the W gradient, which
    bags g rows per feature. Only the given pairs are read or get gradients; fp32 throughout
    (casting W would cost a full pass over it, the bags read only the active rows).
    """

    @staticmethod
    def forward(ctx, values: Tensor, W: Tensor, tok: Tensor, feat: Tensor, tok_f: Tensor,
                feat_f: Tensor, perm: Tensor, n_tokens: int) -> Tensor:
        offsets = _offsets(tok, n_tokens)
        ctx.save_for_backward(values, W, tok, feat, tok_f, feat_f, perm, offsets)
        return F.embedding_bag(feat, W, offsets, mode="sum", per_sample_weights=values.to(W.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor):
        values, W, tok, feat, tok_f, feat_f, perm, offsets = ctx.saved_tensors
        n_tokens, n_features = grad.shape[0], W.shape[0]
        grad = grad.to(W.dtype)
        grad_values = grad_W = None
        if ctx.needs_input_grad[0]:
            crow = torch.cat([offsets, offsets.new_tensor([tok.numel()])])
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore")
                pattern = torch.sparse_csr_tensor(crow, feat, W.new_ones(tok.numel()),
                                                  size=(n_tokens, n_features), check_invariants=False)
            grad_values = torch.sparse.sampled_addmm(pattern, grad, W.T, beta=0.0)
            grad_values = grad_values.values().to(values.dtype)
        if ctx.needs_input_grad[1]:
            by_feature = _offsets(feat_f, n_features)
            grad_W = F.embedding_bag(tok_f, grad, by_feature, mode="sum",
                                     per_sample_weights=values.detach()[perm].to(W.dtype))
        return grad_values, grad_W, None, None, None, None, None, None


class AccumulateTargets(torch.autograd.Function):
    """recon[t] = Σ_{l ≤ t} outs[l][:, t - l]: each source layer's [N, T·d] decode added into
    the targets it writes (layer-major [L, N, d]); backward hands each its slab, no zero-fills."""

    @staticmethod
    def forward(ctx, shape: tuple[int, int, int], *outs: Tensor) -> Tensor:
        L, N, d = shape
        recon = torch.zeros(shape, device=outs[0].device, dtype=torch.float32)
        for l, out in enumerate(outs):
            T = out.shape[1] // d
            recon[l:l + T] += out.view(N, T, d).transpose(0, 1)
        ctx.widths = [out.shape[1] // d for out in outs]
        ctx.dtypes = [out.dtype for out in outs]
        return recon

    @staticmethod
    def backward(ctx, grad: Tensor):
        N = grad.shape[1]
        slabs = [grad[l:l + T].transpose(0, 1).reshape(N, -1).to(dt)
                 for l, (T, dt) in enumerate(zip(ctx.widths, ctx.dtypes))]
        return (None, *slabs)


class Transcoder(nn.Module):
    """CLT / PLT / skip transcoder with JumpReLU or TopK features (see module docstring)."""

    sparse_max_density = 0.05  # decode a source layer sparsely below this fraction of pairs

    def __init__(self, cfg: TranscoderConfig):
        super().__init__()
        self.cfg = cfg
        L, d, n_feat = cfg.n_layers, cfg.d_model, cfg.n_features
        self.W_enc = nn.Parameter(torch.empty(L, d, n_feat))
        self.b_enc = nn.Parameter(torch.zeros(L, n_feat))
        self.log_threshold = nn.Parameter(torch.full((L, n_feat), math.log(cfg.init_threshold)))
        self.W_dec = nn.ParameterList(
            [nn.Parameter(torch.empty(n_feat, cfg.n_targets(l), d)) for l in range(L)])
        self.b_dec = nn.Parameter(torch.zeros(L, d))
        self.W_skip = nn.Parameter(torch.zeros(L, d, d)) if cfg.skip else None
        self.register_buffer("in_scale", torch.ones(L))
        self.register_buffer("out_scale", torch.ones(L))
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
    def init_from_sample(self, x: Float[Tensor, "N L d"], y: Float[Tensor, "N L d"],
                         fire_frac: float | None = None) -> None:
        """Set the norm scalars from a raw sample, and b_enc so each JumpReLU feature fires
        on `fire_frac` of the sample (default min(10⁴/F, 0.05)) at the initial θ."""
        d = self.cfg.d_model
        x, y = x.float(), y.float()
        self.in_scale.copy_(math.sqrt(d) / x.norm(dim=-1).mean(0).clamp_min(1e-12))
        self.out_scale.copy_(math.sqrt(d) / y.norm(dim=-1).mean(0).clamp_min(1e-12))
        if self.cfg.activation != "jumprelu":
            return
        p = fire_frac if fire_frac is not None else min(1e4 / self.cfg.n_features, 0.05)
        xn = self._normalise(x.to(self.W_enc.device), self.in_scale)
        n = xn.shape[1]
        k = min(n - 1, max(1, math.ceil((1 - p) * n))) if n > 1 else 1
        theta = self.log_threshold.exp()
        for l in range(self.cfg.n_layers):
            z = xn[l] @ self.W_enc[l]                                    # [N, F]
            lo = z.kthvalue(k, dim=0).values
            hi = z.kthvalue(k + 1, dim=0).values if n > 1 else lo + 1e-3
            self.b_enc[l] = theta[l] - (lo + hi) / 2    # θ midway between two sample values

    # ---- internal, normalised, layer-major [L, N, ...] ----

    @staticmethod
    def _normalise(v: Tensor, scale: Tensor) -> Tensor:
        """[N, L, d] raw -> [L, N, d] normalised (contiguous)."""
        return (v.transpose(0, 1) * scale[:, None, None].to(v.dtype)).contiguous()

    def _encode(self, xn: Tensor) -> Tensor:
        """[L, N, d] -> pre [L, N, F] (float32; the matmul follows autocast)."""
        return torch.baddbmm(self.b_enc[:, None, :], xn, self.W_enc).float()

    def _activate(self, pre: Tensor, theta: Tensor) -> Tensor:
        if self.cfg.activation == "jumprelu":
            return JumpReLU.apply(pre, theta, self.cfg.bandwidth)
        values, index = pre.topk(self.cfg.topk, dim=-1)
        return torch.zeros_like(pre).scatter(-1, index, values.relu())

    def _candidates(self, pre: Tensor, theta: Tensor) -> Tensor | None:
        """Pairs whose decoded value or gradient matters: active, or inside the STE window."""
        if self.cfg.activation != "jumprelu" or not torch.is_grad_enabled():
            return None
        return pre > theta - self.cfg.bandwidth / 2

    def _decode_layer(self, a: Tensor, mask: Tensor | None, W: Tensor, dense: bool) -> Tensor:
        """One source layer: a [N, F] @ W [F, T·d] -> [N, T·d], sparse where it pays."""
        mask = (a != 0) if mask is None else mask
        if dense or int(mask.count_nonzero()) > self.sparse_max_density * mask.numel():
            return a @ W
        index = torch.full(mask.shape, -1, dtype=torch.long, device=mask.device)
        tok, feat = mask.nonzero(as_tuple=True)                    # token-major
        index[tok, feat] = torch.arange(tok.numel(), device=mask.device)
        feat_f, tok_f = mask.t().nonzero(as_tuple=True)            # feature-major, no sort
        perm = index[tok_f, feat_f]
        return SparseDecode.apply(a[tok, feat], W, tok, feat, tok_f, feat_f, perm, a.shape[0])

    def _decode(self, acts: Tensor, xn: Tensor | None, cand: Tensor | None = None,
                dense: bool = False, reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """acts [L, N, F] -> normalised reconstruction [L, N, d] (float32). `reduce` sums the
        features' part over feature shards (distributed training) before the biases."""
        L, N, d = self.cfg.n_layers, acts.shape[1], self.cfg.d_model
        per_layer = acts.unbind(0)          # one backward for all layers, not L full-size ones
        masks = [None] * L if cand is None else cand.unbind(0)
        outs = [self._decode_layer(per_layer[l], masks[l], W.view(W.shape[0], -1), dense)
                for l, W in enumerate(self.W_dec)]                    # [N, T·d] each
        recon = AccumulateTargets.apply((L, N, d), *outs)
        if reduce is not None:
            recon = reduce(recon)
        recon = recon + self.b_dec[:, None, :]
        if self.W_skip is not None:
            if xn is None:
                raise CltraceError("a skip transcoder needs the MLP input x to decode")
            recon = recon + torch.bmm(xn, self.W_skip).float()
        return recon

    def decoder_norms(self) -> Tensor:
        """||W_dec_{l,i}|| over all targets, normalised scale: [L, F]."""
        return torch.stack([torch.linalg.vector_norm(W, dim=(1, 2)) for W in self.W_dec])

    def loss(self, x: Float[Tensor, "N L d"], y: Float[Tensor, "N L d"], *, lambda_s: float,
             lambda_p: float, c: float = 4.0, reduce: Callable[[Tensor], Tensor] | None = None
             ) -> LossOutput:
        """The training loss on raw-scale MLP inputs x and outputs y (module docstring).
        Penalties cover this module's features only (a shard's, under feature sharding)."""
        n_tokens = x.shape[0]
        xn, yn = self._normalise(x, self.in_scale), self._normalise(y, self.out_scale)
        theta = self.log_threshold.exp()[:, None, :]               # [L, 1, F]
        pre = self._encode(xn)                                     # [L, N, F]
        acts = self._activate(pre, theta)
        recon = self._decode(acts, xn, self._candidates(pre, theta), reduce=reduce)
        mse = (recon - yn.float()).pow(2).sum() / n_tokens
        zero = mse.new_zeros(())
        jump = self.cfg.activation == "jumprelu"      # TopK fixes L0 itself and has no θ
        use_s, use_p = bool(lambda_s) and jump, bool(lambda_p) and jump
        norms = self.decoder_norms()[:, None, :] if use_s or use_p else None      # [L, 1, F]
        sparsity = torch.tanh(c * norms * acts).sum() / n_tokens if use_s else zero
        preact = (F.relu(theta - pre) * norms).sum() / n_tokens if use_p else zero
        loss = mse + lambda_s * sparsity + lambda_p * preact
        return LossOutput(loss, mse, sparsity, preact, acts.detach(), recon.detach(), yn)

    # ---- public API, raw scale, token-major [..., L, ...] ----

    def encode(self, x: Float[Tensor, "... L d"]) -> Float[Tensor, "... L F"]:
        lead = x.shape[:-2]
        xn = self._normalise(x.reshape(-1, *x.shape[-2:]), self.in_scale)
        return self._encode(xn).transpose(0, 1).reshape(*lead, *self.log_threshold.shape)

    def activate(self, pre: Float[Tensor, "... L F"]) -> Float[Tensor, "... L F"]:
        return self._activate(pre, self.log_threshold.exp())

    def activate_layer(self, pre: Float[Tensor, "... F"], layer: int) -> Float[Tensor, "... F"]:
        """The activation function of one layer's features."""
        return self._activate(pre, self.log_threshold[layer].exp())

    def decode(self, acts: Float[Tensor, "... L F"], x: Float[Tensor, "... L d"] | None = None
               ) -> Float[Tensor, "... L d"]:
        """Raw-scale reconstruction. Sparse unless gradients w.r.t. `acts` are wanted."""
        lead, L = acts.shape[:-2], self.cfg.n_layers
        a = acts.reshape(-1, L, acts.shape[-1]).transpose(0, 1)
        xn = None if x is None else self._normalise(x.reshape(-1, L, x.shape[-1]), self.in_scale)
        dense = acts.requires_grad and torch.is_grad_enabled()
        recon = self._decode(a, xn, None, dense=dense) / self.out_scale[:, None, None]
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
        """θ comparable with raw-scale pre-activations (0 for TopK, which has none)."""
        if self.cfg.activation == "topk":
            return torch.zeros_like(self.log_threshold[layer])
        return self.log_threshold[layer].exp()

    @torch.no_grad()
    def decoder_weight(self, layer: int) -> Float[Tensor, "F T d"]:
        T = self.cfg.n_targets(layer)
        return self.W_dec[layer] / self.out_scale[layer:layer + T][None, :, None]

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
            if self.W_skip is not None:
                self.W_skip[l].copy_(self.skip_weight(l))
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
        raise CltraceError(f"{path}: tensors do not match the config "
                           f"(missing {missing[:5]}, unexpected {extra[:5]})")
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CltraceError(f"{path}: tensor {key} has shape {tuple(value.shape)}, "
                               f"the config needs {tuple(expected[key].shape)}")
        if not value.dtype.is_floating_point:
            raise CltraceError(f"{path}: tensor {key} has dtype {value.dtype}, expected a float type")
    module.load_state_dict({k: v.float() for k, v in tensors.items()})


__all__ = ["Transcoder", "TranscoderConfig", "TranscoderOutput", "LossOutput", "JumpReLU",
           "load_state_checked", "WEIGHTS_FILE", "CONFIG_FILE"]
