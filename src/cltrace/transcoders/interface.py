"""What a trained transcoder is to every stage after training: the `TranscoderLike` Protocol.

Attribution, features, interventions, circuits and the viewer take a `TranscoderLike`. The
concrete `Transcoder` (transcoders/model.py, also what `interop.load_circuit_tracer` returns)
satisfies it, and so does the tests' minimal stand-in (tests/test_features_standin.py). Every
tensor is in the model's raw activation scale: the per-layer normalisation of training is
folded in by the methods. L layers, d residual width, F features per layer; T = L - l target
layers for a CLT feature of layer l, 1 for a PLT.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor, nn

from cltrace.errors import CltraceError
from cltrace.transcoders.config import TranscoderConfig

if TYPE_CHECKING:
    from cltrace.models.loading import LoadedModel
    from cltrace.transcoders.model import Transcoder


@runtime_checkable
class TranscoderLike(Protocol):
    """The read side of a transcoder (see docs/ARCHITECTURE.md, "Transcoder")."""

    cfg: TranscoderConfig  # n_layers, d_model, n_features, kind, skip, activation, model_name

    def encode(self, x: Float[Tensor, "... L d"]) -> Float[Tensor, "... L F"]:
        """Pre-activations W_enc x + b_enc."""
        ...

    def activate(self, pre: Float[Tensor, "... L F"]) -> Float[Tensor, "... L F"]:
        """The activation function (JumpReLU, or TopK)."""
        ...

    def decode(
        self, acts: Float[Tensor, "... L F"], x: Float[Tensor, "... L d"] | None = None
    ) -> Float[Tensor, "... L d"]:
        """Reconstructed MLP outputs; `x` (the MLP inputs) is needed for a skip transcoder."""
        ...

    def encoder_weight(self, layer: int) -> Float[Tensor, "d F"]: ...

    def encoder_bias(self, layer: int) -> Float[Tensor, " F"]: ...

    def threshold(self, layer: int) -> Float[Tensor, " F"]: ...

    def decoder_weight(self, layer: int) -> Float[Tensor, "F T d"]: ...

    def decoder_bias(self) -> Float[Tensor, "L d"]: ...

    def skip_weight(self, layer: int) -> Float[Tensor, "d d"] | None:
        """The linear skip term's matrix (ŷ_l gains x_l @ skip_weight(l)), None without one."""
        ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def __call__(self, x: Float[Tensor, "... L d"]) -> Any:
        """forward(x) -> TranscoderOutput(pre, acts, recon)."""
        ...


if TYPE_CHECKING:

    def _transcoder_satisfies_the_protocol(tc: Transcoder) -> TranscoderLike:  # checked by pyright
        return tc


def device_dtype(transcoder: TranscoderLike) -> tuple[torch.device, torch.dtype]:
    """Where the transcoder's weights live and their dtype (CPU float32 when it has none)."""
    p = next(iter(transcoder.parameters()), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


def check_transcoder(lm: LoadedModel, transcoder: TranscoderLike) -> None:
    """The transcoder must have been made for this model's shape."""
    cfg = transcoder.cfg
    if cfg.n_layers != lm.n_layers or cfg.d_model != lm.d_model:
        raise CltraceError(
            f"the transcoder is for a model with {cfg.n_layers} layers and d_model {cfg.d_model}, "
            f"but {lm.name} has {lm.n_layers} layers and d_model {lm.d_model}",
            f"use a transcoder trained on {lm.name}"
            + (f" (this one was trained on {cfg.model_name})" if getattr(cfg, "model_name", None) else ""),
        )


__all__ = ["TranscoderLike", "check_transcoder", "device_dtype"]
