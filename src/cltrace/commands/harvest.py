"""`cltrace harvest`: text -> packed contexts -> every layer's MLP input/output -> sharded store."""

from __future__ import annotations

import argparse

from cltrace.commands import add_device_argument, add_parser
from cltrace.models import DEFAULT_MODEL


def register(subparsers) -> None:
    p = add_parser(
        subparsers,
        "harvest",
        "Run the model over the corpus (or your text) and store every layer's MLP input "
        "and output, token-shuffled, as safetensors shards (resumable)",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="bundled model name or a transformers folder")
    p.add_argument(
        "--text",
        nargs="+",
        metavar="PATH",
        default=None,
        help="your own text files, folders or JSONL instead of the built corpus",
    )
    p.add_argument("--split", default="train", help="corpus split to read")
    p.add_argument("--tokens", type=int, default=1_000_000, help="tokens to harvest (position 0 excluded)")
    p.add_argument(
        "--out", default=None, help="store folder (default: <CLTRACE_HOME>/activations/<model>-<split>)"
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="forward dtype; auto: bfloat16 on CUDA or AMX CPUs, else float32",
    )
    p.add_argument(
        "--store-dtype",
        choices=["bfloat16", "float16", "float32"],
        default="bfloat16",
        help="dtype on disk (float16 overflows for Gemma)",
    )
    p.add_argument("--ctx-len", type=int, default=128, help="tokens per context, BOS included")
    p.add_argument("--batch", type=int, default=8, help="contexts per forward pass")
    p.add_argument("--shard-tokens", type=int, default=8192, help="tokens per shard file")
    p.add_argument("--seed", type=int, default=0, help="seed of the within-shard shuffle")
    again = p.add_mutually_exclusive_group()
    again.add_argument(
        "--resume",
        action="store_true",
        help="continue (or extend to --tokens) the store already in --out, keeping its "
        "complete shards; without --resume or --overwrite an existing store is "
        "left untouched and the command stops",
    )
    again.add_argument(
        "--overwrite", action="store_true", help="delete the store already in --out and harvest it again"
    )
    add_device_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cltrace import paths
    from cltrace.activations.harvest import HarvestConfig
    from cltrace.activations.store import write_store
    from cltrace.errors import CltraceError
    from cltrace.hardware import resolve_device
    from cltrace.models.loading import load_model

    if args.tokens < 1:
        raise CltraceError(f"--tokens must be positive, got {args.tokens}", "e.g. --tokens 1000000")
    device = resolve_device(args.device)
    cfg = HarvestConfig(
        ctx_len=args.ctx_len,
        batch_contexts=args.batch,
        seed=args.seed,
        forward_dtype=None if args.dtype == "auto" else args.dtype,
        store_dtype=args.store_dtype,
    )
    documents, corpus = _documents(args)
    out = args.out or paths.stores_dir() / f"{_slug(args.model)}-{'text' if args.text else args.split}"
    held = _check_existing(out, args)
    model = load_model(args.model, device=device, dtype=cfg.torch_forward_dtype(device))
    if held and args.overwrite:
        from cltrace.activations.store import remove_store

        print(f"--overwrite: deleting the store in {out}")
        remove_store(out)
    store = write_store(
        model, documents, out, args.tokens, cfg, shard_tokens=args.shard_tokens, corpus=corpus
    )
    gb = sum(s.bytes for s in store.manifest.shards) / 1e9
    print(
        f"{store.n_tokens:,} tokens x {len(store.layers)} layers in "
        f"{len(store.manifest.shards)} shards ({gb:.2f} GB) at {store.folder}"
    )
    if store.n_tokens < args.tokens:
        print(f"note: the text ran out before {args.tokens:,} tokens")
    return 0


def _documents(args: argparse.Namespace):
    """The document stream and a description of it for the manifest."""
    from pathlib import Path

    from cltrace.errors import CltraceError

    try:
        from cltrace.data.corpus import iter_documents
    except ImportError as err:
        raise CltraceError(
            "the corpus reader (cltrace.data.corpus) is not available", "reinstall cltrace"
        ) from err
    text = [str(Path(p).expanduser().resolve()) for p in args.text] if args.text else None
    return iter_documents(args.split, paths=text), {"split": args.split, "paths": text}


def _check_existing(out, args: argparse.Namespace) -> bool:
    """Whether `out` holds a store; refuse to touch one without --resume or --overwrite, and
    refuse --resume when there is nothing to resume."""
    from pathlib import Path

    from cltrace.activations.store import MANIFEST, Manifest
    from cltrace.errors import CltraceError

    out = Path(out)
    held = (out / MANIFEST).is_file() or any(out.glob("shard_*.safetensors"))
    if args.resume and not held:
        raise CltraceError(f"nothing to resume in {out}", "drop --resume to start a new harvest")
    if held and not (args.resume or args.overwrite):
        try:
            m = Manifest.load(out)
            what = f"a {'complete' if m.complete else 'partial'} harvest of {m.n_tokens:,} tokens"
        except CltraceError:
            what = "activation shards"
        raise CltraceError(
            f"{out} already holds {what}",
            "add --resume to continue or extend it (complete shards are kept), "
            "--overwrite to delete it and start again, or choose another --out",
        )
    return held


def _slug(model: str) -> str:
    return model.rstrip("/").replace("\\", "/").split("/")[-1] or "model"
