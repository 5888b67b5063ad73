"""Attention (QK) attribution: why a head attends from a query position to a key position.

In the local replacement model (METHOD.md §2, §8) attention patterns are frozen, so a graph
shows what moves between positions but not why. With the patterns of earlier layers and every
norm denominator frozen at their values on the prompt, the residual stream r(l, p) entering
layer l at position p is an affine function of the graph's sources:

    r(l, p) = Σ_s c_s(l, p) + c_bias(l, p) [+ c_bos(l, p)]

(features' decoder writes, error vectors and token embeddings, carried forward through the
frozen attention of layers < l; the constant collects the decoder biases and the model's own
biases, and, when the graph zeroes the first token, the MLP outputs there). The query of head
h at position q is an affine map of r(l, q) at the frozen point: input norm (frozen
denominator), q projection (+ bias: GPT-2, Qwen 2), q norm (Gemma 3 / Qwen 3; RMSNorm with its
frozen denominator is linear), rotary embedding at position q (a fixed rotation). The key is
the same with k. Hence the pre-softmax score

    s(q, k) = scaling · Q_h(q) · K_h(k) = Σ_{s, t} scaling · Q_s · K_t

splits exactly into pairs (query-side source s, key-side source t); the affine maps' constant
parts form one more source on each side, "bias". Gemma 2's attention soft-cap is applied
after this score (tanh is not linear): the decomposed score is the one before the soft-cap.

Cost. Q_s for every source at once is d_head backward rows: inject the rows of the query map
W_Q (d_head x d_model) as gradients at r(l, q) of the recorded replacement forward and read
every source's contribution with the graph's `EdgeReader` (as for graph edges). The same for
K. Each (layer, position, head) side is computed once and reused. The pair matrix is never
formed in full: the exact top pairs come from a bound (|P[s,t]| <= scaling·|Q_s|·|K_t|)
that leaves only the few rows and columns that can hold a top pair.

Which heads matter for a target at q (`head_flows`): the target's gradient g at the attention
output of layer l (input of the output projection), split per head, gives the part of the
target's input that arrives from key position k through head h:
``flow[l, h, k] = A_h[q, k] · g_h(q) · V_h(k)`` (frozen pattern A, value vector V).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from cltrace.attribution.graph import (
    EdgeReader,
    check_transcoder,
    find_active_features,
    prepare_tokens,
    skip_function,
    starts_with_special,
)
from cltrace.attribution.replacement import (
    ReplacementForward,
    _family_eager,
    _norm_scale,
    run_frozen,
    run_replacement,
)
from cltrace.errors import CltraceError
from cltrace.models.loading import LoadedModel
from cltrace.transcoders.interface import TranscoderLike

Side = Literal["q", "k"]

#: family -> (attention module, its input norm, its output projection) attribute names of a block
_ATTENTION = {"gpt2": ("attn", "ln_1", "c_proj")}
_DEFAULT_ATTENTION = ("self_attn", "input_layernorm", "o_proj")


def attention_names(lm: LoadedModel) -> tuple[str, str, str]:
    return _ATTENTION.get(lm.adapter.family, _DEFAULT_ATTENTION)


# --------------------------------------------------------------------------- results


@dataclass
class QKResult:
    """One head's pre-softmax score at (q, k) split into (query source, key source) pairs.

    Source ids are the graph JSON's node ids (`{layer}_{feature}_{pos}`, `err_{layer}_{pos}`,
    `E_{token}_{pos}`) plus "bias" (constant parts) and "bos" (MLP outputs at a zeroed first
    token). Values include the head's scaling: all pairs sum to `score` (`pair_sum`). `pairs`
    lists the top node-node pairs; the pairs with a constant on either side sum to
    `constant_part`; the marginals include the constants.
    """

    layer: int
    head: int
    q_pos: int
    k_pos: int
    score: float  # real pre-softmax (pre-soft-cap) score
    pair_sum: float  # Σ of all pairs (= score up to float error)
    pattern: float  # the attention weight A[q, k]
    pairs: list[tuple[str, str, float]]  # top pairs by |value|
    q_marginals: list[tuple[str, float]]  # Σ_t P[s, t] for the top query sources
    k_marginals: list[tuple[str, float]]  # Σ_s P[s, t] for the top key sources
    summary: str = ""
    softcap: float | None = None  # Gemma 2: the soft-cap applied after `score`
    n_pairs: int = 0  # non-zero node-node pairs
    feature_pairs: list[tuple[str, str, float]] = field(default_factory=list)  # top feature-feature pairs
    constant_part: float = 0.0  # Σ of the pairs with a constant source ("bias", "bos") on either side

    @property
    def relative_error(self) -> float:
        return abs(self.pair_sum - self.score) / max(abs(self.score), 1e-12)

    def to_dict(self) -> dict[str, Any]:
        """Neuronpedia's `qk_tracing_results` keys first, then cltrace's own."""
        return {
            "pair_wise_contributors": [[q, k, v] for q, k, v in self.pairs],
            "top_q_marginal_contributors": [[s, v] for s, v in self.q_marginals],
            "top_k_marginal_contributors": [[s, v] for s, v in self.k_marginals],
            "layer": self.layer,
            "head": self.head,
            "q_pos": self.q_pos,
            "k_pos": self.k_pos,
            "score": self.score,
            "pair_sum": self.pair_sum,
            "pattern": self.pattern,
            "softcap": self.softcap,
            "n_pairs": self.n_pairs,
            "constant_part": self.constant_part,
            "feature_pairs": [[q, k, v] for q, k, v in self.feature_pairs],
            "summary": self.summary,
        }


@dataclass
class _Recorded:
    """The real forward's attention inputs, per layer (batch row 0, detached)."""

    query: list[Tensor] = field(default_factory=list)  # [H, n, dh] (after q norm and rope)
    key: list[Tensor] = field(default_factory=list)  # [H_kv, n, dh]
    value: list[Tensor] = field(default_factory=list)  # [H_kv, n, dh]
    pattern: list[Tensor] = field(default_factory=list)  # [H, n, n]
    scaling: list[float] = field(default_factory=list)
    softcap: list[float | None] = field(default_factory=list)
    window: list[int | None] = field(default_factory=list)
    rope: list[tuple[Tensor, Tensor] | None] = field(default_factory=list)  # (cos, sin) [n, dh]


