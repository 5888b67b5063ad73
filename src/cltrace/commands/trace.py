"""`cltrace trace`: build, prune and save the attribution graph of a prompt."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from cltrace.commands import add_parser, add_run_arguments

if TYPE_CHECKING:
    from cltrace.runs import LoadedRun
    from cltrace.transcoders.interface import TranscoderLike


def register(subparsers) -> None:
    p = add_parser(
        subparsers,
        "trace",
        "Build the attribution graph of a prompt and save it "
        "(full graph + pruned JSON for the viewer / Neuronpedia).",
    )
    p.add_argument("prompt", help="the text to trace (the model's BOS token is prepended)")
    add_run_arguments(p)
    p.add_argument(
        "--max-feature-nodes",
        type=int,
        default=4096,
        help="feature targets visited, most influential first (0: only logits)",
    )
    p.add_argument(
        "--output-target",
        action="append",
        default=None,
        metavar="TOKEN",
        help="attribute this output token instead of the top logits (repeatable; "
        "must be a single token, e.g. ' Austin' with its leading space)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="targets per backward pass; None: chosen from free memory",
    )
    p.add_argument(
        "--node-threshold",
        type=float,
        default=0.8,
        help="keep the nodes carrying this fraction of influence on the logits",
    )
    p.add_argument(
        "--edge-threshold",
        type=float,
        default=0.98,
        help="keep the edges carrying this fraction of influence",
    )
    p.add_argument(
        "--bf16",
        action="store_true",
        help="bfloat16 backward passes and edge read-out: about 1.6x faster on CPUs "
        "with AMX, edges accurate to about 1%% instead of exact",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="PATH",
        help="pruned JSON path; None: <graphs folder>/<slug of the prompt>.json. The "
        "full graph is written next to it as <slug>.graph.safetensors",
    )
    p.add_argument(
        "--qk",
        action="store_true",
        help="explain the heads of the pruned graph's strongest attention edges (QK "
        "attribution, in the JSON as qk_tracing_results)",
    )
    p.add_argument(
        "--qk-node",
        action="append",
        default=None,
        metavar="ID",
        help="QK attribution for this node's strongest heads instead (repeatable; e.g. 12_621_7)",
    )
    p.add_argument("--qk-edges", type=int, default=8, help="attention edges explained by --qk")
    p.add_argument("--open", action="store_true", help="open the viewer on the graphs folder")
    p.add_argument(
        "--circuit",
        action="store_true",
        help="also summarise the graph as a circuit of named supernodes: writes "
        "<slug>.circuit.json and <slug>.circuit.svg beside the graph",
    )
    p.add_argument(
        "--no-validate",
        action="store_true",
        help="with --circuit: skip checking the supernodes' predicted effects on the model",
    )
    p.add_argument(
        "--supernodes",
        default=None,
        metavar="FILE",
        help="with --circuit: build the circuit from these groups instead of the automatic ones "
        "(a supernode file: the <slug>.supernodes.json that --circuit or the viewer wrote, with "
        "groups renamed, merged or split by hand)",
    )
    p.add_argument(
        "--features",
        default=None,
        metavar="DB",
        help="with --circuit: feature store whose labels name the supernodes; "
        "None: the run's features.sqlite when it exists",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cltrace.attribution.graph import AttributionConfig
    from cltrace.attribution.pipeline import default_graph_path, trace_to_files
    from cltrace.errors import CltraceError
    from cltrace.runs import open_run

    for name in ("node_threshold", "edge_threshold"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise CltraceError(f"--{name.replace('_', '-')} must be in [0, 1]")
    if args.max_feature_nodes < 0:
        raise CltraceError("--max-feature-nodes must be >= 0")
    groups = None
    if args.supernodes:
        from cltrace.supernode_file import read_supernodes

        if not args.circuit:
            raise CltraceError("--supernodes builds a circuit from a supernode file", "add --circuit")
        groups = read_supernodes(Path(args.supernodes).expanduser())  # a bad file fails before the trace
    loaded = open_run(args.transcoder, args.model, args.device)
    lm, transcoder = loaded.model, loaded.transcoder
    targets = None if not args.output_target else tuple(single_token(lm, t) for t in args.output_target)
    cfg = AttributionConfig(
        max_feature_nodes=args.max_feature_nodes,
        batch_size=args.batch_size,
        output_targets=targets,
        edge_dtype="bfloat16" if args.bf16 else "float32",
        backward_dtype="bfloat16" if args.bf16 else "float32",
    )
    out = Path(args.out) if args.out else default_graph_path(args.prompt)
    r = trace_to_files(
        lm,
        transcoder,
        args.prompt,
        cfg,
        out,
        transcoder_id=loaded.run.name,
        node_threshold=args.node_threshold,
        edge_threshold=args.edge_threshold,
    )
    _report(r.graph, r.pruned, r.scores, r.logit_strings, r.seconds, r.n_json_nodes, r.n_json_links)
    print(f"graph:  {r.graph_path}\npruned: {out}")
    if args.qk or args.qk_node:
        from cltrace.attribution.qk_graph import report_qk

        report_qk(lm, transcoder, r, node_ids=args.qk_node, max_edges=args.qk_edges)
    if args.circuit:
        _write_circuit(args, r, lm, transcoder, loaded.run.feature_store, groups)
    if args.open:
        _open_viewer(out.parent, loaded)
    return 0


def single_token(lm, text: str) -> int:
    """The id of `text` if it is exactly one token of the model's vocabulary."""
    from cltrace.errors import CltraceError

    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        shown = lm.token_strings(ids)
        hint = "pick one of its tokens" if ids else "give a non-empty token"
        if not text.startswith(" ") and ids:
            hint += f", or try {' ' + text!r} (with the leading space most tokenizers use)"
        raise CltraceError(f"--output-target {text!r} is {len(ids)} tokens {shown}, not one", hint)
    return int(ids[0])


