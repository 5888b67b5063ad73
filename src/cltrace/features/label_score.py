"""Scores that say how far a feature's label can be trusted, and a baseline that must fail.

*Detection* (delphi's detection/fuzzing with the label's own evidence as the judge): on
positions the label was not built from, does the read-side evidence predict where the
feature fires? Each position gets the predictor score max over the label's read items that
match it (`ReadItem.weight`, log lift; 0 when none matches). Positives: the held-out half of
the feature's quantile examples (`label_evidence.split_examples`) and the positions of a
pool of contexts where it fires; negatives: the pool positions where it does not fire. The
pool's activations of *every* feature are recomputed once (`compute_pool`) and stored, so
relabelling needs no model. Score = ROC AUC (ties count half): 1 = the evidence separates
firing from silent positions, 0.5 = chance.

*Output*: steer the feature up (add `steer_scale` x its max activation times its decoder to
every target layer's MLP output, at every position but BOS) on neutral held-out text, in one
batched forward for many features; score = the mean percentile of the logit rise of the
tokens the label says it writes, among the words of the scanned text (the population those
tokens are drawn from; 1 = raised most, 0.5 = chance). Ranks at a position equal ranks of
the log-probability change.

*Baseline*: the same scores with labels shuffled between features (a cyclic shift of a
random order, so no feature keeps its own): a scorer that cannot fail would score it high.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cltrace.features.label_evidence import NO_KEY, TextStats
from cltrace.features.labels import LabelConfig, ReadItem

if TYPE_CHECKING:
    from jaxtyping import Float, Int
    from torch import Tensor

    from cltrace.features.store import FeatureStore
    from cltrace.models.loading import LoadedModel
    from cltrace.transcoders.interface import TranscoderLike

# label_pool: per pool context, `positions` = int32 count of firing features at each scored
# position (1..n-1) and `features` = their global ids (layer * F + index), position by position
POOL_SCHEMA = """
CREATE TABLE IF NOT EXISTS label_pool (id INTEGER PRIMARY KEY, positions BLOB NOT NULL,
    features BLOB NOT NULL);
"""
MIN_POSITIVES = 2


# -- the pool of recomputed contexts ---------------------------------------------------------


@dataclass
class Pool:
    """Every feature's firing positions on a few stored contexts.

    q indexes the pool's scored positions: q = row * (n - 1) + position - 1.
    fire_ptr [L*F + 1] / fire_q [nnz]: the q where global feature id fid fires are
    fire_q[fire_ptr[fid]:fire_ptr[fid + 1]] (CSR, sorted).
    """

    context_ids: list[int]
    context_len: int
    fire_ptr: np.ndarray
    fire_q: np.ndarray

    @property
    def n_positions(self) -> int:
        return len(self.context_ids) * (self.context_len - 1)

    def locations(self) -> np.ndarray:
        """[Q] global location of each pool position."""
        n = self.context_len
        ctx = np.asarray(self.context_ids, np.int64)
        return (ctx[:, None] * n + np.arange(1, n)[None, :]).ravel()

    def fires(self, fid: int) -> np.ndarray:
        return self.fire_q[self.fire_ptr[fid] : self.fire_ptr[fid + 1]]


def choose_pool_contexts(context_ids: Sequence[int], cfg: LabelConfig) -> list[int]:
    """A seeded sample of `cfg.pool_contexts` stored contexts (sorted)."""
    ids = sorted(context_ids)
    rng = np.random.default_rng(cfg.seed)
    pick = rng.choice(len(ids), size=min(cfg.pool_contexts, len(ids)), replace=False) if ids else []
    return sorted(ids[int(i)] for i in pick)


def compute_pool(
    store: "FeatureStore",
    model: "LoadedModel",
    transcoder: TranscoderLike,
    cfg: LabelConfig,
    stats: TextStats,
    batch: int = 4,
) -> None:
    """Recompute every feature's activations on the pool contexts and store where they fire."""
    import torch

    from cltrace.transcoders.interface import device_dtype

    ctx_ids = choose_pool_contexts(list(stats.row_of), cfg)
    device, dtype = device_dtype(transcoder)
    rows = []
    for s in range(0, len(ctx_ids), batch):
        part = ctx_ids[s : s + batch]
        tokens = torch.as_tensor(stats.tokens[[stats.row_of[c] for c in part]], device=model.device)
        with torch.no_grad():
            x = model.capture(tokens).mlp_in[:, 1:].to(device, dtype)  # [B, n-1, L, d]
            for j, cid in enumerate(part):
                acts = transcoder.activate(transcoder.encode(x[j]))  # [n-1, L, F]
                pos, layer, feat = (acts > 0).nonzero(as_tuple=True)  # sorted by pos
                fid = (layer * acts.shape[-1] + feat).cpu().numpy().astype("<i4")
                counts = np.bincount(pos.cpu().numpy(), minlength=acts.shape[0]).astype("<i4")
                rows.append((cid, counts.tobytes(), fid.tobytes()))
    with store.transaction() as conn:
        conn.execute("DELETE FROM label_pool")
        conn.executemany("INSERT INTO label_pool (id, positions, features) VALUES (?, ?, ?)", rows)


