"""Readable feature labels: what a feature reads `·`-joined, an arrow, what it writes.

A label is built from evidence on both sides (METHOD.md §7), without a language model:

- *reads* (`features.label_evidence.read_items`): the tokens at the firing positions of the
  feature's top examples and half of its quantile examples, weighed against how common each
  token is in the scanned text (score = share · log(share / base rate), so a token that is in
  every context says nothing), plus the token before the firing position (`of _`: "the token
  after *of*") and the two-token n-gram ending there (`Eiffel Tower`);
- *writes* (`features.label_evidence.write_items`): the tokens its decoder most promotes through
  the unembedding, keeping those that are words of the scanned text (Gemma's 262k vocabulary
  is mostly rare sub-words).

The text reads `Tokyo · Japan · Osaka → Japanese`; `Label.reads` and `Label.writes` say which
part is which. A feature firing on more than `LabelConfig.broad_density` of all tokens is
labelled `(broad: fires on 31% of tokens)` instead of a confident-looking name; one that
never fired is `(never active)`. How far a label can be trusted is scored separately
(`features.label_score`). User labels (`cltrace feature RUN L:I --label ...`) always win; the
store keeps them in their own table and never recomputes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

MAX_LABEL_CHARS = 60
DEAD_LABEL = "(never active)"
READS_SEP, ARROW = " · ", " → "
LABELS_VERSION = 2  # meta "labels_version"; stores without it have no scores


@dataclass(frozen=True)
class LabelConfig:
    """How labels are made and scored. Saved in the store's meta with the scores."""

    broad_density: float = 0.1  # a feature firing on more of all tokens is marked broad
    max_reads: int = 3  # read-side items named in a label
    max_writes: int = 2  # promoted tokens named in a label
    min_count: int = 2  # a read item must recur in this many label examples...
    min_share: float = 0.1  # ... and in this share of them ...
    min_lift: float = 3.0  # ... and be this many times commoner there than in the text,
    significance: float = 0.05  # ... by more than chance: Poisson tail p < this / candidates
    write_ratio: float = 0.5  # a further written token needs this share of the first's effect
    pool_contexts: int = 32  # contexts with every activation recomputed (held-out negatives)
    output_contexts: int = 2  # neutral contexts per feature for the output score
    output_len: int = 24  # tokens per neutral context (BOS included)
    steer_scale: float = 1.0  # steering adds this times the feature's max activation
    seed: int = 0  # the shuffled baseline and output samples
    max_chars: int = MAX_LABEL_CHARS

    def __post_init__(self) -> None:
        if not 0 < self.broad_density <= 1:
            raise ValueError("broad_density must be in (0, 1]")
        if min(self.max_reads, self.min_count, self.pool_contexts, self.output_contexts) < 1:
            raise ValueError("max_reads, min_count, pool_contexts and output_contexts must be >= 1")
        if self.output_len < 3:
            raise ValueError("output_len must be at least 3")

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT_LABELS = LabelConfig()


@dataclass(frozen=True)
class ReadItem:
    """One piece of read-side evidence.

    kind: "token" (the firing token), "prev" (the token before it), "bigram" (both).
    match: the normalised token strings it matches (one, or two for a bigram: prev, token).
    share: the share of label examples it covers; lift: share / base rate in the text.
    """

    kind: Literal["token", "prev", "bigram"]
    text: str
    match: tuple[str, ...]
    share: float
    lift: float

    @property
    def weight(self) -> float:
        """Strength of the evidence when it predicts firing (log lift, > 0)."""
        import math

        return math.log(max(self.lift, 1.0 + 1e-6))

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "text": self.text,
            "match": list(self.match),
            "share": round(self.share, 4),
            "lift": round(self.lift, 2),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ReadItem":
        return cls(d["kind"], d["text"], tuple(d["match"]), float(d["share"]), float(d["lift"]))


@dataclass(frozen=True)
class WriteItem:
    """A promoted token named in a label: its text, id and direct logit effect per unit."""

    text: str
    token_id: int
    value: float

    def to_dict(self) -> dict:
        return {"text": self.text, "token_id": self.token_id, "value": round(self.value, 5)}

    @classmethod
    def from_dict(cls, d: dict) -> "WriteItem":
        return cls(d["text"], int(d["token_id"]), float(d["value"]))


