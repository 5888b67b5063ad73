"""Labels and their scores in the feature store: (re)labelling in place, and reading them back.

`relabel(store)` recomputes every automatic label from what the store holds (no rescan):
the text's base rates and each feature's examples (`label_evidence`), the held-out
detection score on the stored pool of recomputed contexts (`label_score`; the pool is made
first when a model and transcoder are given and the store has none), optionally output
scores for a sample of features (model needed), and the shuffled-label baseline. It writes

- `auto_labels (id, label)`: the label text (searchable, as before);
- `label_scores (id, broad, detection, detection_shuffled, output, output_shuffled,
  evidence)`: evidence is JSON (`Label.evidence_dict` plus `density`); the shuffled columns
  hold the score the feature gets with another feature's label;
- meta `labels_version`, `label_config` (LabelConfig JSON) and `label_summary` (the score
  distributions and their baselines: `label_summary()`).

A store written before scored labels has no `labels_version`; reading still works (no
scores), and `labels_table` asks for `cltrace features RUN --relabel`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from cltrace.errors import CltraceError
from cltrace.features.label_evidence import TextStats, read_items, split_examples, write_items
from cltrace.features.label_score import (
    POOL_SCHEMA,
    DetectionScorer,
    OutputJob,
    choose_pool_contexts,
    compute_pool,
    load_pool,
    output_scores,
    shuffled_order,
    summarize,
)
from cltrace.features.labels import (
    DEAD_LABEL,
    DEFAULT_LABELS,
    LABELS_VERSION,
    Label,
    LabelConfig,
    ReadItem,
    WriteItem,
    compose,
)

if TYPE_CHECKING:
    from cltrace.features.store import FeatureStore
    from cltrace.models.loading import LoadedModel
    from cltrace.transcoders.interface import TranscoderLike

LABEL_SCHEMA = (
    POOL_SCHEMA
    + """
