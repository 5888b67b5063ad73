"""Active transcoder features of a prompt, their error vectors, and the skip term.

``find_active_features`` encodes the MLP inputs recorded by the replacement forward, keeps the
non-zero activations (sorted by layer, position, feature) and computes the error vectors
``e_l = y_l - ŷ_l`` (``ŷ`` includes ``b_dec`` and the skip term), zero at a leading BOS with
`zero_bos`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from cltrace.attribution.memory import check_source_memory
from cltrace.attribution.replacement import ReplacementForward, SkipFn
from cltrace.transcoders.interface import TranscoderLike


@dataclass
class ActiveFeatures:
    """Active transcoder features of the prompt, sorted by (layer, pos, feature)."""

    layer: Int[Tensor, "active"]
    pos: Int[Tensor, "active"]
    index: Int[Tensor, "active"]
    activation: Float[Tensor, "active"]
    pre_activation: Float[Tensor, "active"]
    layer_start: list[int]  # L + 1 offsets: layer l is [start[l], start[l+1])
    errors: Float[Tensor, "layer pos d_model"]  # y - ŷ (zero at BOS with zero_bos)
    decoders: list[Tensor | None]  # per layer: [k_l, T_l, d] decoder rows (raw scale)

    @property
    def n(self) -> int:
        return int(self.layer.shape[0])


def skip_function(transcoder: TranscoderLike) -> SkipFn | None:
    """The transcoder's skip term per layer as fn(layer, x [..., d]) -> [..., d], or None."""
    if not transcoder.cfg.skip:
        return None
    cache: dict[int, Tensor] = {}

    def skip(layer: int, x: Tensor) -> Tensor:
        if layer not in cache:
            w = transcoder.skip_weight(layer)
            assert w is not None, "cfg.skip is set, so every layer has a skip matrix"
            cache[layer] = w.detach()
        return x @ cache[layer].to(x.dtype)

    return skip


@torch.no_grad()
def find_active_features(
    transcoder: TranscoderLike,
    fwd: ReplacementForward,
    skip: SkipFn | None,
    zero_first: bool,
    free: int | None = None,
) -> ActiveFeatures:
    """Encode the recorded MLP inputs, keep the non-zero activations, compute error vectors.

    The reconstruction ``ŷ_l' = Σ_{l<=l'} W_dec[l→l'] a_l + b_dec_l' + skip_l'(x_l')`` is
    built sparsely from the active features only.
    """
    x = fwd.mlp_in_values  # [n, L, d]
    pre = transcoder.encode(x)  # [n, L, F]
    acts = transcoder.activate(pre)
    if zero_first:
        acts[0] = 0
    layer, pos, index = (acts.transpose(0, 1) != 0).nonzero(as_tuple=True)  # sorted (l, p, f)
    L, n = x.shape[1], x.shape[0]
    counts = torch.bincount(layer, minlength=L).tolist()
    layer_start = [0] + torch.tensor(counts).cumsum(0).tolist()
    if free is not None:
        check_source_memory(transcoder, layer, pos, n, x.shape[-1], free)
    recon = transcoder.decoder_bias().detach().to(x.dtype).expand(n, L, -1).clone()  # [n, L, d]
    decoders: list[Tensor | None] = []
    for l in range(L):
        s, e = layer_start[l], layer_start[l + 1]
        if skip is not None:
            recon[:, l] += skip(l, x[:, l])
        if s == e:
            decoders.append(None)
            continue
        dec = transcoder.decoder_weight(l)[index[s:e]].to(x.dtype)  # [k, T, d]
        decoders.append(dec)
        contrib = dec * acts[pos[s:e], l, index[s:e]][:, None, None]
        recon[:, l : l + dec.shape[1]].index_add_(0, pos[s:e], contrib)
    errors = (fwd.mlp_out_values - recon).transpose(0, 1).contiguous()  # [L, n, d]
    if zero_first:
        errors[:, 0] = 0
    return ActiveFeatures(
        layer=layer,
        pos=pos,
        index=index,
        activation=acts[pos, layer, index],
        pre_activation=pre[pos, layer, index],
        layer_start=layer_start,
        errors=errors,
        decoders=decoders,
    )
