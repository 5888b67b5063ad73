"""Atomic safetensors/JSON files and training checkpoints.

Every file is written to a temporary name in the same folder, flushed, fsynced and moved
into place with os.replace, so a kill -9 leaves either the old or the new file, never half.

A training checkpoint is a folder `RUN/ckpt-{step}/` holding
  transcoder.safetensors + config.json   the model (Transcoder.save)
  optimizer.safetensors                 AdamW state tensors, keyed "{param_index}.{name}"
  trainer.safetensors                   trainer tensors (the dead-feature clock)
  state.json                            step, tokens seen, data position, RNG states,
                                        optimizer scalars, metrics history
The trainer points `RUN/checkpoint.json` at a checkpoint only after all of it is written.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from cltrace.errors import CltraceError
from cltrace.io import atomic_save_tensors, atomic_write_json  # noqa: F401  (re-exported)


def read_json(path: Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise CltraceError(f"no file {path}", hint="is this a cltrace transcoder or run folder?")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CltraceError(f"{path} is not valid JSON ({err})") from None


def load_tensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise CltraceError(f"no file {path}")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as err:
        raise CltraceError(f"{path} is not a readable safetensors file ({err})") from None


def rng_state() -> dict[str, str]:
    """CPU (and CUDA) RNG states, base64 so they fit in JSON."""
    state = {"cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict[str, str]) -> None:
    def decode(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(decode(state["cpu"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(decode(state["cuda"]))


def save_checkpoint(
    directory: Path,
    transcoder,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    extra: dict[str, torch.Tensor] | None = None,
) -> None:
    """Model, optimizer tensors, trainer tensors (`extra`), then state.json (last)."""
    directory = Path(directory)
    transcoder.save(directory)
    atomic_save_tensors(extra or {}, directory / "trainer.safetensors")
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, pstate in opt["state"].items():
        for name, value in pstate.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = float(value)
    atomic_save_tensors(tensors, directory / "optimizer.safetensors")
    full = dict(state, optimizer_scalars=scalars, param_groups=opt["param_groups"], rng=rng_state())
    atomic_write_json(full, directory / "state.json")


def load_checkpoint(
    directory: Path, transcoder, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore weights, optimizer and RNG into existing objects; return state.json and the
    trainer tensors."""
    from cltrace.transcoders.model import WEIGHTS_FILE, load_state_checked

    directory = Path(directory)
    state = read_json(directory / "state.json")
    load_state_checked(transcoder, load_tensors(directory / WEIGHTS_FILE), directory / WEIGHTS_FILE)
    device = next(transcoder.parameters()).device
    tensors = load_tensors(directory / "optimizer.safetensors", device=str(device))
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    for key, value in state["optimizer_scalars"].items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = torch.tensor(value)
    try:
        optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
    except (ValueError, KeyError) as err:
        raise CltraceError(f"{directory}: optimizer state does not match this run ({err})") from None
    set_rng_state(state["rng"])
    return state, load_tensors(directory / "trainer.safetensors")
