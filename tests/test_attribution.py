"""Attribution graphs are exact in the local replacement model (METHOD.md §3).

On tiny random models of every family, with small random transcoders (CLT, PLT, skip CLT)
calibrated so about a third of the features fire:

- every feature's pre-activation = Σ incoming edges + its bias term;
- every demeaned (pre-softcap) logit = Σ incoming edges + its bias term;
- perturbing one source (feature activation, error vector, embedding) in the frozen model,
  with downstream features held fixed, moves every target by the edge's prediction.

The bias term is computed independently: the frozen linear model (replayed patterns and
norm scales) run with every source zeroed. The frozen model itself is checked against the
real model, and the graph's values against an un-hooked forward.
"""

from __future__ import annotations

import math

import pytest
import torch

from cltrace.attribution.graph import AttributionConfig, Graph, attribute, find_active_features, skip_function
from cltrace.attribution.replacement import run_frozen, run_replacement
from cltrace.errors import CltraceError
from cltrace.transcoders.config import TranscoderConfig
from cltrace.transcoders.model import Transcoder
from tiny import FAMILIES, tiny_model

PROMPT = "Fact : the capital of the state containing Dallas is"
KINDS = ("clt", "plt", "skip")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_transcoder(
    lm, kind: str = "clt", n_features: int = 24, fire: float = 0.3, seed: int = 0
) -> Transcoder:
    """A random transcoder with non-trivial biases/scales, calibrated on a few prompts."""
    torch.manual_seed(seed)
    cfg = TranscoderConfig(
        n_layers=lm.n_layers,
        d_model=lm.d_model,
        n_features=n_features,
        kind="plt" if kind == "plt" else "clt",
        skip=kind == "skip",
    )
    tc = Transcoder(cfg)
    texts = [
        PROMPT,
        "the opposite of hot is cold",
        "Michael Jordan plays the sport of basketball",
        "the currency of the country whose capital is Tokyo is the yen",
    ]
    caps = [lm.capture(lm.tokenize(t)) for t in texts]
    x = torch.cat([c.mlp_in[0] for c in caps])
    y = torch.cat([c.mlp_out[0] for c in caps])
    with torch.no_grad():
        for W in tc.W_dec:
            W.mul_(3.0)
        tc.b_dec.normal_(0, 0.05)
        if tc.W_skip is not None:
            tc.W_skip.normal_(0, 0.3 / math.sqrt(lm.d_model))
    tc.init_from_sample(x, y, fire_frac=fire)
    return tc.requires_grad_(False)


def frozen_reference(lm, tc, tokens, zero_bos: bool):
    """The pieces an independent check needs: frozen cache, taps, features, skip."""
    skip = skip_function(tc)
    fwd = run_replacement(lm, tokens, skip=skip, record_frozen=True)
    zero_first = zero_bos and int(tokens[0]) in lm.tokenizer.all_special_ids
    feats = find_active_features(tc, fwd, skip, zero_first)
    rest = fwd.mlp_out_values.clone()  # [n, L, d]: y - skip(x_true)
    if skip is not None:
        for l in range(lm.n_layers):
            rest[:, l] -= skip(l, fwd.mlp_in_values[:, l])
    return fwd, feats, rest, skip, zero_first


def run_with(lm, tokens, fwd, embed, rest, skip):
    """Frozen model with MLP outputs = rest[l] + skip_l(x_l) (downstream features fixed)."""

    def mlp_out(l, x):
        return rest[:, l][None] + (skip(l, x) if skip is not None else 0)

    return run_frozen(lm, tokens, fwd.frozen, embed, mlp_out)


def target_values(graph: Graph, tc, run, logit_dirs) -> torch.Tensor:
    """Pre-activation of every selected feature and demeaned logit under a frozen run."""
    feats = graph.active_features[graph.selected_features]
    vals = []
    for l, p, i in feats.tolist():
        vals.append(run.mlp_in[p, l] @ tc.encoder_weight(l)[:, i] + tc.encoder_bias(l)[i])
    feat_vals = torch.stack(vals) if vals else torch.zeros(0)
    return torch.cat([feat_vals, logit_dirs @ run.final[-1]])


def logit_directions(lm, graph: Graph) -> torch.Tensor:
    W = lm.adapter.unembed(lm.model).weight.float()
    return W[graph.logit_tokens] - W.mean(0, keepdim=True)


def target_rows(graph: Graph) -> torch.Tensor:
    return torch.cat([torch.arange(graph.n_features), torch.arange(graph.logit_offset, graph.n_nodes)])


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return tiny_model(request.param)


@pytest.mark.parametrize("kind", KINDS)
def test_edges_sum_to_targets_and_predict_perturbations(family_model, kind):
    lm = family_model
    graph = check_identities(
        lm,
        make_transcoder(lm, kind),
        lm.tokenize(PROMPT)[0],
        AttributionConfig(max_feature_nodes=None, batch_size=7, progress=False),
    )
    assert graph.n_features > 20, "calibration should make a decent number of features active"


