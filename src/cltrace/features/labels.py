"""Short automatic feature labels, from what a feature reads and what it writes.

The heuristic (offline, no language model):

- *reads*: the tokens on which the feature fires hardest (the active token of each top
  context). When one token dominates (at least `dominant` of the contexts) the label names
  it; when two tokens together do, both ("Texas/Dallas"); otherwise the commonest one with
  a trailing "…" to say the contexts are mixed.
- *writes*: the token the feature's decoder most promotes through the unembedding, appended
  as "→ Austin" (the store passes the promoted tokens that occur in the scanned text first).

So a feature firing on "Texas" that promotes "Austin" is labelled `Texas → Austin`.
User labels (set with `cltrace feature RUN L:I --label ...`) always take precedence; they are
kept in their own table by `features.store` and never recomputed.
"""

from __future__ import annotations

from typing import Sequence

MAX_LABEL_CHARS = 40
DEAD_LABEL = "(never active)"


def clean_token(token: str) -> str:
    """A token as a human reads it in a label: outer whitespace dropped, blanks made visible."""
    stripped = token.strip()
    if stripped:
        return stripped
    return {"\n": "\\n", "\t": "\\t", " ": "␣"}.get(token[:1], repr(token)) if token else "∅"


def reads_part(active_tokens: Sequence[str], dominant: float = 0.5) -> str:
    """What the feature fires on, from the active tokens of its top contexts (best first)."""
    if not active_tokens:
        return ""
    cleaned = [clean_token(t) for t in active_tokens]
    counts: dict[str, int] = {}               # by lower case, in first-seen (best-first) order
    spellings: dict[str, dict[str, int]] = {}
    for tok in cleaned:
        key = tok.lower()
        counts[key] = counts.get(key, 0) + 1
        forms = spellings.setdefault(key, {})
        forms[tok] = forms.get(tok, 0) + 1
    ranked = sorted(counts, key=lambda k: -counts[k])[:2]   # stable: ties keep first-seen order
    shares = [counts[k] / len(cleaned) for k in ranked]
    names = [max(spellings[k], key=spellings[k].__getitem__) for k in ranked]
    if shares[0] >= dominant or len(names) == 1:
        return names[0]
    if shares[0] + shares[1] >= dominant:
        return f"{names[0]}/{names[1]}"
    return f"{names[0]}…"


def auto_label(active_tokens: Sequence[str], promoted: Sequence[str] = (),
               max_chars: int = MAX_LABEL_CHARS) -> str:
    """The automatic label: `reads → writes`, either part may be missing.

    Args:
        active_tokens: the token at the activation position of each top context, best first.
        promoted: the tokens the decoder most promotes, strongest first.
        max_chars: labels longer than this are cut with "…".
    """
    reads = reads_part(active_tokens)
    writes = next((clean_token(t) for t in promoted if t.strip()), "")
    if not reads and not writes:
        return DEAD_LABEL
    label = reads if not writes else f"{reads} → {writes}" if reads else f"→ {writes}"
    return label if len(label) <= max_chars else label[: max_chars - 1] + "…"
