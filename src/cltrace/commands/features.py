"""`cltrace features RUN`: build (or continue) the feature store of a trained transcoder."""

from __future__ import annotations

import argparse

from cltrace.commands import add_device_argument, add_parser


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
    add_device_argument(p)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model dtype")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cltrace.errors import CltraceError
    from cltrace.features.store import FeatureStoreConfig, build_feature_store
    from cltrace.runs import open_run, store_path

    try:
        cfg = FeatureStoreConfig(context_len=args.context_len, top_k=args.top_k, n_bins=args.bins,
                                 per_bin=args.per_bin, batch_contexts=args.batch,
                                 flush_tokens=args.flush_tokens)
    except ValueError as err:
        raise CltraceError(str(err), "check the numbers given to cltrace features") from err
    loaded = open_run(args.run, args.model, args.device, args.dtype)
    path = store_path(args.run, args.db)
    documents = None
    if args.text:
        from cltrace.data.corpus import iter_documents

        documents = iter_documents(paths=args.text)
    summary = build_feature_store(path, loaded.model, loaded.transcoder, documents=documents, config=cfg,
                                  max_tokens=args.tokens or None, fresh=args.fresh, model_id=loaded.model_name,
                                  transcoder_id=str(loaded.run.transcoder_dir), effects=not args.no_effects)
    mb = summary.db_bytes / 2**20
    print(f"{path}: {summary.tokens:,} tokens scanned ({summary.tokens_this_run:,} now, "
          f"{summary.tokens_per_second:,.0f} tok/s), {mb:.1f} MiB")
    print(f"see a feature: cltrace feature {args.run} LAYER:INDEX")
    return 0