# --------------------------------------------------------------------------- hooks


@contextlib.contextmanager
def _record_attention(lm: LoadedModel, rec: _Recorded) -> Iterator[None]:
    """Record every layer's real query/key/value/pattern/scaling and rotary (cos, sin)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    attn_name = attention_names(lm)[0]
    layer_of = {id(getattr(b, attn_name)): l for l, b in enumerate(lm.blocks)}
    L = lm.n_layers
    slots: dict[str, list] = {
        k: [None] * L for k in ("query", "key", "value", "pattern", "scaling", "softcap", "window", "rope")
    }

    def attention(module, query, key, value, attention_mask, **kwargs):
        out, weights = _family_eager(module)(module, query, key, value, attention_mask, **kwargs)
        l = layer_of[id(module)]
        slots["query"][l], slots["key"][l] = query[0].detach(), key[0].detach()
        slots["value"][l], slots["pattern"][l] = value[0].detach(), weights[0].detach()
        scaling = kwargs.get("scaling")
        slots["scaling"][l] = float(query.shape[-1] ** -0.5 if scaling is None else scaling)
        slots["softcap"][l] = kwargs.get("softcap") or getattr(module, "attn_logit_softcapping", None)
        slots["window"][l] = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
        return out, weights

    def pre_hook(module, args, kwargs):
        emb = kwargs.get("position_embeddings")
        if emb is None and len(args) > 1 and isinstance(args[1], tuple):
            emb = args[1]
        if emb is not None:
            slots["rope"][layer_of[id(module)]] = (emb[0][0].detach(), emb[1][0].detach())

    mapping = ALL_ATTENTION_FUNCTIONS._local_mapping
    previous = mapping.get("eager")
    handles = [getattr(b, attn_name).register_forward_pre_hook(pre_hook, with_kwargs=True) for b in lm.blocks]
    ALL_ATTENTION_FUNCTIONS["eager"] = attention
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        if previous is None:
            del ALL_ATTENTION_FUNCTIONS["eager"]
        else:
            ALL_ATTENTION_FUNCTIONS["eager"] = previous
    for key, values in slots.items():
        setattr(rec, key, values)


@contextlib.contextmanager
def _record_residuals(lm: LoadedModel, residuals: list, attn_inputs: list | None = None) -> Iterator[None]:
    """Keep (live) the residual entering each layer's attention input norm, and optionally the
    input of each attention output projection."""
    _, norm_name, out_name = attention_names(lm)
    handles = []

    def keep(store: list, layer: int):
        def hook(_module, args):
            store[layer] = args[0]

        return hook

    try:
        for l, b in enumerate(lm.blocks):
            handles.append(getattr(b, norm_name).register_forward_pre_hook(keep(residuals, l)))
            if attn_inputs is not None:
                attn = getattr(b, attention_names(lm)[0])
                handles.append(getattr(attn, out_name).register_forward_pre_hook(keep(attn_inputs, l)))
        yield
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- affine maps


def _rope_apply(module: nn.Module, y: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The family's own rotary embedding of y [m, dh] at one position (cos, sin: [dh])."""
    fn = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb", None)
    if fn is None:
        raise CltraceError(
            f"{type(module).__name__} has rotary embeddings but no apply_rotary_pos_emb",
            "this transformers version is not supported by QK attribution",
        )
    v = y[:, None, None, :]
    out, _ = fn(v, v, cos.reshape(1, 1, -1).to(y.dtype), sin.reshape(1, 1, -1).to(y.dtype))
    return out[:, 0, 0, :]


