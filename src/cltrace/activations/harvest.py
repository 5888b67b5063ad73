"""Harvest MLP inputs and outputs: documents -> packed contexts -> forward -> shuffled tokens.

The stream, stage by stage:

1-2. `iter_contexts`: the documents packed into contexts of `ctx_len` tokens, each
   `[BOS] + (ctx_len - 1)` stream tokens, by the packer the feature store uses too
   (`activations.contexts`: its rules for empty documents and models without BOS). No token
   is lost: the last context may be shorter.
3. `harvest_contexts`: one forward per batch of contexts without the unembedding
   (`LoadedModel.capture`), every layer's MLP input and output, position 0 dropped (it is
   the attention sink, 100-1000x the norm of other positions), one row per token.
4. `iter_activation_batches`: rows go through a `ShuffleBuffer` (fixed capacity in tokens,
   emits a random half whenever full) and come out as `ActivationBatch`es of `batch_tokens`.

Memory is bounded by the buffer (2 x buffer_tokens x L x d in the storage dtype) plus one
forward batch and one emitted half; nothing scales with the number of documents.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from cltrace.activations import contexts as packer
from cltrace.activations.buffer import ActivationBatch, ShuffleBuffer, rebatch, repeat_later
from cltrace.activations.contexts import document_token_ids, pack_contexts
from cltrace.errors import CltraceError
from cltrace.hardware import fast_dtype
from cltrace.models.loading import LoadedModel
from cltrace.progress import progress

__all__ = [
    "ActivationBatch",
    "HarvestConfig",
    "iter_activation_batches",
    "iter_contexts",
    "harvest_contexts",
    "pack_contexts",
    "limit_contexts",
    "require_contexts",
    "document_token_ids",
    "default_forward_dtype",
]

DTypeName = Literal["float32", "bfloat16", "float16"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class HarvestConfig:
    """How activations are harvested. Saved in a store's manifest.

    Position 0 of every context (the BOS attention sink) is always left out.
    """

    ctx_len: int = 128
    """Tokens per context, BOS included; each context yields ctx_len - 1 harvested tokens."""
    batch_contexts: int = 32
    """Contexts per forward pass (gemma-3-270m, bf16, Sapphire Rapids, 2 cores: 3,400 tokens/s
    at 8, 3,750 at 16, 4,040 at 32)."""
    buffer_tokens: int = 16_384
    """Shuffle-buffer capacity in tokens (Gemma-3-270m, bf16: ~46 KB per token, 0.75 GB)."""
    forward_dtype: Literal["float32", "bfloat16"] | None = None
    """dtype of the forward pass; None: bfloat16 on CUDA or on CPUs with AMX, else float32.
    The model must be loaded in this dtype (`load_model(..., dtype=...)`)."""
    store_dtype: DTypeName = "bfloat16"
    """dtype of stored/emitted activations. Avoid float16 for Gemma (residual up to ~1e5)."""
    seed: int = 0
    """Seed of every shuffle (buffer emission order, store shard order)."""
    layers: tuple[int, ...] | None = None
    """Layers to harvest (sorted, distinct); None: all."""

    def __post_init__(self) -> None:
        if self.ctx_len < 2:
            raise ValueError(f"ctx_len must be >= 2 (BOS + one token), got {self.ctx_len}")
        if self.batch_contexts < 1:
            raise ValueError(f"batch_contexts must be >= 1, got {self.batch_contexts}")
        if self.buffer_tokens < 2:
            raise ValueError(f"buffer_tokens must be >= 2, got {self.buffer_tokens}")
        if self.forward_dtype not in (None, "float32", "bfloat16"):
            raise ValueError(f"forward_dtype must be float32, bfloat16 or None, got {self.forward_dtype!r}")
        if self.store_dtype not in _DTYPES:
            raise ValueError(f"store_dtype must be one of {sorted(_DTYPES)}, got {self.store_dtype!r}")
        if self.layers is not None:
            self.layers = tuple(int(l) for l in self.layers)
            if not self.layers or list(self.layers) != sorted(set(self.layers)) or self.layers[0] < 0:
                raise ValueError(f"layers must be distinct, sorted and >= 0, got {self.layers}")

    @property
    def tokens_per_context(self) -> int:
        return self.ctx_len - 1

    @property
    def torch_store_dtype(self) -> torch.dtype:
        return _DTYPES[self.store_dtype]

    def torch_forward_dtype(self, device: torch.device | str = "cpu") -> torch.dtype:
        """The forward dtype, resolving None for `device`."""
        if self.forward_dtype is None:
            return default_forward_dtype(device)
        return _DTYPES[self.forward_dtype]

    def layer_list(self, n_layers: int) -> list[int]:
        """The harvested layers of a model with `n_layers` layers."""
        layers = list(range(n_layers)) if self.layers is None else list(self.layers)
        if layers[-1] >= n_layers:
            raise CltraceError(
                f"layer {layers[-1]} does not exist: the model has {n_layers} layers",
                f"choose layers between 0 and {n_layers - 1}",
            )
        return layers


def default_forward_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """bfloat16 on CUDA and on CPUs with fast bf16 matmuls (`cltrace.hardware`), else float32."""
    return fast_dtype(device)


def iter_contexts(model: LoadedModel, documents: Iterable[str], cfg: HarvestConfig) -> Iterator[list[int]]:
    """Packed contexts of the document stream (`activations.contexts`, the last one may be short)."""
    return packer.iter_contexts(model, documents, cfg.ctx_len, partial=True)


def batch_contexts(contexts: Iterable[list[int]], size: int) -> Iterator[list[list[int]]]:
    """Groups of up to `size` contexts of equal length (only the final context may differ)."""
    group: list[list[int]] = []
    for ctx in contexts:
        if group and (len(group) == size or len(ctx) != len(group[0])):
            yield group
            group = []
        group.append(ctx)
    if group:
        yield group


class _StopForward(Exception):
    """Raised by the last harvested layer's hook: nothing after it is needed."""


