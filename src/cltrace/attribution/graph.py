"""Attribution graphs: nodes, exact edges of the local replacement model, save/load.

``attribute(lm, transcoder, prompt, cfg) -> Graph`` (METHOD.md §3):

1. one forward of the local replacement model (`replacement.run_replacement`, batch 1);
2. transcoder activations from the recorded MLP inputs; active features, error vectors
   ``e_l = y_l - ŷ_l`` (``ŷ`` includes ``b_dec`` and the skip term), embeddings;
3. logit targets: the top tokens until `desired_logit_prob` (at most `max_n_logits`) or the
   user's `output_targets`; direction = unembedding row minus its mean over the vocabulary,
   injected at the final-norm output of the last position (pre-softcap logits);
4. backward passes: a batch of targets injects each target's direction (feature: its
   encoder column at (layer, pos); logit: as above) as the gradient of its input in one row
   of the batch; one (vmapped) backward through the frozen model per batch, reusing the
   forward, and the edges of every source are read at the gradient taps:
   ``A[t, feature s] = a_s Σ_{l_s<=l<l_t} W_dec[s, l_s→l] · g_t(l, pos_s)``,
   ``A[t, error (l,p)] = e_l[p] · g_t(l, p)``, ``A[t, token p] = x_0[p] · g_t(embed, p)``.
   Feature targets are visited in order of their current estimated influence on the logits
   (logits first), as circuit-tracer does, at most `max_feature_nodes` of them.

Node order (circuit-tracer's): selected features sorted by (layer, pos, feature), error nodes
(index ``layer * n_pos + pos``), token embeddings (pos), logits. ``adjacency[target, source]``.
An embedding node is the residual stream entering block 0 (GPT-2: token + position embedding;
Gemma: the scaled token embedding).

Speed (the backward passes are nearly all the cost):
- one forward serves all targets: backward passes are vmapped over the batch of injected
  gradients (``is_grads_batched``), so the forward runs at batch 1;
- a target at position p only needs the prompt's first p + 1 tokens: backward passes run
  through forwards of a few prompt prefixes (`PrefixForwards`);
- each batch holds targets of similar layer and position (sorted within each ranking queue),
  so its backward stops at its deepest target and reads few source layers and positions;
- edges are read with one batched matmul per source layer (decoder vectors of the layer's
  active features laid out per position) instead of per-node loops;
- the influence ranking is one top-down pass over the rows computed so far (the graph is
  layered), not a power series.

Bias terms: a target's value = Σ incoming edges + a constant that no node carries: its own
encoder bias, decoder biases ``b_dec``, norm/attention biases, and — with `zero_bos` — the
MLP outputs at position 0 when it is BOS or another special token (circuit-tracer: no features
or error there).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from cltrace.attribution.replacement import ReplacementForward, SkipFn, run_replacement
from cltrace.errors import CltraceError
from cltrace.models.loading import LoadedModel

FORMAT_VERSION = 1
NODE_TYPES = ("feature", "error", "embedding", "logit")


# --------------------------------------------------------------------------- config


@dataclass
class AttributionConfig:
    """How `attribute` builds a graph. Saved inside the graph file."""

    max_n_logits: int = 10                    # at most this many logit nodes
    desired_logit_prob: float = 0.95          # ... or fewer, once they cover this probability
    output_targets: tuple[int, ...] | None = None  # token ids to attribute instead of the top logits
    max_feature_nodes: int | None = 4096      # feature targets visited (None: every active feature)
    batch_size: int | None = None             # targets per backward pass (None: from free memory)
    update_interval: int = 16                 # batches between re-rankings of feature influence
                                              # (circuit-tracer: 4 batches of 512 on a GPU)
    prefix_buckets: int = 8                   # prompt prefixes with their own forward (1: none)
    zero_bos: bool = True                     # no features / error at a leading BOS or other
                                              # special token (circuit-tracer's default)
    edge_dtype: Literal["float32", "bfloat16"] = "float32"  # precision of the edge read-out matmuls
    backward_dtype: Literal["float32", "bfloat16"] = "float32"  # bfloat16: autocast backward,
                                              # ~2x faster with AMX, edges to ~1% (not exact)
    progress: bool | None = None              # progress bar (None: when stderr is a terminal)

    def __post_init__(self):
        if self.output_targets is not None:
            self.output_targets = tuple(int(t) for t in self.output_targets)
            if not self.output_targets:
                raise CltraceError("output_targets is empty", "give at least one token or None")
        if self.max_n_logits < 1:
            raise CltraceError(f"max_n_logits must be >= 1, got {self.max_n_logits}")
        if not 0.0 < self.desired_logit_prob <= 1.0:
            raise CltraceError(f"desired_logit_prob must be in (0, 1], got {self.desired_logit_prob}")
        if self.max_feature_nodes is not None and self.max_feature_nodes < 0:
            raise CltraceError(f"max_feature_nodes must be >= 0, got {self.max_feature_nodes}")
        if self.batch_size is not None and self.batch_size < 1:
            raise CltraceError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.prefix_buckets < 1:
            raise CltraceError(f"prefix_buckets must be >= 1, got {self.prefix_buckets}")
        if self.update_interval < 1:
            raise CltraceError(f"update_interval must be >= 1, got {self.update_interval}")
        for name in ("edge_dtype", "backward_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16"):
                raise CltraceError(f"{name} must be float32 or bfloat16, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["output_targets"] = list(self.output_targets) if self.output_targets else None
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AttributionConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# --------------------------------------------------------------------------- graph


@dataclass
class NodeTable:
    """One entry per node, in adjacency order. `feature` is -1 and `activation` NaN where
    meaningless; `token_id` is the prompt token (embeddings) or the output token (logits)."""

    type: list[str]
    layer: Int[Tensor, "node"]         # logits: n_layers; embeddings: -1
    pos: Int[Tensor, "node"]
    feature: Int[Tensor, "node"]
    activation: Float[Tensor, "node"]
    token_id: Int[Tensor, "node"]


@dataclass
class Graph:
    """An unpruned attribution graph (dense, float32, row = target, column = source)."""

    adjacency: Float[Tensor, "node node"]
    active_features: Int[Tensor, "active 3"]      # (layer, pos, feature) of every active feature
    activation_values: Float[Tensor, "active"]
    pre_activations: Float[Tensor, "active"]
    selected_features: Int[Tensor, "selected"]    # indices into active_features, sorted
    logit_tokens: Int[Tensor, "logit"]
    logit_probabilities: Float[Tensor, "logit"]
    logit_values: Float[Tensor, "logit"]          # demeaned pre-softcap logits of the targets
    input_tokens: Int[Tensor, "pos"]
    token_strings: list[str]
    prompt: str
    model_name: str
    transcoder_id: str
    n_layers: int
    config: AttributionConfig
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def n_pos(self) -> int:
        return int(self.input_tokens.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.selected_features.shape[0])

    @property
    def n_errors(self) -> int:
        return self.n_layers * self.n_pos

    @property
    def n_logits(self) -> int:
        return int(self.logit_tokens.shape[0])

    @property
    def n_nodes(self) -> int:
        return self.n_features + self.n_errors + self.n_pos + self.n_logits

    @property
    def error_offset(self) -> int:
        return self.n_features

    @property
    def token_offset(self) -> int:
        return self.n_features + self.n_errors

    @property
    def logit_offset(self) -> int:
        return self.token_offset + self.n_pos

    def nodes(self) -> NodeTable:
        """The node table (built on demand from the compact fields)."""
        L, n, k, F = self.n_layers, self.n_pos, self.n_logits, self.n_features
        feats = self.active_features[self.selected_features]
        err_l = torch.arange(L).repeat_interleave(n)
        err_p = torch.arange(n).repeat(L)
        minus = lambda m: torch.full((m,), -1, dtype=torch.long)  # noqa: E731
        nan = lambda m: torch.full((m,), float("nan"))  # noqa: E731
        return NodeTable(
            type=["feature"] * F + ["error"] * (L * n) + ["embedding"] * n + ["logit"] * k,
            layer=torch.cat([feats[:, 0], err_l, minus(n), torch.full((k,), L)]),
            pos=torch.cat([feats[:, 1], err_p, torch.arange(n), torch.full((k,), n - 1)]),
            feature=torch.cat([feats[:, 2], minus(L * n + n + k)]),
            activation=torch.cat([self.activation_values[self.selected_features].float(),
                                  nan(L * n + n + k)]),
            token_id=torch.cat([minus(F + L * n), self.input_tokens, self.logit_tokens]),
        )

    # ----- persistence: one safetensors file, the JSON metadata in its header (atomic write)

    def _tensors(self) -> dict[str, Tensor]:
        names = ("adjacency", "active_features", "activation_values", "pre_activations",
                 "selected_features", "logit_tokens", "logit_probabilities", "logit_values",
                 "input_tokens")
        return {n: getattr(self, n).detach().cpu().contiguous() for n in names}

    def _meta(self) -> dict[str, Any]:
        return dict(format_version=FORMAT_VERSION, token_strings=self.token_strings,
                    prompt=self.prompt, model_name=self.model_name,
                    transcoder_id=self.transcoder_id, n_layers=self.n_layers,
                    config=self.config.to_dict(), stats=self.stats)

    def save(self, path: str | Path) -> Path:
        """Write the graph to `path` (safetensors, metadata as JSON in the header), atomically."""
        from cltrace.io import atomic_save_tensors

        return atomic_save_tensors(self._tensors(), path,
                                   metadata={"cltrace_graph": json.dumps(self._meta())})

    @classmethod
    def load(cls, path: str | Path) -> "Graph":
        """Read a graph written by `save`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise CltraceError(f"no graph file at {path}", "run `cltrace trace` to build one")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["cltrace_graph"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (KeyError, ValueError, OSError) as err:
            raise CltraceError(f"{path} is not a cltrace graph file ({err})") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise CltraceError(f"{path}: graph format {meta.get('format_version')} is not supported",
                               f"this cltrace reads format {FORMAT_VERSION}")
        meta.pop("format_version")
        meta["config"] = AttributionConfig.from_dict(meta["config"])
        return cls(**tensors, **meta)


# --------------------------------------------------------------------------- features


@dataclass
class ActiveFeatures:
    """Active transcoder features of the prompt, sorted by (layer, pos, feature)."""

    layer: Int[Tensor, "active"]
    pos: Int[Tensor, "active"]
    index: Int[Tensor, "active"]
    activation: Float[Tensor, "active"]
    pre_activation: Float[Tensor, "active"]
    layer_start: list[int]                     # L + 1 offsets: layer l is [start[l], start[l+1])
    errors: Float[Tensor, "layer pos d_model"]  # y - ŷ (zero at BOS with zero_bos)
    decoders: list[Tensor | None]              # per layer: [k_l, T_l, d] decoder rows (raw scale)

    @property
    def n(self) -> int:
        return int(self.layer.shape[0])


def skip_function(transcoder) -> SkipFn | None:
    """The transcoder's skip term per layer as fn(layer, x [..., d]) -> [..., d], or None."""
    if not getattr(transcoder.cfg, "skip", False):
        return None
    if not hasattr(transcoder, "skip_weight"):
        raise CltraceError("this transcoder has a skip connection but no skip_weight(layer) method",
                           "update cltrace.transcoders.model")
    cache: dict[int, Tensor] = {}

    def skip(layer: int, x: Tensor) -> Tensor:
        if layer not in cache:
            cache[layer] = transcoder.skip_weight(layer).detach()
        return x @ cache[layer].to(x.dtype)

    return skip


@torch.no_grad()
def find_active_features(transcoder, fwd: ReplacementForward, skip: SkipFn | None,
                         zero_first: bool, free: int | None = None) -> ActiveFeatures:
    """Encode the recorded MLP inputs, keep the non-zero activations, compute error vectors.

    The reconstruction ``ŷ_l' = Σ_{l<=l'} W_dec[l→l'] a_l + b_dec_l' + skip_l'(x_l')`` is
    built sparsely from the active features only.
    """
    x = fwd.mlp_in_values                                  # [n, L, d]
    pre = transcoder.encode(x)                             # [n, L, F]
    acts = transcoder.activate(pre)
    if zero_first:
        acts[0] = 0
    layer, pos, index = (acts.transpose(0, 1) != 0).nonzero(as_tuple=True)  # sorted (l, p, f)
    L, n = x.shape[1], x.shape[0]
    counts = torch.bincount(layer, minlength=L).tolist()
    layer_start = [0] + torch.tensor(counts).cumsum(0).tolist()
    if free is not None:
        check_source_memory(transcoder, layer, pos, n, x.shape[-1], free)
    recon = transcoder.decoder_bias().detach().to(x.dtype).expand(n, L, -1).clone()  # [n, L, d]
    decoders: list[Tensor | None] = []
    for l in range(L):
        s, e = layer_start[l], layer_start[l + 1]
        if skip is not None:
            recon[:, l] += skip(l, x[:, l])
        if s == e:
            decoders.append(None)
            continue
        dec = transcoder.decoder_weight(l)[index[s:e]].to(x.dtype)          # [k, T, d]
        decoders.append(dec)
        contrib = dec * acts[pos[s:e], l, index[s:e]][:, None, None]
        recon[:, l:l + dec.shape[1]].index_add_(0, pos[s:e], contrib)
    errors = (fwd.mlp_out_values - recon).transpose(0, 1).contiguous()      # [L, n, d]
    if zero_first:
        errors[:, 0] = 0
    return ActiveFeatures(layer=layer, pos=pos, index=index, activation=acts[pos, layer, index],
                          pre_activation=pre[pos, layer, index], layer_start=layer_start,
                          errors=errors, decoders=decoders)


def check_source_memory(transcoder, layer: Tensor, pos: Tensor, n_pos: int, d: int,
                        free: int) -> None:
    """Refuse, before gathering them, source decoders that cannot fit: the gathered rows
    (one [T_l, d] block per active feature) plus the EdgeReader's per-position layout."""
    L = transcoder.cfg.n_layers
    need = 0
    for l in range(L):
        at = pos[layer == l]
        if at.numel() == 0:
            continue
        k_max = int(torch.bincount(at, minlength=n_pos).max())
        row = 4 * transcoder.cfg.n_targets(l) * d
        need += row * (at.numel() + n_pos * k_max)
    if need <= free * 0.85:
        return
    longest = max(1, int(n_pos * free * 0.85 / need))
    raise CltraceError(
        f"the {int(pos.numel()):,} active features of this {n_pos}-token prompt need about "
        f"{need / 2**30:.1f} GiB of decoder vectors but only {free / 2**30:.1f} GiB is free",
        f"use a prompt of at most about {longest} tokens with this transcoder on this machine")


# --------------------------------------------------------------------------- edge read-out


class EdgeReader:
    """Turns the gradients of one backward pass into rows of direct effects.

    Source columns: active features (their order), then errors (layer * n + pos), then
    token embeddings. Feature sources are read with one batched matmul per source layer:
    the decoder vectors of the layer's active features (scaled by their activation) are laid
    out per position, padded to the busiest position: ``dec[l] : [n, k_max, T_l, d]``.
    """

    def __init__(self, feats: ActiveFeatures, embed: Tensor, dtype: torch.dtype):
        self.feats, self.dtype = feats, dtype
        self.n_pos = int(embed.shape[0])
        self.n_layers = len(feats.layer_start) - 1
        self.embed = embed.to(dtype)                                   # [n, d]
        self.errors = feats.errors.to(dtype).contiguous()              # [L, n, d]
        self.n_sources = feats.n + (self.n_layers + 1) * self.n_pos
        self.dec: list[Tensor | None] = []
        self.gather: list[Tensor | None] = []                          # flat (pos, slot) per feature
        self.pos_end: list[Tensor | None] = []                         # features of the layer at pos <= p
        for l in range(self.n_layers):
            self._layout_layer(l)

    @torch.no_grad()
    def _layout_layer(self, l: int) -> None:
        s, e = self.feats.layer_start[l], self.feats.layer_start[l + 1]
        if s == e:
            self.dec.append(None)
            self.gather.append(None)
            self.pos_end.append(None)
            return
        pos = self.feats.pos[s:e]
        counts = torch.bincount(pos, minlength=self.n_pos)
        k_max = int(counts.max())
        first = torch.cumsum(counts, 0) - counts                       # features sorted by pos
        slot = torch.arange(e - s, device=pos.device) - first[pos]
        vecs = self.feats.decoders[l]                                   # [k, T, d], a gathered copy
        vecs.mul_(self.feats.activation[s:e, None, None].to(vecs.dtype))
        dec = torch.zeros(self.n_pos, k_max, *vecs.shape[1:], dtype=self.dtype, device=vecs.device)
        dec[pos, slot] = vecs.to(self.dtype)
        self.feats.decoders[l] = None                                   # freed as the layout grows
        self.dec.append(dec)
        self.gather.append(pos * k_max + slot)
        self.pos_end.append(torch.cumsum(counts, 0).cpu())

    @torch.no_grad()
    def read(self, grad_embed: Float[Tensor, "batch pos d_model"], grad_taps: list[Tensor],
             max_pos: int, out: Float[Tensor, "batch source"]) -> None:
        """Write the direct effects on the batch's targets from every source into `out`.

        Args:
            grad_embed: gradient at the residual entering block 0 ([k, m, d], m > max_pos).
            grad_taps: gradients at the MLP outputs of layers 0..top-1 (later layers: zero).
            max_pos: the largest target position in the batch (later positions have no effect).
            out: zero-initialised rows to fill, [k, n_sources].
        """
        k, P, top = grad_embed.shape[0], max_pos + 1, len(grad_taps)
        n, d = self.n_pos, self.embed.shape[-1]
        g = torch.empty(P, k, top, d, dtype=self.dtype, device=grad_embed.device)  # [P, k, Lt, d]
        for l, gl in enumerate(grad_taps):
            g[:, :, l] = gl[:, :P].transpose(0, 1)
        err0 = self.feats.n
        for l in range(top):
            err = torch.bmm(g[:, :, l], self.errors[l, :P, :, None])          # [P, k, 1]
            out[:, err0 + l * n:err0 + l * n + P] = err[..., 0].T
            self._read_layer(g, l, out)
        tok0 = err0 + self.n_layers * n
        emb = grad_embed[:, :P].transpose(0, 1).to(self.dtype)              # [P, k, d]
        out[:, tok0:tok0 + P] = torch.bmm(emb, self.embed[:P, :, None])[..., 0].T

    def _read_layer(self, g: Tensor, l: int, out: Tensor) -> None:
        """out[:, feature s of layer l] = Σ_j dec[s, j] · g[pos_s, :, l + j] (j < top - l)."""
        dec = self.dec[l]
        if dec is None:
            return
        P, k, top, d = g.shape
        T = min(top - l, dec.shape[2])                                       # tap layers l..l+T-1
        lhs = g[:, :, l:l + T].reshape(P, k, T * d)
        rhs = dec[:P, :, :T].reshape(P, dec.shape[1], T * d)
        res = torch.bmm(lhs, rhs.transpose(1, 2)).transpose(0, 1).reshape(k, -1)  # [k, P*k_max]
        s = self.feats.layer_start[l]
        c = int(self.pos_end[l][P - 1])                                      # features at pos < P
        out[:, s:s + c] = res[:, self.gather[l][:c]]


# --------------------------------------------------------------------------- targets


@dataclass
class LogitTargets:
    tokens: Int[Tensor, "logit"]
    probabilities: Float[Tensor, "logit"]
    values: Float[Tensor, "logit"]             # demeaned pre-softcap logits
    directions: Float[Tensor, "logit d_model"]  # unembedding rows minus their vocab mean


@torch.no_grad()
def logit_targets(lm: LoadedModel, final_last: Float[Tensor, "d_model"],
                  cfg: AttributionConfig) -> LogitTargets:
    """Top tokens until `desired_logit_prob` (at most `max_n_logits`), or `output_targets`."""
    unembed = lm.adapter.unembed(lm.model)
    logits = unembed(final_last[None].to(unembed.weight.dtype))[0].float()
    cap = getattr(lm.model.config.get_text_config(), "final_logit_softcapping", None)
    probs = torch.softmax(torch.tanh(logits / cap) * cap if cap else logits, dim=-1)
    if cfg.output_targets is not None:
        tokens = torch.tensor(cfg.output_targets, device=logits.device)
        if int(tokens.max()) >= logits.shape[0] or int(tokens.min()) < 0:
            raise CltraceError(f"output target ids {list(cfg.output_targets)} are outside the "
                               f"vocabulary (size {logits.shape[0]})")
    else:
        top_p, tokens = torch.topk(probs, min(cfg.max_n_logits, probs.shape[0]))
        cut = int(torch.searchsorted(torch.cumsum(top_p, 0), cfg.desired_logit_prob)) + 1
        tokens = tokens[:cut]
    W = unembed.weight.detach().float()                                  # [V, d]
    directions = W[tokens] - W.mean(0, keepdim=True)
    values = directions @ final_last.float()
    return LogitTargets(tokens=tokens, probabilities=probs[tokens], values=values,
                        directions=directions)


def encoder_rows(transcoder, feats: ActiveFeatures) -> Float[Tensor, "active d_model"]:
    """Each active feature's encoder column (raw scale): what a feature target injects."""
    rows = []
    for l in range(len(feats.layer_start) - 1):
        s, e = feats.layer_start[l], feats.layer_start[l + 1]
        if e > s:
            rows.append(transcoder.encoder_weight(l).detach()[:, feats.index[s:e]].T)
    if not rows:
        return torch.zeros(0, feats.errors.shape[-1], device=feats.errors.device)
    return torch.cat(rows).float()


# --------------------------------------------------------------------------- backward


def backward_batch(fwd: ReplacementForward, layers: Sequence[int], positions: Sequence[int],
                   vectors: Float[Tensor, "k d_model"], n_layers: int):
    """One (vmapped) backward pass: target i injects vectors[i] at (layers[i], positions[i]).

    Layer `n_layers` means the final-norm output (logits). Returns (grad at embed [k, m, d],
    grads at the MLP-output taps of layers 0..top-1, each [k, m, d]) with top = max(layers)
    and m the forward's length.
    """
    k, top = len(layers), max(layers)
    rows = torch.arange(k, device=vectors.device)
    layers_t = torch.tensor(list(layers), device=vectors.device)
    pos_t = torch.tensor(list(positions), device=vectors.device)
    roots, grads = [], []
    for l in sorted(set(layers)):
        root = fwd.final if l == n_layers else fwd.mlp_in[l]     # [1, m, d]
        mask = layers_t == l
        g = root.new_zeros(k, *root.shape)                         # [k, 1, m, d]
        g[rows[mask], 0, pos_t[mask]] = vectors[mask].to(g.dtype)
        roots.append(root)
        grads.append(g)
    inputs = [fwd.embed] + fwd.taps[:top]
    out = torch.autograd.grad(roots, inputs, grads, retain_graph=True, allow_unused=True,
                              is_grads_batched=True)
    out = [x.new_zeros(k, *x.shape[1:]) if g is None else g[:, 0] for g, x in zip(out, inputs)]
    return out[0], out[1:]


class PrefixForwards:
    """Forwards of the replacement model on prefixes of the prompt, built when first needed.

    A target at position p only depends on tokens 0..p (causal model), so its backward pass
    can run through the forward of a prefix of length >= p + 1: with `n_buckets` prefix
    lengths ceil(n k / K), the backward work per target drops from n to about p + n / 2K
    positions. The full-length forward is built first; its values define the graph. With a
    `backward_dtype` other than the model's, the gradient forwards run under autocast.
    """

    def __init__(self, lm: LoadedModel, tokens: Tensor, skip: SkipFn | None, n_buckets: int,
                 backward_dtype: torch.dtype | None = None):
        n = int(tokens.numel())
        k = max(1, min(n_buckets, n))
        self.lengths = sorted({math.ceil(n * i / k) for i in range(1, k + 1)})
        self.lm, self.tokens, self.skip, self.autocast = lm, tokens, skip, backward_dtype
        self.full = run_replacement(lm, tokens, skip=skip)
        self._built: dict[int, ReplacementForward] = {} if backward_dtype else {n: self.full}

    def covering(self, max_pos: int) -> ReplacementForward:
        """The shortest prefix forward that contains position `max_pos`."""
        m = next(m for m in self.lengths if m > max_pos)
        if m not in self._built:
            self._built[m] = run_replacement(self.lm, self.tokens, skip=self.skip, length=m,
                                             autocast_dtype=self.autocast)
        return self._built[m]


# --------------------------------------------------------------------------- influence


@torch.no_grad()
def partial_influence(rows: Float[Tensor, "row source"], row_layer: Int[Tensor, "row"],
                      row_feature: Int[Tensor, "row"], row_weight: Float[Tensor, "row"],
                      n_layers: int) -> Float[Tensor, "source"]:
    """Influence on the logits of every source, from the rows computed so far.

    Rows are targets (features and logits); a target of layer l only has sources of layers
    < l, so one top-down pass over the rows grouped by layer is exact (no power series).

    Args:
        rows: edge rows (absolute values are normalised per row here).
        row_layer: each row's target layer (logits: n_layers).
        row_feature: each row's column index as a source (-1 for logits).
        row_weight: logit probability for logit rows, 0 for feature rows.
    """
    influence = torch.zeros(rows.shape[1], device=rows.device)
    for l in range(n_layers, -1, -1):
        idx = (row_layer == l).nonzero().squeeze(1)
        for chunk in idx.split(512):
            block = rows[chunk].abs()
            block /= block.sum(1, keepdim=True).clamp_min(1e-10)
            feat = row_feature[chunk]
            w = row_weight[chunk] + torch.where(feat >= 0, influence[feat.clamp_min(0)], 0.0)
            influence += w @ block
    return influence


# --------------------------------------------------------------------------- attribute


def prepare_tokens(lm: LoadedModel, prompt: str | Sequence[int] | Tensor) -> Int[Tensor, "pos"]:
    """Token ids [n] of the prompt (a string gets the family's BOS), checked for the model."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise CltraceError("the prompt is empty", "give some text to trace")
        tokens = lm.tokenize(prompt)[0]
    else:
        tokens = torch.as_tensor(prompt, dtype=torch.long).reshape(-1).to(lm.device)
    if tokens.numel() == 0:
        raise CltraceError("the prompt has no tokens", "give some text to trace")
    if int(tokens.min()) < 0 or int(tokens.max()) >= lm.vocab_size:
        raise CltraceError(f"token ids must be in [0, {lm.vocab_size})")
    limit = lm.max_positions
    if limit is not None and tokens.numel() > limit:
        raise CltraceError(f"the prompt has {tokens.numel()} tokens; {lm.name} reads at most {limit}",
                           "shorten the prompt")
    return tokens


def starts_with_special(lm: LoadedModel, tokens: Tensor) -> bool:
    """Is the first token BOS or another special token (circuit-tracer's zero_bos rule)?"""
    special = set(getattr(lm.tokenizer, "all_special_ids", None) or [])
    if lm.bos_token_id is not None:
        special.add(int(lm.bos_token_id))
    return int(tokens[0]) in special


def check_transcoder(lm: LoadedModel, transcoder) -> None:
    """The transcoder must have been made for this model's shape."""
    cfg = transcoder.cfg
    if cfg.n_layers != lm.n_layers or cfg.d_model != lm.d_model:
        raise CltraceError(
            f"the transcoder is for a model with {cfg.n_layers} layers and d_model {cfg.d_model}, "
            f"but {lm.name} has {lm.n_layers} layers and d_model {lm.d_model}",
            f"use a transcoder trained on {lm.name}"
            + (f" (this one was trained on {cfg.model_name})" if getattr(cfg, "model_name", None) else ""))


def available_memory(device: torch.device) -> int:
    """Free bytes on `device`: CUDA's mem_get_info, or MemAvailable from /proc/meminfo."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def choose_batch_size(lm: LoadedModel, n_pos: int, free: int) -> int:
    """Largest sensible batch for the free memory: CPU 32 (matmuls stop gaining), GPU 256."""
    L, d = lm.n_layers, lm.d_model
    heads = int(getattr(lm.model.config.get_text_config(), "num_attention_heads", 8))
    per_row = 4 * (6 * L * n_pos * d + 2 * heads * n_pos * n_pos)   # grads per backward row
    cap = 256 if lm.device.type == "cuda" else 32
    return int(max(1, min(cap, free // 4 // max(per_row, 1))))


def _check_memory(n_rows: int, n_sources: int, n_pos: int, free: int) -> None:
    need = 4 * n_rows * n_sources * 2          # edge rows, then the square adjacency
    if need > free * 0.8:
        max_len = max(1, int(n_pos * math.sqrt(free * 0.8 / need)))
        raise CltraceError(
            f"this graph needs about {need / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB is free",
            f"use a shorter prompt (at most about {max_len} tokens here) or fewer "
            "--max-feature-nodes")


def forward_memory(lm: LoadedModel, n_pos: int) -> int:
    """Bytes the recorded forward (kept for the backward passes) needs for an n-token prompt:
    per layer, eager attention's [heads, n, n] scores/weights and a few [n, d]-wide tensors."""
    cfg = lm.model.config.get_text_config()
    heads = int(getattr(cfg, "num_attention_heads", 8))
    inner = int(getattr(cfg, "intermediate_size", None) or 4 * lm.d_model)
    per_layer = 4 * (4 * heads * n_pos * n_pos + n_pos * (12 * lm.d_model + 4 * inner))
    return lm.n_layers * per_layer


def check_forward_memory(lm: LoadedModel, n_pos: int, free: int) -> None:
    """A prompt whose recorded forward cannot fit is refused before anything is allocated."""
    if forward_memory(lm, n_pos) <= free * 0.6:
        return
    lo, hi = 1, n_pos
    while lo < hi:                                           # longest prompt that fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if forward_memory(lm, mid) <= free * 0.6 else (lo, mid - 1)
    raise CltraceError(
        f"a {n_pos}-token prompt needs about {forward_memory(lm, n_pos) / 2**30:.1f} GiB for its "
        f"forward pass but only {free / 2**30:.1f} GiB is free",
        f"use a prompt of at most about {lo} tokens on this machine")


def attribute(lm: LoadedModel, transcoder, prompt: str | Sequence[int] | Tensor,
              cfg: AttributionConfig | None = None, *, transcoder_id: str = "") -> Graph:
    """Build the attribution graph of `prompt` (METHOD.md §3). See the module docstring."""
    from cltrace.progress import progress

    cfg = cfg or AttributionConfig()
    check_transcoder(lm, transcoder)
    tokens = prepare_tokens(lm, prompt)
    n, L = int(tokens.numel()), lm.n_layers
    free = available_memory(lm.device)
    check_forward_memory(lm, n, free)
    B = cfg.batch_size or choose_batch_size(lm, n, free)
    skip = skip_function(transcoder)
    forwards = PrefixForwards(lm, tokens, skip, cfg.prefix_buckets,
                              torch.bfloat16 if cfg.backward_dtype == "bfloat16" else None)
    fwd = forwards.full                                        # its values define the graph
    zero_first = cfg.zero_bos and starts_with_special(lm, tokens)
    feats = find_active_features(transcoder, fwd, skip, zero_first, free)
    logits = logit_targets(lm, fwd.final_values[-1], cfg)
    n_feat_targets = feats.n if cfg.max_feature_nodes is None else min(cfg.max_feature_nodes, feats.n)
    dtype = torch.bfloat16 if cfg.edge_dtype == "bfloat16" else torch.float32
    reader = EdgeReader(feats, fwd.embed_values, dtype)
    feats.decoders = [None] * L                                # the reader holds a scaled copy
    _check_memory(n_feat_targets + len(logits.tokens), reader.n_sources, n, free)
    state = _Traversal(reader.n_sources, n_feat_targets + len(logits.tokens), lm.device)
    bar = progress(total=n_feat_targets + len(logits.tokens), desc="attribution", unit="node",
                   disable=None if cfg.progress is None else not cfg.progress)
    with bar:
        _visit_logits(forwards, reader, state, logits, B, bar)
        visited = _visit_features(forwards, reader, state, feats, encoder_rows(transcoder, feats),
                                  n_feat_targets, B, cfg.update_interval, bar)
    text = prompt if isinstance(prompt, str) else lm.decode(tokens.tolist())
    return _assemble(lm, tokens, text, feats, logits, state, visited, cfg, transcoder_id, B)


def _visit_logits(forwards: PrefixForwards, reader: EdgeReader, state: "_Traversal",
                  logits: LogitTargets, batch_size: int, bar) -> None:
    """Rows of the logit targets (their directions injected at the last position)."""
    n, L = forwards.full.n_pos, reader.n_layers
    for i in range(0, len(logits.tokens), batch_size):
        vec = logits.directions[i:i + batch_size]
        k = vec.shape[0]
        gin, gtaps = backward_batch(forwards.covering(n - 1), [L] * k, [n - 1] * k, vec, L)
        out = state.add([L] * k, [-1] * k, logits.probabilities[i:i + batch_size].float())
        reader.read(gin, gtaps, n - 1, out)
        bar.update(k)


def _visit_features(forwards: PrefixForwards, reader: EdgeReader, state: "_Traversal",
                    feats: ActiveFeatures, enc: Tensor, budget: int, batch_size: int,
                    update_interval: int, bar) -> Tensor:
    """Rows of up to `budget` feature targets, most influential first; returns the visited mask."""
    L = reader.n_layers
    visited = torch.zeros(feats.n, dtype=torch.bool, device=enc.device)
    while int(visited.sum()) < budget:
        queue = _next_queue(state, feats, visited, budget, batch_size * update_interval, L)
        for batch in queue.split(batch_size):
            lay, pos = feats.layer[batch].tolist(), feats.pos[batch].tolist()
            gin, gtaps = backward_batch(forwards.covering(max(pos)), lay, pos, enc[batch], L)
            out = state.add(lay, batch.tolist(), torch.zeros(len(lay), device=enc.device))
            reader.read(gin, gtaps, max(pos), out)
            bar.update(len(lay))
        visited[queue] = True
    return visited


class _Traversal:
    """Edge rows computed so far, with each row's target layer, feature column and weight."""

    def __init__(self, n_sources: int, n_rows: int, device: torch.device):
        self.rows = torch.zeros(n_rows, n_sources, device=device)
        self.layer = torch.zeros(n_rows, dtype=torch.long, device=device)
        self.feature = torch.full((n_rows,), -1, dtype=torch.long, device=device)
        self.weight = torch.zeros(n_rows, device=device)
        self.count = 0

    def add(self, layers: list[int], features: list[int], weights: Tensor) -> Tensor:
        """Register the next rows' targets; returns the (zero) rows to fill, [k, n_sources]."""
        s, e = self.count, self.count + len(layers)
        self.layer[s:e] = torch.tensor(layers, device=self.rows.device)
        self.feature[s:e] = torch.tensor(features, device=self.rows.device)
        self.weight[s:e] = weights
        self.count = e
        return self.rows[s:e]


def _next_queue(state: _Traversal, feats: ActiveFeatures, visited: Tensor, budget: int,
                size: int, n_layers: int) -> Tensor:
    """The next unvisited features to process, most influential first, sorted by (layer, pos)
    so that each batch's backward pass stops early and reads few source layers."""
    left = budget - int(visited.sum())
    if budget >= feats.n:
        pending = (~visited).nonzero().squeeze(1)              # everything, no ranking needed
    else:
        c = state.count
        infl = partial_influence(state.rows[:c], state.layer[:c], state.feature[:c],
                                 state.weight[:c], n_layers)[:feats.n]
        infl[visited] = -1.0
        pending = torch.argsort(infl, descending=True, stable=True)[:min(size, left)]
    key = feats.layer[pending] * (feats.pos.max() + 1) + feats.pos[pending]
    return pending[torch.argsort(key, stable=True)]


def _assemble(lm: LoadedModel, tokens: Tensor, text: str, feats: ActiveFeatures, logits: LogitTargets,
              state: _Traversal, visited: Tensor, cfg: AttributionConfig, transcoder_id: str,
              batch_size: int) -> Graph:
    """Square adjacency in node order: selected features, errors, tokens, logits."""
    selected = visited.nonzero().squeeze(1)                    # sorted = (layer, pos, feature)
    n_sel, n_src = int(selected.numel()), state.rows.shape[1]
    n_rest, n_log = n_src - feats.n, int(logits.tokens.numel())
    N = n_sel + n_rest + n_log
    c = state.count
    row_of = torch.full((feats.n,), -1, dtype=torch.long, device=selected.device)
    feat_rows = (state.feature[:c] >= 0).nonzero().squeeze(1)
    row_of[state.feature[feat_rows]] = feat_rows
    logit_rows = (state.feature[:c] < 0).nonzero().squeeze(1)
    order = torch.cat([row_of[selected], logit_rows])          # graph row -> traversal row
    keep = torch.cat([selected, torch.arange(feats.n, n_src, device=selected.device)])
    adjacency = torch.zeros(N, N)
    targets = torch.cat([torch.arange(n_sel), torch.arange(N - n_log, N)])
    for chunk in torch.arange(order.numel()).split(1024):      # bounded extra memory
        block = state.rows[order[chunk.to(order.device)]]
        if n_sel < feats.n:
            block = block[:, keep]
        adjacency[targets[chunk], :n_sel + n_rest] = block.cpu()
    return Graph(
        adjacency=adjacency,
        active_features=torch.stack([feats.layer, feats.pos, feats.index], 1).cpu(),
        activation_values=feats.activation.float().cpu(),
        pre_activations=feats.pre_activation.float().cpu(),
        selected_features=selected.cpu(),
        logit_tokens=logits.tokens.cpu(), logit_probabilities=logits.probabilities.float().cpu(),
        logit_values=logits.values.float().cpu(), input_tokens=tokens.cpu(),
        token_strings=lm.token_strings(tokens.tolist()),
        prompt=text, model_name=lm.name, transcoder_id=transcoder_id,
        n_layers=lm.n_layers, config=cfg,
        stats=dict(n_active=feats.n, batch_size=batch_size))
