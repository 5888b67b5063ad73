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


def _topk_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from cltrace.transcoders.distributed import FeatureSharded

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    cfg = TrainConfig(
        n_features=32,
        activation="batchtopk",
        topk=2,
        tokens=64 * 8,
        batch_size=64,
        init_tokens=128,
        checkpoint_every=0,
        precision="fp32",
        balance_rate=0.05,
        balance_window_tokens=32,
        balance_max_density=0.02,
        resample_every_tokens=64,
        dead_window_tokens=64,
    )
    logs: list[str] = []
    try:
        tc = train(cfg, data(), L, D, dist=FeatureSharded(1), log=logs.append).transcoder
        state = {"select_bias": tc.select_bias, "W_enc": tc.W_enc.detach()}
        save_file({k: v.contiguous() for k, v in state.items()}, f"{out_dir}/rank{rank}.safetensors")
        with open(f"{out_dir}/rank{rank}.log", "w") as fh:
            fh.write("\n".join(logs))
    finally:
        dist.destroy_process_group()


def test_data_parallel_ranks_agree_on_balancing_and_skip_resampling(tmp_path):
    """Each rank sees its own half of the batch: the selection bias follows the counts of the
    whole batch (the same on both ranks), and resampling, which would aim each rank's features
    at different tokens, is skipped with a note."""
    from safetensors.torch import load_file

    mp.spawn(_topk_worker, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    a, b = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert a["select_bias"].abs().sum() > 0  # the balancing acted
    assert torch.equal(a["select_bias"], b["select_bias"])
    assert torch.allclose(a["W_enc"], b["W_enc"], atol=1e-6)
    note = "resampling of dead features runs without data parallelism only"
    assert note in (tmp_path / "rank0.log").read_text()
