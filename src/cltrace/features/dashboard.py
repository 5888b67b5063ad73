"""Feature dashboards: the JSON-able card the viewer serves, and its plain-text rendering.

`FeatureStore.dashboard(layer, index)` reads one `FeatureRecord` from SQLite and passes it to
`assemble`; nothing here touches the database, torch or numpy, so `cltrace feature` starts
and prints fast.

The card (keys beyond the viewer's contract in `viewer/backend.py` are extra detail):

    {"layer", "index", "label", "label_source": "user"|"auto",
     "density", "n_fires", "n_tokens", "mean_activation", "max_activation",
     "contexts": [{"tokens": [str], "active_index": int, "value": float,
                   "context_id": int, "position": int}],          # top activations, best first
     "quantiles": [{"low", "high", "examples": [context...]}],    # bins of the activation range
     "promoted": [{"token", "token_id", "value"}], "suppressed": [...],
     "auto_label": str, "label_reads": [str], "label_writes": [str],   # the automatic label's parts
     "label_broad": bool, "label_detection": float|None, "label_output": float|None,
     "label_evidence": {"reads": [{"kind", "text", "match", "share", "lift"}], "writes": [...],
                        "n_pos", "n_neg"} | None,                 # None before scored labels
     "message": str}                                              # only when data is missing
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cltrace.features.labels import DEAD_LABEL, auto_label


@dataclass
class FeatureRecord:
    """Everything stored about one feature, as plain Python values.

    Example locations are global token indices: `context_id * context_len + position`.
    """

    layer: int
    index: int
    context_len: int
    n_tokens: int  # tokens scanned by the build so far
    n_fires: int = 0
    sum_activation: float = 0.0
    max_activation: float = 0.0
    top: list[tuple[float, int]] = field(default_factory=list)  # (value, location), best first
    reservoir: list[tuple[float, int]] = field(default_factory=list)  # (value, location)
    promoted: list[tuple[int, float]] = field(default_factory=list)  # (token id, logit effect)
    suppressed: list[tuple[int, float]] = field(default_factory=list)
    auto_label: str | None = None
    user_label: str | None = None
    label_info: dict | None = None  # `label_store.label_info`
    contexts: dict[int, list[int]] = field(default_factory=dict)  # context id -> token ids
    vocab: dict[int, str] = field(default_factory=dict)  # token id -> string

    def locations(self) -> list[int]:
        return [loc for _, loc in self.top] + [loc for _, loc in self.reservoir]


def example(rec: FeatureRecord, value: float, location: int, before: int, after: int) -> dict:
    """One context window around an activating token."""
    ctx_id, pos = divmod(location, rec.context_len)
    ids = rec.contexts.get(ctx_id, [])
    lo, hi = max(0, pos - before), min(len(ids), pos + after + 1)
    return {
        "tokens": [rec.vocab.get(t, f"<{t}>") for t in ids[lo:hi]],
        "active_index": pos - lo,
        "value": value,
        "context_id": ctx_id,
        "position": pos,
    }


def active_tokens(rec: FeatureRecord) -> list[str]:
    """The token at each top example's location, best first."""
    out = []
    for _, loc in rec.top:
        ctx_id, pos = divmod(loc, rec.context_len)
        ids = rec.contexts.get(ctx_id)
        if ids is not None and pos < len(ids):
            out.append(rec.vocab.get(ids[pos], ""))
    return out


def quantile_bins(rec: FeatureRecord, n_bins: int, per_bin: int, before: int, after: int) -> list[dict]:
    """Reservoir examples grouped into equal slices of (0, max activation], highest first."""
    top = rec.max_activation
    if top <= 0 or not rec.reservoir:
        return []
    bins: list[list[tuple[float, int]]] = [[] for _ in range(n_bins)]
    for value, loc in rec.reservoir:
        bins[min(n_bins - 1, int(value / top * n_bins))].append((value, loc))
    out = []
    for b in reversed(range(n_bins)):
        chosen = sorted(bins[b], reverse=True)[:per_bin]
        if chosen:
            out.append(
                {
                    "low": top * b / n_bins,
                    "high": top * (b + 1) / n_bins,
                    "examples": [example(rec, v, loc, before, after) for v, loc in chosen],
                }
            )
    return out


def token_list(rec: FeatureRecord, pairs: list[tuple[int, float]]) -> list[dict]:
    return [{"token": rec.vocab.get(t, f"<{t}>"), "token_id": t, "value": v} for t, v in pairs]


