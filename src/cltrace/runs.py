"""One way to open a run: a RUN argument -> its folder, its transcoder, its model, its device.

A RUN is a folder or a run name under `paths.runs_dir()`. The folder is what `cltrace train`
wrote (the transcoder in RUN/transcoder, the feature store in RUN/features.sqlite) or a folder
holding a transcoder directly: cltrace's config.json + transcoder.safetensors, or
circuit-tracer's config.yaml. The model is the one named in the transcoder's config
(`TranscoderConfig.model_name`) unless the caller names another. Every command, the viewer,
the demo and the Python API open runs here.

Importing this module is cheap; torch loads when a transcoder or model does.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from cltrace import paths
from cltrace.errors import CltraceError
from cltrace.models import DEFAULT_MODEL

if TYPE_CHECKING:
    from cltrace.models.loading import LoadedModel
    from cltrace.transcoders.model import Transcoder

TRANSCODER_SUBDIR = "transcoder"  # where `cltrace train` saves the transcoder inside a run
CIRCUIT_TRACER_CONFIG = "config.yaml"  # circuit-tracer's transcoder folders
TranscoderFormat = Literal["cltrace", "circuit-tracer"]


@dataclass(frozen=True)
class Run:
    """Where a run's files are (nothing loaded)."""

    dir: Path  # the run folder: feature store, eval.json, checkpoints
    transcoder_dir: Path  # the folder holding the transcoder's files (dir or dir/transcoder)
    format: TranscoderFormat  # how the transcoder is stored

    @property
    def name(self) -> str:
        """The run's name: its folder's name (graphs record it as their transcoder id)."""
        return self.dir.name

    @property
    def feature_store(self) -> Path:
        """The run's default feature store (it may not exist yet)."""
        from cltrace.features.store import DB_FILENAME

        return self.dir / DB_FILENAME


@dataclass
class LoadedRun:
    """A run with its transcoder and the model it reads, ready on one device."""

    run: Run
    model: LoadedModel
    transcoder: Transcoder
    model_name: str  # the bundled name or folder the model was loaded from
    device: str


def run_folder(spec: str | Path) -> Path:
    """The folder a RUN argument names: a path, else a name under `paths.runs_dir()`."""
    for candidate in _candidates(spec):
        if candidate.is_dir():
            return candidate.resolve()
    if Path(spec).expanduser().exists():
        raise CltraceError(
            f"{spec} is a file, not a run folder", "pass the folder `cltrace train` wrote (or a run name)"
        )
    raise CltraceError(
        f"no transcoder run at {str(spec)!r}: no such folder, and no run of that name in {paths.runs_dir()}",
        _known_runs_hint(),
    )


def resolve_run(spec: str | Path) -> Run:
    """The run a RUN argument names; CltraceError (with a hint) when there is no transcoder."""
    from cltrace.transcoders.model import CONFIG_FILE

    folder = run_folder(spec)
    run_dir = _run_dir(folder)
    for tc_dir in (folder, folder / TRANSCODER_SUBDIR):
        if (tc_dir / CONFIG_FILE).is_file():
            return Run(run_dir, tc_dir, "cltrace")
        if (tc_dir / CIRCUIT_TRACER_CONFIG).is_file():
            return Run(run_dir, tc_dir, "circuit-tracer")
    raise CltraceError(
        f"{folder} holds no transcoder (no {CONFIG_FILE} in it or in {TRANSCODER_SUBDIR}/)",
        f"pass the folder `cltrace train` wrote; the transcoder appears when training ends (an "
        f"interrupted run continues with `cltrace train --out {run_dir} --resume`)",
    )


def load_transcoder(run: Run | str | Path, device: str = "auto") -> Transcoder:
    """The run's transcoder on `device`, in eval mode, without gradients."""
    from cltrace.hardware import resolve_device

    run = run if isinstance(run, Run) else resolve_run(run)
    device = resolve_device(device)
    if run.format == "circuit-tracer":
        from cltrace.transcoders.interop import load_circuit_tracer

        tc = load_circuit_tracer(run.transcoder_dir)
    else:
        from cltrace.transcoders.model import Transcoder

        tc = Transcoder.load(run.transcoder_dir)
    return tc.to(device).eval().requires_grad_(False)


def model_name(run: Run, transcoder: Transcoder, override: str | None = None) -> str:
    """The model to load: `override`, else the one the transcoder's config names, else the default
    model (with a note on stderr: the run does not say)."""
    if override:
        return override
    if transcoder.cfg.model_name:
        return transcoder.cfg.model_name
    print(
        f"note: {run.name} does not say which model it was trained on; using {DEFAULT_MODEL} "
        "(pass --model to choose)",
        file=sys.stderr,
    )
    return DEFAULT_MODEL


def open_run(
    spec: str | Path | Run, model: str | None = None, device: str = "auto", dtype: str = "float32"
) -> LoadedRun:
    """Resolve a run, load its transcoder and its model on one device."""
    import torch

    from cltrace.hardware import resolve_device
    from cltrace.models.loading import load_model

    run = spec if isinstance(spec, Run) else resolve_run(spec)
    device = resolve_device(device)
    tc = load_transcoder(run, device)
    name = model_name(run, tc, model)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise CltraceError(f"unknown dtype {dtype!r}", "use float32, bfloat16 or float16")
    lm = load_model(name, device=device, dtype=getattr(torch, dtype))
    return LoadedRun(run, lm, tc, name, device)


def store_path(spec: str | Path, db: str | Path | None = None) -> Path:
    """The feature store for a RUN argument: `db`, else RUN itself when it is a store file, else
    RUN/features.sqlite."""
    if db:
        return Path(db).expanduser()
    path = Path(spec).expanduser()
    if path.suffix in (".sqlite", ".db") and path.is_file():
        return path
    from cltrace.features.store import DB_FILENAME

    return _run_dir(run_folder(spec)) / DB_FILENAME


def _run_dir(folder: Path) -> Path:
    """The run a folder belongs to: its parent when it is a run's transcoder/ sub-folder."""
    return folder.parent if folder.name == TRANSCODER_SUBDIR else folder


def _candidates(spec: str | Path) -> list[Path]:
    path = Path(spec).expanduser()
    named = [] if path.is_absolute() else [paths.runs_dir() / path]
    return [path, *named]


def _known_runs_hint() -> str:
    runs_dir = paths.runs_dir()
    known = sorted(p.name for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.is_dir() else []
    if known:
        return f"runs in {runs_dir}: {', '.join(known[:10])}{' ...' if len(known) > 10 else ''}"
    return "train one with `cltrace train`, or pass the folder that holds it"