def _project(
    lm: LoadedModel,
    layer: int,
    side: Side,
    head: int,
    x: Tensor,
    residual: Tensor,
    rope: tuple[Tensor, Tensor] | None,
    pos: int,
) -> Tensor:
    """Head `head`'s query (side "q") or key ("k") of normalised inputs x [m, d] at `pos`, with
    the q/k norm's denominator frozen at its value for `residual`'s row (the last row of x)."""
    attn_name = attention_names(lm)[0]
    attn = getattr(lm.blocks[layer], attn_name)
    if lm.adapter.family == "gpt2":
        d = x.shape[-1]
        qkv = attn.c_attn(x)  # [m, 3d]
        y = qkv[:, :d] if side == "q" else qkv[:, d : 2 * d]
        return y.reshape(x.shape[0], -1, attn.head_dim)[:, head]
    proj = attn.q_proj if side == "q" else attn.k_proj
    dh = attn.head_dim
    y = proj(x).reshape(x.shape[0], -1, dh)[:, head]  # [m, dh]
    norm = getattr(attn, f"{side}_norm", None)
    if norm is not None:
        scale = _norm_scale(lm, norm, y[-1:])  # frozen at the real point
        y = lm.adapter.frozen_norm(norm, y, scale=scale.expand(y.shape[0], 1))
    if rope is not None:
        y = _rope_apply(attn, y, rope[0][pos], rope[1][pos])
    return y


@torch.no_grad()
def affine_map(
    lm: LoadedModel,
    layer: int,
    side: Side,
    head: int,
    pos: int,
    residual: Float[Tensor, "d_model"],
    rope: tuple[Tensor, Tensor] | None,
):
    """(W [d_head, d_model], b [d_head], value [d_head]): the map r -> W r + b from the residual
    entering `layer` at `pos` to head `head`'s query or key there, with every denominator frozen
    at the real point; `value` is the map applied by the model's own modules to `residual`."""
    norm = getattr(lm.blocks[layer], attention_names(lm)[1])
    d = residual.shape[-1]
    dtype = next(norm.parameters()).dtype
    points = torch.cat([torch.zeros(1, d), torch.eye(d), residual.float().cpu()[None]])
    points = points.to(residual.device, dtype)  # [d + 2, d]
    scale = _norm_scale(lm, norm, residual[None]).expand(points.shape[0], 1)
    x = lm.adapter.frozen_norm(norm, points, scale=scale)
    y = _project(lm, layer, side, head, x, residual, rope, pos).float()  # [d + 2, dh]
    bias = y[0]
    return (y[1 : d + 1] - bias).T.contiguous(), bias, y[-1]


# --------------------------------------------------------------------------- tracer


