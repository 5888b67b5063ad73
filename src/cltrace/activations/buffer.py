"""A token-level shuffle buffer with a fixed capacity in tokens.

Harvested activations arrive a context at a time, so consecutive tokens come from the same
document. Training wants many documents in every batch. The buffer keeps up to `capacity`
tokens (each a `[L, d]` MLP input and a `[L, d]` MLP output) in preallocated storage:

    fill until full -> emit a random half -> refill the freed slots -> ...  -> drain the rest

Every token pushed is emitted exactly once. Memory is the two `[capacity, L, d]` tensors plus
whatever the caller holds of an emitted half.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor


class ActivationBatch(NamedTuple):
    """MLP input and output of the harvested layers for a set of tokens (one row per token).

    Tensors are in the harvest's storage dtype (bf16 by default); `.to(dtype=torch.float32)`
    gives float32 copies. Layer k of the tensors is `layers[k]` of the harvest (all layers
    unless a subset was asked for).
    """

    mlp_in: Float[Tensor, "tokens layer d_model"]
    mlp_out: Float[Tensor, "tokens layer d_model"]

    @property
    def n_tokens(self) -> int:
        return int(self.mlp_in.shape[0])

    def slice(self, start: int, stop: int) -> ActivationBatch:
        return ActivationBatch(self.mlp_in[start:stop], self.mlp_out[start:stop])

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> ActivationBatch:
        return ActivationBatch(
            self.mlp_in.to(device=device, dtype=dtype), self.mlp_out.to(device=device, dtype=dtype)
        )


def concat(parts: list[ActivationBatch]) -> ActivationBatch:
    """Tokens of several batches, in order."""
    if len(parts) == 1:
        return parts[0]
    return ActivationBatch(torch.cat([p.mlp_in for p in parts]), torch.cat([p.mlp_out for p in parts]))


def rebatch(
    chunks: Iterable[ActivationBatch], batch_tokens: int, drop_last: bool = False
) -> Iterator[ActivationBatch]:
    """Cut a stream of token chunks into batches of exactly `batch_tokens` (the last may be
    smaller unless `drop_last`)."""
    pending: list[ActivationBatch] = []
    n_pending = 0
    for chunk in chunks:
        start = 0
        while n_pending + chunk.n_tokens - start >= batch_tokens:
            stop = start + batch_tokens - n_pending
            yield concat(pending + [chunk.slice(start, stop)])
            pending, n_pending, start = [], 0, stop
        if start < chunk.n_tokens:
            pending.append(chunk.slice(start, chunk.n_tokens))
            n_pending += chunk.n_tokens - start
    if n_pending and not drop_last:
        yield concat(pending)


def repeat_later(chunks: Iterable[ActivationBatch], times: int, gap_tokens: int) -> Iterator[ActivationBatch]:
    """Each chunk `times` times: once as it arrives, then again each time `gap_tokens` more
    fresh tokens have arrived (repeats due at the end come out then, in order).

    With `gap_tokens` at least a shuffle buffer's capacity, a token's copies pass through the
    buffer apart and land in different batches. Holds up to (times - 1) x gap_tokens tokens
    (plus one chunk) for the repeats.
    """
    if times < 1 or gap_tokens < 0:
        raise ValueError(f"times must be >= 1 and gap_tokens >= 0, got {times}, {gap_tokens}")
    due: list[tuple[int, int, ActivationBatch]] = []  # (fresh position due, order, chunk)
    fresh = order = 0  # fresh tokens so far; chunks queued so far
    for chunk in chunks:
        yield chunk
        fresh += chunk.n_tokens
        for j in range(1, times):
            heapq.heappush(due, (fresh + j * gap_tokens, order, chunk))
            order += 1
        while due and due[0][0] <= fresh:
            yield heapq.heappop(due)[2]
    while due:
        yield heapq.heappop(due)[2]


class ShuffleBuffer:
    """Fixed-capacity token store that emits tokens in random order.

    Args:
        capacity: tokens held at most (>= 2).
        n_layers, d_model: shape of one token's activations.
        dtype: storage dtype.
        generator: source of randomness (seed it for reproducible order).
    """

    def __init__(
        self,
        capacity: int,
        n_layers: int,
        d_model: int,
        dtype: torch.dtype,
        generator: torch.Generator | None = None,
    ):
        if capacity < 2:
            raise ValueError(f"capacity must be >= 2 tokens, got {capacity}")
        self.capacity = capacity
        self._in = torch.empty(capacity, n_layers, d_model, dtype=dtype)  # (C, L, d)
        self._out = torch.empty(capacity, n_layers, d_model, dtype=dtype)  # (C, L, d)
        self._free = torch.arange(capacity)  # slot indices not holding a token
        self._gen = generator

    def __len__(self) -> int:
        """Tokens currently held (never more than `capacity`)."""
        return self.capacity - int(self._free.numel())

    @property
    def full(self) -> bool:
        return self._free.numel() == 0

    def push(self, acts: ActivationBatch) -> ActivationBatch:
        """Store as many of `acts` as fit; return the tokens that did not fit (maybe none)."""
        k = min(acts.n_tokens, int(self._free.numel()))
        slots, self._free = self._free[:k], self._free[k:]
        self._in.index_copy_(0, slots, acts.mlp_in[:k].to(self._in.dtype))
        self._out.index_copy_(0, slots, acts.mlp_out[:k].to(self._out.dtype))
        return acts.slice(k, acts.n_tokens)

    def pop_half(self) -> ActivationBatch:
        """Remove and return a random half of the held tokens (call when full)."""
        return self._pop(max(1, len(self) // 2))

    def drain(self) -> ActivationBatch:
        """Remove and return every held token, in random order."""
        return self._pop(len(self))

    def _pop(self, n: int) -> ActivationBatch:
        held = self._held_slots()
        chosen = held[torch.randperm(held.numel(), generator=self._gen)[:n]]
        out = ActivationBatch(self._in.index_select(0, chosen), self._out.index_select(0, chosen))
        self._free = torch.cat([self._free, chosen])
        return out

    def _held_slots(self) -> Tensor:
        is_free = torch.zeros(self.capacity, dtype=torch.bool)
        is_free[self._free] = True
        return (~is_free).nonzero().squeeze(1)