def assemble(
    rec: FeatureRecord,
    *,
    n_bins: int = 5,
    per_bin: int = 4,
    before: int = 12,
    after: int = 4,
    n_top: int | None = None,
) -> dict:
    """The dashboard card for one feature (see the module docstring for its keys)."""
    label, source = (rec.user_label, "user") if rec.user_label else (rec.auto_label, "auto")
    if not label:
        label = auto_label(active_tokens(rec), [rec.vocab.get(t, "") for t, _ in rec.promoted])
    if rec.n_fires == 0 and not rec.user_label:
        label = DEAD_LABEL
    top = rec.top if n_top is None else rec.top[:n_top]
    card = {
        "layer": rec.layer,
        "index": rec.index,
        "label": label,
        "label_source": source,
        "density": rec.n_fires / rec.n_tokens if rec.n_tokens else None,
        "n_fires": rec.n_fires,
        "n_tokens": rec.n_tokens,
        "mean_activation": rec.sum_activation / rec.n_fires if rec.n_fires else None,
        "max_activation": rec.max_activation if rec.n_fires else None,
        "contexts": [example(rec, v, loc, before, after) for v, loc in top],
        "quantiles": quantile_bins(rec, n_bins, per_bin, before, after),
        "promoted": token_list(rec, rec.promoted),
        "suppressed": token_list(rec, rec.suppressed),
        **label_keys(rec),
    }
    if rec.n_fires == 0:
        card["message"] = f"never active in the {rec.n_tokens:,} tokens scanned"
    return card


def label_keys(rec: FeatureRecord) -> dict:
    """The automatic label's parts and scores (scores None for a store without them)."""
    info = rec.label_info or {}
    return {
        "auto_label": rec.auto_label,
        "label_reads": [r["text"] for r in info.get("reads", [])],
        "label_writes": [w["text"] for w in info.get("writes", [])],
        "label_broad": info.get("broad", False),
        "label_detection": info.get("detection"),
        "label_output": info.get("output"),
        "label_evidence": {k: info[k] for k in ("reads", "writes", "n_pos", "n_neg")} if info else None,
    }


def score_text(card: dict) -> str:
    """`detection 0.93 · output 0.88` (what exists), or why there is none."""
    if card.get("label_evidence") is None:
        return "no scores (relabel: cltrace features RUN --relabel)"
    if card.get("label_broad"):
        return "not scored (broad)"
    names = (("detection", "label_detection"), ("output", "label_output"))
    parts = [f"{name} {card[key]:.2f}" for name, key in names if card.get(key) is not None]
    return " · ".join(parts) if parts else "not scored"


def _show(token: str) -> str:
    return token.replace("\n", "\\n").replace("\t", "\\t")


def render_context(ctx: dict) -> str:
    """A context on one line with the active token marked: `... the state of [[Texas]] is`."""
    toks = [_show(t) for t in ctx["tokens"]]
    i = ctx["active_index"]
    if 0 <= i < len(toks):
        toks[i] = f"[[{toks[i]}]]"
    return "".join(toks)


def render(card: dict, max_contexts: int = 10) -> str:
    """The dashboard as text for a terminal."""
    dens = card.get("density")
    lines = [
        f"feature L{card['layer']}:{card['index']}  {card.get('label', '')!s}"
        + ("  (your label)" if card.get("label_source") == "user" else ""),
        f"  label score: {score_text(card)}"
        + (
            f"  (automatic label: {card['auto_label']})"
            if card.get("label_source") == "user" and card.get("auto_label")
            else ""
        ),
        f"  density {dens:.3g} ({card['n_fires']:,} of {card['n_tokens']:,} tokens)"
        if dens is not None
        else "  density unknown (no tokens scanned yet)",
    ]
    if card.get("mean_activation") is not None:
        lines.append(f"  activation mean {card['mean_activation']:.4g}, max {card['max_activation']:.4g}")
    if card.get("message"):
        lines.append(f"  {card['message']}")
    if card["contexts"]:
        lines.append("top contexts:")
        lines += [f"  {c['value']:>10.4g}  {render_context(c)}" for c in card["contexts"][:max_contexts]]
    for q in card.get("quantiles", []):
        lines.append(f"activations in ({q['low']:.3g}, {q['high']:.3g}]:")
        lines += [f"  {c['value']:>10.4g}  {render_context(c)}" for c in q["examples"]]
    for key, title in (("promoted", "promotes"), ("suppressed", "suppresses")):
        if card.get(key):
            items = ", ".join(f"{_show(t['token'])!r} {t['value']:+.3g}" for t in card[key])
            lines.append(f"{title}: {items}")
    return "\n".join(lines)
