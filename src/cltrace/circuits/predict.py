"""What an attribution graph predicts an intervention on its feature nodes will do (METHOD.md §2, §7).

The graph describes the *local replacement model* of one prompt: attention patterns, norm
denominators and error nodes frozen, every active feature linear in its pre-activation
(a JumpReLU above its threshold is the identity, ``a = z``). An edge ``A[t, s]`` (row = target,
column = source) is source s's contribution to target t's pre-activation (a feature) or
demeaned logit (a logit node); a feature source contributes in proportion to its activation,
``A[t, s] = a_s · c[t, s]``.

Intervention. A set S of feature nodes is changed by relative amounts ``r_s = Δa_s / a_s``
(ablation ×0: ``r_s = -1``; steering ×k: ``Δa_s = (k - 1)·a_s``, ``r_s = k - 1``). The members of S
are clamped to their new values (they do not react to each other). Every target then moves by

    Δz_t = Σ_s A[t, s] · r_s                    (sum over feature sources s)          (1)

where, for a source s outside S, ``r_s = Δz_s / a_s`` if s *responds* and 0 if it is held at its
clean value. Two ways to hold features:

- total effect (``constrain_until=None``): every feature outside S responds. With
  ``D = diag(1/a)`` over the responding set R and ``A_RR``, ``A_RS`` the feature blocks,
  ``r_R = D (A_RS r_S + A_RR r_R)``, i.e. ``(I - D A_RR) r_R = D A_RS r_S``;
- constrained (``constrain_until=c``): features of layers ≤ c are held, those above respond.
  With ``c = n_layers - 1`` nothing responds and (1) is the direct effect
  ``Δz_t = Σ_{s∈S} A[t, s] r_s`` — what `Steerer` measures with ``constrain_until = L - 1``
  (MLP outputs clamped, only the intervened features' decoder writes added).

A feature's sources lie in strictly lower layers, so with nodes sorted by layer ``D A_RR`` is
strictly lower triangular and the solve is one forward substitution, done here one layer at a
time for every intervention at once (``(I - D A_RR)^{-1} = I + D A_RR + (D A_RR)^2 + ...`` ends
after at most n_layers terms). Logit rows then follow from (1).

What the prediction ignores, so what a measurement on the real model can disagree with:
features crossing their threshold (turning on or off), attention patterns and norm scales
moving, the MLP error changing (the real MLP is not the transcoder), and active features the
graph did not select (``max_feature_nodes``): they are held at their clean values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from cltrace.attribution.graph import Graph
from cltrace.errors import CltraceError


def feature_layers(graph: Graph) -> Tensor:
    """Layer of each selected feature node, in node order ([n_features])."""
    return graph.active_features[graph.selected_features][:, 0]


def feature_activations(graph: Graph) -> Tensor:
    """Activation of each selected feature node, in node order ([n_features])."""
    return graph.activation_values[graph.selected_features].float()


def relative_changes(
    graph: Graph, groups: Sequence[Sequence[int]], value: float = -1.0
) -> Float[Tensor, "group feature"]:
    """Rows of r: ``value`` on each group's members (feature node indices), 0 elsewhere."""
    F = graph.n_features
    r = torch.zeros(len(groups), F)
    for g, members in enumerate(groups):
        idx = torch.as_tensor(list(members), dtype=torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= F):
            raise CltraceError(f"feature node index out of range in group {g} (the graph has {F} features)")
        r[g, idx] = value
    return r


def propagate(
    graph: Graph, r: Float[Tensor, "group feature"], constrain_until: int | None = None
) -> Float[Tensor, "group node"]:
    """Δ of every target (feature pre-activations and demeaned logits) for relative changes r.

    Args:
        graph: the (unpruned) attribution graph.
        r: relative change ``Δa/a`` of each intervened feature node (0: not intervened).
        constrain_until: features of layers ≤ this are held at their clean values
            (None: every non-intervened feature responds; n_layers - 1: direct effects only).
    Returns:
        [group, n_nodes]: the change of each feature's pre-activation and each logit node's
        demeaned logit (error and embedding columns are 0: they are never targets).
    """
    F = graph.n_features
    A = graph.adjacency.float()
    A_ff, a = A[:F, :F], feature_activations(graph)
    layers = feature_layers(graph)
    clamped = r != 0  # intervened members are clamped
    r_all = r.clone()
    respond_from = -1 if constrain_until is None else constrain_until
    for layer in range(int(layers.max()) + 1 if F else 0):
        rows = (layers == layer).nonzero().squeeze(1)
        if rows.numel() == 0 or layer <= respond_from:
            continue
        dz = r_all @ A_ff[rows].T  # [G, k]: Δ pre-activation
        free = ~clamped[:, rows]
        r_all[:, rows] = torch.where(free, dz / a[rows], r_all[:, rows])
    out = torch.zeros(r.shape[0], graph.n_nodes)
    out[:, :F] = r_all @ A_ff.T
    out[:, graph.logit_offset :] = r_all @ A[graph.logit_offset :, :F].T
    return out


def logit_index(graph: Graph, token_id: int) -> int:
    """Index of `token_id` among the graph's logit nodes (0..n_logits-1)."""
    tokens = graph.logit_tokens.tolist()
    if token_id not in tokens:
        raise CltraceError(
            f"token {token_id} is not one of this graph's logit nodes {tokens}",
            "trace with output_targets including the answer",
        )
    return tokens.index(token_id)


def predicted_ablation_effects(
    graph: Graph,
    groups: Sequence[Sequence[int]],
    target_logit_index: int,
    *,
    constrain_until: int | None = None,
) -> list[float]:
    """Predicted change of one logit node's demeaned logit when each group is ablated (×0).

    Args:
        graph: the attribution graph.
        groups: feature node indices (0..n_features-1) ablated together, one list per group.
        target_logit_index: which logit node (0..n_logits-1, see `logit_index`).
        constrain_until: see `propagate` (None: total effect).
    """
    if not 0 <= target_logit_index < graph.n_logits:
        raise CltraceError(f"logit index {target_logit_index} out of range (the graph has {graph.n_logits})")
    delta = propagate(graph, relative_changes(graph, groups), constrain_until)
    return delta[:, graph.logit_offset + target_logit_index].tolist()


def predicted_steering_effect(
    graph: Graph, node: int, scale: float, target_logit_index: int, *, constrain_until: int | None = None
) -> float:
    """Predicted change of a logit node when feature node `node` is scaled by `scale`
    (``Δa = (scale - 1)·a``; ×0 is the ablation)."""
    r = relative_changes(graph, [[node]], value=scale - 1.0)
    return float(propagate(graph, r, constrain_until)[0, graph.logit_offset + target_logit_index])
