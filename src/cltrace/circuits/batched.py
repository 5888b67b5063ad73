"""Many feature interventions on one prompt, one batch row each, on the real model.

`Steerer` (interventions/steer.py) applies one set of interventions to every batch row. Validation
and swap searches run dozens of different sets on the same prompt, so here each batch row gets
its own list of `Edit`s, with the same semantics as `Steerer` (METHOD.md §6):

- unconstrained (``constrain=False``): at an edit's layer l the feature's activation ``a`` is
  computed from the row's *current* MLP input (JumpReLU of its encoder row), the new value is
  ``a·value`` (scale) or ``value`` (set), and ``Δa · W_dec[l→l']`` is added to the real MLP output of
  every layer l' ≥ l; the rest of the model runs on normally;
- constrained (``constrain=True``, Steerer's ``constrain_until = n_layers - 1``): every MLP output
  is clamped to its clean value plus the edited features' decoder writes, with ``Δa`` taken from
  the clean activations; attention and norms still run live.

Only the last position's logits are computed, pre-softcap (the graph's logit nodes are
pre-softcap), from the final norm's output and the unembedding; `probabilities` applies the
model's softcap (if any) and the softmax. Parity with `Steerer` is tested.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from cltrace.models.loading import Captured, LoadedModel
from cltrace.transcoders.interface import TranscoderLike, device_dtype

#: reuse a cached clean prefix only when it covers at least this share of the prompt (on 2 CPU
#: cores a batch-1 forward costs about a third of a 16-row one)
PREFIX_MIN_SHARE = 0.4


@dataclass(frozen=True)
class Edit:
    """Scale or set feature (layer, feature) at one prompt position (negative: from the end)."""

    layer: int
    pos: int
    feature: int
    mode: Literal["scale", "set"] = "scale"
    value: float = 0.0


class _Plan:
    """The edits of a batch grouped by layer: row, position, feature, mode flag and value per edit."""

    def __init__(
        self,
        transcoder: TranscoderLike,
        rows: Sequence[Sequence[Edit]],
        n_pos: int,
        device: torch.device,
        start: int = 0,
    ):
        self.by_layer: dict[int, tuple[Tensor, ...]] = {}
        flat = [(b, e) for b, row in enumerate(rows) for e in row]
        for layer in sorted({e.layer for _, e in flat}):
            sel = [(b, e) for b, e in flat if e.layer == layer]
            row = torch.tensor([b for b, _ in sel], device=device)
            pos = torch.tensor([e.pos % n_pos - start for _, e in sel], device=device)
            feat = torch.tensor([e.feature for _, e in sel], device=device)
            is_set = torch.tensor([e.mode == "set" for _, e in sel], device=device)
            value = torch.tensor([float(e.value) for _, e in sel], device=device)
            self.by_layer[layer] = (row, pos, feat, is_set, value)
        self.tc = transcoder

    def writes(self, layer: int, x: Float[Tensor, "batch pos d"], pending: dict[int, Tensor]) -> None:
        """Queue Δa · W_dec[layer→l'] of this layer's edits (activations from MLP input x)."""
        if layer not in self.by_layer:
            return
        row, pos, feat, is_set, value = self.by_layer[layer]
        w_enc = self.tc.encoder_weight(layer)[:, feat]  # [d, k]
        pre = (x[row, pos].to(w_enc.dtype) * w_enc.T).sum(-1) + self.tc.encoder_bias(layer)[feat]
        a = pre * (pre > self.tc.threshold(layer)[feat])
        delta = torch.where(is_set, value, a * value) - a  # [k]
        dec = self.tc.decoder_weight(layer)[feat] * delta[:, None, None]  # [k, T, d]
        for t in range(dec.shape[1]):
            buf = pending.setdefault(layer + t, x.new_zeros(x.shape))
            buf.index_put_((row, pos), dec[:, t].to(buf.dtype), accumulate=True)


@torch.no_grad()
def last_logits(lm: LoadedModel, tokens: Int[Tensor, "batch pos"], past=None) -> Float[Tensor, "batch vocab"]:
    """Pre-softcap logits at the last position (final-norm output through the unembedding).
    With `past` (a transformers cache of a prefix), `tokens` continue that prefix."""
    state: dict[str, Tensor] = {}

    def keep(_m, _i, output):
        state["final"] = output[:, -1]

    with lm.hooks([(lm.adapter.final_norm(lm.model), keep)]):
        if past is None:
            lm.run(tokens, with_logits=False)
        else:
            lm.model.base_model(input_ids=tokens, use_cache=True, **{_cache_kwarg(lm): past})
    unembed = lm.adapter.unembed(lm.model)
    return unembed(state["final"].to(unembed.weight.dtype)).float()


def _cache_kwarg(lm: LoadedModel) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); use whichever the model takes."""
    params = inspect.signature(lm.model.base_model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def probabilities(lm: LoadedModel, logits: Float[Tensor, "... vocab"]) -> Float[Tensor, "... vocab"]:
    """Next-token probabilities from pre-softcap logits (the model's softcap applied)."""
    cap = getattr(lm.model.config.get_text_config(), "final_logit_softcapping", None)
    return torch.softmax(torch.tanh(logits / cap) * cap if cap else logits, dim=-1)


@torch.no_grad()
def run_edits(
    lm: LoadedModel,
    transcoder: TranscoderLike,
    tokens: Int[Tensor, "1 pos"],
    rows: Sequence[Sequence[Edit]],
    *,
    constrain: bool = False,
    batch_size: int = 16,
    clean: Captured | None = None,
    reuse_prefix: bool = True,
) -> Float[Tensor, "row vocab"]:
    """Last-position pre-softcap logits of `tokens` with each row's edits applied (one row each).

    Args:
        lm, transcoder: the model and a JumpReLU transcoder.
        tokens: the prompt, [1, n].
        rows: one list of edits per output row (an empty list: the clean run).
        constrain: constrained patching over every layer (see the module docstring).
        batch_size: rows per forward.
        clean: `lm.capture(tokens)` if already computed (constrained mode needs it).
        reuse_prefix: positions before a batch's first edited position are the clean run's:
            they are run once (batch 1) and their attention cache shared by the batch's rows
            (rows are batched in order of their first edited position).
    """
    return run_edits_reading(
        lm,
        transcoder,
        tokens,
        rows,
        constrain=constrain,
        batch_size=batch_size,
        clean=clean,
        reuse_prefix=reuse_prefix,
    ).logits


@dataclass
class EditRun:
    """What `run_edits_reading` returns, one row per list of edits."""

    logits: Float[Tensor, "row vocab"]  # last position, pre-softcap
    pre: Float[Tensor, "row read"] | None  # pre-activations of the read features (live MLP input)


@torch.no_grad()
def run_edits_reading(
    lm: LoadedModel,
    transcoder: TranscoderLike,
    tokens: Int[Tensor, "1 pos"],
    rows: Sequence[Sequence[Edit]],
    read: Sequence[tuple[int, int, int]] = (),
    *,
    constrain: bool = False,
    batch_size: int = 16,
    clean: Captured | None = None,
    reuse_prefix: bool = True,
) -> EditRun:
    """`run_edits`, also reading the encoder pre-activation of each (layer, pos, feature) in `read`
    from the row's live MLP input (in constrained mode too: only MLP outputs are clamped)."""
    if constrain and clean is None:
        clean = lm.capture(tokens)
    n = tokens.shape[1]
    reuse_prefix = reuse_prefix and not read  # read positions may lie before the prefix
    starts = [min((e.pos % n for e in row), default=n - 1) if reuse_prefix else 0 for row in rows]
    order = sorted(range(len(rows)), key=lambda i: starts[i])
    out = torch.zeros(len(rows), lm.vocab_size, device=lm.device)
    pre = torch.zeros(len(rows), len(read), device=lm.device) if read else None
    for i in range(0, len(rows), batch_size):
        idx = order[i : i + batch_size]
        start = min(starts[j] for j in idx)
        start = start if start >= PREFIX_MIN_SHARE * n else 0  # a batch-1 prefix forward is not free
        logits, values = _run_chunk(
            lm, transcoder, tokens, [rows[j] for j in idx], constrain, clean, start, read
        )
        out[idx] = logits.to(out.device)
        if pre is not None:
            pre[idx] = values.to(pre.device)
    return EditRun(out, pre)


def _prefix_cache(lm: LoadedModel, prefix: Tensor, batch: int):
    """The transformers cache of a clean forward of `prefix` [1, m], repeated for `batch` rows."""
    out = lm.model.base_model(input_ids=prefix, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    cache.batch_repeat_interleave(batch)
    return cache


def _reader(transcoder: TranscoderLike, read: Sequence[tuple[int, int, int]], B: int, device: torch.device):
    """fn(layer, mlp_in [B, n, d]) filling the pre-activations of the read features of that layer."""
    values = torch.zeros(B, len(read), device=device)
    by_layer: dict[int, list[int]] = {}
    for j, (layer, _, _) in enumerate(read):
        by_layer.setdefault(layer, []).append(j)

    def see(layer: int, x: Tensor) -> None:
        cols = by_layer.get(layer)
        if not cols:
            return
        pos = torch.tensor([read[j][1] for j in cols], device=device)
        feat = torch.tensor([read[j][2] for j in cols], device=device)
        w = transcoder.encoder_weight(layer)[:, feat]  # [d, k]
        xs = x[:, pos].to(device, w.dtype)  # [B, k, d]
        values[:, cols] = (xs * w.T).sum(-1) + transcoder.encoder_bias(layer)[feat]

    return values, see


def _run_chunk(
    lm: LoadedModel,
    transcoder: TranscoderLike,
    tokens: Tensor,
    rows: Sequence[Sequence[Edit]],
    constrain: bool,
    clean: Captured | None,
    start: int,
    read: Sequence[tuple[int, int, int]] = (),
) -> tuple[Tensor, Tensor]:
    """One forward of the rows; positions before `start` (no edits there) come from a cache."""
    if constrain and clean is None:
        raise ValueError("a constrained run needs the clean capture")
    clamp = clean if constrain else None  # the clean MLP inputs / outputs of a constrained run
    B, n = len(rows), tokens.shape[1]
    device, _ = device_dtype(transcoder)
    plan = _Plan(transcoder, rows, n, device, start)
    pending: dict[int, Tensor] = {}
    past = _prefix_cache(lm, tokens[:, :start], B) if start > 0 else None
    values, see = _reader(transcoder, read, B, device)

    def patch(layer: int, mlp_in: Tensor, mlp_out: Tensor) -> Tensor:
        if layer == 0:
            pending.clear()
        see(layer, mlp_in)
        if clamp is not None:
            x = clamp.mlp_in[:, start:, layer].expand(B, -1, -1)
            base = clamp.mlp_out[:, start:, layer].to(mlp_out.dtype).expand(B, -1, -1)
        else:
            x, base = mlp_in, mlp_out
        plan.writes(layer, x.to(device), pending)
        delta = pending.pop(layer, None)
        return base if delta is None else base + delta.to(base.device, base.dtype)

    with lm.patch_mlp_outputs(patch):
        return last_logits(lm, tokens[:, start:].expand(B, -1), past), values


def demeaned(logits: Float[Tensor, "... vocab"], token_id: int) -> Float[Tensor, "..."]:
    """A token's logit minus the mean logit over the vocabulary (the graph's logit value)."""
    return logits[..., token_id] - logits.mean(-1)
