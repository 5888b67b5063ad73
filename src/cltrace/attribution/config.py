"""AttributionConfig: how `attribute` builds a graph (saved inside the graph file)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from cltrace.errors import CltraceError


@dataclass
class AttributionConfig:
    """How `attribute` builds a graph. Saved inside the graph file."""

    max_n_logits: int = 10  # at most this many logit nodes
    desired_logit_prob: float = 0.95  # ... or fewer, once they cover this probability
    output_targets: tuple[int, ...] | None = None  # token ids to attribute instead of the top logits
    max_feature_nodes: int | None = 4096  # feature targets visited (None: every active feature)
    batch_size: int | None = None  # targets per backward pass (None: from free memory)
    update_interval: int = 16  # batches between re-rankings of feature influence
    # (circuit-tracer: 4 batches of 512 on a GPU)
    prefix_buckets: int = 8  # prompt prefixes with their own forward (1: none)
    zero_bos: bool = True  # no features / error at a leading BOS or other
    # special token (circuit-tracer's default)
    edge_dtype: Literal["float32", "bfloat16"] = "float32"  # precision of the edge read-out matmuls
    backward_dtype: Literal["float32", "bfloat16"] = "float32"  # bfloat16: autocast backward,
    # ~2x faster with AMX, edges to ~1% (not exact)
    progress: bool | None = None  # progress bar (None: when stderr is a terminal)

    def __post_init__(self):
        if self.output_targets is not None:
            self.output_targets = tuple(int(t) for t in self.output_targets)
            if not self.output_targets:
                raise CltraceError("output_targets is empty", "give at least one token or None")
        if self.max_n_logits < 1:
            raise CltraceError(f"max_n_logits must be >= 1, got {self.max_n_logits}")
        if not 0.0 < self.desired_logit_prob <= 1.0:
            raise CltraceError(f"desired_logit_prob must be in (0, 1], got {self.desired_logit_prob}")
        if self.max_feature_nodes is not None and self.max_feature_nodes < 0:
            raise CltraceError(f"max_feature_nodes must be >= 0, got {self.max_feature_nodes}")
        if self.batch_size is not None and self.batch_size < 1:
            raise CltraceError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.prefix_buckets < 1:
            raise CltraceError(f"prefix_buckets must be >= 1, got {self.prefix_buckets}")
        if self.update_interval < 1:
            raise CltraceError(f"update_interval must be >= 1, got {self.update_interval}")
        for name in ("edge_dtype", "backward_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16"):
                raise CltraceError(f"{name} must be float32 or bfloat16, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["output_targets"] = list(self.output_targets) if self.output_targets else None
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AttributionConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