def load_pool(store: "FeatureStore") -> Pool | None:
    """The stored pool, or None when the store has none."""
    n = store.context_len
    rows = store.conn.execute("SELECT id, positions, features FROM label_pool ORDER BY id").fetchall()
    if not rows:
        return None
    qs, fids = [], []
    for r, (_, counts_blob, fid_blob) in enumerate(rows):
        pos0 = np.repeat(np.arange(n - 1), np.frombuffer(counts_blob, "<i4"))  # position - 1
        qs.append(r * (n - 1) + pos0)
        fids.append(np.frombuffer(fid_blob, "<i4").astype(np.int64))
    q, fid = np.concatenate(qs), np.concatenate(fids)
    order = np.lexsort((q, fid))
    n_total = store.n_layers * store.n_features
    ptr = np.zeros(n_total + 1, np.int64)
    np.cumsum(np.bincount(fid, minlength=n_total), out=ptr[1:])
    return Pool([int(r[0]) for r in rows], n, ptr, q[order])


# -- detection -------------------------------------------------------------------------------


def item_scores(items: Sequence[ReadItem], tok: np.ndarray, prev: np.ndarray, stats: TextStats) -> np.ndarray:
    """Predictor score at each position (firing-token keys `tok`, preceding keys `prev`)."""
    s = np.zeros(tok.shape, np.float64)
    for it in items:
        keys = [stats.key_of_norm.get(m, NO_KEY - 1) for m in it.match]
        if it.kind == "token":
            hit = tok == keys[0]
        elif it.kind == "prev":
            hit = prev == keys[0]
        else:
            hit = (prev == keys[0]) & (tok == keys[1])
        s = np.where(hit, np.maximum(s, it.weight), s)
    return s


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting half."""
    neg = np.sort(neg)
    lo, hi = np.searchsorted(neg, pos, "left"), np.searchsorted(neg, pos, "right")
    return float(((lo + hi) / 2.0).mean() / len(neg))


@dataclass
class HeldOut:
    """One feature's held-out positions as (firing-token key, preceding key) arrays."""

    pos_tok: np.ndarray
    pos_prev: np.ndarray
    neg_mask: np.ndarray  # [Q] bool: pool positions where it does not fire

    @property
    def n_pos(self) -> int:
        return int(self.pos_tok.size)


class DetectionScorer:
    """Held-out positions of every feature, and the AUC of any label's items on them."""

    def __init__(self, stats: TextStats, pool: Pool):
        self.stats, self.pool = stats, pool
        rows = np.asarray([stats.row_of[c] for c in pool.context_ids], np.int64)
        n = pool.context_len
        keys = stats.keys[rows][:, 1:]  # [P, n-1]
        prev = np.concatenate([np.full((len(rows), 1), NO_KEY), stats.keys[rows][:, 1:-1]], axis=1)
        self.q_tok, self.q_prev = keys.ravel(), prev.ravel()
        self.q_loc = pool.locations()
        assert self.q_tok.size == pool.n_positions and n == stats.context_len

    def held_out(self, fid: int, held_locations: Sequence[int], build_locations: Sequence[int]) -> HeldOut:
        fired = self.pool.fires(fid)
        build = np.asarray(list(build_locations), np.int64)
        pool_pos = self.q_loc[fired]
        pool_pos = pool_pos[~np.isin(pool_pos, build)]
        locs = np.unique(np.concatenate([np.asarray(list(held_locations), np.int64), pool_pos]))
        rows, pos = self.stats.rows_positions(locs.tolist())
        tok = self.stats.keys[rows, pos]
        prev = np.where(pos >= 2, self.stats.keys[rows, np.maximum(pos - 1, 0)], NO_KEY)
        neg = np.ones(self.pool.n_positions, bool)
        neg[fired] = False
        return HeldOut(tok, prev, neg)

    def score(self, items: Sequence[ReadItem], held: HeldOut) -> float | None:
        """AUC of `items` on `held` (None: no items, or too few positives or negatives)."""
        if not items or held.n_pos < MIN_POSITIVES or held.neg_mask.sum() < 10:
            return None
        s_pos = item_scores(items, held.pos_tok, held.pos_prev, self.stats)
        s_neg = item_scores(items, self.q_tok[held.neg_mask], self.q_prev[held.neg_mask], self.stats)
        return auc(s_pos, s_neg)


def shuffled_order(n: int, seed: int) -> np.ndarray:
    """perm[i] = whose label feature i gets: a cyclic shift of a random order (no fixed point)."""
    if n < 2:
        return np.arange(n)
    order = np.random.default_rng(seed).permutation(n)
    perm = np.empty(n, np.int64)
    perm[order] = np.roll(order, -1)
    return perm


