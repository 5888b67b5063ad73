"""FeatureStoreConfig: how a feature store is built (saved in its meta table)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class FeatureStoreConfig:
    """How a feature store is built. Saved in its meta table; a resumed build must match."""

    context_len: int = 64  # tokens per context, BOS included; position 0 is not scored
    top_k: int = 20  # top activating examples kept per feature
    n_bins: int = 5  # slices of the activation range for the spread of examples
    per_bin: int = 4  # random examples kept per slice
    n_effects: int = 10  # promoted and suppressed tokens kept per feature
    batch_contexts: int = 8  # contexts per model forward
    encode_elems: int = 2**25  # max tokens*L*F activations materialised at once
    flush_tokens: int = 32768  # write to the database every this many tokens
    seed: int = 0  # reservoir sampling seed

    def __post_init__(self) -> None:
        if self.context_len < 2:
            raise ValueError("context_len must be at least 2 (position 0 is not scored)")
        if min(self.top_k, self.n_bins, self.per_bin, self.batch_contexts, self.flush_tokens) < 1:
            raise ValueError("top_k, n_bins, per_bin, batch_contexts and flush_tokens must be >= 1")

    def identity(self) -> dict:
        """The fields that change what is stored (a resumed build must agree on them)."""
        return {
            k: v
            for k, v in asdict(self).items()
            if k in ("context_len", "top_k", "n_bins", "per_bin", "n_effects", "seed")
        }
