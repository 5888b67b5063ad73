"""EdgeReader: the gradients of one backward pass -> rows of direct effects (edges).

``A[t, feature s] = a_s Σ_{l_s<=l<l_t} W_dec[s, l_s→l] · g_t(l, pos_s)``,
``A[t, error (l,p)] = e_l[p] · g_t(l, p)``, ``A[t, token p] = x_0[p] · g_t(embed, p)``.
Edges are read with one batched matmul per source layer (decoder vectors of the layer's
active features laid out per position) instead of per-node loops.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from cltrace.attribution.active import ActiveFeatures


class EdgeReader:
    """Turns the gradients of one backward pass into rows of direct effects.

    Source columns: active features (their order), then errors (layer * n + pos), then
    token embeddings. Feature sources are read with one batched matmul per source layer:
    the decoder vectors of the layer's active features (scaled by their activation) are laid
    out per position, padded to the busiest position: ``dec[l] : [n, k_max, T_l, d]``.
    """

    def __init__(self, feats: ActiveFeatures, embed: Tensor, dtype: torch.dtype):
        self.feats, self.dtype = feats, dtype
        self.n_pos = int(embed.shape[0])
        self.n_layers = len(feats.layer_start) - 1
        self.embed = embed.to(dtype)  # [n, d]
        self.errors = feats.errors.to(dtype).contiguous()  # [L, n, d]
        self.n_sources = feats.n + (self.n_layers + 1) * self.n_pos
        self.dec: list[Tensor | None] = []
        self.gather: list[Tensor | None] = []  # flat (pos, slot) per feature
        self.pos_end: list[Tensor | None] = []  # features of the layer at pos <= p
        for l in range(self.n_layers):
            self._layout_layer(l)

    @torch.no_grad()
    def _layout_layer(self, l: int) -> None:
        s, e = self.feats.layer_start[l], self.feats.layer_start[l + 1]
        if s == e:
            self.dec.append(None)
            self.gather.append(None)
            self.pos_end.append(None)
            return
        pos = self.feats.pos[s:e]
        counts = torch.bincount(pos, minlength=self.n_pos)
        k_max = int(counts.max())
        first = torch.cumsum(counts, 0) - counts  # features sorted by pos
        slot = torch.arange(e - s, device=pos.device) - first[pos]
        vecs = self.feats.decoders[l]  # [k, T, d], a gathered copy
        assert vecs is not None, "find_active_features gathers the decoders of every busy layer"
        vecs.mul_(self.feats.activation[s:e, None, None].to(vecs.dtype))
        dec = torch.zeros(self.n_pos, k_max, *vecs.shape[1:], dtype=self.dtype, device=vecs.device)
        dec[pos, slot] = vecs.to(self.dtype)
        self.feats.decoders[l] = None  # freed as the layout grows
        self.dec.append(dec)
        self.gather.append(pos * k_max + slot)
        self.pos_end.append(torch.cumsum(counts, 0).cpu())

    @torch.no_grad()
    def read(
        self,
        grad_embed: Float[Tensor, "batch pos d_model"],
        grad_taps: list[Tensor],
        max_pos: int,
        out: Float[Tensor, "batch source"],
    ) -> None:
        """Write the direct effects on the batch's targets from every source into `out`.

        Args:
            grad_embed: gradient at the residual entering block 0 ([k, m, d], m > max_pos).
            grad_taps: gradients at the MLP outputs of layers 0..top-1 (later layers: zero).
            max_pos: the largest target position in the batch (later positions have no effect).
            out: zero-initialised rows to fill, [k, n_sources].
        """
        k, P, top = grad_embed.shape[0], max_pos + 1, len(grad_taps)
        n, d = self.n_pos, self.embed.shape[-1]
        g = torch.empty(P, k, top, d, dtype=self.dtype, device=grad_embed.device)  # [P, k, Lt, d]
        for l, gl in enumerate(grad_taps):
            g[:, :, l] = gl[:, :P].transpose(0, 1)
        err0 = self.feats.n
        for l in range(top):
            err = torch.bmm(g[:, :, l], self.errors[l, :P, :, None])  # [P, k, 1]
            out[:, err0 + l * n : err0 + l * n + P] = err[..., 0].T
            self._read_layer(g, l, out)
        tok0 = err0 + self.n_layers * n
        emb = grad_embed[:, :P].transpose(0, 1).to(self.dtype)  # [P, k, d]
        out[:, tok0 : tok0 + P] = torch.bmm(emb, self.embed[:P, :, None])[..., 0].T

    def _read_layer(self, g: Tensor, l: int, out: Tensor) -> None:
        """out[:, feature s of layer l] = Σ_j dec[s, j] · g[pos_s, :, l + j] (j < top - l)."""
        dec, gather, pos_end = self.dec[l], self.gather[l], self.pos_end[l]
        if dec is None or gather is None or pos_end is None:
            return
        P, k, top, d = g.shape
        T = min(top - l, dec.shape[2])  # tap layers l..l+T-1
        lhs = g[:, :, l : l + T].reshape(P, k, T * d)
        rhs = dec[:P, :, :T].reshape(P, dec.shape[1], T * d)
        res = torch.bmm(lhs, rhs.transpose(1, 2)).transpose(0, 1).reshape(k, -1)  # [k, P*k_max]
        s = self.feats.layer_start[l]
        c = int(pos_end[P - 1])  # features at pos < P
        out[:, s : s + c] = res[:, gather[:c]]
