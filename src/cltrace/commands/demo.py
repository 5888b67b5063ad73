"""`cltrace demo`: the main job, from a fresh machine to the report and the viewer."""

from __future__ import annotations

import argparse

from cltrace.commands import add_device_argument, add_parser
from cltrace.models import DEFAULT_MODEL


def register(subparsers) -> None:
    p = add_parser(
        subparsers,
        "demo",
        "Run the whole pipeline on the default model: train a cross-layer transcoder, "
        "build its feature store, trace the paper's example prompts, run the "
        "interventions, write a report and open the viewer (finished steps are reused)",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="bundled model name or transformers folder")
    p.add_argument("--preset", default="demo", help="training preset")
    p.add_argument("--run", default=None, help="run folder (default: <runs>/demo-<model>-clt)")
    p.add_argument("--feature-tokens", type=int, default=60_000, help="held-out tokens for the feature store")
    p.add_argument("--max-feature-nodes", type=int, default=1024, help="feature targets per graph")
    p.add_argument("--out", default=None, help="report folder (default: <CLTRACE_HOME>/demo)")
    p.add_argument("--no-serve", action="store_true", help="write the report and exit without the viewer")
    p.add_argument(
        "--no-open", action="store_true", help="print the viewer's address instead of opening a browser"
    )
    p.add_argument("--port", type=int, default=8765, help="viewer port")
    add_device_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cltrace.demo import DemoConfig, run_demo

    cfg = DemoConfig(
        model=args.model,
        preset=args.preset,
        run=args.run,
        feature_tokens=args.feature_tokens,
        max_feature_nodes=args.max_feature_nodes,
        serve=not args.no_serve,
        open_browser=not args.no_open,
        port=args.port,
        device=args.device,
    )
    if args.out:
        cfg.out = Path(args.out)
    run_demo(cfg)
    return 0
