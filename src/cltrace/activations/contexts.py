"""The one context packer: text -> fixed-length contexts of token ids.

The harvest (what transcoders train on), the feature store (what dashboards show) and
evaluation all read text through `iter_contexts`, so they see the same contexts:

1. documents that are empty, blank or tokenise to nothing are skipped;
2. each document is tokenised without special tokens and followed by a separator: EOS where
   the tokenizer has one, else BOS, else nothing;
3. the running token stream is cut into contexts `[first] + (ctx_len - 1)` stream tokens,
   where `first` is the model's BOS; a model without BOS starts every context with EOS
   instead (position 0 is the attention sink that harvest and store both leave out, so it
   should not be a text token); with neither, contexts are `ctx_len` stream tokens;
4. the stream's last tokens form a final, shorter context (at least one stream token) when
   `partial=True` (the harvest: no token is lost); the feature store, whose contexts all have
   `context_len` tokens, passes `partial=False` and leaves it out.

Deterministic for a deterministic document stream, so a resumed run skips the contexts it
has done.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cltrace.models.loading import LoadedModel


def document_token_ids(model: LoadedModel, documents: Iterable[str]) -> Iterator[list[int]]:
    """Token ids of each non-empty document followed by the separator (EOS, else BOS)."""
    tok = model.tokenizer
    eos = getattr(tok, "eos_token_id", None)
    sep = eos if eos is not None else model.bos_token_id
    for text in documents:
        if not text or not text.strip():
            continue
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
        if ids:
            yield ids + ([sep] if sep is not None else [])


def first_token(model: LoadedModel) -> int | None:
    """The token every context starts with: BOS, else EOS, else None (no prefix)."""
    bos = model.bos_token_id
    if bos is None:
        bos = getattr(model.tokenizer, "eos_token_id", None)
    return bos


def pack_contexts(
    token_lists: Iterable[list[int]], ctx_len: int, bos: int | None, *, partial: bool = True
) -> Iterator[list[int]]:
    """Cut the concatenated token stream into contexts `[bos] + next ctx_len - 1 tokens`.

    Without a BOS token, contexts are `ctx_len` stream tokens. The tokens left at the end
    form a final, shorter context when `partial`, and are dropped otherwise.
    """
    prefix = [] if bos is None else [bos]
    body = ctx_len - len(prefix)
    pending: list[int] = []
    for ids in token_lists:
        pending.extend(ids)
        n_full = len(pending) // body
        for k in range(n_full):
            yield prefix + pending[k * body : (k + 1) * body]
        del pending[: n_full * body]
    if pending and partial:
        yield prefix + pending


def iter_contexts(
    model: LoadedModel, documents: Iterable[str], ctx_len: int, *, partial: bool = True
) -> Iterator[list[int]]:
    """Packed contexts of `ctx_len` tokens of the document stream (see the module docstring)."""
    return pack_contexts(document_token_ids(model, documents), ctx_len, first_token(model), partial=partial)
