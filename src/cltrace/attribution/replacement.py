"""The local replacement model of one prompt, built with hooks on the real transformers model.

For one prompt the real model is run once (batch 1) with three freezes that make everything
downstream of the MLP outputs linear (METHOD.md §2):

- attention patterns: a local override of the "eager" attention function
  (``ALL_ATTENTION_FUNCTIONS["eager"]``, which every supported family looks up through
  ``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)`` in
  transformers 5) calls the family's own eager function with detached queries and keys, so
  the pattern is a constant and gradients flow through the values only;
- normalisation denominators: a forward hook on every residual-path norm returns
  ``adapter.frozen_norm`` (same value, denominator detached). Gemma 3 / Qwen 3 q/k norms
  only feed the (frozen) patterns, so they are left alone;
- MLP outputs: the output of each layer's MLP-output module is replaced by a leaf tensor
  ``tap_l`` holding the same value (a stop-gradient constant), so after a backward pass
  ``grad(tap_l)`` is d(target)/d(MLP output at l). With a skip transcoder the skip term
  ``W_skip · x_l`` stays live (it is part of the linear replacement model, as in
  circuit-tracer): the MLP output becomes ``tap_l + skip_l(x_l)`` with
  ``tap_l = (y_l - skip_l(x_l)).detach()``.

The MLP input of each layer (output of ``adapter.mlp_in_module``) is recorded without
detaching: feature targets inject their encoder direction as its gradient. The residual
entering block 0 (token embedding, plus learned positions for GPT-2) is a leaf too: the
embedding nodes read their edges from its gradient. The final norm's output is recorded for
the logit targets. Logits are pre-softcap (Gemma 2/3 ``final_logit_softcapping`` is not
linear; the attribution targets the logit before it, the probabilities come from after it).

Many targets share one forward: the backward passes use
``torch.autograd.grad(..., is_grads_batched=True)``, which vmaps the backward over a batch of
injected gradients, so the forward never has to repeat the prompt (a forward costs about
seven backward passes of the same size: the MLPs and the q/k projections are not in the
backward graph). Because the model is causal, a forward of the prompt's first m tokens
serves every target at a position < m: `run_replacement(..., length=m)` builds such a prefix.

`run_frozen` replays the same freezes from a recorded cache (patterns and norm scales)
with arbitrary MLP outputs and embeddings, batch 1: the frozen linear model used by the
exactness tests and by interventions with everything frozen.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from cltrace.errors import CltraceError
from cltrace.models.loading import LoadedModel

#: skip_l(layer, x [..., d]) -> [..., d]: the transcoder's linear skip term (None: no skip)
SkipFn = Callable[[int, Tensor], Tensor]


@dataclass
class FrozenCache:
    """Attention patterns and norm scales of the real forward on the prompt (batch row 0).

    Keyed by module identity (``id(module)``), valid only for the model that produced them.
    """

    patterns: dict[int, Float[Tensor, "1 head pos pos"]] = field(default_factory=dict)
    norm_scales: dict[int, Float[Tensor, "1 pos 1"]] = field(default_factory=dict)


@dataclass
class ReplacementForward:
    """One forward of the local replacement model, ready for many (batched) backward passes.

    Tensors with a leading axis of 1 are live in the autograd graph; the ``*_values`` fields
    are detached copies without that axis.
    """

    tokens: Int[Tensor, "pos"]
    embed: Float[Tensor, "1 pos d_model"]  # leaf: residual entering block 0
    mlp_in: list[Tensor]  # L x [1, n, d]: roots for feature targets
    taps: list[Tensor]  # L x [1, n, d] leaves: MLP outputs
    final: Float[Tensor, "1 pos d_model"]  # final-norm output: root for logits
    mlp_in_values: Float[Tensor, "pos layer d_model"]
    mlp_out_values: Float[Tensor, "pos layer d_model"]  # true MLP outputs (incl. skip term)
    embed_values: Float[Tensor, "pos d_model"]
    final_values: Float[Tensor, "pos d_model"]
    frozen: FrozenCache | None = None

    @property
    def n_pos(self) -> int:
        return int(self.embed.shape[1])


@dataclass
class FrozenRun:
    """Result of `run_frozen`: what the frozen linear model computes (batch row 0)."""

    mlp_in: Float[Tensor, "pos layer d_model"]
    final: Float[Tensor, "pos d_model"]


# --------------------------------------------------------------------------- attention


def _family_eager(module: nn.Module) -> Callable:
    """The eager attention function defined next to the attention module's class."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise CltraceError(
            f"{type(module).__name__} has no eager_attention_forward in its module",
            "this transformers version is not supported by cltrace's attribution",
        )
    return fn


