"""The traversal: backward passes target by target, logits first, then the feature targets in
order of their current estimated influence on the logits (as circuit-tracer does).

All the state the passes share lives in one `Traversal`: the prefix forwards they run through,
the edge reader, the sources and targets, the batch size, and the edge rows computed so far
(`EdgeRows`, with each row's target layer, feature column and weight for the ranking).

Each batch holds targets of similar layer and position (sorted within each ranking queue), so
its backward stops at its deepest target and reads few source layers and positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from cltrace.attribution.active import ActiveFeatures
from cltrace.attribution.backward import PrefixForwards, backward_batch
from cltrace.attribution.edges import EdgeReader
from cltrace.attribution.influence import partial_influence
from cltrace.attribution.targets import LogitTargets


class EdgeRows:
    """Edge rows computed so far, with each row's target layer, feature column and weight."""

    def __init__(self, n_sources: int, n_rows: int, device: torch.device):
        self.rows = torch.zeros(n_rows, n_sources, device=device)
        self.layer = torch.zeros(n_rows, dtype=torch.long, device=device)
        self.feature = torch.full((n_rows,), -1, dtype=torch.long, device=device)
        self.weight = torch.zeros(n_rows, device=device)
        self.count = 0

    def add(self, layers: list[int], features: list[int], weights: Tensor) -> Tensor:
        """Register the next rows' targets; returns the (zero) rows to fill, [k, n_sources]."""
        s, e = self.count, self.count + len(layers)
        self.layer[s:e] = torch.tensor(layers, device=self.rows.device)
        self.feature[s:e] = torch.tensor(features, device=self.rows.device)
        self.weight[s:e] = weights
        self.count = e
        return self.rows[s:e]

    def influence(self, n_layers: int) -> Float[Tensor, "source"]:
        """Influence on the logits of every source column, from the rows filled so far."""
        c = self.count
        return partial_influence(self.rows[:c], self.layer[:c], self.feature[:c], self.weight[:c], n_layers)


@dataclass
class Traversal:
    """The state of one graph's backward passes."""

    forwards: PrefixForwards
    reader: EdgeReader
    feats: ActiveFeatures
    logits: LogitTargets
    encoders: Float[Tensor, "active d_model"]  # what each feature target injects
    batch_size: int
    rows: EdgeRows
    visited: Bool[Tensor, "active"]  # feature targets whose rows are computed
    bar: Any  # progress bar (update(k))

    @classmethod
    def start(
        cls,
        forwards: PrefixForwards,
        reader: EdgeReader,
        feats: ActiveFeatures,
        logits: LogitTargets,
        encoders: Tensor,
        batch_size: int,
        n_rows: int,
        bar: Any,
    ) -> "Traversal":
        """A traversal with room for `n_rows` rows and nothing visited yet."""
        rows = EdgeRows(reader.n_sources, n_rows, forwards.lm.device)
        visited = torch.zeros(feats.n, dtype=torch.bool, device=encoders.device)
        return cls(forwards, reader, feats, logits, encoders, batch_size, rows, visited, bar)

    def visit_logits(self) -> None:
        """Rows of the logit targets (their directions injected at the last position)."""
        n, L, B = self.forwards.full.n_pos, self.reader.n_layers, self.batch_size
        logits = self.logits
        for i in range(0, len(logits.tokens), B):
            vec = logits.directions[i : i + B]
            k = vec.shape[0]
            gin, gtaps = backward_batch(self.forwards.covering(n - 1), [L] * k, [n - 1] * k, vec, L)
            out = self.rows.add([L] * k, [-1] * k, logits.probabilities[i : i + B].float())
            self.reader.read(gin, gtaps, n - 1, out)
            self.bar.update(k)

    def visit_features(self, budget: int, update_interval: int) -> None:
        """Rows of up to `budget` feature targets, most influential first (marked `visited`)."""
        L, enc, feats = self.reader.n_layers, self.encoders, self.feats
        while int(self.visited.sum()) < budget:
            queue = self.next_queue(budget, self.batch_size * update_interval)
            for batch in queue.split(self.batch_size):
                lay, pos = feats.layer[batch].tolist(), feats.pos[batch].tolist()
                gin, gtaps = backward_batch(self.forwards.covering(max(pos)), lay, pos, enc[batch], L)
                out = self.rows.add(lay, batch.tolist(), torch.zeros(len(lay), device=enc.device))
                self.reader.read(gin, gtaps, max(pos), out)
                self.bar.update(len(lay))
            self.visited[queue] = True

    def next_queue(self, budget: int, size: int) -> Tensor:
        """The next unvisited features to process, most influential first, sorted by (layer, pos)
        so that each batch's backward pass stops early and reads few source layers."""
        feats, visited = self.feats, self.visited
        left = budget - int(visited.sum())
        if budget >= feats.n:
            pending = (~visited).nonzero().squeeze(1)  # everything, no ranking needed
        else:
            infl = self.rows.influence(self.reader.n_layers)[: feats.n]
            infl[visited] = -1.0
            pending = torch.argsort(infl, descending=True, stable=True)[: min(size, left)]
        key = feats.layer[pending] * (feats.pos.max() + 1) + feats.pos[pending]
        return pending[torch.argsort(key, stable=True)]
