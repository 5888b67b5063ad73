"""`cltrace feature RUN LAYER:INDEX`: one feature's dashboard from the feature store; set its label.

Reads SQLite only (no torch, no model), so it prints in well under a second.
"""

from __future__ import annotations

import argparse
import re

from cltrace.commands import add_parser

_REF = re.compile(r"^\s*L?(\d+)\s*[:/]\s*(\d+)\s*$")


def parse_feature_ref(text: str) -> tuple[int, int]:
    """ "3:1234" (or "L3:1234", "3/1234") -> (3, 1234)."""
    m = _REF.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a feature: write LAYER:INDEX, e.g. 3:1234")
    return int(m.group(1)), int(m.group(2))


def register(subparsers) -> None:
    p = add_parser(
        subparsers,
        "feature",
        "Show one feature's dashboard (label, density, top contexts, promoted and "
        "suppressed tokens) from the feature store, or set its label.",
    )
    p.add_argument("run", metavar="RUN", help="transcoder run (folder or name), or a feature store file")
    p.add_argument(
        "ref", metavar="LAYER:INDEX", nargs="?", type=parse_feature_ref, help="the feature, e.g. 3:1234"
    )
    p.add_argument("--label", default=None, help="set your own label (kept across rebuilds)")
    p.add_argument(
        "--clear-label", action="store_true", help="remove your label (the automatic one shows again)"
    )
    p.add_argument("--search", default=None, metavar="TEXT", help="list features whose label contains TEXT")
    p.add_argument("--db", default=None, help="feature store file (default: RUN/features.sqlite)")
    p.add_argument("--contexts", type=int, default=10, help="top contexts to print")
    p.add_argument("--json", action="store_true", help="print the dashboard as JSON (what the viewer gets)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import time

    from cltrace.errors import CltraceError
    from cltrace.features.dashboard import render
    from cltrace.features.store import FeatureStore
    from cltrace.runs import store_path

    with FeatureStore(store_path(args.run, args.db)) as store:
        if args.search is not None:
            for layer, index, label in store.search(args.search, limit=50):
                print(f"{layer}:{index}\t{label}")
            return 0
        if args.ref is None:
            raise CltraceError("which feature? give LAYER:INDEX", "e.g. cltrace feature RUN 3:1234")
        layer, index = args.ref
        if args.label is not None or args.clear_label:
            store.set_label(layer, index, None if args.clear_label else args.label)
        t0 = time.perf_counter()
        card = store.dashboard(layer, index)
        ms = (time.perf_counter() - t0) * 1000
        print(
            json.dumps(card, indent=1, ensure_ascii=False)
            if args.json
            else render(card, max_contexts=args.contexts) + f"\n({ms:.1f} ms)"
        )
    return 0
