"""Label evidence of features and of groups: the words a label gives on its read side (what the
feature fires on) and its write side (what it promotes), `Tokyo · Japan/Osaka → Japanese`.

Used by `circuits.group` as a similarity signal (Jaccard overlap) and for names (the words
most members share). Labels come from the feature store (`features.labels`); without a store
there is no evidence and groups are named by position.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from cltrace.interventions.supernodes import FeatureNode

_ESCAPES = re.compile(r"\\[ntr]")  # blanks as labels show them ("\n")
_SPLIT = re.compile(r"\s*(?:·|/|,|;|\|)\s*")


@dataclass(frozen=True)
class Evidence:
    """Words of one label: what the feature reads (fires on) and what it writes (promotes)."""

    reads: frozenset[str] = frozenset()
    writes: frozenset[str] = frozenset()

    def words(self) -> set[str]:
        return {f"r:{w.lower()}" for w in self.reads} | {f"w:{w.lower()}" for w in self.writes}

    def __bool__(self) -> bool:
        return bool(self.reads or self.writes)


def parse_label(label: str | None) -> Evidence:
    """`"Tokyo · Japan/Osaka → Japanese"` -> reads {Tokyo, Japan, Osaka}, writes {Japanese}.

    Labels that say nothing (empty, "(never active)", "(broad: …)", "(too broad …)") give no
    evidence; a trailing "…" (mixed contexts) is dropped from the word, and so are words with
    no letter or digit ("," or a newline shown as "\\n"), which cannot name a group.
    """
    if not label or label.lstrip().startswith("(") or "too broad" in label.lower():
        return Evidence()
    reads, _, writes = label.partition("→")

    def words(part: str) -> frozenset[str]:
        return word_set(re.sub(r"\s*\(.*?\)\s*", " ", w) for w in _SPLIT.split(part))

    return Evidence(words(reads), words(writes))


def word_set(items: Iterable[str]) -> frozenset[str]:
    """Evidence words of label items: stripped, a trailing "…" dropped, and only those with a
    letter or digit (not "," or a newline shown as "\\n")."""
    cleaned = (w.strip().strip("…").strip() for w in items)
    return frozenset(w for w in cleaned if any(c.isalnum() for c in _ESCAPES.sub("", w)))


def feature_evidence(store, feats: Sequence[FeatureNode]) -> dict[tuple[int, int], Evidence]:
    """Label evidence of each (layer, feature) from a feature store; {} without a store.

    Uses the store's structured evidence when it offers it (`label_evidence(keys)` returning
    {key: (reads, writes)}), else parses `store.labels(keys)`.
    """
    if store is None or not feats:
        return {}
    keys = list(dict.fromkeys((f.layer, f.feature) for f in feats))
    if hasattr(store, "label_evidence"):
        found = store.label_evidence(keys)
        return {k: Evidence(word_set(r), word_set(w)) for k, (r, w) in found.items()}
    return {k: parse_label(v) for k, v in store.labels(keys).items()}


def jaccard_matrix(sets: Sequence[set[str]]) -> tuple[np.ndarray, np.ndarray]:
    """[m, m] Jaccard overlaps and an [m, m] mask of the pairs where both sets are non-empty."""
    vocab = {w: k for k, w in enumerate(sorted(set().union(*sets)))} if sets else {}
    X = np.zeros((len(sets), max(1, len(vocab))))
    for i, s in enumerate(sets):
        for w in s:
            X[i, vocab[w]] = 1.0
    inter = X @ X.T
    sizes = X.sum(1)
    union = sizes[:, None] + sizes[None, :] - inter
    both = (sizes[:, None] > 0) & (sizes[None, :] > 0)
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0), both


def shared_evidence(evidence: Sequence[Evidence], weights: np.ndarray, limit: int) -> list[str]:
    """Words the members share, most influence-weighted support first: reads, then "→ writes".

    A word counts when members carrying at least a third of the labelled members' influence
    (and at least two members when more than two are labelled) have it; a lone labelled
    feature's words all count.
    """
    labelled = [(e, float(w)) for e, w in zip(evidence, weights) if e]
    if not labelled:
        return []
    total = sum(w for _, w in labelled) or 1.0
    need_members = 2 if len(labelled) > 2 else 1
    out: list[str] = []
    for side in ("reads", "writes"):
        support: defaultdict[str, float] = defaultdict(float)  # influence share (Counter holds ints)
        count: Counter[str] = Counter()
        spelling: dict[str, str] = {}
        for e, w in labelled:
            for word in getattr(e, side):
                key = word.lower()
                support[key] += w / total
                count[key] += 1
                spelling.setdefault(key, word)
        by_support = sorted(support.items(), key=lambda kv: kv[1], reverse=True)  # as most_common()
        ranked = [k for k, s in by_support if s >= 1 / 3 and count[k] >= need_members]
        budget = limit - len(out) if side == "writes" else max(1, limit - 2)
        out += [("→ " if side == "writes" else "") + spelling[k] for k in ranked[:budget]]
    return out
