"""`cltrace diff A B`: what changes between two attribution graphs (or two prompts' graphs)."""

from __future__ import annotations

import argparse

from cltrace.commands import add_parser, add_run_arguments


def register(subparsers) -> None:
    p = add_parser(
        subparsers,
        "diff",
        "Compare two attribution graphs: features that appear, vanish or change weight, aligned "
        "by the tokens the prompts share, and the paths that carry the change in the answer.",
    )
    p.add_argument("a", help="graph file (.json or .graph.safetensors from `cltrace trace`) or a prompt")
    p.add_argument("b", help="graph file or prompt (the same kind as A)")
    add_run_arguments(p, required=False, note="needed for two prompts")
    p.add_argument("--max-feature-nodes", type=int, default=4096, help="feature targets per prompt graph")
    p.add_argument(
        "--min-change",
        type=float,
        default=0.01,
        help="smallest change of a node's share of the influence on the logits reported",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="PATH",
        help="diff JSON (docs/DIFF_FORMAT.md); None: <graphs folder>/diff-<a>-vs-<b>.json",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cltrace import paths
    from cltrace.attribution.diff import diff_graphs
    from cltrace.attribution.pipeline import slugify
    from cltrace.io import atomic_write_json

    files = [_looks_like_file(x) for x in (args.a, args.b)]
    if all(files):
        inputs = _from_files(args.a, args.b)
    elif not any(files):
        inputs = _from_prompts(args)
    else:
        from cltrace.errors import CltraceError

        raise CltraceError(
            "give two graph files or two prompts, not one of each",
            "a graph file ends in .json or .graph.safetensors",
        )
    graphs, answers, pruned, circuits, sources = inputs
    result = diff_graphs(
        graphs[0],
        graphs[1],
        answers,
        pruned=pruned,
        sources=sources,
        circuits=circuits,
        min_change=args.min_change,
    )
    out = (
        Path(args.out)
        if args.out
        else paths.graphs_dir()
        / (f"diff-{slugify(graphs[0].prompt, 24)}-vs-{slugify(graphs[1].prompt, 24)}.json")
    )
    atomic_write_json(result.to_dict(), out)
    for line in result.summary():
        print(line)
    if result.is_empty:
        print("no difference at the feature level")
    print(f"diff: {out}")
    return 0


def _looks_like_file(text: str) -> bool:
    return text.endswith(".json") or text.endswith(".graph.safetensors")


def _from_files(a: str, b: str):
    import json

    from cltrace.attribution.diff import graph_files, load_circuit
    from cltrace.attribution.graph import Graph
    from cltrace.attribution.prune import prune

    graphs, answers, pruned, circuits = [], [], [], []
    for spec in (a, b):
        full, pruned_json = graph_files(spec)
        graph = Graph.load(full)
        doc = json.loads(pruned_json.read_text()) if pruned_json else {}
        settings = doc.get("metadata", {}).get("pruning_settings", {})
        graphs.append(graph)
        pruned.append(prune(graph, settings.get("node_threshold", 0.8), settings.get("edge_threshold", 0.98)))
        answers.append(_answer_from_json(doc, int(graph.logit_tokens[0])))
        circuits.append(load_circuit(pruned_json))
    answer_pair = (answers[0], answers[1])
    both = tuple(circuits) if all(c is not None for c in circuits) else None
    return graphs, answer_pair, (pruned[0], pruned[1]), both, (a, b)


def _answer_from_json(doc: dict, token: int) -> str:
    import re

    for node in doc.get("nodes", []):
        if node.get("is_target_logit"):
            m = re.match(r'^Output "(.*)" \(p=', node.get("clerp", ""), re.S)
            if m:
                return m.group(1)
    return f"token {token}"


def _from_prompts(args: argparse.Namespace):
    from cltrace.attribution.graph import AttributionConfig, attribute
    from cltrace.attribution.prune import prune
    from cltrace.errors import CltraceError
    from cltrace.runs import open_run

    if not args.transcoder:
        raise CltraceError(
            "two prompts need --transcoder RUN to trace them",
            "or give two graph files written by `cltrace trace`",
        )
    loaded = open_run(args.transcoder, args.model, args.device)
    cfg = AttributionConfig(max_feature_nodes=args.max_feature_nodes)
    graphs = [
        attribute(loaded.model, loaded.transcoder, p, cfg, transcoder_id=loaded.run.name)
        for p in (args.a, args.b)
    ]
    a, b = (loaded.model.token_strings([int(g.logit_tokens[0])])[0] for g in graphs)
    return graphs, (a, b), (prune(graphs[0]), prune(graphs[1])), None, (args.a, args.b)
