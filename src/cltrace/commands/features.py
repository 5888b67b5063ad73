"""`cltrace features RUN`: build (or continue) the feature store of a trained transcoder; relabel
it in place (`--relabel`); list its labels with their scores (`--list`, `--sort`, `--min-score`)."""

from __future__ import annotations

import argparse

from cltrace.commands import MODEL_HELP, RUN_HELP, add_device_argument, add_parser


def register(subparsers) -> None:
    p = add_parser(
        subparsers,
        "features",
        "Scan held-out text with a transcoder and store each feature's top contexts, "
        "activation density and promoted/suppressed tokens (resumable).",
    )
    p.add_argument("run", metavar="RUN", help=RUN_HELP)
    p.add_argument(
        "--tokens",
        type=int,
        default=1_000_000,
        help="total tokens to scan (a later call with a larger number continues); 0: whole corpus",
    )
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--db", default=None, help="feature store file (default: RUN/features.sqlite)")
    p.add_argument(
        "--text",
        action="append",
        default=None,
        metavar="PATH",
        help="scan these .txt/.jsonl files or folders instead of the held-out corpus (repeatable)",
    )
    p.add_argument("--context-len", type=int, default=64, help="tokens per context (BOS included)")
    p.add_argument("--top-k", type=int, default=20, help="top activating examples kept per feature")
    p.add_argument("--bins", type=int, default=5, help="slices of the activation range for spread examples")
    p.add_argument("--per-bin", type=int, default=4, help="examples kept per slice")
    p.add_argument("--batch", type=int, default=8, help="contexts per forward pass")
    p.add_argument("--flush-tokens", type=int, default=32768, help="write progress every this many tokens")
    p.add_argument(
        "--no-effects",
        action="store_true",
        help="skip promoted/suppressed tokens (saves a matmul with the unembedding per layer)",
    )
    p.add_argument("--fresh", action="store_true", help="discard a previous build (your labels are kept)")
    add_device_argument(p)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model dtype")
    g = p.add_argument_group("labels and their scores")
    g.add_argument(
        "--relabel",
        action="store_true",
        help="recompute labels and scores in the existing store without rescanning",
    )
    g.add_argument(
        "--score-output",
        default="0",
        metavar="N|all",
        help="steer N sampled features (or all) to score their labels' written tokens (default: 0)",
    )
    g.add_argument(
        "--broad-density",
        type=float,
        default=0.1,
        help="a feature firing on more than this share of tokens is labelled broad, not named",
    )
    g.add_argument("--list", action="store_true", help="list labels with their scores instead of building")
    g.add_argument(
        "--sort",
        choices=["score", "output", "density", "id"],
        default=None,
        help="order of --list (score: detection score, best first; implies --list)",
    )
    g.add_argument(
        "--min-score", type=float, default=None, help="only labels with detection >= this (implies --list)"
    )
    g.add_argument(
        "--min-output", type=float, default=None, help="only labels with output >= this (implies --list)"
    )
    g.add_argument("--limit", type=int, default=30, help="rows of --list (0: all)")
    g.add_argument("--broad", action="store_true", help="--list broad features too")
    p.set_defaults(func=run)


def _score_output(text: str) -> int | None:
    from cltrace.errors import CltraceError

    if text == "all":
        return None
    try:
        return max(0, int(text))
    except ValueError:
        raise CltraceError(
            f"--score-output {text!r} is not a number", "give a count, e.g. 200, or all"
        ) from None


def list_labels(args: argparse.Namespace) -> int:
    """Print labelled features with their scores, and the store's shuffled baseline."""
    from cltrace.features.store import FeatureStore
    from cltrace.runs import store_path

    with FeatureStore(store_path(args.run, args.db)) as store:
        rows = store.labels_table(
            min_score=args.min_score,
            min_output=args.min_output,
            order=args.sort or "score",
            limit=args.limit or None,
            include_broad=args.broad,
        )
        summary = store.label_summary() or {}
    fmt = lambda v: "  -  " if v is None else f"{v:.2f}"  # noqa: E731
    print(f"{'feature':>10}  {'detect':>6}  {'(pos)':>5}  {'output':>6}  {'density':>8}  label")
    for r in rows:
        dens = "" if r["density"] is None else f"{r['density']:.2%}"
        mark = "  (yours)" if r["source"] == "user" else ""
        print(
            f"{r['layer']:>5}:{r['index']:<4}  {fmt(r['detection']):>6}  {r['n_pos']:>5}  "
            f"{fmt(r['output']):>6}  {dens:>8}  "
            f"{r['label']}{mark}"
        )
    print(baseline_line(summary))
    return 0