class QKTracer:
    """QK attribution for one prompt: one recorded forward, per-side contributions cached.

    Args:
        lm: the model (eager attention).
        transcoder: the transcoder the graph was traced with.
        prompt: text or token ids (as for `attribute`).
        zero_bos: as AttributionConfig.zero_bos (must match the graph's for the same node set).
        prefix_buckets: prompt prefixes with their own forward (shorter backward passes).
    """

    def __init__(
        self,
        lm: LoadedModel,
        transcoder: TranscoderLike,
        prompt: str | Sequence[int] | Tensor,
        *,
        zero_bos: bool = True,
        prefix_buckets: int = 4,
    ):
        check_transcoder(lm, transcoder)
        self.lm, self.transcoder = lm, transcoder
        self.tokens: Int[Tensor, "pos"] = prepare_tokens(lm, prompt)
        self.n, self.L = int(self.tokens.numel()), lm.n_layers
        self.skip = skip_function(transcoder)
        self.zero_first = zero_bos and starts_with_special(lm, self.tokens)
        self.rec = _Recorded()
        with torch.no_grad(), _record_attention(lm, self.rec):
            lm.run(self.tokens[None].to(lm.device), with_logits=False)
        k = max(1, min(prefix_buckets, self.n))
        self.lengths = sorted({math.ceil(self.n * i / k) for i in range(1, k + 1)})
        self._forwards: dict[int, tuple[ReplacementForward, list, list]] = {}
        full, self.residual, _ = self._forward(self.n, record_frozen=True)
        self.residual = [r[0].detach() for r in self.residual]  # L x [n, d]
        self.feats = find_active_features(transcoder, full, self.skip, self.zero_first)
        self.reader = EdgeReader(self.feats, full.embed_values, torch.float32)
        self.constants = self._constants(full)  # name -> L x [n, d]
        self.source_ids = self._source_ids()
        self._sides: dict[tuple, Tensor] = {}

    # ----- forwards

    def _forward(self, length: int, record_frozen: bool = False):
        if length not in self._forwards:
            residuals: list = [None] * self.L
            attn_in: list = [None] * self.L
            with _record_residuals(self.lm, residuals, attn_in):
                fwd = run_replacement(
                    self.lm, self.tokens, skip=self.skip, length=length, record_frozen=record_frozen
                )
            self._forwards[length] = (fwd, residuals, attn_in)
        return self._forwards[length]

    def _covering(self, pos: int):
        return self._forward(next(m for m in self.lengths if m > pos))

    @torch.no_grad()
    def _constants(self, full: ReplacementForward) -> dict[str, list[Tensor]]:
        """Residuals of the frozen model with every node zeroed: biases only, then + the MLP
        outputs at the zeroed first token ("bos": the difference of the two runs)."""
        b_dec = self.transcoder.decoder_bias().detach().float().to(self.lm.device)  # [L, d]
        taps0 = full.mlp_out_values[0].clone()  # [L, d]
        frozen = full.frozen
        assert frozen is not None  # the full forward records it
        if self.skip is not None:
            for l in range(self.L):
                taps0[l] -= self.skip(l, full.mlp_in_values[0, l])

        def run(with_bos: bool) -> list[Tensor]:
            def mlp_out(l: int, x: Tensor) -> Tensor:
                out = b_dec[l].expand(1, self.n, -1).clone()
                if with_bos:
                    out[0, 0] = taps0[l]
                return out + (self.skip(l, x) if self.skip is not None else 0)

            residuals: list = [None] * self.L
            with _record_residuals(self.lm, residuals):
                run_frozen(self.lm, self.tokens, frozen, torch.zeros_like(full.embed_values), mlp_out)
            return [r[0].float() for r in residuals]

        out = {"bias": run(False)}
        if self.zero_first:
            out["bos"] = [a - b for a, b in zip(run(True), out["bias"])]
        return out

    def _source_ids(self) -> list[str]:
        f = self.feats
        ids = [f"{l}_{i}_{p}" for l, p, i in zip(f.layer.tolist(), f.pos.tolist(), f.index.tolist())]
        ids += [f"err_{l}_{p}" for l in range(self.L) for p in range(self.n)]
        ids += [f"E_{t}_{p}" for p, t in enumerate(self.tokens.tolist())]
        return ids + list(self.constants)

    # ----- shape checks

    @property
    def n_heads(self) -> int:
        return int(self.rec.query[0].shape[0])

    def kv_head(self, layer: int, head: int) -> int:
        return head // (self.n_heads // int(self.rec.key[layer].shape[0]))

    def check_edge(self, layer: int, head: int, q_pos: int, k_pos: int) -> None:
        """Clear errors for a layer, head or position pair the model does not have."""
        if not 0 <= layer < self.L:
            raise CltraceError(f"layer {layer} does not exist: the model has layers 0..{self.L - 1}")
        if not 0 <= head < self.n_heads:
            raise CltraceError(
                f"head {head} does not exist: layer {layer} has heads 0..{self.n_heads - 1}",
                "give a head index below the model's num_attention_heads",
            )
        for name, p in (("query", q_pos), ("key", k_pos)):
            if not 0 <= p < self.n:
                raise CltraceError(f"{name} position {p} is outside the prompt (0..{self.n - 1})")
        if k_pos > q_pos:
            raise CltraceError(
                f"key position {k_pos} is after query position {q_pos}: a causal model never attends there"
            )
        window = self.rec.window[layer]
        if window is not None and q_pos - k_pos >= window:
            raise CltraceError(
                f"layer {layer} is a sliding-window layer ({window} tokens): query "
                f"{q_pos} cannot see key {k_pos}, so there is no score to explain",
                f"pick a key position after {q_pos - window}",
            )

    # ----- per-side contributions

    def side(self, layer: int, side: Side, head: int, pos: int) -> Float[Tensor, "source d_head"]:
        """Every source's contribution to head `head`'s query (or key) at (layer, pos); rows in
        `source_ids` order, the constants last. For a key, `head` is the key-value head."""
        key = (layer, side, head, pos)
        if key not in self._sides:
            self._sides[key] = self._compute_side(layer, side, head, pos)
        return self._sides[key]

    def _compute_side(self, layer: int, side: Side, head: int, pos: int) -> Tensor:
        W, b, value = affine_map(
            self.lm, layer, side, head, pos, self.residual[layer][pos], self.rec.rope[layer]
        )
        recorded = (self.rec.query if side == "q" else self.rec.key)[layer][head, pos].float()
        if not torch.allclose(value, recorded, rtol=1e-3, atol=1e-4 * float(recorded.abs().max()) + 1e-6):
            what = "query" if side == "q" else "key"
            raise CltraceError(
                f"internal check failed: the rebuilt {what} map of layer {layer} head "
                f"{head} does not reproduce the model's own {what}",
                f"{type(self.lm.model).__name__} may compute attention in a way "
                "cltrace's QK attribution does not know; please report it",
            )
        fwd, residuals, _ = self._covering(pos)
        root = residuals[layer]  # [1, m, d]
        dh = W.shape[0]
        g = root.new_zeros(dh, *root.shape)  # [dh, 1, m, d]
        g[:, 0, pos] = W.to(g.dtype)
        if layer == 0:
            g_embed, g_taps = g[:, 0], []
        else:
            inputs = [fwd.embed] + fwd.taps[:layer]
            grads = torch.autograd.grad(
                [root], inputs, [g], retain_graph=True, allow_unused=True, is_grads_batched=True
            )
            grads = [
                x.new_zeros(dh, *x.shape[1:]) if gr is None else gr[:, 0] for gr, x in zip(grads, inputs)
            ]
            g_embed, g_taps = grads[0], grads[1:]
        out = torch.zeros(dh, self.reader.n_sources, device=W.device)
        self.reader.read(g_embed, g_taps, pos, out)
        consts = [W @ c[layer][pos].to(W.device) for c in self.constants.values()]
        consts[0] = consts[0] + b  # the map's own bias
        return torch.cat([out.T, torch.stack(consts)])  # [n_src + n_const, dh]

    # ----- one attention edge

    def explain(self, layer: int, head: int, q_pos: int, k_pos: int, top: int = 10) -> QKResult:
        """Decompose head `head`'s pre-softmax score at (q_pos, k_pos) into source pairs."""
        self.check_edge(layer, head, q_pos, k_pos)
        kv = self.kv_head(layer, head)
        Q = self.side(layer, "q", head, q_pos)  # [S, dh]
        K = self.side(layer, "k", kv, k_pos)
        scaling = self.rec.scaling[layer]
        score = scaling * float(
            self.rec.query[layer][head, q_pos].float() @ self.rec.key[layer][kv, k_pos].float()
        )
        q_tot, k_tot = Q.double().sum(0), K.double().sum(0)  # float64: the sums cancel
        pair_sum = scaling * float(q_tot @ k_tot)
        q_marg = scaling * (Q @ k_tot.to(Q.dtype))
        k_marg = scaling * (K @ q_tot.to(K.dtype))
        n_nodes = len(self.source_ids) - len(self.constants)
        pairs, n_pairs = top_pairs(Q[:n_nodes], K[:n_nodes], scaling, top)  # node pairs only
        nf = self.feats.n  # feature rows come first
        fpairs, _ = top_pairs(Q[:nf], K[:nf], scaling, min(top, 5))
        node_sum = scaling * float(Q[:n_nodes].double().sum(0) @ K[:n_nodes].double().sum(0))
        ids = self.source_ids
        result = QKResult(
            layer=layer,
            head=head,
            q_pos=q_pos,
            k_pos=k_pos,
            score=score,
            pair_sum=pair_sum,
            pattern=float(self.rec.pattern[layer][head, q_pos, k_pos]),
            pairs=[(ids[s], ids[t], v) for s, t, v in pairs],
            q_marginals=_top_entries(q_marg, ids, top),
            k_marginals=_top_entries(k_marg, ids, top),
            softcap=self.rec.softcap[layer],
            n_pairs=n_pairs,
            constant_part=pair_sum - node_sum,
            feature_pairs=[(ids[a], ids[b], v) for a, b, v in fpairs],
        )
        result.summary = summarize(result, self.token_strings())
        return result

    def token_strings(self) -> list[str]:
        if not hasattr(self, "_strings"):
            self._strings = self.lm.token_strings(self.tokens.tolist())
        return self._strings

    # ----- which heads carry a target's input from a key position

    def head_flows(
        self, layer: int | None, pos: int, direction: Float[Tensor, "d_model"]
    ) -> Float[Tensor, "layer head key"]:
        """flow[l, h, k]: the part of the target's input that arrives from key position k
        through head h of layer l (module docstring). The target reads `direction` at the MLP
        input of `layer` (a feature's encoder column) or, with layer None, at the final-norm
        output (a logit direction)."""
        fwd, _, attn_in = self._covering(pos)
        root = fwd.final if layer is None else fwd.mlp_in[layer]
        top = self.L if layer is None else layer + 1
        g = torch.zeros_like(root)
        g[0, pos] = direction.to(g.dtype)
        grads = torch.autograd.grad([root], attn_in[:top], [g], retain_graph=True, allow_unused=True)
        flows = torch.zeros(self.L, self.n_heads, self.n)
        for l, gr in enumerate(grads):
            if gr is None:
                continue
            gq = gr[0, pos].float().reshape(self.n_heads, -1)  # [H, dh]
            rep = self.n_heads // self.rec.value[l].shape[0]
            v = self.rec.value[l].float().repeat_interleave(rep, 0)[:, : pos + 1]  # [H, k, dh]
            per_key = torch.einsum("hd,hkd->hk", gq, v) * self.rec.pattern[l][:, pos, : pos + 1].float()
            flows[l, :, : pos + 1] = per_key.cpu()
        return flows


