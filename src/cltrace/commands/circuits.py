"""`cltrace circuits`: the circuit a set of prompts shares (features recurring at the same role)."""

from __future__ import annotations

import argparse

from cltrace.commands import add_parser, add_run_arguments


def register(subparsers) -> None:
    p = add_parser(
        subparsers,
        "circuits",
        "Trace a set of prompts (a file, or a template with fillers) and report the features and "
        "supernodes that recur at the same role, each part's coverage, and the prompts the shared "
        "circuit does not explain.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", metavar="FILE", help="a text file with one prompt per line")
    src.add_argument(
        "--template", help='a prompt with {name} placeholders, e.g. "the capital of {country} is"'
    )
    p.add_argument(
        "--fill",
        action="append",
        default=[],
        metavar="NAME=A,B,...",
        help="the fillers of a placeholder (repeatable; several are zipped)",
    )
    add_run_arguments(p)
    p.add_argument("--max-feature-nodes", type=int, default=4096, help="feature targets per prompt graph")
    p.add_argument("--node-threshold", type=float, default=0.8, help="pruning: share of influence kept")
    p.add_argument(
        "--min-frequency",
        type=float,
        default=0.5,
        help="a feature is part of the shared circuit when kept in this share of the prompts",
    )
    p.add_argument(
        "--explain-threshold",
        type=float,
        default=0.5,
        help="a prompt is explained when shared features carry this share of its feature influence",
    )
    p.add_argument("--no-supernodes", action="store_true", help="skip the supernode-level matching")
    p.add_argument(
        "--out", default=None, metavar="PATH", help="report JSON; None: <graphs folder>/circuits-<slug>.json"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cltrace import paths
    from cltrace.attribution.graph import AttributionConfig
    from cltrace.attribution.pipeline import slugify
    from cltrace.attribution.recurring import expand_template, parse_fill, trace_prompt_set
    from cltrace.attribution.recurring_diagram import write_merged
    from cltrace.errors import CltraceError
    from cltrace.io import atomic_write_json
    from cltrace.runs import open_run

    for name in ("min_frequency", "explain_threshold", "node_threshold"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise CltraceError(f"--{name.replace('_', '-')} must be in [0, 1]")
    if args.template is not None:
        prompts = expand_template(args.template, parse_fill(args.fill))
    else:
        if args.fill:
            raise CltraceError("--fill goes with --template, not --prompts")
        path = Path(args.prompts).expanduser()
        if not path.is_file():
            raise CltraceError(f"no prompt file at {path}")
        prompts = [(line.rstrip("\n"), {}) for line in path.read_text().splitlines() if line.strip()]
    if len(prompts) < 2:
        raise CltraceError(f"a prompt set needs at least two prompts, got {len(prompts)}")
    loaded = open_run(args.transcoder, args.model, args.device)
    store = _store(loaded) if not args.no_supernodes else None
    cfg = AttributionConfig(max_feature_nodes=args.max_feature_nodes)
    report = trace_prompt_set(
        loaded.model,
        loaded.transcoder,
        prompts,
        cfg,
        template=args.template,
        transcoder_id=loaded.run.name,
        supernodes=not args.no_supernodes,
        store=store,
        min_frequency=args.min_frequency,
        explain_threshold=args.explain_threshold,
        node_threshold=args.node_threshold,
    )
    name = slugify(args.template or prompts[0][0], 32)
    out = Path(args.out) if args.out else paths.graphs_dir() / f"circuits-{name}.json"
    atomic_write_json(report.to_dict(), out)
    for line in report.lines():
        print(line)
    print(f"report: {out}")
    svg = write_merged(report, out, loaded.model.n_layers, loaded.model_name, loaded.run.name)
    if svg is not None:
        print(f"merged circuit: {svg}")
    return 0


def _store(loaded):
    """The run's feature store (for supernode names), or None."""
    path = getattr(loaded.run, "feature_store", None)
    if path is None or not path.is_file():
        return None
    try:
        from cltrace.features.store import FeatureStore
    except ImportError:
        return None
    return FeatureStore(path)