def _repeat_kv(value: Tensor, n_heads: int) -> Tensor:
    """[B, kv_heads, n, dh] -> [B, n_heads, n, dh] (grouped-query attention)."""
    rep = n_heads // value.shape[1]
    return value if rep == 1 else value.repeat_interleave(rep, dim=1)


@contextlib.contextmanager
def frozen_attention(record: FrozenCache | None = None, replay: FrozenCache | None = None) -> Iterator[None]:
    """Within the block, eager attention patterns are constants (gradients flow through V only).

    Args:
        record: if given, each module's pattern (batch row 0) is stored in it.
        replay: if given, each module's pattern is taken from it instead of recomputed.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def attention(module, query, key, value, attention_mask, **kwargs):
        if getattr(module, "reorder_and_upcast_attn", False):
            raise CltraceError("GPT-2 reorder_and_upcast_attn is not supported by attribution")
        if replay is not None:
            weights = replay.patterns[id(module)].to(value.dtype)
            out = torch.matmul(weights, _repeat_kv(value, weights.shape[1]))
            return out.transpose(1, 2).contiguous(), weights
        out, weights = _family_eager(module)(
            module, query.detach(), key.detach(), value, attention_mask, **kwargs
        )
        if record is not None:
            record.patterns[id(module)] = weights[:1].detach()
        return out, weights

    mapping = ALL_ATTENTION_FUNCTIONS._local_mapping
    previous = mapping.get("eager")
    ALL_ATTENTION_FUNCTIONS["eager"] = attention
    try:
        yield
    finally:
        if previous is None:
            del ALL_ATTENTION_FUNCTIONS["eager"]
        else:
            ALL_ATTENTION_FUNCTIONS["eager"] = previous


def check_eager(lm: LoadedModel) -> None:
    """Attribution needs the eager attention path (the only one whose patterns we can freeze)."""
    impl = getattr(lm.model.config, "_attn_implementation", "eager")
    if impl != "eager":
        raise CltraceError(
            f"the model runs attention with {impl!r}; attribution needs 'eager'",
            "load it with cltrace.models.loading.load_model (it sets eager)",
        )


# --------------------------------------------------------------------------- norms


def _norm_scale(lm: LoadedModel, module: nn.Module, x: Tensor) -> Tensor:
    """1 / denominator of a norm on input x: [..., 1] (detached)."""
    xf = x.detach().float()
    eps = _eps(module)
    if lm.adapter.norm_kind == "layernorm":
        xf = xf - xf.mean(-1, keepdim=True)
    return torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


def _eps(module: nn.Module) -> float:
    for name in ("eps", "variance_epsilon"):
        if hasattr(module, name):
            return float(getattr(module, name))
    raise CltraceError(f"cannot find the epsilon of norm module {type(module).__name__}")


def _norm_hook(lm: LoadedModel, record: FrozenCache | None, replay: FrozenCache | None):
    def hook(module, inputs, _output):
        x = inputs[0]
        if replay is not None:
            return lm.adapter.frozen_norm(module, x, scale=replay.norm_scales[id(module)])
        if record is not None:
            record.norm_scales[id(module)] = _norm_scale(lm, module, x[:1])
        return lm.adapter.frozen_norm(module, x)

    return hook


def _frozen_norm_hooks(
    lm: LoadedModel, record: FrozenCache | None = None, replay: FrozenCache | None = None
) -> list[tuple[nn.Module, Callable]]:
    """Frozen-denominator hooks on every residual norm except MLP-output modules (replaced anyway)."""
    out_modules = {id(lm.adapter.mlp_out_module(b)) for b in lm.blocks}
    hook = _norm_hook(lm, record, replay)
    return [(m, hook) for m in lm.adapter.norm_modules(lm.model) if id(m) not in out_modules]


# --------------------------------------------------------------------------- block-0 input


@contextlib.contextmanager
def _block0_input(lm: LoadedModel, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Replace the residual entering block 0 by fn(residual) for the `with` block."""

    def pre_hook(_module, args, kwargs):
        if args:
            return (fn(args[0]),) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = fn(kwargs["hidden_states"])
        return args, kwargs

    handle = lm.blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


# --------------------------------------------------------------------------- forward


def _seen(values: list[Tensor | None], layer: int) -> Tensor:
    """The MLP input a hook recorded for `layer` (its MLP-output hook runs after it)."""
    value = values[layer]
    if value is None:
        raise RuntimeError(
            f"layer {layer}'s MLP output was reached before its MLP input: "
            "the model adapter's mlp_in_module / mlp_out_module are wrong"
        )
    return value


def _every_layer(values: list[Tensor | None], what: str) -> list[Tensor]:
    """The per-layer tensors the hooks recorded, checking the forward reached every layer."""
    missing = [layer for layer, value in enumerate(values) if value is None]
    if missing:
        raise RuntimeError(
            f"the forward never reached the {what} of layers {missing}: "
            "the model adapter's hook modules are wrong"
        )
    return [value for value in values if value is not None]