CREATE TABLE IF NOT EXISTS label_scores (id INTEGER PRIMARY KEY, broad INTEGER NOT NULL,
    detection REAL, detection_shuffled REAL, output REAL, output_shuffled REAL, evidence TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS label_scores_by_detection ON label_scores (detection);
"""
)
LABEL_TABLES = ("label_scores", "label_pool")
RELABEL_HINT = "relabel it in place (no rescan): cltrace features RUN --relabel"
Order = Literal["score", "output", "density", "id"]


@dataclass(frozen=True)
class RelabelSummary:
    """What one `relabel` call did."""

    n_features: int
    n_broad: int
    n_dead: int
    n_detection: int  # features with a detection score
    n_output: int  # features with an output score
    seconds: float
    summary: dict  # the store's label_summary


@dataclass
class _Feature:
    fid: int
    label: Label
    build: list[int]
    held: list[int]
    max_act: float
    output: float | None = None
    output_shuffled: float | None = None
    detection_shuffled: float | None = None


def ensure_schema(store: "FeatureStore") -> None:
    store.conn.executescript(LABEL_SCHEMA)


def relabel(
    store: "FeatureStore",
    cfg: LabelConfig = DEFAULT_LABELS,
    *,
    model: "LoadedModel | None" = None,
    transcoder: TranscoderLike | None = None,
    score_output: int | None = 0,
    show_progress: bool = False,
) -> RelabelSummary:
    """Recompute labels and scores in place (see the module docstring).

    Args:
        model, transcoder: needed to make the pool (when the store has none; a build clears
            it) and for output scores; without them detection uses the stored pool, if any.
        score_output: output-score this many features (a seeded sample of those whose label
            names written tokens); None: all of them; 0: none (previous output scores whose
            written tokens did not change are kept).
    """
    t0 = time.perf_counter()
    ensure_schema(store)
    stats = TextStats.from_store(store)
    if model is not None and transcoder is not None and needs_model(store):
        compute_pool(store, model, transcoder, cfg, stats)
    feats = _label_all(store, stats, cfg)
    pool = load_pool(store)
    if pool is not None:
        _score_detection(feats, DetectionScorer(stats, pool), cfg)
    _keep_old_outputs(store, feats)
    if score_output != 0 and model is not None and transcoder is not None:
        _score_outputs(store, feats, stats, model, transcoder, cfg, score_output, show_progress)
    summary = _summary(feats, cfg, has_pool=pool is not None)
    _write(store, feats, cfg, summary)
    labels = [f.label for f in feats]
    return RelabelSummary(
        len(feats),
        sum(lab.broad for lab in labels),
        sum(lab.text == DEAD_LABEL for lab in labels),
        sum(lab.detection is not None for lab in labels),
        sum(f.output is not None for f in feats),
        time.perf_counter() - t0,
        summary,
    )


def needs_model(store: "FeatureStore") -> bool:
    """Whether relabelling must make the pool of recomputed contexts (the store has none)."""
    ensure_schema(store)
    return store.conn.execute("SELECT 1 FROM label_pool LIMIT 1").fetchone() is None


def _label_all(store: "FeatureStore", stats: TextStats, cfg: LabelConfig) -> list[_Feature]:
    """Every feature's label from its stored examples and effects."""
    from cltrace.features.store import RecordLayout

    meta = store.meta
    n_bins = int(meta["n_bins"])
    layout = RecordLayout(int(meta["top_k"]), n_bins * int(meta["per_bin"]))
    n_tokens = store.progress()[1]
    n_fires, max_act = _layer_stats(store)
    vocab = dict(store.conn.execute("SELECT id, text FROM vocab"))
    effects = {int(i): b for i, b in store.conn.execute("SELECT id, data FROM effects")}
    out = []
    for fid, blob in store.conn.execute("SELECT id, data FROM features ORDER BY id"):
        top, res = layout.unpack(blob)
        peak = float(max_act.get(fid, 0.0))
        build, held = split_examples(top, res, peak, n_bins)
        density = n_fires.get(fid, 0) / n_tokens if n_tokens else None
        if not top:
            out.append(_Feature(fid, Label(DEAD_LABEL, density=density), build, held, peak))
            continue
        reads = read_items(stats, build, cfg)
        writes = write_items(stats, _promoted(effects.get(fid)), vocab, cfg)
        out.append(_Feature(fid, compose(reads, writes, density=density, cfg=cfg), build, held, peak))
    return out


def _layer_stats(store: "FeatureStore") -> tuple[dict[int, int], dict[int, float]]:
    F = store.n_features
    fires, peaks = {}, {}
    for layer, n_blob, m_blob in store.conn.execute("SELECT layer, n_fires, max_act FROM layer_stats"):
        base = int(layer) * F
        n, m = np.frombuffer(n_blob, "<i8"), np.frombuffer(m_blob, "<f4")
        fires.update({base + i: int(v) for i, v in enumerate(n.tolist())})
        peaks.update({base + i: float(v) for i, v in enumerate(m.tolist())})
    return fires, peaks


def _promoted(blob: bytes | None) -> list[tuple[int, float]]:
    if blob is None:
        return []
    n = len(blob) // 16
    ids, vals = np.frombuffer(blob, "<i4")[:n], np.frombuffer(blob, "<f4")[n : 2 * n]
    return list(zip(ids.tolist(), vals.tolist()))


def _score_detection(feats: list[_Feature], scorer: DetectionScorer, cfg: LabelConfig) -> None:
    scored = []
    for f in feats:
        if f.label.broad or not f.label.reads:
            continue
        held = scorer.held_out(f.fid, f.held, f.build)
        f.label.n_pos, f.label.n_neg = held.n_pos, int(held.neg_mask.sum())
        f.label.detection = scorer.score(f.label.reads, held)
        if f.label.detection is not None:
            scored.append((f, held))
    perm = shuffled_order(len(scored), cfg.seed)
    for i, (f, held) in enumerate(scored):
        f.detection_shuffled = scorer.score(scored[perm[i]][0].label.reads, held)


def _keep_old_outputs(store: "FeatureStore", feats: list[_Feature]) -> None:
    """Output scores of a previous relabel stay while the label's written tokens are the same."""
    old = {
        int(i): (o, s, json.loads(e).get("writes", []))
        for i, o, s, e in store.conn.execute(
            "SELECT id, output, output_shuffled, evidence FROM label_scores WHERE output IS NOT NULL"
        )
    }
    for f in feats:
        if f.fid in old and [w["token_id"] for w in old[f.fid][2]] == [w.token_id for w in f.label.writes]:
            f.output, f.output_shuffled = old[f.fid][0], old[f.fid][1]
            f.label.output = f.output


def _score_outputs(
    store: "FeatureStore",
    feats: list[_Feature],
    stats: TextStats,
    model: "LoadedModel",
    transcoder: TranscoderLike,
    cfg: LabelConfig,
    n: int | None,
    show_progress: bool,
) -> None:
    import torch

    cands = [f for f in feats if f.label.writes and not f.label.broad and f.max_act > 0]
    rng = np.random.default_rng(cfg.seed + 1)
    if n is not None and n < len(cands):
        cands = [cands[i] for i in sorted(rng.choice(len(cands), size=n, replace=False).tolist())]
    perm = shuffled_order(len(cands), cfg.seed + 2)
    F = store.n_features
    jobs = [
        OutputJob(
            f.fid // F,
            f.fid % F,
            cfg.steer_scale * f.max_act,
            tuple(w.token_id for w in f.label.writes),
            tuple(w.token_id for w in cands[perm[i]].label.writes),
        )
        for i, f in enumerate(cands)
    ]
    ctx_ids = choose_pool_contexts(
        list(stats.row_of), LabelConfig(pool_contexts=cfg.output_contexts, seed=cfg.seed + 3)
    )
    contexts = torch.as_tensor(stats.tokens[[stats.row_of[c] for c in ctx_ids], : cfg.output_len])
    vocab = dict(store.conn.execute("SELECT id, text FROM vocab"))
    words = sorted(t for t in stats.token_key if any(ch.isalnum() for ch in vocab.get(t, "")))
    scores = output_scores(model, transcoder, contexts, jobs, words, show_progress=show_progress)
    for f, (own, other) in zip(cands, scores):
        f.output, f.output_shuffled = own, other
        f.label.output = own


def _summary(feats: list[_Feature], cfg: LabelConfig, has_pool: bool) -> dict:
    labels = [f.label for f in feats]
    return {
        "n_features": len(feats),
        "n_broad": sum(lab.broad for lab in labels),
        "n_dead": sum(lab.text == DEAD_LABEL for lab in labels),
        "n_with_reads": sum(bool(lab.reads) and not lab.broad for lab in labels),
        "n_with_writes": sum(bool(lab.writes) and not lab.broad for lab in labels),
        "has_pool": has_pool,
        "broad_density": cfg.broad_density,
        "detection": summarize([lab.detection for lab in labels]),
        "detection_shuffled": summarize([f.detection_shuffled for f in feats]),
        "output": summarize([f.output for f in feats]),
        "output_shuffled": summarize([f.output_shuffled for f in feats]),
    }


def _write(store: "FeatureStore", feats: list[_Feature], cfg: LabelConfig, summary: dict) -> None:
    rows = [
        (
            f.fid,
            int(f.label.broad),
            f.label.detection,
            f.detection_shuffled,
            f.output,
            f.output_shuffled,
            json.dumps({**f.label.evidence_dict(), "density": f.label.density}, ensure_ascii=False),
        )
        for f in feats
    ]
    with store.transaction() as conn:
        conn.execute("DELETE FROM auto_labels")
        conn.executemany(
            "INSERT INTO auto_labels (id, label) VALUES (?, ?)", ((f.fid, f.label.text) for f in feats)
        )
        conn.execute("DELETE FROM label_scores")
        conn.executemany(
            "INSERT INTO label_scores (id, broad, detection, detection_shuffled, output, "
            "output_shuffled, evidence) VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        conn.executemany(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            [
                ("labels_version", str(LABELS_VERSION)),
                ("label_config", json.dumps(cfg.to_dict())),
                ("label_summary", json.dumps(summary)),
            ],
        )
    store._meta = None


