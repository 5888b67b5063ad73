"""What each target injects into its backward pass: logit directions and encoder columns.

Logit targets: the top tokens until `desired_logit_prob` (at most `max_n_logits`) or the
user's `output_targets`; direction = unembedding row minus its mean over the vocabulary,
injected at the final-norm output of the last position (pre-softcap logits). A feature target
injects its encoder column at (layer, pos).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from cltrace.attribution.active import ActiveFeatures
from cltrace.attribution.config import AttributionConfig
from cltrace.errors import CltraceError
from cltrace.models.loading import LoadedModel
from cltrace.transcoders.interface import TranscoderLike


@dataclass
class LogitTargets:
    tokens: Int[Tensor, "logit"]
    probabilities: Float[Tensor, "logit"]
    values: Float[Tensor, "logit"]  # demeaned pre-softcap logits
    directions: Float[Tensor, "logit d_model"]  # unembedding rows minus their vocab mean


@torch.no_grad()
def logit_targets(
    lm: LoadedModel, final_last: Float[Tensor, "d_model"], cfg: AttributionConfig
) -> LogitTargets:
    """Top tokens until `desired_logit_prob` (at most `max_n_logits`), or `output_targets`."""
    unembed = lm.adapter.unembed(lm.model)
    logits = unembed(final_last[None].to(unembed.weight.dtype))[0].float()
    cap = getattr(lm.model.config.get_text_config(), "final_logit_softcapping", None)
    probs = torch.softmax(torch.tanh(logits / cap) * cap if cap else logits, dim=-1)
    if cfg.output_targets is not None:
        tokens = torch.tensor(cfg.output_targets, device=logits.device)
        if int(tokens.max()) >= logits.shape[0] or int(tokens.min()) < 0:
            raise CltraceError(
                f"output target ids {list(cfg.output_targets)} are outside the "
                f"vocabulary (size {logits.shape[0]})"
            )
    else:
        top_p, tokens = torch.topk(probs, min(cfg.max_n_logits, probs.shape[0]))
        cut = int(torch.searchsorted(torch.cumsum(top_p, 0), cfg.desired_logit_prob)) + 1
        tokens = tokens[:cut]
    W = unembed.weight.detach().float()  # [V, d]
    directions = W[tokens] - W.mean(0, keepdim=True)
    values = directions @ final_last.float()
    return LogitTargets(tokens=tokens, probabilities=probs[tokens], values=values, directions=directions)


def encoder_rows(transcoder: TranscoderLike, feats: ActiveFeatures) -> Float[Tensor, "active d_model"]:
    """Each active feature's encoder column (raw scale): what a feature target injects."""
    rows = []
    for l in range(len(feats.layer_start) - 1):
        s, e = feats.layer_start[l], feats.layer_start[l + 1]
        if e > s:
            rows.append(transcoder.encoder_weight(l).detach()[:, feats.index[s:e]].T)
    if not rows:
        return torch.zeros(0, feats.errors.shape[-1], device=feats.errors.device)
    return torch.cat(rows).float()
