"""Family adapters: where each architecture keeps its MLP input, MLP output, norms and unembedding.

Everything downstream of this module is family-agnostic. An adapter answers four questions:

- which modules are the decoder blocks;
- which module's *output* is the MLP input (the normalised residual stream the MLP reads:
  Llama/Qwen `post_attention_layernorm`, Gemma `pre_feedforward_layernorm`, GPT-2 `ln_2`);
- which module's *output* is the MLP output added to the residual stream (Gemma: after
  `post_feedforward_layernorm`; others: the MLP itself);
- which norms sit on the residual path and how to recompute them with a frozen denominator.

The residual stream entering block 0 is the token (and position) embedding for every family,
so no adapter needs to know about embedding scales or learned positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from torch import nn

from cltrace.errors import CltraceError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

NormKind = Literal["rms", "rms_plus_one", "layernorm"]


@dataclass(frozen=True)
class FamilyAdapter:
    """Names of the modules that matter, per family.

    Attributes:
        family: short family name ("gemma", "llama", "qwen", "gpt2").
        blocks_path: dotted path from the CausalLM to the list of decoder blocks.
        mlp_in: attribute of a block whose output is the MLP input.
        mlp_out: attribute of a block whose output is the MLP output added to the residual.
        norm_kind: formula of the norms (all norms of a family share one).
        block_norms: attributes of a block that are norms on the residual path.
        final_norm_path: dotted path from the CausalLM to the final norm.
    """

    family: str
    blocks_path: str
    mlp_in: str
    mlp_out: str
    norm_kind: NormKind
    block_norms: tuple[str, ...]
    final_norm_path: str

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(_get(model, self.blocks_path))

    def mlp_in_module(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.mlp_in)

    def mlp_out_module(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.mlp_out)

    def final_norm(self, model: nn.Module) -> nn.Module:
        return _get(model, self.final_norm_path)

    def unembed(self, model: PreTrainedModel) -> nn.Linear:
        head = model.get_output_embeddings()
        assert isinstance(head, nn.Linear), f"{type(model).__name__} has no linear output embedding"
        return head

    def norm_modules(self, model: nn.Module) -> list[nn.Module]:
        """Every norm on the residual path, in forward order (final norm last)."""
        norms = [getattr(b, name) for b in self.blocks(model) for name in self.block_norms]
        return norms + [self.final_norm(model)]

    def frozen_norm(
        self, module: nn.Module, x: torch.Tensor, scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Recompute `module(x)` with its denominator treated as a constant.

        Args:
            module: a norm of this family.
            x: its input, [..., d].
            scale: the frozen 1/denominator, [..., 1]; computed from x (and detached) if None.
        Returns:
            The norm's output, equal in value to `module(x)`, linear in x for gradients.
        """
        xf = x.float()
        eps = _eps(module)
        weight = cast(torch.Tensor, module.weight).float()
        if self.norm_kind == "layernorm":
            centred = xf - xf.mean(-1, keepdim=True)
            if scale is None:
                scale = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps).detach()
            out = centred * scale * weight
            bias = cast("torch.Tensor | None", getattr(module, "bias", None))
            if bias is not None:
                out = out + bias.float()
            return out.to(x.dtype)
        if scale is None:
            scale = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps).detach()
        if self.norm_kind == "rms_plus_one":
            weight = 1.0 + weight
        return (xf * scale * weight).to(x.dtype)


def _eps(module: nn.Module) -> float:
    for name in ("eps", "variance_epsilon"):
        if hasattr(module, name):
            return float(getattr(module, name))
    raise CltraceError(f"cannot find the epsilon of norm module {type(module).__name__}")


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


_LLAMA = FamilyAdapter(
    family="llama",
    blocks_path="model.layers",
    mlp_in="post_attention_layernorm",
    mlp_out="mlp",
    norm_kind="rms",
    block_norms=("input_layernorm", "post_attention_layernorm"),
    final_norm_path="model.norm",
)
_GEMMA = FamilyAdapter(
    family="gemma",
    blocks_path="model.layers",
    mlp_in="pre_feedforward_layernorm",
    mlp_out="post_feedforward_layernorm",
    norm_kind="rms_plus_one",
    block_norms=(
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    ),
    final_norm_path="model.norm",
)
_GPT2 = FamilyAdapter(
    family="gpt2",
    blocks_path="transformer.h",
    mlp_in="ln_2",
    mlp_out="mlp",
    norm_kind="layernorm",
    block_norms=("ln_1", "ln_2"),
    final_norm_path="transformer.ln_f",
)

#: config.model_type -> adapter
ADAPTERS: dict[str, FamilyAdapter] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": FamilyAdapter(**{**_LLAMA.__dict__, "family": "qwen"}),
    "qwen3": FamilyAdapter(**{**_LLAMA.__dict__, "family": "qwen"}),
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
    "gpt2": _GPT2,
}


def adapter_for(model: nn.Module) -> FamilyAdapter:
    """The adapter for a transformers CausalLM, or a clear error for an unsupported one."""
    return adapter_for_type(getattr(model.config, "model_type", None))


def adapter_for_type(model_type: str | None) -> FamilyAdapter:
    """The adapter for a config's `model_type`; CltraceError naming the supported ones if none."""
    if model_type not in ADAPTERS:
        raise CltraceError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(ADAPTERS))}",
            "use a model of a supported family, or add a FamilyAdapter in "
            "cltrace/models/adapters.py for another one",
        )
    return ADAPTERS[model_type]
