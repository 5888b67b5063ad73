"""Transcoders for feature/intervention tests: the real `Transcoder` (default) or a minimal
stand-in implementing the same contract (docs/ARCHITECTURE.md: raw scale, JumpReLU, CLT/PLT).

`make_transcoder(lm)` gives random weights calibrated on a tiny model so that about a third
of the features fire; `impl="standin"` (or CLTRACE_TEST_STANDIN=1) uses the stand-in, so these
tests do not depend on the training code. The one test here checks the stand-in's decode.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch
from torch import nn

from cltrace.transcoders.config import TranscoderConfig
from tiny import WORDS

TEXT = " ".join(WORDS)


class StandInTranscoder(nn.Module):
    """CLT (every layer writes to itself and all later layers) or PLT (itself only)."""

    def __init__(self, n_layers: int, d_model: int, n_features: int, kind: str = "clt"):
        super().__init__()
        L, d, F = n_layers, d_model, n_features
        self.cfg = TranscoderConfig(n_layers=L, d_model=d, n_features=F, kind=kind)  # JumpReLU, no skip
        self.w_enc = nn.Parameter(torch.randn(L, d, F) / d**0.5)
        self.b_enc = nn.Parameter(torch.zeros(L, F))
        self.log_threshold = nn.Parameter(torch.zeros(L, F))
        n_t = (lambda l: L - l) if kind == "clt" else (lambda l: 1)
        self.w_dec = nn.ParameterList([nn.Parameter(torch.randn(F, n_t(l), d) / F**0.5) for l in range(L)])
        self.b_dec = nn.Parameter(0.1 * torch.randn(L, d))

    def encode(self, x):  # [..., L, d] -> [..., L, F]
        return torch.einsum("...ld,ldf->...lf", x, self.w_enc) + self.b_enc

    def activate(self, pre):  # JumpReLU
        return pre * (pre > self.log_threshold.exp())

    def decode(self, acts, x=None):  # [..., L, F] -> [..., L, d]
        out = self.b_dec.expand(*acts.shape[:-1], self.cfg.d_model).clone()
        for l in range(self.cfg.n_layers):
            writes = torch.einsum("...f,ftd->...td", acts[..., l, :], self.w_dec[l])
            for t in range(writes.shape[-2]):
                out[..., l + t, :] += writes[..., t, :]
        return out

    def forward(self, x):
        pre = self.encode(x)
        acts = self.activate(pre)
        return SimpleNamespace(pre=pre, acts=acts, recon=self.decode(acts, x))

    def encoder_weight(self, l):
        return self.w_enc[l]

    def encoder_bias(self, l):
        return self.b_enc[l]

    def threshold(self, l):
        return self.log_threshold[l].exp()

    def decoder_weight(self, l):
        return self.w_dec[l]

    def decoder_bias(self):
        return self.b_dec

    def skip_weight(self, l):
        return None


def make_transcoder(
    lm,
    n_features: int = 16,
    kind: str = "clt",
    seed: int = 0,
    fire_fraction: float = 0.3,
    impl: str | None = None,
):
    """A transcoder calibrated on `lm` (see the module docstring)."""
    impl = impl or ("standin" if os.environ.get("CLTRACE_TEST_STANDIN") else "real")
    if impl == "real":
        return make_real_transcoder(lm, n_features, kind, seed, fire_fraction)
    return make_standin(lm, n_features, kind, seed, fire_fraction)


def make_real_transcoder(lm, n_features, kind, seed, fire_fraction):
    from cltrace.transcoders.config import TranscoderConfig
    from cltrace.transcoders.model import Transcoder

    torch.manual_seed(seed)
    tc = Transcoder(
        TranscoderConfig(n_layers=lm.n_layers, d_model=lm.d_model, n_features=n_features, kind=kind)
    )
    cap = lm.capture(lm.tokenize(TEXT))
    tc.init_from_sample(cap.mlp_in[0, 1:], cap.mlp_out[0, 1:], fire_frac=fire_fraction)
    with torch.no_grad():
        tc.b_dec.normal_(0, 0.3)
        for w in tc.W_dec:
            w.mul_(10.0)
    return tc.eval().requires_grad_(False)


def make_standin(lm, n_features, kind, seed, fire_fraction) -> StandInTranscoder:
    """Thresholds at the (1 - fire_fraction) quantile of each feature's pre-activation over a
    sample, decoders scaled to the MLP outputs."""
    torch.manual_seed(seed)
    tc = StandInTranscoder(lm.n_layers, lm.d_model, n_features, kind)
    cap = lm.capture(lm.tokenize(TEXT))
    x, y = cap.mlp_in[0, 1:], cap.mlp_out[0, 1:]  # [n, L, d]
    with torch.no_grad():
        tc.w_enc /= x.norm(dim=-1).mean(0)[:, None, None] / lm.d_model**0.5
        pre = tc.encode(x)  # [n, L, F]
        tc.b_enc -= pre.mean(0)
        pre = tc.encode(x)
        tc.log_threshold.copy_(pre.quantile(1 - fire_fraction, dim=0).clamp(min=1e-3).log())
        scale = y.norm(dim=-1).mean(0)  # [L]
        for l in range(lm.n_layers):
            tc.w_dec[l] *= (
                scale[l : l + tc.w_dec[l].shape[1]][None, :, None] / (n_features * fire_fraction) ** 0.5
            )
    return tc.requires_grad_(False)


def test_standin_decode_matches_decoder_weights():
    torch.manual_seed(0)
    tc = StandInTranscoder(3, 8, 5)
    acts = torch.zeros(3, 5)
    acts[1, 2] = 2.0
    out = tc.decode(acts) - tc.decoder_bias()
    torch.testing.assert_close(out[0], torch.zeros(8))
    torch.testing.assert_close(out[1:], 2.0 * tc.decoder_weight(1)[2])
