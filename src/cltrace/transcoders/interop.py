"""circuit-tracer's on-disk transcoder format, both ways.

Layout (as circuit-tracer 0.5 reads it; weights in the model's raw scale):

    config.yaml     model_kind: transcoder_set | cross_layer_transcoder, model_name,
                    feature_input_hook, feature_output_hook, transcoders: [layer files]
    per-layer set:  layer_{i}.safetensors  W_enc [F, d], W_dec [F, d], b_enc [F], b_dec [d],
                    activation_function.threshold [F] (JumpReLU; absent = ReLU),
                    W_skip [d, d] (optional; the skip adds x @ W_skip.T)
    CLT:            W_enc_{i}.safetensors  W_enc_{i} [F, d], b_enc_{i} [F], b_dec_{i} [d],
                                           threshold_{i} [F] (absent = ReLU)
                    W_dec_{i}.safetensors  W_dec_{i} [F, L - i, d]

circuit-tracer's CLT files have no skip weights and neither format has TopK, so those are
refused on export. On import every file is checked (present, readable, keys, float dtype,
shapes agreeing with each other and with the expected model) and any mismatch is a
CltraceError naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import yaml
from torch import Tensor

from cltrace.errors import CltraceError
from cltrace.transcoders.checkpoint import atomic_save_tensors, load_tensors
from cltrace.transcoders.config import TranscoderConfig
from cltrace.transcoders.model import Transcoder

Kind = Literal["clt", "plt"]
KINDS: dict[Kind, str] = {"plt": "transcoder_set", "clt": "cross_layer_transcoder"}
KIND_OF: dict[str, Kind] = {v: k for k, v in KINDS.items()}
INPUT_HOOK, OUTPUT_HOOK = "mlp.hook_in", "hook_mlp_out"


def save_circuit_tracer(
    tc: Transcoder,
    directory: str | Path,
    *,
    model_name: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write `tc` (raw scale, scalars folded in) in circuit-tracer's format."""
    cfg = tc.cfg
    if cfg.activation != "jumprelu":
        raise CltraceError("circuit-tracer's format has no TopK transcoders", hint="export a JumpReLU one")
    if cfg.kind == "clt" and cfg.skip:
        raise CltraceError(
            "circuit-tracer's CLT files have no skip weights", hint="export a PLT, or a CLT without skip"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cast = lambda t: t.detach().to("cpu", dtype).contiguous()  # noqa: E731
    files = []
    for i in range(cfg.n_layers):
        if cfg.kind == "plt":
            tensors = {
                "W_enc": tc.encoder_weight(i).T,
                "W_dec": tc.decoder_weight(i)[:, 0],
                "b_enc": tc.encoder_bias(i),
                "b_dec": tc.decoder_bias()[i],
                "activation_function.threshold": tc.threshold(i),
            }
            skip = tc.skip_weight(i)  # None exactly when not cfg.skip
            if skip is not None:
                tensors["W_skip"] = skip.T
            files.append(f"layer_{i}.safetensors")
            atomic_save_tensors({k: cast(v) for k, v in tensors.items()}, directory / files[-1])
        else:
            enc = {
                f"W_enc_{i}": tc.encoder_weight(i).T,
                f"b_enc_{i}": tc.encoder_bias(i),
                f"b_dec_{i}": tc.decoder_bias()[i],
                f"threshold_{i}": tc.threshold(i),
            }
            atomic_save_tensors({k: cast(v) for k, v in enc.items()}, directory / f"W_enc_{i}.safetensors")
            atomic_save_tensors(
                {f"W_dec_{i}": cast(tc.decoder_weight(i))}, directory / f"W_dec_{i}.safetensors"
            )
    config: dict[str, str | list[str]] = {
        "model_kind": KINDS[cfg.kind],
        "model_name": model_name or cfg.model_name or "unknown",
        "feature_input_hook": INPUT_HOOK,
        "feature_output_hook": OUTPUT_HOOK,
    }
    if files:
        config["transcoders"] = [str((directory / f).resolve()) for f in files]
    (directory / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return directory


def load_circuit_tracer(
    directory: str | Path, *, n_layers: int | None = None, d_model: int | None = None
) -> Transcoder:
    """Read a circuit-tracer transcoder folder; check it against (n_layers, d_model) if given."""
    directory = Path(directory)
    config = _read_config(directory / "config.yaml")
    model_kind = config.get("model_kind")
    kind = KIND_OF.get(model_kind) if isinstance(model_kind, str) else None
    if kind is None:
        raise CltraceError(
            f"{directory / 'config.yaml'}: model_kind must be one of "
            f"{sorted(KINDS.values())}, got {config.get('model_kind')!r}"
        )
    layers = _read_plt(directory, config) if kind == "plt" else _read_clt(directory)
    L = len(layers)
    if n_layers is not None and L != n_layers:
        raise CltraceError(f"{directory}: {L} layers of transcoders, the model has {n_layers}")
    F, d = layers[0].tensors["W_enc"].shape
    has_threshold, has_skip = "threshold" in layers[0].tensors, "W_skip" in layers[0].tensors
    for i, layer in enumerate(layers):
        _check_shapes(layer, i, L, F, d_model if d_model is not None else d, kind)
        if ("threshold" in layer.tensors) != has_threshold or ("W_skip" in layer.tensors) != has_skip:
            raise CltraceError(
                f"{layer.file}: layer {i} differs from layer 0 in having a threshold or skip weights"
            )
    cfg = TranscoderConfig(
        n_layers=L, d_model=d, n_features=F, kind=kind, skip=has_skip, model_name=config.get("model_name")
    )
    tc = Transcoder(cfg)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            t = layer.tensors
            tc.W_enc[i] = t["W_enc"].T
            tc.b_enc[i] = t["b_enc"]
            tc.W_dec[i].copy_(t["W_dec"].reshape(tc.W_dec[i].shape))
            tc.b_dec[i] = t["b_dec"]
            theta = t["threshold"] if has_threshold else torch.zeros(F)
            if (theta < 0).any():
                raise CltraceError(f"{layer.file}: negative JumpReLU thresholds are not supported")
            tc.log_threshold[i] = theta.log()  # θ = 0 (ReLU) -> log θ = -inf
            if tc.W_skip is not None:  # cfg.skip = has_skip
                tc.W_skip[i] = t["W_skip"].T
    return tc


def _read_config(path: Path) -> dict:
    if not path.exists():
        raise CltraceError(f"no file {path}", hint="a circuit-tracer transcoder folder has a config.yaml")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise CltraceError(f"{path} is not valid YAML ({err})") from None
    if not isinstance(config, dict):
        raise CltraceError(f"{path}: expected a mapping of settings")
    return config


@dataclass
class _LayerFiles:
    """One layer's tensors under our names, and the files they came from (for error messages)."""

    tensors: dict[str, Tensor]
    file: Path  # everything of a PLT layer; a CLT layer's encoder side
    dec_file: Path | None = None  # a CLT layer's W_dec


def _load(path: Path, keys: dict[str, str]) -> _LayerFiles:
    """Load `path` and rename its keys (file key -> our name); check presence and dtype."""
    tensors = load_tensors(path)
    out: dict[str, Tensor] = {}
    for file_key, name in keys.items():
        if file_key not in tensors:
            if name in ("threshold", "W_skip"):
                continue
            raise CltraceError(f"{path}: missing tensor {file_key!r} (has {sorted(tensors)})")
        value = tensors[file_key]
        if not value.dtype.is_floating_point:
            raise CltraceError(f"{path}: tensor {file_key!r} has dtype {value.dtype}, expected a float type")
        out[name] = value.float()
    return _LayerFiles(out, path)


def _read_plt(directory: Path, config: dict) -> list[_LayerFiles]:
    paths = config.get("transcoders")
    if paths is None:
        paths = sorted(directory.glob("layer_*.safetensors"), key=lambda p: int(p.stem.split("_")[1]))
    paths = [Path(p) if Path(p).is_absolute() else directory / p for p in paths]
    if not paths:
        raise CltraceError(f"{directory}: no layer_*.safetensors files")
    keys = {
        "W_enc": "W_enc",
        "W_dec": "W_dec",
        "b_enc": "b_enc",
        "b_dec": "b_dec",
        "activation_function.threshold": "threshold",
        "W_skip": "W_skip",
    }
    return [_load(p, keys) for p in paths]


def _read_clt(directory: Path) -> list[_LayerFiles]:
    n = len(list(directory.glob("W_enc_*.safetensors")))
    if n == 0:
        raise CltraceError(f"{directory}: no W_enc_*.safetensors files")
    layers = []
    for i in range(n):
        enc = _load(
            directory / f"W_enc_{i}.safetensors",
            {
                f"W_enc_{i}": "W_enc",
                f"b_enc_{i}": "b_enc",
                f"b_dec_{i}": "b_dec",
                f"threshold_{i}": "threshold",
            },
        )
        dec = _load(directory / f"W_dec_{i}.safetensors", {f"W_dec_{i}": "W_dec"})
        enc.tensors["W_dec"], enc.dec_file = dec.tensors["W_dec"], dec.file
        layers.append(enc)
    return layers


def _check_shapes(layer: _LayerFiles, i: int, L: int, F: int, d: int, kind: str) -> None:
    t = layer.tensors
    T = L - i if kind == "clt" else 1
    expected = {
        "W_enc": (F, d),
        "b_enc": (F,),
        "b_dec": (d,),
        "threshold": (F,),
        "W_skip": (d, d),
        "W_dec": (F, T, d) if kind == "clt" else (F, d),
    }
    for name, shape in expected.items():
        if name in t and tuple(t[name].shape) != shape:
            where = (layer.dec_file or layer.file) if name == "W_dec" else layer.file
            raise CltraceError(
                f"{where}: layer {i} tensor {name} has shape {tuple(t[name].shape)}, "
                f"expected {shape} (n_layers={L}, n_features={F}, d_model={d})"
            )
