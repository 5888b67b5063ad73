"""Building a feature store: `build_feature_store` scans text and streams statistics to SQLite.

Held-out corpus text is packed into contexts of `context_len` tokens by the harvest's packer
(`iter_contexts`, `activations.contexts`); the model's MLP inputs go through the transcoder and
every batch's activations are merged into `StreamingStats`. Every `flush_tokens` tokens, in one
transaction, the contexts read, the buffers of features that changed, the per-layer counters
and the progress row are written; a build that stops (or is killed) restarts from the last
flush and produces the same store as an uninterrupted one. Token effects (`features.effects`)
are computed first, automatic labels last. `user_labels` is never written by a build, even
with `fresh=True`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cltrace.activations import contexts as packer
from cltrace.errors import CltraceError
from cltrace.features.config import FeatureStoreConfig
from cltrace.features.effects import EFFECTS_METHOD, write_effects
from cltrace.features.labels import DEFAULT_LABELS, LabelConfig
from cltrace.features.store import BUILD_TABLES, SCHEMA_VERSION, FeatureStore, add_vocab, write_auto_labels
from cltrace.features.streaming import StreamingStats

if TYPE_CHECKING:
    from cltrace.models.loading import LoadedModel
    from cltrace.transcoders.interface import TranscoderLike


@dataclass(frozen=True)
class BuildSummary:
    """What one `build_feature_store` call did."""

    path: Path
    tokens: int  # tokens scanned in total (all calls)
    tokens_this_run: int
    seconds: float  # wall time of this call (effects included)
    scan_seconds: float  # time spent scanning tokens in this call
    db_bytes: int

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_this_run / self.scan_seconds if self.scan_seconds > 0 else float("nan")


def iter_contexts(model: "LoadedModel", documents: Iterable[str], context_len: int) -> Iterator[list[int]]:
    """The harvest's contexts of `context_len` tokens (`activations.contexts`), all full length:
    a final shorter context is left out."""
    return packer.iter_contexts(model, documents, context_len, partial=False)


def _check_or_write_meta(store: FeatureStore, wanted: dict[str, str]) -> None:
    """Write the build's identity on first use; refuse to resume a different one."""
    have = store.meta
    if not have:
        with store.transaction() as conn:
            conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", wanted.items())
        store._meta = None
        return
    clash = {k: (have.get(k), v) for k, v in wanted.items() if have.get(k) != v}
    if clash:
        what = "; ".join(f"{k}: stored {a!r}, now {b!r}" for k, (a, b) in sorted(clash.items()))
        raise CltraceError(
            f"{store.path} was built with different settings ({what})",
            "pass --fresh to rebuild it (your labels are kept), or --db for another file",
        )


def _clear_build(store: FeatureStore) -> None:
    """Delete everything a build wrote; user labels stay."""
    with store.transaction() as conn:
        for table in BUILD_TABLES:
            conn.execute(f"DELETE FROM {table}")
    store._meta = None
    store.conn.execute("VACUUM")


class _Builder:
    """One build call: scan contexts, merge, flush. Holds what is pending between flushes."""

    def __init__(
        self, store: FeatureStore, model: "LoadedModel", transcoder: TranscoderLike, cfg: FeatureStoreConfig
    ):
        from cltrace.transcoders.interface import device_dtype

        self.store, self.model, self.tc, self.cfg = store, model, transcoder, cfg
        self.device, self.dtype = device_dtype(transcoder)
        self.state = StreamingStats.from_store(store, cfg, self.device)
        self.contexts_done, self.tokens_done = store.progress()
        self.pending: list[tuple[int, list[int]]] = []
        self.pending_tokens = 0
        self.consistent = True  # False while a batch is half merged: never flush then

    def scan(self, contexts: list[list[int]]) -> None:
        """Run the model and the transcoder on a batch of contexts and merge the activations."""
        import torch

        first = self.contexts_done
        n = self.cfg.context_len
        self.consistent = False
        tokens = torch.tensor(contexts, dtype=torch.long, device=self.model.device)  # [B, n]
        x = self.model.capture(tokens).mlp_in[:, 1:]  # [B, n-1, L, d]
        x = x.reshape(-1, *x.shape[2:]).to(self.device, self.dtype)  # [N, L, d]
        ctx = torch.arange(first, first + len(contexts), device=self.device)
        pos = torch.arange(1, n, device=self.device)
        loc = (ctx[:, None] * n + pos[None, :]).reshape(-1).to(torch.int32)  # [N]
        per = max(1, self.cfg.encode_elems // (self.store.n_layers * self.store.n_features))
        with torch.no_grad():
            for s in range(0, x.shape[0], per):
                acts = self.tc.activate(self.tc.encode(x[s : s + per]))  # [n_s, L, F]
                self.state.update(acts, loc[s : s + per], seed=self.cfg.seed * 1_000_003 + first * 997 + s)
        self.pending += list(zip(range(first, first + len(contexts)), contexts))
        self.contexts_done += len(contexts)
        self.tokens_done += x.shape[0]
        self.pending_tokens += x.shape[0]
        self.consistent = True

    def flush(self) -> None:
        """Write everything since the last flush in one transaction."""
        import numpy as np

        changed = self.state.changed()
        F = self.store.n_features
        with self.store.transaction() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO contexts (id, tokens) VALUES (?, ?)",
                ((cid, np.asarray(t, "<i4").tobytes()) for cid, t in self.pending),
            )
            add_vocab(conn, self.model, {t for _, toks in self.pending for t in toks})
            for layer in range(self.store.n_layers):
                feats = changed[layer].nonzero().squeeze(1).cpu()
                if feats.numel():
                    recs = self.state.records(layer, feats)
                    conn.executemany(
                        "INSERT OR REPLACE INTO features (id, data) VALUES (?, ?)",
                        ((layer * F + int(f), recs[j].tobytes()) for j, f in enumerate(feats)),
                    )
                conn.execute(
                    "INSERT OR REPLACE INTO layer_stats (layer, n_fires, sum_act, max_act) "
                    "VALUES (?, ?, ?, ?)",
                    (layer, *self.state.stats_blobs(layer)),
                )
            conn.execute(
                "INSERT OR REPLACE INTO progress (id, contexts, tokens, updated) VALUES (0, ?, ?, ?)",
                (self.contexts_done, self.tokens_done, time.time()),
            )
        self.state.mark_clean()
        self.pending, self.pending_tokens = [], 0


