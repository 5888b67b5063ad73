"""Ctrl-C during training writes a checkpoint at the current step; --resume continues from it
along the same trajectory as an uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch

import test_train
from cltrace.transcoders.model import Transcoder
from cltrace.transcoders.train import Trainer, train
from test_train import D, L, config, data

one_thread = test_train.one_thread  # autouse fixture: one torch thread


def ctrl_c_after(batches, n: int):
    """The first `n` batches, then KeyboardInterrupt (as Ctrl-C while the next one is read)."""
    for i, batch in enumerate(batches):
        if i == n:
            raise KeyboardInterrupt
        yield batch


def test_ctrl_c_leaves_a_checkpoint_that_resume_continues(tmp_path):
    cfg = config(checkpoint_every=0)  # no periodic checkpoints: only the interrupt's
    torch.manual_seed(cfg.seed)
    straight = train(cfg, data(), L, D, tmp_path / "a").transcoder

    torch.manual_seed(cfg.seed)
    logs: list[str] = []
    (tmp_path / "b").mkdir()
    trainer = Trainer(Transcoder(cfg.transcoder_config(L, D)), cfg, tmp_path / "b", log=logs.append)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(ctrl_c_after(data(), 7))  # 7 batches read: 7 steps taken
    assert trainer.step == 7
    assert json.loads((tmp_path / "b" / "checkpoint.json").read_text())["step"] == 7
    assert "interrupted: checkpoint saved at step 7; rerun with --resume to continue" in logs

    torch.manual_seed(123)  # a fresh process
    resumed_logs: list[str] = []
    result = train(cfg, data(), L, D, tmp_path / "b", resume=True, log=resumed_logs.append)
    assert any(line.startswith("resumed from step 7") for line in resumed_logs)
    assert result.history[0].step == 8 and result.history[-1].step == cfg.n_steps
    for (name, a), b in zip(straight.state_dict().items(), result.transcoder.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), name


def test_ctrl_c_before_the_first_step_writes_nothing(tmp_path):
    cfg = config(checkpoint_every=0)
    trainer = Trainer(Transcoder(cfg.transcoder_config(L, D)), cfg, tmp_path / "c", log=lambda _: None)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(ctrl_c_after(data(), 1))  # while initialisation reads its 2nd batch
    assert trainer.step == 0 and not (tmp_path / "c" / "checkpoint.json").exists()
