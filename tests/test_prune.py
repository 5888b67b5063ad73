"""Pruning and graph scores against hand-computed values (METHOD.md §4)."""

from __future__ import annotations

import torch

from cltrace.attribution.graph import AttributionConfig, Graph
from cltrace.attribution.prune import (
    cumulative_shares,
    graph_scores,
    influence,
    normalize_rows,
    prune,
    score_threshold,
)


def make_graph(
    adjacency: torch.Tensor, feats: list[tuple[int, int, int]], n_layers: int, n_pos: int, probs: list[float]
) -> Graph:
    n_f = len(feats)
    active = torch.tensor(feats, dtype=torch.long).reshape(-1, 3)
    return Graph(
        adjacency=adjacency.float(),
        active_features=active,
        activation_values=torch.ones(n_f),
        pre_activations=torch.ones(n_f),
        selected_features=torch.arange(n_f),
        logit_tokens=torch.arange(len(probs)),
        logit_probabilities=torch.tensor(probs),
        logit_values=torch.zeros(len(probs)),
        input_tokens=torch.arange(n_pos),
        token_strings=["a"] * n_pos,
        prompt="a",
        model_name="m",
        transcoder_id="t",
        n_layers=n_layers,
        config=AttributionConfig(),
    )


def chain_graph() -> Graph:
    """1 layer, 1 position: feature f, error e, token x, logit y.

    x -> f (2), e -> f (2);  f -> y (3), e -> y (1), x -> y (0)."""
    # node order: f, e(l0,p0), x(p0), y
    A = torch.zeros(4, 4)
    A[0, 1], A[0, 2] = 2.0, 2.0
    A[3, 0], A[3, 1] = 3.0, 1.0
    return make_graph(A, [(0, 0, 7)], n_layers=1, n_pos=1, probs=[1.0])


def test_influence_is_the_neumann_series():
    torch.manual_seed(0)
    n = 7
    A = torch.randn(n, n).tril(-1)  # a DAG
    norm = normalize_rows(A)
    w = torch.zeros(n)
    w[-1] = 0.7
    w[-2] = 0.3
    expected = w @ (torch.linalg.inv(torch.eye(n) - norm) - torch.eye(n))
    torch.testing.assert_close(influence(norm, w), expected, rtol=1e-5, atol=1e-6)


def test_scores_by_hand():
    g = chain_graph()
    # Â: row f = [0, .5, .5, 0]; row y = [.75, .25, 0, 0]
    # influence: f = .75; e = .25 + .75*.5 = .625; x = .75*.5 = .375
    infl = influence(normalize_rows(g.adjacency), torch.tensor([0, 0, 0, 1.0]))
    torch.testing.assert_close(infl, torch.tensor([0.75, 0.625, 0.375, 0.0]))
    s = graph_scores(g)
    assert abs(s.replacement - 0.375 / (0.375 + 0.625)) < 1e-6
    # completeness: f: (1-.5)*.75; y: (1-.25)*1; e, x: no inputs -> 1 * influence
    out = torch.tensor([0.75, 0.625, 0.375, 1.0])
    nonerr = torch.tensor([0.5, 1.0, 1.0, 0.75])
    assert abs(s.completeness - float((nonerr * out).sum() / out.sum())) < 1e-6


def test_pruned_scores_fold_dropped_features_into_errors():
    g = chain_graph()
    everything = graph_scores(g, node_mask=torch.ones(4, dtype=torch.bool))
    assert everything == graph_scores(g)
    no_feature = graph_scores(g, node_mask=torch.tensor([False, True, True, True]))
    # f folded into e: y <- e (1 + 3), x has no path left
    assert no_feature.replacement == 0.0
    assert no_feature.completeness < everything.completeness


def test_thresholds_keep_tokens_and_logits_and_drop_weak_nodes():
    torch.manual_seed(1)
    L, n = 2, 3
    feats = [(0, 1, 0), (0, 2, 1), (1, 2, 2), (1, 2, 3)]
    n_f = len(feats)
    N = n_f + L * n + n + 2
    A = torch.zeros(N, N)
    tok = n_f + L * n
    err = n_f
    A[0, tok + 1] = 5.0  # token 1 -> f0
    A[1, tok + 2] = 5.0
    A[2, 0], A[2, 1] = 4.0, 1.0  # f0, f1 -> f2
    A[3, tok + 2] = 0.01  # f3: weak, only to a weak logit
    A[3, err + 2] = 0.01
    A[N - 2, 2], A[N - 2, err + 5] = 6.0, 0.5  # logit 0 <- f2, error (1, 2)
    A[N - 1, 3] = 0.01  # logit 1 <- f3 (tiny probability)
    g = make_graph(A, feats, n_layers=L, n_pos=n, probs=[0.99, 0.01])
    res = prune(g, node_threshold=0.8, edge_threshold=0.98)
    assert res.node_mask[tok:].all(), "tokens and logits are always kept"
    assert res.node_mask[2] and res.node_mask[0]
    assert not res.node_mask[3], "a feature with negligible influence is pruned"
    assert not res.edge_mask[:, ~res.node_mask].any() and not res.edge_mask[~res.node_mask].any()
    kept = res.edge_mask.nonzero().tolist()
    assert [N - 2, 2] in kept and [2, 0] in kept
    full = prune(g, node_threshold=1.0, edge_threshold=1.0)
    assert full.n_edges >= res.n_edges and full.node_mask.sum() >= res.node_mask.sum()


def test_threshold_helpers():
    s = torch.tensor([5.0, 3.0, 1.0, 1.0])
    assert score_threshold(s, 0.5) == 5.0
    assert score_threshold(s, 0.8) == 3.0
    assert score_threshold(s, 1.0) == 1.0
    assert score_threshold(torch.zeros(3), 0.8) == float("inf")
    torch.testing.assert_close(cumulative_shares(torch.tensor([1.0, 3.0])), torch.tensor([1.0, 0.75]))


def test_prune_on_a_real_graph():
    from cltrace.attribution.graph import attribute
    from test_attribution import PROMPT, make_transcoder
    from tiny import tiny_model

    lm = tiny_model("gemma")
    graph = attribute(
        lm, make_transcoder(lm, "clt"), PROMPT, AttributionConfig(max_feature_nodes=None, progress=False)
    )
    res = prune(graph)
    assert 0 < res.n_nodes < graph.n_nodes and 0 < res.n_edges < int((graph.adjacency != 0).sum())
    full, part = graph_scores(graph), graph_scores(graph, res.node_mask)
    for s in (full, part):
        assert 0.0 <= s.replacement <= 1.0 and 0.0 <= s.completeness <= 1.0
    assert part.completeness <= full.completeness + 1e-6
