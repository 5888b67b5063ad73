"""Token effects: the tokens each feature's decoder most promotes and suppresses.

The decoder direction is the *sum over its target layers* Σ_{l'≥l} W_dec_{l→l'} (a CLT feature
writes to every later MLP output, and all of them reach the residual stream at the top),
multiplied by the final norm's gain and the unembedding. The final norm's per-token
denominator is a positive scale and logit soft-capping is monotonic, so the ranking is exact;
values are logit changes per unit of activation before that scale.

Stored per feature in the `effects` table: ids i32[n], values f32[n], for promoted then
suppressed; written layer by layer, resumably (meta `effects_layers_done`).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from cltrace.features.config import FeatureStoreConfig
from cltrace.features.store import FeatureStore, add_vocab

if TYPE_CHECKING:
    from torch import Tensor

    from cltrace.models.loading import LoadedModel
    from cltrace.transcoders.interface import TranscoderLike

EFFECTS_METHOD = "sum over target layers of W_dec, times final-norm gain, times W_U"


def final_norm_gain(model: "LoadedModel") -> "Tensor":
    """The final norm's elementwise gain [d] (Gemma stores weight - 1)."""
    import torch

    norm = model.adapter.final_norm(model.model)
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor):  # no affine gain (None)
        return torch.ones(model.d_model)
    weight = weight.detach().float()
    return 1.0 + weight if model.adapter.norm_kind == "rms_plus_one" else weight


def token_effects(
    model: "LoadedModel", transcoder: TranscoderLike, layer: int, n: int, chunk_elems: int = 2**24
) -> tuple["Tensor", "Tensor", "Tensor", "Tensor"]:
    """Top and bottom `n` tokens by direct logit effect for every feature of `layer`.

    Returns (promoted ids [F, n], promoted values [F, n], suppressed ids, suppressed values),
    values as described in the module docstring (sum over target layers).
    """
    import torch

    with torch.no_grad():
        w_dec = transcoder.decoder_weight(layer).float().sum(1)  # [F, d]
        unembed = model.adapter.unembed(model.model).weight  # [V, d]
        dirs = w_dec.to(unembed.device) * final_norm_gain(model).to(unembed.device)  # [F, d]
        chunk = max(1, chunk_elems // unembed.shape[0])
        outs = [[], [], [], []]
        for start in range(0, dirs.shape[0], chunk):
            logits = dirs[start : start + chunk].to(unembed.dtype) @ unembed.T  # [c, V]
            hi, lo = logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)
            for lst, t in zip(outs, (hi.indices, hi.values.float(), lo.indices, lo.values.float())):
                lst.append(t.cpu())
    p_ids, p_val, s_ids, s_val = (torch.cat(t) for t in outs)
    return p_ids, p_val, s_ids, s_val


def write_effects(
    store: FeatureStore,
    model: "LoadedModel",
    transcoder: TranscoderLike,
    cfg: FeatureStoreConfig,
    show_progress: bool,
) -> None:
    """Compute and store token effects for each layer not done yet (resumable per layer)."""
    import numpy as np

    from cltrace.progress import progress

    done = set(json.loads(store.meta.get("effects_layers_done", "[]")))
    todo = [l for l in range(store.n_layers) if l not in done]
    F = store.n_features
    for layer in progress(todo, desc="token effects", unit="layer", disable=None if show_progress else True):
        p_ids, p_val, s_ids, s_val = token_effects(model, transcoder, layer, cfg.n_effects)
        packed = np.concatenate(
            [
                p_ids.numpy().astype("<i4").view("<u4"),
                p_val.numpy().astype("<f4").view("<u4"),
                s_ids.numpy().astype("<i4").view("<u4"),
                s_val.numpy().astype("<f4").view("<u4"),
            ],
            axis=1,
        )  # [F, 4n] words
        new_ids = set(np.unique(np.concatenate([p_ids.numpy().ravel(), s_ids.numpy().ravel()])).tolist())
        done.add(layer)
        with store.transaction() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO effects (id, data) VALUES (?, ?)",
                ((layer * F + f, packed[f].tobytes()) for f in range(F)),
            )
            add_vocab(conn, model, new_ids)
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('effects_layers_done', ?)",
                (json.dumps(sorted(done)),),
            )
        store._meta = None
