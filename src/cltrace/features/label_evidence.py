"""The evidence a label is built from: the scanned text's base rates and a feature's examples.

`TextStats` reads every stored context once and counts, over the scanned positions (the BOS
at position 0 excluded), each normalised token (`labels.norm_token`: spellings of one word
merged) and each two-token n-gram. These are the base rates the read side is weighed
against: an item's score is share · log(share / base rate), the tf-idf-like term of the
KL divergence between the firing positions and the text, so "the" (5% of the text) scores
far below "Tokyo" (0.01%) at the same share.

`split_examples` decides which examples build the label and which are held out for its
score: all top examples and the even-ranked half of each quantile slice build it; the
odd-ranked half (at every quantile) is held out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cltrace.features.labels import DEFAULT_LABELS, LabelConfig, ReadItem, WriteItem, clean_token, norm_token

if TYPE_CHECKING:
    from cltrace.features.store import FeatureStore

NO_KEY = -1


@dataclass
class TextStats:
    """The scanned text as normalised keys, and their counts.

    Shapes: tokens/keys [C, n] (C stored contexts of n tokens); key_counts [K];
    bigram_codes/bigram_counts [U] sorted (code = prev_key * K + key, positions >= 2).
    """

    context_len: int
    row_of: dict[int, int]  # context id -> row
    tokens: np.ndarray  # [C, n] token ids
    keys: np.ndarray  # [C, n] normalised keys; position 0 is NO_KEY
    key_norm: list[str]  # key -> normalised string
    key_text: list[str]  # key -> commonest raw spelling
    key_of_norm: dict[str, int]
    key_counts: np.ndarray  # [K]
    n_positions: int  # scanned positions counted
    bigram_codes: np.ndarray
    bigram_counts: np.ndarray
    token_key: dict[int, int]  # token id -> key (ids seen in the text)

    @property
    def n_keys(self) -> int:
        return len(self.key_norm)

    def base_rate(self, key: int) -> float:
        return (float(self.key_counts[key]) + 0.5) / (self.n_positions + 1.0)

    def bigram_rate(self, code: int) -> float:
        j = int(np.searchsorted(self.bigram_codes, code))
        c = self.bigram_counts[j] if j < len(self.bigram_codes) and self.bigram_codes[j] == code else 0
        return (float(c) + 0.5) / (self.n_positions + 1.0)

    def rows_positions(self, locations: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(rows, positions) of global locations whose context is stored (others dropped)."""
        n = self.context_len
        pairs = [(self.row_of[loc // n], loc % n) for loc in locations if loc // n in self.row_of]
        if not pairs:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        arr = np.asarray(pairs, dtype=np.int64)
        return arr[:, 0], arr[:, 1]

    def key_strings(self, key: int) -> str:
        return self.key_text[key] if key >= 0 else ""

    @classmethod
    def from_store(cls, store: "FeatureStore") -> "TextStats":
        conn = store.conn
        n = store.context_len
        rows = conn.execute("SELECT id, tokens FROM contexts ORDER BY id").fetchall()
        tokens = (
            np.frombuffer(b"".join(b for _, b in rows), "<i4").reshape(len(rows), n).astype(np.int64)
            if rows
            else np.zeros((0, n), np.int64)
        )
        vocab = dict(conn.execute("SELECT id, text FROM vocab"))
        return cls.from_tokens(tokens, vocab, [int(i) for i, _ in rows], n)

    @classmethod
    def from_tokens(
        cls, tokens: np.ndarray, vocab: dict[int, str], ctx_ids: list[int], n: int
    ) -> "TextStats":
        ids, counts = np.unique(tokens[:, 1:], return_counts=True)
        key_of_norm: dict[str, int] = {}
        best: dict[int, tuple[int, str]] = {}  # key -> (count, spelling)
        token_key: dict[int, int] = {}
        for tid, c in zip(ids.tolist(), counts.tolist()):
            text = vocab.get(tid, f"<{tid}>")
            key = key_of_norm.setdefault(norm_token(text), len(key_of_norm))
            token_key[tid] = key
            if c > best.get(key, (-1, ""))[0]:
                best[key] = (c, text)
        lookup = np.full(int(tokens.max()) + 1 if tokens.size else 1, NO_KEY, np.int64)
        lookup[np.fromiter(token_key, np.int64, len(token_key))] = np.fromiter(
            token_key.values(), np.int64, len(token_key)
        )
        keys = lookup[tokens]
        keys[:, 0] = NO_KEY
        K = len(key_of_norm)
        key_counts = np.bincount(keys[:, 1:].ravel(), minlength=K) if K else np.zeros(0, np.int64)
        codes = (keys[:, 1:-1] * K + keys[:, 2:]).ravel()
        b_codes, b_counts = np.unique(codes, return_counts=True)
        norms = [""] * K
        for s, k in key_of_norm.items():
            norms[k] = s
        return cls(
            context_len=n,
            row_of={c: r for r, c in enumerate(ctx_ids)},
            tokens=tokens,
            keys=keys,
            key_norm=norms,
            key_text=[best[k][1] for k in range(K)],
            key_of_norm=key_of_norm,
            key_counts=key_counts,
            n_positions=int(keys[:, 1:].size),
            bigram_codes=b_codes,
            bigram_counts=b_counts,
            token_key=token_key,
        )


def split_examples(
    top: list[tuple[float, int]], reservoir: list[tuple[float, int]], max_act: float, n_bins: int
) -> tuple[list[int], list[int]]:
    """(label locations, held-out locations): every top example and the even-ranked half of
    each quantile slice build the label; the odd-ranked half of each slice is held out
    (a held-out location that is also a top example is dropped)."""
    build = [loc for _, loc in top]
    held: list[int] = []
    bins: dict[int, list[tuple[float, int]]] = {}
    for v, loc in reservoir:
        b = min(n_bins - 1, int(v / max_act * n_bins)) if max_act > 0 else 0
        bins.setdefault(b, []).append((v, loc))
    for b in sorted(bins):
        ranked = sorted(bins[b], key=lambda t: (-t[0], t[1]))
        build += [loc for _, loc in ranked[0::2]]
        held += [loc for _, loc in ranked[1::2]]
    build = list(dict.fromkeys(build))
    seen = set(build)
    return build, [loc for loc in dict.fromkeys(held) if loc not in seen]


@dataclass
class _Candidate:
    item: ReadItem
    covers: np.ndarray  # [n_examples] bool
    score: float
    fire_key: int  # firing-token key it names, or NO_KEY
    prev_key: int  # preceding-token key it names, or NO_KEY


def read_items(
    stats: TextStats, locations: Sequence[int], cfg: LabelConfig = DEFAULT_LABELS
) -> list[ReadItem]:
    """The read-side items of a label, strongest first (at most `cfg.max_reads`).

    Candidates are the firing token, the token before it and the bigram of both at each
    label location; each must recur (`min_count`, `min_share`), be `min_lift` times commoner
    at the firing positions than in the text, and recur more than chance would make it: the
    Poisson tail P(X >= count | n x base rate) must be below `significance` divided by the
    number of candidates (Bonferroni); a bigram is tested against its firing token's examples
    (is the preceding token commoner there than before that token in the text?). They are
    taken greedily by score,
    skipping one that names a token an earlier one already names, or covers no new example.
    """
    rows, pos = stats.rows_positions(locations)
    if rows.size == 0:
        return []
    tok = stats.keys[rows, pos]
    prev = np.where(pos >= 2, stats.keys[rows, np.maximum(pos - 1, 0)], NO_KEY)
    cands = _candidates(stats, tok, prev, cfg)
    chosen: list[_Candidate] = []
    covered = np.zeros(rows.size, bool)
    for c in sorted(cands, key=lambda c: -c.score):
        if len(chosen) >= cfg.max_reads:
            break
        clash = any(
            (c.fire_key != NO_KEY and c.fire_key == o.fire_key)
            or (c.prev_key != NO_KEY and c.prev_key == o.prev_key)
            for o in chosen
        )
        new = int((c.covers & ~covered).sum())
        if clash or new < min(cfg.min_count, rows.size):
            continue
        chosen.append(c)
        covered |= c.covers
    return [c.item for c in chosen]


def _candidates(stats: TextStats, tok: np.ndarray, prev: np.ndarray, cfg: LabelConfig) -> list[_Candidate]:
    n = tok.size
    need = min(cfg.min_count, n)
    out: list[_Candidate] = []
    K = stats.n_keys
    groups = [
        (kind, codes, *np.unique(codes[codes >= 0], return_counts=True))
        for kind, codes in (
            ("token", tok),
            ("prev", prev),
            ("bigram", np.where(prev >= 0, prev * K + tok, NO_KEY)),
        )
    ]
    alpha = cfg.significance / max(1, sum(len(g[2]) for g in groups))
    tok_counts = dict(zip(*(x.tolist() for x in groups[0][2:4])))
    for kind, codes, values, counts in groups:
        for code, count in zip(values.tolist(), counts.tolist()):
            share = count / n
            if count < need or share < cfg.min_share:
                continue
            base = stats.bigram_rate(code) if kind == "bigram" else stats.base_rate(code)
            lift = share / base
            # a bigram must beat its firing token: expected = examples of that token x P(prev | token)
            expected = (
                tok_counts.get(code % K, 0) * base / stats.base_rate(code % K)
                if kind == "bigram"
                else n * base
            )
            if (
                lift < cfg.min_lift
                or count < cfg.min_lift * expected
                or poisson_tail(count, expected) >= alpha
            ):
                continue
            item, fire_key, prev_key = _item(stats, kind, code, share, lift)
            out.append(_Candidate(item, codes == code, share * math.log(lift), fire_key, prev_key))
    return out


def poisson_tail(count: int, lam: float) -> float:
    """P(X >= count) for X ~ Poisson(lam)."""
    term = math.exp(-lam)
    below = 0.0
    for k in range(count):
        below += term
        term *= lam / (k + 1)
    return max(0.0, 1.0 - below)


def _item(stats: TextStats, kind: str, code: int, share: float, lift: float) -> tuple[ReadItem, int, int]:
    if kind == "token":
        return (
            ReadItem("token", clean_token(stats.key_text[code]), (stats.key_norm[code],), share, lift),
            code,
            NO_KEY,
        )
    if kind == "prev":
        return (
            ReadItem("prev", f"{clean_token(stats.key_text[code])} _", (stats.key_norm[code],), share, lift),
            NO_KEY,
            code,
        )
    a, b = divmod(code, stats.n_keys)
    text = clean_token(stats.key_text[a] + stats.key_text[b])
    return ReadItem("bigram", text, (stats.key_norm[a], stats.key_norm[b]), share, lift), b, a


def write_items(
    stats: TextStats,
    promoted: Sequence[tuple[int, float]],
    vocab: dict[int, str],
    cfg: LabelConfig = DEFAULT_LABELS,
) -> list[WriteItem]:
    """The promoted tokens a label names: the strongest ones (positive effect) that are words
    of the scanned text (the token occurs in it and has a letter or digit), one per word; a
    second one only when its effect is `write_ratio` of the first's."""
    out: list[WriteItem] = []
    seen: set[str] = set()
    for tid, value in promoted:
        text = vocab.get(int(tid), "")
        key = norm_token(text)
        if (
            value <= 0
            or int(tid) not in stats.token_key
            or key in seen
            or not any(ch.isalnum() for ch in text)
        ):
            continue
        if out and value < cfg.write_ratio * out[0].value:
            break
        seen.add(key)
        out.append(WriteItem(clean_token(text), int(tid), float(value)))
        if len(out) >= cfg.max_writes:
            break
    return out