# -- reading ---------------------------------------------------------------------------------


def has_scores(store: "FeatureStore") -> bool:
    return store.meta.get("labels_version") == str(LABELS_VERSION)


def label_summary(store: "FeatureStore") -> dict | None:
    """The store-level score distributions and shuffled baselines (None before a relabel)."""
    raw = store.meta.get("label_summary")
    return json.loads(raw) if raw and has_scores(store) else None


def label_info(store: "FeatureStore", fid: int) -> dict | None:
    """One feature's label evidence and scores, as the dashboard shows them (read only: the
    tables exist once `FeatureStore` has opened the file)."""
    row = store.conn.execute(
        "SELECT broad, detection, output, evidence FROM label_scores WHERE id = ?", (fid,)
    ).fetchone()
    if row is None:
        return None
    ev = json.loads(row[3])
    return {
        "reads": [ReadItem.from_dict(r).to_dict() for r in ev.get("reads", [])],
        "writes": [WriteItem.from_dict(w).to_dict() for w in ev.get("writes", [])],
        "broad": bool(row[0]),
        "detection": row[1],
        "output": row[2],
        "n_pos": ev.get("n_pos", 0),
        "n_neg": ev.get("n_neg", 0),
        "density": ev.get("density"),
    }


def label_evidence(
    store: "FeatureStore", keys: list[tuple[int, int]]
) -> dict[tuple[int, int], tuple[list, list]]:
    """{(layer, index): (read texts, written texts)} of each feature's label: the automatic
    label's items (none for a broad or never-active feature), a user label split at its
    arrow and dots. Features without any label are left out."""
    F = store.n_features
    fids = {layer * F + index: (layer, index) for layer, index in dict.fromkeys(keys)}
    out: dict[tuple[int, int], tuple[list, list]] = {}
    ids = sorted(fids)
    for s in range(0, len(ids), 500):
        part = ids[s : s + 500]
        marks = ",".join("?" * len(part))
        for fid, text, broad, ev in store.conn.execute(
            f"SELECT a.id, a.label, s.broad, s.evidence FROM auto_labels a LEFT JOIN label_scores s "
            f"ON s.id = a.id WHERE a.id IN ({marks})",
            part,
        ):
            if ev is None:
                out[fids[fid]] = split_label(text)
            else:
                ev = json.loads(ev)
                items = ([r["text"] for r in ev.get("reads", [])], [w["text"] for w in ev.get("writes", [])])
                out[fids[fid]] = ([], []) if broad else items
    for layer, index, text in store.conn.execute("SELECT layer, feature, label FROM user_labels"):
        if (layer, index) in out or layer * F + index in fids:
            out[(layer, index)] = split_label(text)
    return out


