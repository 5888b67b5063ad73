"""Least-squares decoder refit: equals a direct ridge regression, never worse than before."""

from __future__ import annotations

import pytest
import torch

from cltrace.errors import CltraceError
from cltrace.transcoders.refit import refit_decoder
from cltrace.transcoders.train import SyntheticBatch
from test_transcoder import small


def batches(x, y, size=40):
    return [SyntheticBatch(x[i : i + size], y[i : i + size]) for i in range(0, x.shape[0], size)]


def direct_ridge(tc, x, y, t, ridge):
    """Ridge regression of target t on the features of the layers that write to it, solved
    with an explicit augmented least-squares problem (independent of refit's algebra)."""
    with torch.no_grad():
        xn, yn = tc._normalise(x, tc.in_scale).double(), tc._normalise(y, tc.out_scale).double()
        acts = tc._activate(tc._encode(xn.float()), tc.log_threshold.exp()[:, None, :]).double()
    src = [t] if tc.cfg.kind == "plt" else list(range(t + 1))
    A = torch.cat([acts[l] for l in src], dim=1)  # [N, k]
    A_c, Y_c = A - A.mean(0), yn[t] - yn[t].mean(0)
    every = A_c if tc.cfg.kind == "plt" else torch.cat([a - a.mean(0) for a in acts], dim=1)
    rho = ridge * (every * every).sum(0).mean() + 1e-9  # relative to the mean diagonal
    k = A.shape[1]
    W = torch.linalg.lstsq(
        torch.cat([A_c, rho.sqrt() * torch.eye(k, dtype=A.dtype)]),
        torch.cat([Y_c, torch.zeros(k, Y_c.shape[1], dtype=A.dtype)]),
    ).solution
    return W, yn[t].mean(0) - A.mean(0) @ W, acts


@pytest.mark.parametrize("kind", ["clt", "plt"])
def test_refit_equals_direct_ridge_and_lowers_the_error(kind):
    tc, x, y = small(kind=kind, L=3, d=8, F=16)
    y = y + x.roll(1, dims=-1) * 0.3  # something an encoder can explain
    before = (tc(x).recon - y).pow(2).sum()
    n = refit_decoder(tc, batches(x, y), max_tokens=10_000, ridge=1e-3)
    assert n == x.shape[0]
    after = (tc(x).recon - y).pow(2).sum()
    assert after < before
    F = tc.cfg.n_features
    for t in range(tc.cfg.n_layers):
        W, b, acts = direct_ridge(tc, x, y, t, 1e-3)
        src = [t] if kind == "plt" else list(range(t + 1))
        for j, l in enumerate(src):
            fired = (acts[l] > 0).any(0)
            got = tc.W_dec[l][:, t - l if kind == "clt" else 0].double()
            torch.testing.assert_close(got[fired], W[j * F : (j + 1) * F][fired], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(tc.b_dec[t].double(), b, rtol=1e-4, atol=1e-5)


def test_refit_is_independent_of_batching_and_respects_max_tokens():
    tc_a, x, y = small(kind="clt", F=8)  # 24 regressors, 90 tokens
    tc_b, _, _ = small(kind="clt", F=8)
    assert refit_decoder(tc_a, batches(x, y, 7), max_tokens=90) == 90
    refit_decoder(tc_b, batches(x[:90], y[:90], 90), max_tokens=90)
    for Wa, Wb in zip(tc_a.W_dec, tc_b.W_dec):
        torch.testing.assert_close(Wa, Wb, rtol=1e-4, atol=1e-5)  # float32 products, other blocking


def test_refit_rejects_skip_transcoders():
    tc, x, y = small(kind="clt", skip=True)
    with pytest.raises(CltraceError, match="skip"):
        refit_decoder(tc, batches(x, y), max_tokens=100)
