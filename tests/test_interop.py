"""circuit-tracer format: round trips for CLT / PLT / skip, and clear errors on bad files."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from cltrace.errors import CltraceError
from cltrace.transcoders.config import TranscoderConfig
from cltrace.transcoders.interop import load_circuit_tracer, save_circuit_tracer
from cltrace.transcoders.model import Transcoder


def make(kind="clt", skip=False, L=3, d=8, F=16):
    torch.manual_seed(0)
    tc = Transcoder(TranscoderConfig(n_layers=L, d_model=d, n_features=F, kind=kind, skip=skip))
    x = torch.randn(64, L, d) * 5
    tc.init_from_sample(x, torch.randn(64, L, d) * 2, fire_frac=0.2)
    with torch.no_grad():
        tc.b_enc.add_(0.01)
        tc.log_threshold.add_(0.1 * torch.randn_like(tc.log_threshold))
        if skip:
            tc.W_skip.normal_(0, 0.1)
    return tc, x


@pytest.mark.parametrize("kind,skip", [("clt", False), ("plt", False), ("plt", True)])
def test_round_trip(tmp_path, kind, skip):
    tc, x = make(kind, skip)
    save_circuit_tracer(tc, tmp_path / "ct", model_name="gemma-3-270m")
    config = yaml.safe_load((tmp_path / "ct" / "config.yaml").read_text())
    assert config["model_kind"] == {"clt": "cross_layer_transcoder", "plt": "transcoder_set"}[kind]
    back = load_circuit_tracer(tmp_path / "ct", n_layers=3, d_model=8)
    assert back.cfg.kind == kind and back.cfg.skip == skip
    a, b = tc(x), back(x)
    assert torch.allclose(a.pre, b.pre, atol=1e-4)
    assert torch.allclose(a.recon, b.recon, atol=1e-4)


def test_file_layout_matches_circuit_tracer(tmp_path):
    tc, x = make("clt")
    save_circuit_tracer(tc, tmp_path / "ct")
    enc = load_file(str(tmp_path / "ct" / "W_enc_1.safetensors"))
    dec = load_file(str(tmp_path / "ct" / "W_dec_1.safetensors"))
    assert set(enc) == {"W_enc_1", "b_enc_1", "b_dec_1", "threshold_1"}
    assert enc["W_enc_1"].shape == (16, 8) and dec["W_dec_1"].shape == (16, 2, 8)
    # circuit-tracer's encoder: pre = x @ W_enc.T + b_enc, JumpReLU with its threshold
    pre = x[:, 1] @ enc["W_enc_1"].T + enc["b_enc_1"]
    assert torch.allclose(pre, tc(x).pre[:, 1], atol=1e-4)
    plt, _ = make("plt", skip=True)
    save_circuit_tracer(plt, tmp_path / "set")
    layer = load_file(str(tmp_path / "set" / "layer_0.safetensors"))
    assert set(layer) == {"W_enc", "W_dec", "b_enc", "b_dec", "activation_function.threshold", "W_skip"}
    assert layer["W_enc"].shape == (16, 8) and layer["W_dec"].shape == (16, 8)


def test_mismatches_name_the_file(tmp_path):
    tc, _ = make("clt")
    save_circuit_tracer(tc, tmp_path / "ct")
    with pytest.raises(CltraceError, match="expected .*d_model=9"):
        load_circuit_tracer(tmp_path / "ct", d_model=9)
    with pytest.raises(CltraceError, match="3 layers of transcoders, the model has 4"):
        load_circuit_tracer(tmp_path / "ct", n_layers=4)

    path = tmp_path / "ct" / "W_dec_2.safetensors"
    save_file({"W_dec_2": torch.zeros(16, 2, 8)}, str(path))  # wrong layer count
    with pytest.raises(CltraceError, match="W_dec_2.safetensors: layer 2 tensor W_dec has shape"):
        load_circuit_tracer(tmp_path / "ct")
    save_file({"W_dec_2": torch.zeros(16, 1, 8, dtype=torch.int32)}, str(path))  # wrong dtype
    with pytest.raises(CltraceError, match="W_dec_2.safetensors: tensor 'W_dec_2' has dtype"):
        load_circuit_tracer(tmp_path / "ct")
    save_file({"other": torch.zeros(1)}, str(path))  # missing key
    with pytest.raises(CltraceError, match="W_dec_2.safetensors: missing tensor 'W_dec_2'"):
        load_circuit_tracer(tmp_path / "ct")
    path.write_bytes(b"\x00" * 10)  # corrupt
    with pytest.raises(CltraceError, match="W_dec_2.safetensors"):
        load_circuit_tracer(tmp_path / "ct")
    (tmp_path / "ct" / "config.yaml").write_text("model_kind: sae\n")
    with pytest.raises(CltraceError, match="model_kind"):
        load_circuit_tracer(tmp_path / "ct")
    with pytest.raises(CltraceError, match="no file"):
        load_circuit_tracer(tmp_path / "nothing")


def test_export_refuses_what_the_format_cannot_hold(tmp_path):
    tc, _ = make("clt", skip=True)
    with pytest.raises(CltraceError, match="no skip"):
        save_circuit_tracer(tc, tmp_path / "x")
