"""Feature sharding and data parallel over 2 CPU processes (gloo) == one process."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.multiprocessing as mp

from cltrace.transcoders.config import TrainConfig
from cltrace.transcoders.model import Transcoder
from cltrace.transcoders.train import synthetic_batches, train

L, D = 3, 16


def config() -> TrainConfig:
    return TrainConfig(
        n_features=32,
        tokens=64 * 6,
        batch_size=64,
        lr=3e-3,
        lambda_s=3e-3,
        lambda_p=1e-3,
        init_tokens=128,
        checkpoint_every=3,
        log_every=2,
        precision="fp32",
        lr_warmup_frac=0.2,
        grad_clip=0.5,
        skip=True,
    )


def data():
    return synthetic_batches(L, D, 64, n_teacher=8, active=2, seed=3)


def _worker(rank: int, world: int, shards: int, init_file: str, run_dir: str) -> None:
    import torch.distributed as dist

    from cltrace.transcoders.distributed import FeatureSharded

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        train(config(), data(), L, D, run_dir, dist=FeatureSharded(shards), log=lambda _m: None)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("shards", [2, 1], ids=["feature-sharded", "data-parallel"])
def test_two_processes_match_one(tmp_path, shards):
    torch.set_num_threads(1)
    single = train(config(), data(), L, D, log=lambda _m: None).transcoder
    run = tmp_path / "run"
    mp.spawn(_worker, args=(2, shards, str(tmp_path / "pg"), str(run)), nprocs=2, join=True)
    both = Transcoder.load(run / "transcoder")
    for (name, a), b in zip(single.state_dict().items(), both.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), name
    assert (run / "checkpoint.json").exists()
    assert sorted(p.name for p in (run / "ckpt-00000006").iterdir()) == ["rank0", "rank1"]
