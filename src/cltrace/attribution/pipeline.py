"""Trace one prompt to files: attribute, prune, score, write the viewer JSON and the full graph.

The one sequence behind `cltrace trace` and the demo's experiments.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path

from cltrace import paths
from cltrace.attribution.export import to_frontend_json, write_json
from cltrace.attribution.graph import AttributionConfig, Graph, attribute
from cltrace.attribution.prune import GraphScores, PruneResult, graph_scores, prune
from cltrace.transcoders.interface import TranscoderLike


@dataclass
class TraceResult:
    """A traced prompt and where it was written."""

    graph: Graph
    pruned: PruneResult
    scores: dict[str, GraphScores]  # "unpruned" / "pruned"
    logit_strings: dict[int, str]  # logit token id -> its text
    seconds: float  # time spent in `attribute`
    json_path: Path  # pruned graph, Neuronpedia schema
    graph_path: Path  # full graph, safetensors
    n_json_nodes: int
    n_json_links: int


def slugify(text: str, limit: int = 48) -> str:
    """A file-name-safe slug of the prompt plus a short hash (distinct prompts, distinct files)."""
    words = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:limit].strip("-") or "graph"
    return f"{words}-{hashlib.sha1(text.encode()).hexdigest()[:6]}"


def default_graph_path(prompt: str) -> Path:
    """Where a traced prompt's pruned JSON goes when no path is given: the graphs folder."""
    return paths.graphs_dir() / f"{slugify(prompt)}.json"


def trace_to_files(
    lm,
    transcoder: TranscoderLike,
    prompt,
    cfg: AttributionConfig,
    out: Path,
    *,
    transcoder_id: str,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
) -> TraceResult:
    """Build the graph of `prompt`, write `out` (pruned JSON) and `<stem>.graph.safetensors`."""
    start = time.perf_counter()
    graph = attribute(lm, transcoder, prompt, cfg, transcoder_id=transcoder_id)
    seconds = time.perf_counter() - start
    pruned = prune(graph, node_threshold, edge_threshold)
    scores = {"unpruned": graph_scores(graph), "pruned": graph_scores(graph, pruned.node_mask)}
    ids = graph.logit_tokens.tolist()
    strings = dict(zip(ids, lm.token_strings(ids)))
    doc = to_frontend_json(
        graph,
        pruned,
        slug=out.stem,
        logit_strings=strings,
        scores=scores,
        node_threshold=node_threshold,
        edge_threshold=edge_threshold,
    )
    write_json(doc, out)
    graph_path = graph.save(out.with_name(out.stem + ".graph.safetensors"))
    return TraceResult(
        graph, pruned, scores, strings, seconds, out, graph_path, len(doc["nodes"]), len(doc["links"])
    )
