"""Attribution graphs: the Graph dataclass, its node table and its file format.

A graph is built by `cltrace.attribution.build.attribute` (METHOD.md §3); the stages live in
`config` (AttributionConfig), `inputs`, `memory`, `active` (active features, errors),
`targets` (logit targets), `backward` (backward passes), `edges` (edge read-out),
`influence` and `traversal`.

Node order (circuit-tracer's): selected features sorted by (layer, pos, feature), error nodes
(index ``layer * n_pos + pos``), token embeddings (pos), logits. ``adjacency[target, source]``.
An embedding node is the residual stream entering block 0 (GPT-2: token + position embedding;
Gemma: the scaled token embedding).

File format: one safetensors file (`<slug>.graph.safetensors`), the tensors of the Graph and
its JSON metadata (``format_version``, prompt, ids, config, stats) in the header.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

# Names that lived here before the split stay importable from here (compatibility). `attribute`
# is resolved on first use (module __getattr__): cltrace.attribution.build imports Graph from here.
from cltrace.attribution.active import ActiveFeatures, find_active_features, skip_function
from cltrace.attribution.backward import PrefixForwards, backward_batch
from cltrace.attribution.config import AttributionConfig
from cltrace.attribution.edges import EdgeReader
from cltrace.attribution.influence import partial_influence
from cltrace.attribution.inputs import check_transcoder, prepare_tokens, starts_with_special
from cltrace.attribution.memory import (
    available_memory,
    check_forward_memory,
    check_source_memory,
    choose_batch_size,
    forward_memory,
)
from cltrace.attribution.targets import LogitTargets, encoder_rows, logit_targets
from cltrace.errors import CltraceError

if TYPE_CHECKING:
    from cltrace.attribution.build import attribute

FORMAT_VERSION = 1
NODE_TYPES = ("feature", "error", "embedding", "logit")


@dataclass
class NodeTable:
    """One entry per node, in adjacency order. `feature` is -1 and `activation` NaN where
    meaningless; `token_id` is the prompt token (embeddings) or the output token (logits)."""

    type: list[str]
    layer: Int[Tensor, "node"]  # logits: n_layers; embeddings: -1
    pos: Int[Tensor, "node"]
    feature: Int[Tensor, "node"]
    activation: Float[Tensor, "node"]
    token_id: Int[Tensor, "node"]


@dataclass
class Graph:
    """An unpruned attribution graph (dense, float32, row = target, column = source)."""

    adjacency: Float[Tensor, "node node"]
    active_features: Int[Tensor, "active 3"]  # (layer, pos, feature) of every active feature
    activation_values: Float[Tensor, "active"]
    pre_activations: Float[Tensor, "active"]
    selected_features: Int[Tensor, "selected"]  # indices into active_features, sorted
    logit_tokens: Int[Tensor, "logit"]
    logit_probabilities: Float[Tensor, "logit"]
    logit_values: Float[Tensor, "logit"]  # demeaned pre-softcap logits of the targets
    input_tokens: Int[Tensor, "pos"]
    token_strings: list[str]
    prompt: str
    model_name: str
    transcoder_id: str
    n_layers: int
    config: AttributionConfig
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def n_pos(self) -> int:
        return int(self.input_tokens.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.selected_features.shape[0])

    @property
    def n_errors(self) -> int:
        return self.n_layers * self.n_pos

    @property
    def n_logits(self) -> int:
        return int(self.logit_tokens.shape[0])

    @property
    def n_nodes(self) -> int:
        return self.n_features + self.n_errors + self.n_pos + self.n_logits

    @property
    def error_offset(self) -> int:
        return self.n_features

    @property
    def token_offset(self) -> int:
        return self.n_features + self.n_errors

    @property
    def logit_offset(self) -> int:
        return self.token_offset + self.n_pos

    def nodes(self) -> NodeTable:
        """The node table (built on demand from the compact fields)."""
        L, n, k, F = self.n_layers, self.n_pos, self.n_logits, self.n_features
        feats = self.active_features[self.selected_features]
        err_l = torch.arange(L).repeat_interleave(n)
        err_p = torch.arange(n).repeat(L)
        minus = lambda m: torch.full((m,), -1, dtype=torch.long)  # noqa: E731
        nan = lambda m: torch.full((m,), float("nan"))  # noqa: E731
        return NodeTable(
            type=["feature"] * F + ["error"] * (L * n) + ["embedding"] * n + ["logit"] * k,
            layer=torch.cat([feats[:, 0], err_l, minus(n), torch.full((k,), L)]),
            pos=torch.cat([feats[:, 1], err_p, torch.arange(n), torch.full((k,), n - 1)]),
            feature=torch.cat([feats[:, 2], minus(L * n + n + k)]),
            activation=torch.cat(
                [self.activation_values[self.selected_features].float(), nan(L * n + n + k)]
            ),
            token_id=torch.cat([minus(F + L * n), self.input_tokens, self.logit_tokens]),
        )

    # ----- persistence: one safetensors file, the JSON metadata in its header (atomic write)

    def _tensors(self) -> dict[str, Tensor]:
        names = (
            "adjacency",
            "active_features",
            "activation_values",
            "pre_activations",
            "selected_features",
            "logit_tokens",
            "logit_probabilities",
            "logit_values",
            "input_tokens",
        )
        return {n: getattr(self, n).detach().cpu().contiguous() for n in names}

    def _meta(self) -> dict[str, Any]:
        return dict(
            format_version=FORMAT_VERSION,
            token_strings=self.token_strings,
            prompt=self.prompt,
            model_name=self.model_name,
            transcoder_id=self.transcoder_id,
            n_layers=self.n_layers,
            config=self.config.to_dict(),
            stats=self.stats,
        )

    def save(self, path: str | Path) -> Path:
        """Write the graph to `path` (safetensors, metadata as JSON in the header), atomically."""
        from cltrace.io import atomic_save_tensors

        return atomic_save_tensors(
            self._tensors(), path, metadata={"cltrace_graph": json.dumps(self._meta())}
        )

    @classmethod
    def load(cls, path: str | Path) -> "Graph":
        """Read a graph written by `save`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise CltraceError(f"no graph file at {path}", "run `cltrace trace` to build one")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["cltrace_graph"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (KeyError, ValueError, OSError) as err:
            raise CltraceError(f"{path} is not a cltrace graph file ({err})") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise CltraceError(
                f"{path}: graph format {meta.get('format_version')} is not supported",
                f"this cltrace reads format {FORMAT_VERSION}",
            )
        meta.pop("format_version")
        meta["config"] = AttributionConfig.from_dict(meta["config"])
        return cls(**tensors, **meta)


def __getattr__(name: str) -> Any:
    if name == "attribute":
        from cltrace.attribution.build import attribute

        return attribute
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AttributionConfig",
    "Graph",
    "NodeTable",
    "attribute",
    "FORMAT_VERSION",
    "NODE_TYPES",
    "ActiveFeatures",
    "find_active_features",
    "skip_function",
    "PrefixForwards",
    "backward_batch",
    "EdgeReader",
    "partial_influence",
    "check_transcoder",
    "prepare_tokens",
    "starts_with_special",
    "available_memory",
    "check_forward_memory",
    "check_source_memory",
    "choose_batch_size",
    "forward_memory",
    "LogitTargets",
    "encoder_rows",
    "logit_targets",
]
