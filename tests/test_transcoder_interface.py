"""The TranscoderLike Protocol: the real Transcoder and the tests' stand-in both satisfy it, and a
stage typed on it (the Steerer) runs on the stand-in, which has no training code behind it."""

from __future__ import annotations

import torch

from cltrace.transcoders.config import TranscoderConfig
from cltrace.transcoders.interface import TranscoderLike, device_dtype
from cltrace.transcoders.model import Transcoder
from test_features_standin import StandInTranscoder, make_standin
from tiny import tiny_model


def test_both_implementations_satisfy_the_protocol():
    real = Transcoder(TranscoderConfig(n_layers=2, d_model=8, n_features=4))
    standin = StandInTranscoder(2, 8, 4)
    assert isinstance(real, TranscoderLike) and isinstance(standin, TranscoderLike)
    assert not isinstance(object(), TranscoderLike)
    assert device_dtype(real) == (torch.device("cpu"), torch.float32)
    assert device_dtype(real.to(torch.float64)) == (torch.device("cpu"), torch.float64)
    assert standin.skip_weight(0) is None and real.skip_weight(0) is None


def test_steering_runs_on_the_standin_and_is_causal():
    """Setting a feature at position 2 through the stand-in changes the logits from position 2 on
    and leaves the earlier positions exactly as they were."""
    from cltrace.interventions.steer import Intervention, Steerer

    lm = tiny_model("gemma")
    tc = make_standin(lm, n_features=8, kind="plt", seed=0, fire_fraction=0.3)
    steerer = Steerer(lm, tc)
    tokens = steerer.tokens("the capital of Texas is")
    base = steerer.activations(tokens)
    assert base.shape == (tokens.shape[1], lm.n_layers, 8)
    iv = Intervention(1, 3, (2,), "set", float(base[2, 1, 3]) + 2.0)
    logits_before = steerer.logits(tokens)
    logits_after = steerer.logits(tokens, [iv])
    assert not torch.allclose(logits_before, logits_after)  # the edit reaches the output
    torch.testing.assert_close(logits_before[:, :2], logits_after[:, :2])  # and nothing before pos 2