# --------------------------------------------------------------------------- pairs


@torch.no_grad()
def top_pairs(
    Q: Float[Tensor, "source d_head"],
    K: Float[Tensor, "source d_head"],
    scaling: float,
    top: int,
    chunk: int = 2048,
) -> tuple[list[tuple[int, int, float]], int]:
    """The `top` pairs (s, t) by |scaling · Q_s · K_t|, exactly, without the full matrix.

    Rows and columns that are zero (sources that do not reach the position) are dropped; the
    product of norms bounds every pair, so after a first guess τ (k-th largest value among the
    pairs of the largest-norm rows and columns) only rows with |Q_s|·max|K| >= τ and columns
    with max|Q|·|K_t| >= τ can hold a top pair. Returns the pairs and the count of non-zero ones.
    """
    qn, kn = Q.norm(dim=1) * abs(scaling), K.norm(dim=1)
    rows, cols = (qn > 0).nonzero().squeeze(1), (kn > 0).nonzero().squeeze(1)
    n_pairs = int(rows.numel() * cols.numel())
    if n_pairs == 0:
        return [], 0
    m = max(top, 32)
    r0 = rows[torch.argsort(qn[rows], descending=True)[:m]]
    c0 = cols[torch.argsort(kn[cols], descending=True)[:m]]
    guess = (scaling * Q[r0] @ K[c0].T).abs().flatten()
    tau = float(torch.topk(guess, min(top, guess.numel())).values[-1]) * (1 - 1e-4)
    rows = rows[qn[rows] * kn[cols].max() >= tau]
    cols = cols[kn[cols] * qn[rows].max() >= tau]
    best_v = torch.zeros(0)
    best_i = torch.zeros(0, 2, dtype=torch.long)
    for part in rows.split(chunk):
        block = scaling * Q[part] @ K[cols].T  # [r, c]
        k = min(top, block.numel())
        vals, flat = torch.topk(block.abs().flatten(), k)
        idx = torch.stack([part[flat // cols.numel()], cols[flat % cols.numel()]], 1).cpu()
        best_v = torch.cat([best_v, block.flatten()[flat].cpu()])
        best_i = torch.cat([best_i, idx])
        keep = torch.topk(best_v.abs(), min(top, best_v.numel())).indices
        best_v, best_i = best_v[keep], best_i[keep]
    order = torch.argsort(best_v.abs(), descending=True)
    return [(int(best_i[o, 0]), int(best_i[o, 1]), float(best_v[o])) for o in order], n_pairs


def _top_entries(values: Tensor, ids: list[str], top: int) -> list[tuple[str, float]]:
    k = min(top, values.numel())
    idx = torch.topk(values.abs(), k).indices.tolist()
    return [(ids[i], float(values[i])) for i in idx if float(values[i]) != 0.0]


# --------------------------------------------------------------------------- words


_CONSTANTS = ("bias", "bos")


def describe_source(source_id: str, tokens: Sequence[str]) -> str:
    """'feature 3:212 at " Tokyo"', 'error 4 at " the"', 'token " the"', 'bias'."""
    if source_id == "bias":
        return "the biases"
    if source_id == "bos":
        return "the MLP outputs at the first token"
    parts = source_id.split("_")
    pos = int(parts[-1])
    at = repr(tokens[pos]) if pos < len(tokens) else f"position {pos}"
    if parts[0] == "err":
        return f"error {parts[1]} at {at}"
    if parts[0] == "E":
        return f"token {at}"
    return f"feature {parts[0]}:{parts[1]} at {at}"


def summarize(r: QKResult, tokens: Sequence[str]) -> str:
    """'head 5.2 attends from ' the' to ' Tokyo' (weight 0.61, score 3.20) because feature
    3:212 at ' Tokyo' meets feature 12:621 at ' the' (+1.90, 59% of the score)'."""
    q_tok = repr(tokens[r.q_pos]) if r.q_pos < len(tokens) else str(r.q_pos)
    k_tok = repr(tokens[r.k_pos]) if r.k_pos < len(tokens) else str(r.k_pos)
    head = f"head {r.layer}.{r.head} attends from {q_tok} (pos {r.q_pos}) to {k_tok} (pos {r.k_pos})"
    head += f" with weight {r.pattern:.2f} (score {r.score:+.2f})"
    if not r.pairs:
        return head
    q_src, k_src, value = r.pairs[0]
    share = value / r.score if r.score else float("nan")
    verb = "because" if value * r.score > 0 else "despite"
    text = (
        f"{head} {verb} {describe_source(k_src, tokens)} meets {describe_source(q_src, tokens)} "
        f"({value:+.2f}, {share:.0%} of the score)"
    )
    if len(r.pairs) > 1:
        q2, k2, v2 = r.pairs[1]
        text += f"; next: {describe_source(k2, tokens)} meets {describe_source(q2, tokens)} ({v2:+.2f})"
    if r.feature_pairs and r.feature_pairs[0] != r.pairs[0]:
        fq, fk, fv = r.feature_pairs[0]
        pair = f"{describe_source(fk, tokens)} meets {describe_source(fq, tokens)}"
        text += f"; top feature pair: {pair} ({fv:+.2f})"
    k_best = next(((i, v) for i, v in r.k_marginals if i not in _CONSTANTS), None)
    q_best = next(((i, v) for i, v in r.q_marginals if i not in _CONSTANTS), None)
    if k_best and q_best:
        text += (
            f"; strongest key source {describe_source(k_best[0], tokens)} ({k_best[1]:+.2f}), "
            f"query source {describe_source(q_best[0], tokens)} ({q_best[1]:+.2f})"
        )
    if r.constant_part:
        text += f"; biases and first-token outputs give {r.constant_part:+.2f}"
    return text