DEFAULT_STORE_CONFIG = FeatureStoreConfig()  # frozen, so one shared default is safe


def build_feature_store(
    path: str | Path,
    model: "LoadedModel",
    transcoder: TranscoderLike,
    *,
    documents: Iterable[str] | None = None,
    config: FeatureStoreConfig = DEFAULT_STORE_CONFIG,
    max_tokens: int | None = None,
    fresh: bool = False,
    model_id: str | None = None,
    transcoder_id: str | None = None,
    effects: bool = True,
    show_progress: bool = True,
    labels: LabelConfig = DEFAULT_LABELS,
    score_output: int | None = 0,
) -> BuildSummary:
    """Build or continue a feature store.

    Args:
        path: SQLite file to create or continue.
        model: the language model the transcoder was trained on.
        transcoder: a `Transcoder` (encode/activate/decoder_weight, raw scale).
        documents: texts to scan; default: the held-out split of the corpus.
        config: what to record; must match the stored one when continuing.
        max_tokens: stop once this many tokens (in total, over all calls) are scanned;
            None: the whole corpus.
        fresh: delete a previous build first (user labels are kept).
        model_id, transcoder_id: recorded in meta; a continued build must name the same.
        effects: compute promoted/suppressed tokens (one matmul with the unembedding per layer).
        labels: how labels are made and scored; score_output: features to output-score
            (0: none, None: all; see `features.label_store.relabel`).
    """
    from cltrace.progress import progress

    t0 = time.perf_counter()
    store = FeatureStore(path, create=True)
    try:
        if fresh:
            _clear_build(store)
        wanted = {
            "schema_version": SCHEMA_VERSION,
            "model": model_id or model.name,
            "transcoder": transcoder_id or "in-memory",
            "n_layers": model.n_layers,
            "n_features": transcoder.cfg.n_features,
            "effects_method": EFFECTS_METHOD,
            **config.identity(),
        }
        _check_or_write_meta(store, {k: str(v) for k, v in wanted.items()})
        if effects:
            write_effects(store, model, transcoder, config, show_progress)
        builder = _Builder(store, model, transcoder, config)
        start_tokens = builder.tokens_done
        t_scan = time.perf_counter()
        _scan_all(builder, documents, max_tokens, show_progress, progress)
        scan_seconds = time.perf_counter() - t_scan
        write_auto_labels(
            store,
            labels,
            model=model,
            transcoder=transcoder,
            score_output=score_output,
            show_progress=show_progress,
        )
        store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return BuildSummary(
            path=Path(path),
            tokens=builder.tokens_done,
            tokens_this_run=builder.tokens_done - start_tokens,
            seconds=time.perf_counter() - t0,
            scan_seconds=scan_seconds,
            db_bytes=Path(path).stat().st_size,
        )
    finally:
        store.close()


def _scan_all(
    builder: _Builder, documents: Iterable[str] | None, max_tokens: int | None, show_progress: bool, progress
) -> None:
    """The scan loop: batches of contexts until the documents or the token budget run out."""
    cfg = builder.cfg
    if documents is None:
        from cltrace.data.corpus import iter_documents

        documents = iter_documents(split="heldout")
    per_ctx = cfg.context_len - 1
    contexts = itertools.islice(
        iter_contexts(builder.model, documents, cfg.context_len), builder.contexts_done, None
    )
    remaining = None if max_tokens is None else max(0, max_tokens - builder.tokens_done)
    bar = progress(
        total=remaining, desc="features", unit="tok", unit_scale=True, disable=None if show_progress else True
    )
    try:
        while remaining is None or remaining > 0:
            want = (
                cfg.batch_contexts if remaining is None else min(cfg.batch_contexts, -(-remaining // per_ctx))
            )
            batch = list(itertools.islice(contexts, want))
            if not batch:
                break
            builder.scan(batch)
            bar.update(len(batch) * per_ctx)
            if remaining is not None:
                remaining -= len(batch) * per_ctx
            if builder.pending_tokens >= cfg.flush_tokens:
                builder.flush()
    finally:
        bar.close()
        if builder.pending and builder.consistent:
            builder.flush()  # e.g. after Ctrl-C between batches: keep what was scanned
