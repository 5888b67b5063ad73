"""Backward passes through the frozen replacement model, reusing recorded forwards.

One forward serves all targets: backward passes are vmapped over the batch of injected
gradients (``is_grads_batched``), so the forward runs at batch 1; a target at position p only
needs the prompt's first p + 1 tokens, so backward passes run through forwards of a few prompt
prefixes (`PrefixForwards`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from cltrace.attribution.replacement import ReplacementForward, SkipFn, run_replacement
from cltrace.models.loading import LoadedModel


def backward_batch(
    fwd: ReplacementForward,
    layers: Sequence[int],
    positions: Sequence[int],
    vectors: Float[Tensor, "k d_model"],
    n_layers: int,
):
    """One (vmapped) backward pass: target i injects vectors[i] at (layers[i], positions[i]).

    Layer `n_layers` means the final-norm output (logits). Returns (grad at embed [k, m, d],
    grads at the MLP-output taps of layers 0..top-1, each [k, m, d]) with top = max(layers)
    and m the forward's length.
    """
    k, top = len(layers), max(layers)
    rows = torch.arange(k, device=vectors.device)
    layers_t = torch.tensor(list(layers), device=vectors.device)
    pos_t = torch.tensor(list(positions), device=vectors.device)
    roots, grads = [], []
    for l in sorted(set(layers)):
        root = fwd.final if l == n_layers else fwd.mlp_in[l]  # [1, m, d]
        mask = layers_t == l
        g = root.new_zeros(k, *root.shape)  # [k, 1, m, d]
        g[rows[mask], 0, pos_t[mask]] = vectors[mask].to(g.dtype)
        roots.append(root)
        grads.append(g)
    inputs = [fwd.embed] + fwd.taps[:top]
    out = torch.autograd.grad(
        roots, inputs, grads, retain_graph=True, allow_unused=True, is_grads_batched=True
    )
    out = [x.new_zeros(k, *x.shape[1:]) if g is None else g[:, 0] for g, x in zip(out, inputs)]
    return out[0], out[1:]


class PrefixForwards:
    """Forwards of the replacement model on prefixes of the prompt, built when first needed.

    A target at position p only depends on tokens 0..p (causal model), so its backward pass
    can run through the forward of a prefix of length >= p + 1: with `n_buckets` prefix
    lengths ceil(n k / K), the backward work per target drops from n to about p + n / 2K
    positions. The full-length forward is built first; its values define the graph. With a
    `backward_dtype` other than the model's, the gradient forwards run under autocast.
    """

    def __init__(
        self,
        lm: LoadedModel,
        tokens: Tensor,
        skip: SkipFn | None,
        n_buckets: int,
        backward_dtype: torch.dtype | None = None,
    ):
        n = int(tokens.numel())
        k = max(1, min(n_buckets, n))
        self.lengths = sorted({math.ceil(n * i / k) for i in range(1, k + 1)})
        self.lm, self.tokens, self.skip, self.autocast = lm, tokens, skip, backward_dtype
        self.full = run_replacement(lm, tokens, skip=skip)
        self._built: dict[int, ReplacementForward] = {} if backward_dtype else {n: self.full}

    def covering(self, max_pos: int) -> ReplacementForward:
        """The shortest prefix forward that contains position `max_pos`."""
        m = next(m for m in self.lengths if m > max_pos)
        if m not in self._built:
            self._built[m] = run_replacement(
                self.lm, self.tokens, skip=self.skip, length=m, autocast_dtype=self.autocast
            )
        return self._built[m]