@dataclass
class Label:
    """A feature's automatic label, its evidence and (once scored) its scores."""

    text: str
    reads: list[ReadItem] = field(default_factory=list)
    writes: list[WriteItem] = field(default_factory=list)
    broad: bool = False
    density: float | None = None
    detection: float | None = None  # held-out AUC of the read evidence (0.5 = chance)
    output: float | None = None  # percentile of the written tokens' rise when steered
    n_pos: int = 0  # held-out activating positions behind `detection`
    n_neg: int = 0  # held-out non-activating positions

    @property
    def reads_text(self) -> str:
        return READS_SEP.join(r.text for r in self.reads)

    @property
    def writes_text(self) -> str:
        return READS_SEP.join(w.text for w in self.writes)

    def evidence_dict(self) -> dict:
        return {
            "reads": [r.to_dict() for r in self.reads],
            "writes": [w.to_dict() for w in self.writes],
            "n_pos": self.n_pos,
            "n_neg": self.n_neg,
        }


def clean_token(token: str) -> str:
    """A token as a human reads it in a label: outer whitespace dropped, blanks made visible."""
    stripped = token.strip()
    if stripped:
        return stripped
    return {"\n": "\\n", "\t": "\\t", " ": "␣"}.get(token[:1], repr(token)) if token else "∅"


def norm_token(token: str) -> str:
    """The key under which spellings of one word are merged (" Tokyo", "Tokyo", "tokyo")."""
    return clean_token(token).lower()


def broad_text(density: float) -> str:
    return f"(broad: fires on {density:.0%} of tokens)"


def compose(
    reads: list[ReadItem],
    writes: list[WriteItem],
    *,
    density: float | None = None,
    cfg: LabelConfig = DEFAULT_LABELS,
) -> Label:
    """The label of a feature from its evidence: `reads → writes`, either part may be missing.

    Items are dropped from the end (writes first) until the text fits `cfg.max_chars`.
    """
    if density is not None and density > cfg.broad_density:
        return Label(broad_text(density), reads, writes, broad=True, density=density)
    r, w = list(reads[: cfg.max_reads]), list(writes[: cfg.max_writes])
    text = _join(r, w)
    while len(text) > cfg.max_chars and len(r) + len(w) > 1:
        (w if len(w) > 1 or not r else r if len(r) > 1 else w).pop()
        text = _join(r, w)
    if not text:
        text = DEAD_LABEL if density in (None, 0) else "(no evidence)"
    elif len(text) > cfg.max_chars:
        text = text[: cfg.max_chars - 1] + "…"
    return Label(text, r, w, density=density)


def _join(reads: list[ReadItem], writes: list[WriteItem]) -> str:
    left, right = READS_SEP.join(x.text for x in reads), READS_SEP.join(x.text for x in writes)
    if left and right:
        return f"{left}{ARROW}{right}"
    return left or (f"→ {right}" if right else "")


def auto_label(
    active_tokens: list[str], promoted: Sequence[str] = (), max_chars: int = MAX_LABEL_CHARS
) -> str:
    """A label without the text's base rates (for a store made before scored labels):
    the commonest firing tokens (each in at least a fifth of the top examples) → the first
    promoted token with a visible character."""
    counts: dict[str, int] = {}
    spelling: dict[str, str] = {}
    for tok in active_tokens:
        key = norm_token(tok)
        counts[key] = counts.get(key, 0) + 1
        spelling.setdefault(key, clean_token(tok))
    n = max(1, len(active_tokens))
    ranked = [k for k in sorted(counts, key=lambda k: -counts[k]) if counts[k] / n >= 0.2][:3]
    reads = [ReadItem("token", spelling[k], (k,), counts[k] / n, 1.0) for k in ranked]
    first = next((t for t in promoted if t.strip()), None)
    writes = [WriteItem(clean_token(first), -1, 0.0)] if first is not None else []
    return compose(reads, writes, cfg=LabelConfig(max_chars=max_chars)).text