def run_replacement(
    lm: LoadedModel,
    tokens: Int[Tensor, "pos"],
    skip: SkipFn | None = None,
    record_frozen: bool = False,
    length: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> ReplacementForward:
    """Run the real model on `tokens` (or its first `length` tokens) with the freezes installed.

    Args:
        lm: the model (eager attention).
        tokens: the prompt's token ids, [n].
        skip: the transcoder's skip term per layer (kept live in the graph), or None.
        record_frozen: also keep every attention pattern and norm scale (for `run_frozen`).
        length: run only this prefix of the prompt (targets before it see the same model).
        autocast_dtype: run under autocast in this dtype (a faster, approximate backward).
    Returns:
        The live tensors (roots and leaves) and their detached values.
    """
    check_eager(lm)
    L = lm.n_layers
    record = FrozenCache() if record_frozen else None
    mlp_in: list[Tensor | None] = [None] * L
    taps: list[Tensor | None] = [None] * L
    outs: list[Tensor | None] = [None] * L
    state: dict[str, Tensor] = {}

    def leaf_embed(h: Tensor) -> Tensor:
        state["embed"] = h.detach().requires_grad_(True)
        return state["embed"]

    def tap_out(layer: int, output: Tensor) -> Tensor:
        live = skip(layer, _seen(mlp_in, layer)) if skip is not None else None
        outs[layer] = output.detach()
        rest = output.detach() if live is None else (output - live).detach()
        tap = taps[layer] = rest.requires_grad_(True)
        return tap if live is None else tap + live

    def keep_final(_m, _i, output):
        state["final"] = output

    fwd = _frozen_norm_hooks(lm, record=record) + lm.mlp_hooks(mlp_in.__setitem__, tap_out)
    fwd += [(lm.adapter.final_norm(lm.model), keep_final)]
    tokens = tokens.reshape(-1)[:length]
    batch = tokens.reshape(1, -1).to(lm.device)
    autocast = (
        torch.autocast(lm.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    )
    with (
        torch.enable_grad(),
        autocast,
        frozen_attention(record=record),
        lm.hooks(fwd),
        _block0_input(lm, leaf_embed),
    ):
        lm.model.base_model(input_ids=batch, use_cache=False)

    row0 = lambda ts: torch.stack([t[0].detach() for t in ts], dim=1)  # noqa: E731  [n, L, d]
    live_in = _every_layer(mlp_in, "MLP input")
    return ReplacementForward(
        tokens=tokens,
        embed=state["embed"],
        mlp_in=live_in,
        taps=_every_layer(taps, "MLP output"),
        final=state["final"],
        mlp_in_values=row0(live_in),
        mlp_out_values=row0(_every_layer(outs, "MLP output")),
        embed_values=state["embed"][0].detach(),
        final_values=state["final"][0].detach(),
        frozen=record,
    )


@torch.no_grad()
def run_frozen(
    lm: LoadedModel,
    tokens: Int[Tensor, "pos"],
    frozen: FrozenCache,
    embed: Float[Tensor, "pos d_model"],
    mlp_out: Callable[[int, Tensor], Tensor],
) -> FrozenRun:
    """The frozen linear model: replayed patterns and norm scales, chosen MLP outputs.

    Args:
        lm: the model that produced `frozen`.
        tokens: the prompt, [n] (only used to drive the forward; its embedding is replaced).
        frozen: patterns and norm scales recorded by `run_replacement(record_frozen=True)`.
        embed: the residual entering block 0, [n, d].
        mlp_out: fn(layer, mlp_in [1, n, d]) -> the MLP output to add at that layer, [1, n, d].
    Returns:
        Every layer's MLP input and the final-norm output under these inputs.
    """
    L = lm.n_layers
    mlp_in: list[Tensor | None] = [None] * L
    state: dict[str, Tensor] = {}

    def set_out(layer: int, output: Tensor) -> Tensor:
        return mlp_out(layer, _seen(mlp_in, layer)).to(output.dtype).reshape(output.shape)

    def keep_final(_m, _i, output):
        state["final"] = output

    fwd = _frozen_norm_hooks(lm, replay=frozen) + lm.mlp_hooks(mlp_in.__setitem__, set_out)
    fwd += [(lm.adapter.final_norm(lm.model), keep_final)]
    new_embed = embed.reshape(1, *embed.shape)
    with frozen_attention(replay=frozen), lm.hooks(fwd), _block0_input(lm, lambda h: new_embed.to(h.dtype)):
        lm.model.base_model(input_ids=tokens.reshape(1, -1).to(lm.device), use_cache=False)
    return FrozenRun(
        mlp_in=torch.stack([m[0] for m in _every_layer(mlp_in, "MLP input")], dim=1), final=state["final"][0]
    )