def baseline_line(summary: dict) -> str:
    """`detection median 0.81 over 9,120 labels (shuffled labels: 0.50); output ...`."""
    parts = []
    for key in ("detection", "output"):
        own, shuf = summary.get(key, {}), summary.get(f"{key}_shuffled", {})
        if own.get("n"):
            parts.append(
                f"{key} median {own['median']:.2f} over {own['n']:,} labels "
                f"(shuffled labels: {shuf.get('median', float('nan')):.2f})"
            )
    return "; ".join(parts) if parts else "no scores yet"


def relabel(args: argparse.Namespace) -> int:
    """Recompute labels and scores in place; the model is loaded only when it is needed."""
    from cltrace.features.label_store import needs_model
    from cltrace.features.label_store import relabel as relabel_store
    from cltrace.features.labels import LabelConfig
    from cltrace.features.store import FeatureStore
    from cltrace.runs import open_run, store_path

    cfg = LabelConfig(broad_density=args.broad_density)
    n_out = _score_output(args.score_output)
    with FeatureStore(store_path(args.run, args.db)) as store:
        model = transcoder = None
        if n_out != 0 or needs_model(store):
            loaded = open_run(args.run, args.model, args.device, args.dtype)
            model, transcoder = loaded.model, loaded.transcoder
        done = relabel_store(
            store, cfg, model=model, transcoder=transcoder, score_output=n_out, show_progress=True
        )
    print(
        f"{done.n_features:,} features relabelled in {done.seconds:.1f} s: {done.n_broad:,} broad, "
        f"{done.n_dead:,} never active, {done.n_detection:,} with a detection score, "
        f"{done.n_output:,} with an output score"
    )
    print(baseline_line(done.summary))
    return 0


def run(args: argparse.Namespace) -> int:
    from cltrace.errors import CltraceError
    from cltrace.features.labels import LabelConfig
    from cltrace.features.store import FeatureStore, FeatureStoreConfig, build_feature_store
    from cltrace.runs import open_run, store_path

    if args.list or args.sort or args.min_score is not None or args.min_output is not None:
        return list_labels(args)
    if args.relabel:
        return relabel(args)

    try:
        cfg = FeatureStoreConfig(
            context_len=args.context_len,
            top_k=args.top_k,
            n_bins=args.bins,
            per_bin=args.per_bin,
            batch_contexts=args.batch,
            flush_tokens=args.flush_tokens,
        )
    except ValueError as err:
        raise CltraceError(str(err), "check the numbers given to cltrace features") from err
    loaded = open_run(args.run, args.model, args.device, args.dtype)
    path = store_path(args.run, args.db)
    documents = None
    if args.text:
        from cltrace.data.corpus import iter_documents

        documents = iter_documents(paths=args.text)
    summary = build_feature_store(
        path,
        loaded.model,
        loaded.transcoder,
        documents=documents,
        config=cfg,
        max_tokens=args.tokens or None,
        fresh=args.fresh,
        model_id=loaded.model_name,
        transcoder_id=str(loaded.run.transcoder_dir),
        effects=not args.no_effects,
        labels=LabelConfig(broad_density=args.broad_density),
        score_output=_score_output(args.score_output),
    )
    mb = summary.db_bytes / 2**20
    print(
        f"{path}: {summary.tokens:,} tokens scanned ({summary.tokens_this_run:,} now, "
        f"{summary.tokens_per_second:,.0f} tok/s), {mb:.1f} MiB"
    )
    with FeatureStore(path) as store:
        print(baseline_line(store.label_summary() or {}))
    print(
        f"see a feature: cltrace feature {args.run} LAYER:INDEX; labels by score: "
        f"cltrace features {args.run} --sort score"
    )
    return 0