@pytest.mark.parametrize("family", ["gemma", "gpt2"])
def test_identities_hold_with_features_at_bos(family):
    lm = tiny_model(family)
    graph = check_identities(
        lm,
        make_transcoder(lm, "skip"),
        lm.tokenize(PROMPT)[0],
        AttributionConfig(max_feature_nodes=None, zero_bos=False, prefix_buckets=1, progress=False),
    )
    assert (graph.active_features[:, 1] == 0).any()


def check_identities(lm, tc, tokens, cfg: AttributionConfig, rtol: float = 2e-5) -> Graph:
    """Build the graph and check the three exactness identities (module docstring)."""
    graph = attribute(lm, tc, tokens, cfg)
    fwd, feats, rest, skip, zero_first = frozen_reference(lm, tc, tokens, cfg.zero_bos)
    assert torch.equal(torch.stack([feats.layer, feats.pos, feats.index], 1), graph.active_features)
    dirs = logit_directions(lm, graph)
    rows = target_rows(graph)
    A = graph.adjacency.double()

    # bias term: the frozen model with every source zeroed (BOS MLP outputs stay constant)
    const_rest = tc.decoder_bias()[None].expand_as(rest).clone()
    if zero_first:
        const_rest[0] = rest[0]
    zero = run_with(lm, tokens, fwd, torch.zeros_like(fwd.embed_values), const_rest, skip)
    const = target_values(graph, tc, zero, dirs).double()

    # the frozen model at the true sources is the real model
    true = run_with(lm, tokens, fwd, fwd.embed_values, rest, skip)
    real = lm.capture(tokens[None]).mlp_in[0]
    torch.testing.assert_close(true.mlp_in, real, rtol=1e-4, atol=1e-5 * real.abs().max())
    values = target_values(graph, tc, true, dirs).double()
    expected = torch.cat([graph.pre_activations[graph.selected_features], graph.logit_values])
    scale = values.abs().max()
    torch.testing.assert_close(values, expected.double(), rtol=1e-4, atol=1e-5 * scale)
    hidden = lm.model.base_model(input_ids=tokens[None]).last_hidden_state[0, -1]
    torch.testing.assert_close(graph.logit_values, dirs @ hidden, rtol=1e-4, atol=1e-5 * scale)

    # identity 1 and 2: Σ incoming edges + bias term = value
    torch.testing.assert_close(A[rows].sum(1) + const, values, rtol=0, atol=rtol * scale)

    # identity 3: perturb one source by a factor, downstream features held fixed
    for col, kind_, key in _pick_sources(graph):
        new_rest, new_embed = rest.clone(), fwd.embed_values.clone()
        factor = 0.5
        if kind_ == "feature":
            l_s, p_s, i = key
            k = int(((feats.layer == l_s) & (feats.pos == p_s) & (feats.index == i)).nonzero())
            a = feats.activation[k]
            dec = tc.decoder_weight(l_s)[i]  # [T, d]
            new_rest[p_s, l_s : l_s + dec.shape[0]] += factor * a * dec
        elif kind_ == "error":
            l, p = key
            new_rest[p, l] += factor * feats.errors[l, p]
        else:
            new_embed[key] *= 1 + factor
        moved = target_values(graph, tc, run_with(lm, tokens, fwd, new_embed, new_rest, skip), dirs)
        torch.testing.assert_close(
            (moved.double() - values), factor * A[rows, col], rtol=0, atol=rtol * scale
        )
    return graph


def _pick_sources(graph: Graph):
    """A few feature, error and embedding sources with at least one non-zero out-edge."""
    A = graph.adjacency
    out = []
    feats = graph.active_features[graph.selected_features]
    for j in torch.argsort(A[:, : graph.n_features].abs().sum(0), descending=True)[:3].tolist():
        out.append((j, "feature", tuple(feats[j].tolist())))
    err = A[:, graph.error_offset : graph.token_offset].abs().sum(0)
    for j in torch.argsort(err, descending=True)[:2].tolist():
        out.append((graph.error_offset + j, "error", divmod(j, graph.n_pos)))
    for p in (1, graph.n_pos - 1):
        out.append((graph.token_offset + p, "embedding", p))
    return out


