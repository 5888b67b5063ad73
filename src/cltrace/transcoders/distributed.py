"""Data parallel + feature sharding, under `torchrun` (gloo on CPU, NCCL on CUDA).

The world is a grid of dp × fs ranks: rank = dp_rank · fs + fs_rank.
- Feature sharding: the fs ranks of a row see the same tokens; each owns a contiguous slice
  of every layer's features (W_enc[:, :, slice], b_enc, θ, W_dec[l][slice]). Each decodes
  its own features; the partial reconstructions are summed with an all-reduce whose backward
  is the identity (every shard needs the full reconstruction's gradient, once). Biases, the
  skip weights and the norm scalars are replicated.
- Data parallel: the dp rows split every global batch into equal token slices and average
  gradients over each column.
The loss is then exactly the single-process loss on the global batch (up to float error),
and so is every update: AdamW is elementwise, and the clipping norm is reduced over shards.

Usage: `torchrun --nproc-per-node 2 -m cltrace train ...` (set CLTRACE_FEATURE_SHARDS for
dp > 1; default: every rank is a feature shard).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from cltrace.errors import CltraceError
from cltrace.transcoders.model import Transcoder
from cltrace.transcoders.train import Distributed, global_norm

FEATURE_DIM = {"W_enc": 2, "b_enc": 1, "log_threshold": 1}  # W_dec.{l}: dim 0


def _feature_dim(name: str) -> int | None:
    """The feature axis of a parameter, None for replicated ones."""
    if name.startswith("W_dec."):
        return 0
    return FEATURE_DIM.get(name)


class _AllReduceSum(torch.autograd.Function):
    """Sum over a group; backward passes the gradient through unchanged."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def _summed(value: Tensor, group, size: int) -> Tensor:
    """value summed over a process group of `size` ranks (a new tensor unless size is 1)."""
    if size == 1:
        return value
    value = value.clone()
    dist.all_reduce(value, group=group)
    return value


class FeatureSharded(Distributed):
    """A dp × fs grid over an initialised process group."""

    def __init__(self, feature_shards: int | None = None):
        if not dist.is_initialized():
            raise CltraceError("torch.distributed is not initialised", hint="launch with torchrun")
        world, self.rank = dist.get_world_size(), dist.get_rank()
        self.fs = feature_shards or world
        if world % self.fs:
            raise CltraceError(f"{world} processes cannot form rows of {self.fs} feature shards")
        self.dp = world // self.fs
        self.data_parallel = self.dp
        self.dp_rank, self.fs_rank = divmod(self.rank, self.fs)
        self.is_main = self.rank == 0
        rows = [dist.new_group([r * self.fs + i for i in range(self.fs)]) for r in range(self.dp)]
        cols = [dist.new_group([r * self.fs + i for r in range(self.dp)]) for i in range(self.fs)]
        self.fs_group, self.dp_group = rows[self.dp_rank], cols[self.fs_rank]

    def shard(self, full: Transcoder) -> Transcoder:
        """This rank's slice of a full transcoder (same initial values as the full one)."""
        n_feat = full.cfg.n_features
        if n_feat % self.fs:
            raise CltraceError(f"{n_feat} features per layer do not split into {self.fs} shards")
        per = n_feat // self.fs
        cfg = type(full.cfg)(**{**full.cfg.to_dict(), "n_features": per})
        local = Transcoder(cfg).to(next(full.parameters()).device)
        lo = self.fs_rank * per
        state = {}
        for name, value in full.state_dict().items():
            axis = _feature_dim(name)
            state[name] = value if axis is None else value.narrow(axis, lo, per).clone()
        local.load_state_dict(state)
        return local

    def local_batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if self.dp == 1:
            return x, y
        if x.shape[0] % self.dp:
            raise CltraceError(
                f"batch of {x.shape[0]} tokens does not split over {self.dp} data-parallel ranks"
            )
        return x.chunk(self.dp)[self.dp_rank], y.chunk(self.dp)[self.dp_rank]

    def sum_over_batch(self, counts: Tensor) -> Tensor:
        return _summed(counts, self.dp_group, self.dp)

    def reduce_partial(self, recon: Tensor) -> Tensor:
        return recon if self.fs == 1 else _AllReduceSum.apply(recon, self.fs_group)

    def sync_grads(self, tc: Transcoder) -> None:
        if self.dp == 1:
            return
        for p in tc.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=self.dp_group)
                p.grad.div_(self.dp)

    def grad_norm(self, tc: Transcoder) -> Tensor:
        grads = [(name, p.grad) for name, p in tc.named_parameters() if p.grad is not None]
        sharded = global_norm([g for name, g in grads if _feature_dim(name) is not None]).square()
        replicated = global_norm([g for name, g in grads if _feature_dim(name) is None]).square()
        device = next(tc.parameters()).device
        return (self.sum_features(sharded.to(device)) + replicated.to(device)).sqrt()

    def sum_features(self, value: Tensor) -> Tensor:
        return _summed(value, self.fs_group, self.fs)

    def checkpoint_dir(self, run_dir: Path, step: int) -> Path:
        return run_dir / f"ckpt-{step:08d}" / f"rank{self.rank}"

    def barrier(self) -> None:
        dist.barrier()

    def full_transcoder(self, tc: Transcoder) -> Transcoder | None:
        """Gather the shards of row 0 into one transcoder on rank 0 (None elsewhere)."""
        state = {}
        for name, value in tc.state_dict().items():
            axis = _feature_dim(name)
            if axis is None or self.fs == 1:
                state[name] = value
                continue
            parts = [torch.empty_like(value) for _ in range(self.fs)]
            dist.all_gather(parts, value.contiguous(), group=self.fs_group)
            state[name] = torch.cat(parts, dim=axis)
        if not self.is_main:
            return None
        cfg = type(tc.cfg)(**{**tc.cfg.to_dict(), "n_features": tc.cfg.n_features * self.fs})
        full = Transcoder(cfg)
        full.load_state_dict(state)
        return full


def setup_from_env(device: str = "cpu") -> Distributed:
    """FeatureSharded when launched by torchrun (WORLD_SIZE > 1), else the one-process default."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    shards = os.environ.get("CLTRACE_FEATURE_SHARDS")
    return FeatureSharded(int(shards) if shards else None)
