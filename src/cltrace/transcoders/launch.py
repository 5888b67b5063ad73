"""Start or resume a training run: where its activations come from (an activation store, or
a live harvest of the corpus) and the one call `cltrace train` and `cltrace demo` both make."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from cltrace import paths
from cltrace.errors import CltraceError
from cltrace.transcoders.config import TrainConfig
from cltrace.transcoders.train import Distributed, TrainResult

if TYPE_CHECKING:
    from cltrace.data.corpus import Split
    from cltrace.transcoders.finetune import FinetuneConfig, FinetuneResult
    from cltrace.transcoders.model import Transcoder

FINETUNE_FILE = "finetune.json"


class TrainingData(NamedTuple):
    batches: Iterable  # activation batches (.mlp_in, .mlp_out: [B, L, d])
    n_layers: int
    d_model: int


def default_run_dir(cfg: TrainConfig) -> Path:
    """<runs>/<model>-<kind>-<F>: where a run goes when no folder is given."""
    slug = cfg.model.rstrip("/").split("/")[-1]
    return paths.runs_dir() / f"{slug}-{cfg.kind}-{cfg.n_features}"


def has_checkpoint(run_dir: str | Path) -> bool:
    return (Path(run_dir) / "checkpoint.json").exists()


def training_data(cfg: TrainConfig, device: str, split: Split = "train") -> TrainingData:
    """The store's batches when `cfg.store` is set (repeated, reshuffled, when it is smaller than
    the run), else a live harvest of the corpus `split` with the run's model (each harvested
    token `cfg.data_repeats` times)."""
    if cfg.store:
        from cltrace.activations.store import ActivationStore

        store = ActivationStore(cfg.store)
        if store.layers != list(range(len(store.layers))):
            raise CltraceError(f"{cfg.store} holds layers {store.layers}; a transcoder needs all of them")
        epochs = -(-cfg.tokens_needed // max(store.n_tokens, 1))
        if cfg.data_repeats > 1:
            print(f"note: data_repeats ({cfg.data_repeats}) applies to harvesting on the fly; not to a store")
        if epochs > 1:
            print(
                f"note: the store holds {store.n_tokens:,} tokens, fewer than the {cfg.tokens_needed:,} "
                f"this run reads: {epochs} passes over it, reshuffled each time"
            )
        batches = store.iter_batches(
            cfg.batch_size, shuffle=True, seed=cfg.seed, drop_last=True, epochs=epochs
        )
        return TrainingData(batches, len(store.layers), store.d_model)
    from cltrace.activations.harvest import HarvestConfig, iter_activation_batches
    from cltrace.data.corpus import iter_documents
    from cltrace.models.loading import load_model

    hcfg = HarvestConfig(ctx_len=cfg.context_len, seed=cfg.seed)
    model = load_model(cfg.model, device=device, dtype=hcfg.torch_forward_dtype(device))
    batches = iter_activation_batches(
        model,
        iter_documents(split),
        hcfg,
        batch_tokens=cfg.batch_size,
        max_tokens=cfg.tokens_needed,
        drop_last=True,
        show_eta=cfg.minutes is None,  # a wall-time budget ends it before max_tokens
        repeats=cfg.data_repeats,
    )
    return TrainingData(batches, model.n_layers, model.d_model)


def train_run(
    cfg: TrainConfig,
    out: str | Path | None = None,
    *,
    resume: bool = False,
    device: str = "auto",
    split: Split = "train",
) -> TrainResult:
    """Train (or with `resume`, continue) the run in `out` (default: `default_run_dir(cfg)`) and
    print its summary; the transcoder is saved to out/transcoder."""
    from cltrace.hardware import resolve_device
    from cltrace.transcoders.distributed import setup_from_env
    from cltrace.transcoders.train import train

    device = resolve_device(device)
    out = Path(out) if out else default_run_dir(cfg)
    dist = setup_from_env(device)
    if resume and not has_checkpoint(out):
        raise CltraceError(f"nothing to resume in {out}", hint="drop --resume to start a new run")
    if not resume and has_checkpoint(out):
        raise CltraceError(
            f"{out} already holds a run", hint="add --resume to continue it, or choose another --out"
        )
    data = training_data(cfg, device, split)
    result = train(
        cfg, data.batches, data.n_layers, data.d_model, out, resume=resume, device=device, dist=dist
    )
    if dist.is_main:
        print(summary(result, out, repeats=1 if cfg.store else cfg.data_repeats))
    if cfg.finetune_minutes and dist.is_main:
        _finetune_after_training(result, cfg, out, device, split, single=type(dist) is Distributed)
    return result


def _finetune_after_training(
    result: TrainResult, cfg: TrainConfig, out: Path, device: str, split: Split, *, single: bool
) -> None:
    from cltrace.transcoders.finetune import FinetuneConfig

    if not single:
        print("note: end-to-end fine-tuning runs after single-process training only; skipped")
    elif (out / FINETUNE_FILE).exists():
        print(f"note: {out} was fine-tuned already ({FINETUNE_FILE}); not fine-tuned again")
    elif result.transcoder.cfg.activation != "jumprelu":
        print("note: the transcoder did not end as JumpReLU (training stopped early); not fine-tuned")
    else:
        fcfg = FinetuneConfig(
            minutes=cfg.finetune_minutes,
            lr=cfg.finetune_lr,
            context_len=cfg.context_len,
            precision=cfg.precision,
            seed=cfg.seed,
        )
        finetune_stage(result.transcoder, cfg.model, out, fcfg, device=device, split=split)


def finetune_stage(
    tc: Transcoder,
    model_name: str,
    out: Path,
    fcfg: FinetuneConfig,
    *,
    device: str,
    split: Split = "train",
    text: list[str] | None = None,
) -> FinetuneResult:
    """Fine-tune `tc` end to end (finetune.py) on the corpus `split` (or the `text` files) with
    the model it reads (loaded in the device's fast dtype), then save it to out/transcoder and
    write out/finetune.json (settings, what was reached, the step history)."""
    from cltrace.activations.harvest import default_forward_dtype
    from cltrace.io import atomic_write_json
    from cltrace.models.loading import load_model
    from cltrace.transcoders.finetune import corpus_contexts, finetune

    model = load_model(model_name, device=device, dtype=default_forward_dtype(device))
    tc.to(model.device)
    result = finetune(tc, model, corpus_contexts(model, fcfg, split, text), fcfg)
    tc.save(out / "transcoder")
    record = {
        "config": dataclasses.asdict(fcfg),
        "steps": result.steps,
        "tokens": result.tokens,
        "seconds": result.seconds,
        "history": [dataclasses.asdict(h) for h in result.history],
    }
    atomic_write_json(record, out / FINETUNE_FILE)
    print(f"fine-tuned transcoder saved to {out}/transcoder ({FINETUNE_FILE}: its steps)")
    return result


def summary(result: TrainResult, out: Path, repeats: int = 1) -> str:
    """What `cltrace train` prints at the end (`repeats`: times each harvested token was used)."""
    last = result.history[-1] if result.history else None
    lines = []
    if last is not None:
        seen = f"{last.tokens:,} tokens"
        if repeats > 1:
            seen += f": {-(-last.tokens // repeats):,} harvested, each used {repeats} times"
        lines.append(
            f"trained {last.step} steps ({seen}) at {result.tokens_per_s:,.0f} "
            f"tokens/s: nmse {last.nmse:.3f}, L0 {last.l0:.1f}, {result.dead} dead features"
        )
    lines.append(f"transcoder saved to {out}/transcoder  (next: cltrace eval {out})")
    return "\n".join(lines)


__all__ = [
    "FINETUNE_FILE",
    "TrainingData",
    "default_run_dir",
    "finetune_stage",
    "has_checkpoint",
    "summary",
    "train_run",
    "training_data",
]
