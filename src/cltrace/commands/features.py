"""`cltrace features RUN`: build (or continue) the feature store of a trained transcoder.

Also home of the helpers that turn a RUN argument into a transcoder, a model name and a
feature-store path (used by `feature` and `intervene` too); they import torch lazily.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cltrace.commands import add_parser

DEFAULT_MODEL = "gemma-3-270m"
_MODEL_KEYS = ("model", "model_name", "base_model")


def register(subparsers) -> None:
    p = add_parser(subparsers, "features",
                   "Scan held-out text with a transcoder and store each feature's top contexts, "
                   "activation density and promoted/suppressed tokens (resumable).")
    p.add_argument("run", metavar="RUN", help="transcoder run: a folder, or a run name under cltrace's runs folder")
    p.add_argument("--tokens", type=int, default=1_000_000,
                   help="total tokens to scan (a later call with a larger number continues); 0: whole corpus")
    p.add_argument("--model", default=None, help="model name or path (default: the one the run was trained on)")
    p.add_argument("--db", default=None, help="feature store file (default: RUN/features.sqlite)")
    p.add_argument("--text", action="append", default=None, metavar="PATH",
                   help="scan these .txt/.jsonl files or folders instead of the held-out corpus (repeatable)")
    p.add_argument("--context-len", type=int, default=64, help="tokens per context (BOS included)")
    p.add_argument("--top-k", type=int, default=20, help="top activating examples kept per feature")
    p.add_argument("--bins", type=int, default=5, help="slices of the activation range for spread examples")
    p.add_argument("--per-bin", type=int, default=4, help="examples kept per slice")
    p.add_argument("--batch", type=int, default=8, help="contexts per forward pass")
    p.add_argument("--flush-tokens", type=int, default=32768, help="write progress every this many tokens")
    p.add_argument("--no-effects", action="store_true", help="skip promoted/suppressed tokens (saves a matmul with the unembedding per layer)")
    p.add_argument("--fresh", action="store_true", help="discard a previous build (your labels are kept)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model dtype")
    p.set_defaults(func=run)


# -- shared helpers -------------------------------------------------------------------------

def resolve_run(run: str) -> Path:
    """A run folder from a path or a name under `paths.runs_dir()`."""
    from cltrace import paths
    from cltrace.errors import CltraceError

    for candidate in (Path(run).expanduser(), paths.runs_dir() / run):
        if candidate.is_dir():
            return candidate.resolve()
    raise CltraceError(f"no transcoder run called {run!r} (looked in . and {paths.runs_dir()})",
                       "train one with `cltrace train`, or pass the folder that holds it")


def transcoder_dir(run_dir: Path) -> Path:
    """The folder holding the transcoder's config.json + weights: the run itself or RUN/transcoder."""
    for candidate in (run_dir, run_dir / "transcoder"):
        if (candidate / "config.json").is_file():
            return candidate
    from cltrace.errors import CltraceError

    raise CltraceError(f"{run_dir} holds no transcoder (no config.json)",
                       "pass the folder `cltrace train` wrote")


def load_transcoder(run_dir: Path, device: str = "cpu"):
    from cltrace.transcoders.model import Transcoder

    tc = Transcoder.load(transcoder_dir(run_dir))
    return tc.to(device).eval().requires_grad_(False)


def run_model_name(run_dir: Path, transcoder=None, override: str | None = None) -> str:
    """The model a run was trained on: --model, else the transcoder's config, else run JSON files."""
    if override:
        return override
    cfg = getattr(transcoder, "cfg", None)
    for key in _MODEL_KEYS:
        if cfg is not None and getattr(cfg, key, None):
            return str(getattr(cfg, key))
    for name in ("run.json", "train.json", "config.json"):
        for folder in (run_dir, run_dir / "transcoder"):
            try:
                data = json.loads((folder / name).read_text())
            except (OSError, ValueError):
                continue
            for key in _MODEL_KEYS:
                if isinstance(data.get(key), str):
                    return data[key]
    print(f"note: {run_dir.name} does not say which model it was trained on; using {DEFAULT_MODEL}")
    return DEFAULT_MODEL


def load_model_and_transcoder(run: str, model: str | None, device: str = "cpu", dtype: str = "float32"):
    """(LoadedModel, transcoder, run_dir, model_name) for a RUN argument."""
    import torch

    from cltrace.models.loading import load_model

    run_dir = resolve_run(run)
    tc = load_transcoder(run_dir, device)
    name = run_model_name(run_dir, tc, model)
    lm = load_model(name, device=device, dtype=getattr(torch, dtype))
    return lm, tc, run_dir, name


def store_path(run: str, db: str | None) -> Path:
    """--db, else RUN itself when it is a store file, else RUN/features.sqlite."""
    from cltrace.features.store import DB_FILENAME

    if db:
        return Path(db).expanduser()
    if Path(run).suffix in (".sqlite", ".db") and Path(run).is_file():
        return Path(run)
    return resolve_run(run) / DB_FILENAME


# -- the command ------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    from cltrace.errors import CltraceError
    from cltrace.features.store import FeatureStoreConfig, build_feature_store

    try:
        cfg = FeatureStoreConfig(context_len=args.context_len, top_k=args.top_k, n_bins=args.bins,
                                 per_bin=args.per_bin, batch_contexts=args.batch,
                                 flush_tokens=args.flush_tokens)
    except ValueError as err:
        raise CltraceError(str(err), "check the numbers given to cltrace features") from err
    lm, tc, run_dir, name = load_model_and_transcoder(args.run, args.model, args.device, args.dtype)
    path = store_path(args.run, args.db)
    documents = None
    if args.text:
        from cltrace.data.corpus import iter_documents

        documents = iter_documents(paths=args.text)
    summary = build_feature_store(path, lm, tc, documents=documents, config=cfg, max_tokens=args.tokens or None,
                                  fresh=args.fresh, model_id=name,
                                  transcoder_id=str(transcoder_dir(run_dir)), effects=not args.no_effects)
    mb = summary.db_bytes / 2**20
    print(f"{path}: {summary.tokens:,} tokens scanned ({summary.tokens_this_run:,} now, "
          f"{summary.tokens_per_second:,.0f} tok/s), {mb:.1f} MiB")
    print(f"see a feature: cltrace feature {args.run} LAYER:INDEX")
    return 0
