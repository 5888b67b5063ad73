"""cltrace.attribution: local replacement model, attribution graphs, pruning, export.

graph = attribute(lm, transcoder, "The capital of Texas is", AttributionConfig())
kept = prune(graph)                      # 80% of node influence, 98% of edge influence
scores = graph_scores(graph, kept.node_mask)
doc = to_frontend_json(graph, kept, slug="texas", logit_strings={...})
"""

from cltrace.attribution.build import attribute
from cltrace.attribution.config import AttributionConfig
from cltrace.attribution.export import to_frontend_json, validate, write_json
from cltrace.attribution.graph import Graph, NodeTable
from cltrace.attribution.prune import GraphScores, PruneResult, graph_scores, prune

__all__ = [
    "AttributionConfig",
    "Graph",
    "NodeTable",
    "attribute",
    "prune",
    "PruneResult",
    "GraphScores",
    "graph_scores",
    "to_frontend_json",
    "validate",
    "write_json",
]