def harvest_contexts(model: LoadedModel, contexts: list[list[int]], cfg: HarvestConfig) -> ActivationBatch:
    """MLP input/output of equal-length contexts, position 0 dropped, one row per token.

    Same values as `LoadedModel.capture(tokens)[:, 1:]`, but hooks copy each layer straight
    into preallocated storage-dtype tensors (no stacking, no float32 copies) and the forward
    stops after the last harvested layer. Rows are ordered context by context, position by
    position, on the CPU.
    """
    tokens = torch.tensor(contexts, dtype=torch.long, device=model.device)  # (B, T)
    layers = cfg.layer_list(model.n_layers)
    shape = (tokens.shape[0], tokens.shape[1] - 1, len(layers), model.d_model)
    ins = torch.empty(shape, dtype=cfg.torch_store_dtype, device=model.device)  # (B, T-1, L, d)
    outs = torch.empty(shape, dtype=cfg.torch_store_dtype, device=model.device)  # (B, T-1, L, d)

    def keep(store: torch.Tensor, k: int, last: bool):
        def hook(_module, _inputs, output):
            store[:, :, k].copy_(output[:, 1:])
            if last:
                raise _StopForward

        return hook

    adapter, last = model.adapter, len(layers) - 1
    hooks = [(adapter.mlp_in_module(model.blocks[l]), keep(ins, k, False)) for k, l in enumerate(layers)]
    hooks += [
        (adapter.mlp_out_module(model.blocks[l]), keep(outs, k, k == last)) for k, l in enumerate(layers)
    ]
    with torch.no_grad(), model.hooks(hooks):
        try:
            model.run(tokens, with_logits=False)
        except _StopForward:
            pass
    n_rows = shape[0] * shape[1]
    return ActivationBatch(ins.view(n_rows, *shape[2:]).cpu(), outs.view(n_rows, *shape[2:]).cpu())


def check_model(model: LoadedModel, cfg: HarvestConfig) -> None:
    """Raise if the model is not in the forward dtype; warn about float16 storage for Gemma."""
    want = cfg.torch_forward_dtype(model.device)
    if model.dtype != want:
        name = str(want).removeprefix("torch.")
        raise CltraceError(
            f"the model is loaded in {str(model.dtype).removeprefix('torch.')} but the harvest "
            f"runs its forward in {name}",
            f"load it with load_model(..., dtype=torch.{name}) or set HarvestConfig.forward_dtype",
        )
    if cfg.store_dtype == "float16" and model.adapter.family.startswith("gemma"):
        warnings.warn(
            "float16 storage can overflow for Gemma, whose residual stream reaches ~1e5; use bfloat16",
            stacklevel=3,
        )


