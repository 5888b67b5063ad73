"""`cltrace eval RUN`: reconstruction, sparsity and replacement-model quality of a transcoder."""

from __future__ import annotations

import argparse

from cltrace.commands import MODEL_HELP, RUN_HELP, add_device_argument, add_parser


def register(subparsers) -> None:
    p = add_parser(
        subparsers,
        "eval",
        "Evaluate a trained transcoder on held-out text: per-layer normalised MSE, FVE, L0, "
        "dead/dense features, and the replacement model's agreement, KL and CE loss recovered",
    )
    p.add_argument("run", metavar="RUN", help=RUN_HELP)
    p.add_argument(
        "--store", default=None, help="held-out activation store (default: harvest the heldout split)"
    )
    p.add_argument("--tokens", type=int, default=20_000, help="held-out tokens for the activation metrics")
    p.add_argument(
        "--replacement-tokens",
        type=int,
        default=2_000,
        help="tokens for the replacement-model metrics (0: skip them)",
    )
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--split", default="heldout", help="corpus split to evaluate on")
    p.add_argument(
        "--text",
        nargs="+",
        metavar="PATH",
        default=None,
        help="evaluate on your own text files, folders or JSONL instead of the corpus",
    )
    p.add_argument("--json", default=None, help="where to write the metrics (default: RUN/eval.json)")
    add_device_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cltrace.hardware import resolve_device
    from cltrace.io import atomic_write_json
    from cltrace.runs import load_transcoder, open_run, resolve_run
    from cltrace.transcoders.evaluate import evaluate_on_text, report

    run = resolve_run(args.run)
    device = resolve_device(args.device)
    if args.store and not args.replacement_tokens:  # everything comes from the store: no model
        model, tc = None, load_transcoder(run, device)
    else:
        loaded = open_run(run, args.model, device)
        model, tc = loaded.model, loaded.transcoder
    result = evaluate_on_text(
        tc,
        model,
        tokens=args.tokens,
        replacement_tokens=args.replacement_tokens,
        split=args.split,
        text=args.text,
        store=args.store,
    )
    print(report(result.activations, result.replacement))
    atomic_write_json(result.to_dict(), Path(args.json) if args.json else run.dir / "eval.json")
    return 0