def _report(graph, pruned, scores, strings, seconds, n_json_nodes, n_json_links) -> None:
    print(
        f"prompt: {graph.n_pos} tokens; {graph.stats['n_active']} active features, "
        f"{graph.n_features} visited; {seconds:.1f} s"
    )
    print("top logits:")
    for tok, p in zip(graph.logit_tokens.tolist(), graph.logit_probabilities.tolist()):
        print(f"  {strings[tok]!r:>16}  p={p:.3f}")
    n_edges = int((graph.adjacency != 0).sum())
    print(f"full graph:   {graph.n_nodes} nodes, {n_edges} edges")
    print(f"pruned graph: {n_json_nodes} nodes, {n_json_links} edges")
    for name, s in scores.items():
        print(f"{name:>9} scores: replacement {s.replacement:.3f}, completeness {s.completeness:.3f}")


def _write_circuit(args, r, lm, transcoder: TranscoderLike, default_store, groups: list[dict] | None) -> None:
    """`--circuit`: supernodes, their edges and (unless --no-validate) their validation."""
    from pathlib import Path

    from cltrace.circuits.build import circuit_to_files
    from cltrace.features.store import FeatureStore

    db = Path(args.features).expanduser() if args.features else Path(default_store)
    if args.features and not db.is_file():
        from cltrace.errors import CltraceError

        raise CltraceError(f"no feature store at {db}", "build one with `cltrace features RUN`")
    store = FeatureStore(db) if db.is_file() else None
    try:
        c, json_path, svg_path = circuit_to_files(
            r.graph,
            r.pruned,
            r.json_path,
            lm,
            transcoder,
            store=store,
            validate=not args.no_validate,
            groups=groups,
        )
    finally:
        if store is not None:
            store.close()
    print(
        f"circuit: {len(c.feature_nodes)} supernodes carry {c.influence_share:.0%} of the logit "
        f"influence ({c.stats['n_grouped_features']} of {c.stats['n_pruned_features']} pruned-graph "
        f"features); {c.stats['seconds_build']:.1f} s"
        + (f" + {c.stats['seconds_validate']:.1f} s validation" if c.stats.get("seconds_validate") else "")
    )
    for n in c.feature_nodes:
        check = (
            ""
            if n.measured is None or n.predicted is None
            else (f"  pred {n.predicted:+.2f} meas {n.measured:+.2f}" + ("  FAILED" if n.failed else ""))
        )
        print(f"  {n.id:>4} {n.influence_share:6.1%}  {n.name}{check}")
    f = c.faithfulness
    if f.get("spearman_supernodes") is not None:
        print(
            f"faithfulness (Spearman): supernodes {f['spearman_supernodes']:.2f}"
            + (f", features {f['spearman_features']:.2f}" if f.get("spearman_features") is not None else "")
        )
    print(f"circuit: {json_path}\ndiagram: {svg_path}")


def _open_viewer(folder, loaded: LoadedRun) -> None:
    from cltrace.interventions.steer import Steerer
    from cltrace.viewer.model_backend import ModelBackend
    from cltrace.viewer.server import ViewerConfig, serve

    backend = ModelBackend(steerer=Steerer(loaded.model, loaded.transcoder))  # the model already loaded
    serve(ViewerConfig(graph_dirs=[folder], open_browser=True), backend)