def iter_token_rows(
    model: LoadedModel, contexts: Iterable[list[int]], cfg: HarvestConfig, max_tokens: int | None = None
) -> Iterator[ActivationBatch]:
    """Harvested rows in stream order, one chunk per forward batch, at most `max_tokens`."""
    if max_tokens is not None:
        contexts = limit_contexts(contexts, max_tokens)
    for group in batch_contexts(contexts, cfg.batch_contexts):
        yield harvest_contexts(model, group, cfg)


def limit_contexts(contexts: Iterable[list[int]], max_tokens: int) -> Iterator[list[int]]:
    """Contexts holding `max_tokens` harvestable tokens in all (the last one cut short)."""
    left, it = max_tokens, iter(contexts)
    while left > 0:  # check before pulling: a shared iterator loses nothing
        ctx = next(it, None)
        if ctx is None:
            return
        ctx = ctx[: left + 1]
        left -= len(ctx) - 1
        yield ctx


def iter_activation_batches(
    model: LoadedModel,
    documents: Iterable[str],
    cfg: HarvestConfig,
    batch_tokens: int = 4096,
    max_tokens: int | None = None,
    drop_last: bool = False,
    show_eta: bool = True,
    repeats: int = 1,
) -> Iterator[ActivationBatch]:
    """Token-shuffled batches of MLP inputs/outputs, `[batch_tokens, L, d]`, straight from text.

    Args:
        model: loaded in the forward dtype of `cfg`.
        documents: any iterable of strings (e.g. `cltrace.data.corpus.iter_documents(split)`).
        cfg: harvest settings (context length, buffer size, dtypes, seed, layers).
        batch_tokens: tokens per emitted batch (the last one may be smaller unless drop_last).
        max_tokens: stop after this many emitted tokens (repeats included: the harvest reads
            max_tokens / repeats, rounded up); None: the whole stream.
        show_eta: give the progress bar `max_tokens` as its total; False for a consumer that
            stops early on its own (training under a wall-time budget): no false ETA.
        repeats: emit every harvested token this many times, the copies `cfg.buffer_tokens`
            fresh tokens apart (`repeat_later`), so they land in different batches. Training
            uses it where the forward is a large share of a step (CPU): 2 halves its cost per
            trained token.

    Raises:
        CltraceError: the documents hold no text, or the model's dtype does not match.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    check_model(model, cfg)
    contexts = require_contexts(iter_contexts(model, documents, cfg))
    layers = cfg.layer_list(model.n_layers)
    gen = torch.Generator().manual_seed(cfg.seed)
    buffer = ShuffleBuffer(cfg.buffer_tokens, len(layers), model.d_model, cfg.torch_store_dtype, gen)
    harvested = None if max_tokens is None else -(-max_tokens // repeats)
    bar = progress(total=harvested if show_eta else None, desc="harvest", unit="tok", unit_scale=True)
    rows = _counted(iter_token_rows(model, contexts, cfg, harvested), bar)
    chunks = _through_buffer(repeat_later(rows, repeats, cfg.buffer_tokens), buffer)
    try:
        yield from rebatch(chunks, batch_tokens, drop_last)
    finally:
        bar.close()


def _counted(rows: Iterable[ActivationBatch], bar) -> Iterator[ActivationBatch]:
    """The rows, each chunk's tokens counted on the progress bar."""
    for chunk in rows:
        bar.update(chunk.n_tokens)
        yield chunk


def _through_buffer(rows: Iterable[ActivationBatch], buffer: ShuffleBuffer) -> Iterator[ActivationBatch]:
    """Push rows into the buffer; emit a random half each time it fills; drain at the end."""
    for chunk in rows:
        while chunk.n_tokens:
            chunk = buffer.push(chunk)
            if buffer.full:
                yield buffer.pop_half()
    if len(buffer):
        yield buffer.drain()


def require_contexts(contexts: Iterator[list[int]]) -> Iterator[list[int]]:
    """The contexts, or CltraceError if there are none (an empty corpus)."""
    first = next(contexts, None)
    if first is None or len(first) < 2:
        raise CltraceError(
            "the documents hold no text to harvest",
            "check the corpus (`cltrace corpus`) or the files given with --text",
        )
    return itertools.chain([first], contexts)