# -- output ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputJob:
    """One feature to steer: where it is, how hard, and the token sets to rank."""

    layer: int
    index: int
    activation: float  # steering activation (scale x max activation)
    own: tuple[int, ...]  # token ids its label says it writes
    other: tuple[int, ...]  # another feature's (the shuffled baseline)


def output_scores(
    model: "LoadedModel",
    transcoder: TranscoderLike,
    contexts: "Int[Tensor, 'c n']",
    jobs: Sequence[OutputJob],
    reference: Sequence[int],
    *,
    batch: int = 16,
    show_progress: bool = False,
) -> list[tuple[float, float]]:
    """(own, shuffled) output score of each job, from one steered forward per (job, context).

    Percentiles are taken among the `reference` token ids, which must hold every job's ids;
    only their logits are computed (final-norm output times their unembedding rows: the
    logits before any soft-capping).
    """
    import torch

    from cltrace.progress import progress

    contexts = contexts.to(model.device)
    ref = list(reference)
    col = {t: j for j, t in enumerate(ref)}
    w_ref = model.adapter.unembed(model.model).weight[torch.as_tensor(ref, device=model.device)]  # [r, d]
    C = contexts.shape[0]
    clean = _word_logits(model, contexts, None, w_ref)  # [C, n-1, r]
    out: list[tuple[float, float]] = []
    per = max(1, batch // C)
    for s in progress(
        range(0, len(jobs), per), desc="output scores", unit="batch", disable=None if show_progress else True
    ):
        part = jobs[s : s + per]
        delta = _steering_deltas(model, transcoder, part).repeat_interleave(C, 0)  # [J*C, L, d]
        rise = _word_logits(model, contexts.repeat(len(part), 1), delta, w_ref) - clean.repeat(
            len(part), 1, 1
        )
        for j, job in enumerate(part):
            r = rise[j * C : (j + 1) * C].flatten(0, 1)  # [C*(n-1), r]
            out.append(
                (_percentile(r, [col[t] for t in job.own]), _percentile(r, [col[t] for t in job.other]))
            )
    return out


def _steering_deltas(
    model: "LoadedModel", transcoder: TranscoderLike, jobs: Sequence[OutputJob]
) -> "Float[Tensor, 'j l d']":
    import torch

    delta = torch.zeros(len(jobs), model.n_layers, model.d_model)
    for j, job in enumerate(jobs):
        w = transcoder.decoder_weight(job.layer)[job.index].detach().float().cpu()  # [T, d]
        delta[j, job.layer : job.layer + w.shape[0]] += job.activation * w
    return delta


def _shift_mlp_outputs(delta: "Float[Tensor, 'b l d']") -> "Callable[[int, Tensor, Tensor], Tensor]":
    """An MLP-output patch adding `delta[b, l]` to layer l's output at positions 1.."""

    def patch(layer: int, _mlp_in: "Tensor", mlp_out: "Tensor") -> "Tensor":
        out = mlp_out.clone()
        out[:, 1:] += delta[:, layer, None, :].to(out.device, out.dtype)
        return out

    return patch


def _word_logits(
    model: "LoadedModel",
    tokens: "Int[Tensor, 'b n']",
    delta: "Float[Tensor, 'b l d'] | None",
    w_ref: "Float[Tensor, 'r d']",
) -> "Float[Tensor, 'b n-1 r']":
    """Logits of the reference tokens at positions 1.., with `delta[b, l]` added to every
    layer's MLP output at those positions (None: a clean run)."""
    import contextlib

    import torch

    hooks = (
        model.patch_mlp_outputs(_shift_mlp_outputs(delta)) if delta is not None else contextlib.nullcontext()
    )
    with torch.no_grad(), hooks:
        hidden = model.run(tokens, with_logits=False).last_hidden_state[
            :, 1:
        ]  # [b, n-1, d] after the final norm
        return (hidden.to(w_ref.dtype) @ w_ref.T).float()


def _percentile(rise: "Float[Tensor, 'p r']", cols: Sequence[int]) -> float:
    """Mean over positions and `cols` of the share of the reference tokens that rose less."""
    import torch

    mine = rise[:, torch.as_tensor(cols, device=rise.device)]  # [p, k]
    below = (rise[:, :, None] < mine[:, None, :]).float().mean(1)  # [p, k]
    return float(below.mean())


def summarize(values: Sequence[float | None]) -> dict:
    """Median, mean, quartiles and count of the scores that exist."""
    v = np.asarray([x for x in values if x is not None], np.float64)
    if v.size == 0:
        return {"n": 0}
    q = np.quantile(v, [0.1, 0.25, 0.5, 0.75, 0.9])
    return {
        "n": int(v.size),
        "mean": round(float(v.mean()), 4),
        "p10": round(float(q[0]), 4),
        "p25": round(float(q[1]), 4),
        "median": round(float(q[2]), 4),
        "p75": round(float(q[3]), 4),
        "p90": round(float(q[4]), 4),
        "share_above_0.7": round(float((v > 0.7).mean()), 4),
    }
