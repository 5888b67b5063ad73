"""Build the attribution graph of a prompt: `attribute`.

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

Node order and the graph file: `cltrace.attribution.graph`.

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

from collections.abc import Sequence

import torch
from torch import Tensor

from cltrace.attribution.active import find_active_features, skip_function
from cltrace.attribution.backward import PrefixForwards
from cltrace.attribution.config import AttributionConfig
from cltrace.attribution.edges import EdgeReader
from cltrace.attribution.graph import Graph
from cltrace.attribution.inputs import check_transcoder, prepare_tokens, starts_with_special
from cltrace.attribution.memory import (
    available_memory,
    check_forward_memory,
    check_graph_memory,
    choose_batch_size,
)
from cltrace.attribution.targets import encoder_rows, logit_targets
from cltrace.attribution.traversal import Traversal
from cltrace.models.loading import LoadedModel
from cltrace.transcoders.interface import TranscoderLike


def attribute(
    lm: LoadedModel,
    transcoder: TranscoderLike,
    prompt: str | Sequence[int] | Tensor,
    cfg: AttributionConfig | None = None,
    *,
    transcoder_id: str = "",
) -> Graph:
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
    forwards = PrefixForwards(
        lm, tokens, skip, cfg.prefix_buckets, torch.bfloat16 if cfg.backward_dtype == "bfloat16" else None
    )
    fwd = forwards.full  # its values define the graph
    zero_first = cfg.zero_bos and starts_with_special(lm, tokens)
    feats = find_active_features(transcoder, fwd, skip, zero_first, free)
    logits = logit_targets(lm, fwd.final_values[-1], cfg)
    n_feat_targets = feats.n if cfg.max_feature_nodes is None else min(cfg.max_feature_nodes, feats.n)
    dtype = torch.bfloat16 if cfg.edge_dtype == "bfloat16" else torch.float32
    reader = EdgeReader(feats, fwd.embed_values, dtype)
    feats.decoders = [None] * L  # the reader holds a scaled copy
    n_rows = n_feat_targets + len(logits.tokens)
    check_graph_memory(n_rows, reader.n_sources, n, free)
    bar = progress(
        total=n_rows,
        desc="attribution",
        unit="node",
        disable=None if cfg.progress is None else not cfg.progress,
    )
    walk = Traversal.start(forwards, reader, feats, logits, encoder_rows(transcoder, feats), B, n_rows, bar)
    with bar:
        walk.visit_logits()
        walk.visit_features(n_feat_targets, cfg.update_interval)
    text = prompt if isinstance(prompt, str) else lm.decode(tokens.tolist())
    return assemble(lm, tokens, text, walk, cfg, transcoder_id)


def square_adjacency(walk: Traversal) -> tuple[Tensor, Tensor]:
    """(adjacency [N, N] on the CPU, selected features) in node order: selected features,
    errors, tokens, logits; the traversal's rows are in visiting order."""
    feats, rows = walk.feats, walk.rows
    selected = walk.visited.nonzero().squeeze(1)  # sorted = (layer, pos, feature)
    n_sel, n_src = int(selected.numel()), rows.rows.shape[1]
    n_rest, n_log = n_src - feats.n, int(walk.logits.tokens.numel())
    N = n_sel + n_rest + n_log
    c = rows.count
    row_of = torch.full((feats.n,), -1, dtype=torch.long, device=selected.device)
    feat_rows = (rows.feature[:c] >= 0).nonzero().squeeze(1)
    row_of[rows.feature[feat_rows]] = feat_rows
    logit_rows = (rows.feature[:c] < 0).nonzero().squeeze(1)
    order = torch.cat([row_of[selected], logit_rows])  # graph row -> traversal row
    keep = torch.cat([selected, torch.arange(feats.n, n_src, device=selected.device)])
    adjacency = torch.zeros(N, N)
    targets = torch.cat([torch.arange(n_sel), torch.arange(N - n_log, N)])
    for chunk in torch.arange(order.numel()).split(1024):  # bounded extra memory
        block = rows.rows[order[chunk.to(order.device)]]
        if n_sel < feats.n:
            block = block[:, keep]
        adjacency[targets[chunk], : n_sel + n_rest] = block.cpu()
    return adjacency, selected


def assemble(
    lm: LoadedModel, tokens: Tensor, text: str, walk: Traversal, cfg: AttributionConfig, transcoder_id: str
) -> Graph:
    """The Graph of a finished traversal."""
    adjacency, selected = square_adjacency(walk)
    feats, logits = walk.feats, walk.logits
    return Graph(
        adjacency=adjacency,
        active_features=torch.stack([feats.layer, feats.pos, feats.index], 1).cpu(),
        activation_values=feats.activation.float().cpu(),
        pre_activations=feats.pre_activation.float().cpu(),
        selected_features=selected.cpu(),
        logit_tokens=logits.tokens.cpu(),
        logit_probabilities=logits.probabilities.float().cpu(),
        logit_values=logits.values.float().cpu(),
        input_tokens=tokens.cpu(),
        token_strings=lm.token_strings(tokens.tolist()),
        prompt=text,
        model_name=lm.name,
        transcoder_id=transcoder_id,
        n_layers=lm.n_layers,
        config=cfg,
        stats=dict(n_active=feats.n, batch_size=walk.batch_size),
    )
