"""Influence on the logits of every source, from the edge rows computed so far.

The graph is layered, so the influence ranking that orders the feature targets is one
top-down pass over the rows, not a power series.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor


@torch.no_grad()
def partial_influence(
    rows: Float[Tensor, "row source"],
    row_layer: Int[Tensor, "row"],
    row_feature: Int[Tensor, "row"],
    row_weight: Float[Tensor, "row"],
    n_layers: int,
) -> Float[Tensor, "source"]:
    """Influence on the logits of every source, from the rows computed so far.

    Rows are targets (features and logits); a target of layer l only has sources of layers
    < l, so one top-down pass over the rows grouped by layer is exact (no power series).

    Args:
        rows: edge rows (absolute values are normalised per row here).
        row_layer: each row's target layer (logits: n_layers).
        row_feature: each row's column index as a source (-1 for logits).
        row_weight: logit probability for logit rows, 0 for feature rows.
    """
    influence = torch.zeros(rows.shape[1], device=rows.device)
    for l in range(n_layers, -1, -1):
        idx = (row_layer == l).nonzero().squeeze(1)
        for chunk in idx.split(512):
            block = rows[chunk].abs()
            block /= block.sum(1, keepdim=True).clamp_min(1e-10)
            feat = row_feature[chunk]
            w = row_weight[chunk] + torch.where(feat >= 0, influence[feat.clamp_min(0)], 0.0)
            influence += w @ block
    return influence