def split_label(text: str) -> tuple[list[str], list[str]]:
    """`"Tokyo · Japan → Japanese"` -> (["Tokyo", "Japan"], ["Japanese"]); "(...)" -> ([], [])."""
    if not text or text.startswith("("):
        return [], []
    reads, _, writes = text.partition("→")
    part = lambda t: [w.strip() for w in t.split("·") if w.strip()]  # noqa: E731
    return part(reads), part(writes)


_ORDER_SQL = {
    "score": "s.detection IS NULL, s.detection DESC, json_extract(s.evidence, '$.n_pos') DESC, a.id",
    "output": "s.output IS NULL, s.output DESC, a.id",
    "density": "json_extract(s.evidence, '$.density') DESC, a.id",
    "id": "a.id",
}


def labels_table(
    store: "FeatureStore",
    *,
    min_score: float | None = None,
    min_output: float | None = None,
    order: Order = "score",
    limit: int | None = None,
    include_broad: bool = False,
) -> list[dict]:
    """Labelled features as rows {layer, index, label, source, auto_label, reads, writes, broad,
    detection, output, density, n_pos}, sorted by `order` (scores best first; equal detection
    scores: more held-out activating positions first), filtered by score.

    User labels replace the text; the scores are those of the automatic label.
    """
    if not has_scores(store):
        raise CltraceError(f"{store.path} has labels without scores (made by an older cltrace)", RELABEL_HINT)
    if order not in _ORDER_SQL:
        raise CltraceError(f"unknown order {order!r}", f"use one of {', '.join(_ORDER_SQL)}")
    where, args = ["1"], []
    if min_score is not None:
        where.append("s.detection >= ?")
        args.append(min_score)
    if min_output is not None:
        where.append("s.output >= ?")
        args.append(min_output)
    if not include_broad:
        where.append("s.broad = 0")
    sql = (
        f"SELECT a.id, a.label, s.broad, s.detection, s.output, s.evidence FROM auto_labels a "
        f"JOIN label_scores s ON s.id = a.id WHERE {' AND '.join(where)} AND a.label != ? "
        f"ORDER BY {_ORDER_SQL[order]}" + (" LIMIT ?" if limit is not None else "")
    )
    args.append(DEAD_LABEL)
    if limit is not None:
        args.append(limit)
    F = store.n_features
    user = {
        (int(l), int(i)): lab
        for l, i, lab in store.conn.execute("SELECT layer, feature, label FROM user_labels")
    }
    out = []
    for fid, text, broad, det, outp, ev in store.conn.execute(sql, args):
        ev = json.loads(ev)
        key = (int(fid) // F, int(fid) % F)
        out.append(
            {
                "layer": key[0],
                "index": key[1],
                "label": user.get(key, text),
                "source": "user" if key in user else "auto",
                "auto_label": text,
                "reads": [r["text"] for r in ev.get("reads", [])],
                "writes": [w["text"] for w in ev.get("writes", [])],
                "broad": bool(broad),
                "detection": det,
                "output": outp,
                "density": ev.get("density"),
                "n_pos": ev.get("n_pos", 0),
            }
        )
    return out
