"""The inputs of `attribute`, checked: the prompt's tokens, the transcoder's shape, BOS."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from cltrace.errors import CltraceError
from cltrace.models.loading import LoadedModel
from cltrace.transcoders.interface import (
    check_transcoder,
)  # re-exported: the shape check lives with TranscoderLike


def prepare_tokens(lm: LoadedModel, prompt: str | Sequence[int] | Tensor) -> Int[Tensor, "pos"]:
    """Token ids [n] of the prompt (a string gets the family's BOS), checked for the model."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise CltraceError("the prompt is empty", "give some text to trace")
        tokens = lm.tokenize(prompt)[0]
    else:
        tokens = torch.as_tensor(prompt, dtype=torch.long).reshape(-1).to(lm.device)
    if tokens.numel() == 0:
        raise CltraceError("the prompt has no tokens", "give some text to trace")
    if int(tokens.min()) < 0 or int(tokens.max()) >= lm.vocab_size:
        raise CltraceError(f"token ids must be in [0, {lm.vocab_size})")
    limit = lm.max_positions
    if limit is not None and tokens.numel() > limit:
        raise CltraceError(
            f"the prompt has {tokens.numel()} tokens; {lm.name} reads at most {limit}", "shorten the prompt"
        )
    return tokens


def starts_with_special(lm: LoadedModel, tokens: Tensor) -> bool:
    """Is the first token BOS or another special token (circuit-tracer's zero_bos rule)?"""
    special = set(getattr(lm.tokenizer, "all_special_ids", None) or [])
    if lm.bos_token_id is not None:
        special.add(int(lm.bos_token_id))
    return int(tokens[0]) in special


__all__ = ["check_transcoder", "prepare_tokens", "starts_with_special"]