def test_graph_layout_and_logits():
    lm = tiny_model("llama")
    tc = make_transcoder(lm, "clt")
    graph = attribute(lm, tc, PROMPT, AttributionConfig(max_feature_nodes=None, progress=False))
    n, L = graph.n_pos, lm.n_layers
    assert graph.n_nodes == graph.n_features + L * n + n + graph.n_logits
    assert graph.adjacency.shape == (graph.n_nodes, graph.n_nodes)
    nodes = graph.nodes()
    assert nodes.type[graph.error_offset] == "error" and nodes.type[-1] == "logit"
    feats = graph.active_features[graph.selected_features]
    key = feats[:, 0] * 10_000 + feats[:, 1] * 100 + feats[:, 2]
    assert torch.all(key[1:] > key[:-1]), "features sorted by (layer, pos, feature)"
    assert (feats[:, 1] > 0).all(), "zero_bos: no features at the BOS position"
    # rows of errors / tokens are empty; no edges from later layers or later positions
    assert graph.adjacency[graph.error_offset : graph.logit_offset].abs().sum() == 0
    lay, pos = nodes.layer, nodes.pos
    src_layer = torch.where(torch.tensor([t == "embedding" for t in nodes.type]), -1, lay)
    tgt = torch.arange(graph.n_features)
    later = (src_layer[None, :] >= lay[tgt, None]) & (
        torch.tensor([t != "embedding" for t in nodes.type])[None]
    )
    assert graph.adjacency[tgt][later].abs().sum() == 0
    assert graph.adjacency[tgt][pos[None, :] > pos[tgt, None]].abs().sum() == 0
    # logits: top tokens until 95% (at most 10), probabilities decreasing
    probs = torch.softmax(lm.run(graph.input_tokens[None])[0, -1], -1)
    top = torch.argsort(probs, descending=True)[: graph.n_logits]
    assert torch.equal(graph.logit_tokens, top)
    assert graph.n_logits == 10 or graph.logit_probabilities.sum() >= 0.95


def test_partial_graph_visits_most_influential_features_first():
    lm = tiny_model("gemma")
    tc = make_transcoder(lm, "clt", n_features=32)
    full = attribute(lm, tc, PROMPT, AttributionConfig(max_feature_nodes=None, progress=False))
    part = attribute(
        lm,
        tc,
        PROMPT,
        AttributionConfig(max_feature_nodes=12, batch_size=4, update_interval=1, progress=False),
    )
    assert part.n_features == 12 and full.n_features > 12
    # the first batch is the 4 features with the largest direct influence on the logits
    from cltrace.attribution.prune import normalize_rows

    logit_rows = normalize_rows(full.adjacency[full.logit_offset :])
    direct = (full.logit_probabilities @ logit_rows)[: full.n_features]
    top4 = set(torch.argsort(direct, descending=True)[:4].tolist())
    assert top4 <= set(part.selected_features.tolist())
    # the rows that were computed are exact: same edges as in the full graph
    sel = part.selected_features
    full_cols = torch.cat([sel, torch.arange(full.n_features, full.n_nodes)])
    torch.testing.assert_close(part.adjacency[:12], full.adjacency[sel][:, full_cols])
    torch.testing.assert_close(
        part.adjacency[-part.n_logits :], full.adjacency[-full.n_logits :][:, full_cols]
    )


def test_output_targets_and_bfloat16_edges():
    lm = tiny_model("qwen2")
    tc = make_transcoder(lm, "clt")
    tok = lm.tokenizer.convert_tokens_to_ids(["Austin", "Dallas"])
    g32 = attribute(
        lm, tc, PROMPT, AttributionConfig(output_targets=tok, max_feature_nodes=None, progress=False)
    )
    assert g32.logit_tokens.tolist() == tok
    for fast in (dict(edge_dtype="bfloat16"), dict(edge_dtype="bfloat16", backward_dtype="bfloat16")):
        g16 = attribute(
            lm,
            tc,
            PROMPT,
            AttributionConfig(output_targets=tok, max_feature_nodes=None, progress=False, **fast),
        )
        err = (g16.adjacency - g32.adjacency).abs().max()
        assert err <= 0.02 * g32.adjacency.abs().max()


def test_save_load_roundtrip(tmp_path):
    lm = tiny_model("gpt2")
    tc = make_transcoder(lm, "plt")
    graph = attribute(
        lm, tc, PROMPT, AttributionConfig(max_feature_nodes=None, progress=False), transcoder_id="tiny-plt"
    )
    path = graph.save(tmp_path / "g.graph.safetensors")
    back = Graph.load(path)
    assert torch.equal(back.adjacency, graph.adjacency)
    assert back.token_strings == graph.token_strings and back.transcoder_id == "tiny-plt"
    assert back.config == graph.config
    assert not list(tmp_path.glob(".*tmp"))


def test_bad_inputs_are_clear_errors():
    lm = tiny_model("llama")
    tc = make_transcoder(lm, "clt")
    with pytest.raises(CltraceError, match="empty"):
        attribute(lm, tc, "   ")
    with pytest.raises(CltraceError, match="at most 128"):
        attribute(lm, tc, [5] * 129)
    other = Transcoder(TranscoderConfig(n_layers=2, d_model=lm.d_model, n_features=8))
    with pytest.raises(CltraceError, match="2 layers"):
        attribute(lm, other, PROMPT)
    with pytest.raises(CltraceError, match="vocabulary"):
        attribute(lm, tc, PROMPT, AttributionConfig(output_targets=(10_000,)))


def test_prompt_too_large_for_memory_names_a_length(monkeypatch):
    import cltrace.attribution.build as build_mod

    lm = tiny_model("llama")
    tc = make_transcoder(lm, "clt")
    monkeypatch.setattr(build_mod, "available_memory", lambda device: 200_000)
    with pytest.raises(CltraceError, match=r"at most about \d+ tokens"):
        attribute(lm, tc, PROMPT, AttributionConfig(max_feature_nodes=None, batch_size=4))
