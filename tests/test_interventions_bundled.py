"""Steering on the bundled model moves the logits as the attribution graph's edges predict."""

import pytest
import torch

pytestmark = pytest.mark.slow

PROMPT = "The Eiffel Tower is located in the city of"


@pytest.fixture(scope="module")
def setup():
    from cltrace.models.bundled import BUNDLED, model_status
    from cltrace.models.loading import load_model
    from cltrace.transcoders.config import TranscoderConfig
    from cltrace.transcoders.model import Transcoder

    if model_status("gemma-3-270m") == "package missing":
        pytest.skip(f"install {BUNDLED['gemma-3-270m'].package} to run the bundled-model tests")
    lm = load_model("gemma-3-270m")
    torch.manual_seed(0)
    tc = Transcoder(TranscoderConfig(n_layers=lm.n_layers, d_model=lm.d_model, n_features=128))
    cap = lm.capture(lm.tokenize("Paris is the capital of France, and Berlin is the capital of Germany."))
    x, y = cap.mlp_in[0, 1:], cap.mlp_out[0, 1:]  # [n, L, d], BOS left out
    tc.init_from_sample(x, y, fire_frac=0.1)
    with torch.no_grad():  # decoders sized so features matter: a few % of the MLP output each
        for W in tc.W_dec:
            W.mul_(5.0)
    return lm, tc.requires_grad_(False)


def demeaned(logits: torch.Tensor, token: int) -> float:
    return float(logits[token] - logits.mean())


def test_steering_follows_graph_edges(setup):
    """Halving a feature's activation, with the MLPs downstream clamped to their values except
    for the feature's own decoder writes (constrained patching), moves the top logit by
    δ/a · A: the sign always, the size up to the attention patterns and norm denominators
    that the real model recomputes and the graph freezes. (Without the clamp, a random
    transcoder's features leave the real MLPs' responses unexplained, so only the constrained
    effect is the graph's to predict.)"""
    from cltrace.attribution.graph import AttributionConfig, attribute
    from cltrace.interventions.steer import Intervention, Steerer

    lm, tc = setup
    graph = attribute(lm, tc, PROMPT, AttributionConfig(max_feature_nodes=512))
    nodes = graph.nodes()
    token = int(graph.logit_tokens[0])
    row = graph.adjacency[graph.logit_offset, : graph.n_features]  # edges into the top logit
    steerer = Steerer(lm, tc)
    tokens = steerer.tokens(PROMPT)
    base = demeaned(steerer.logits(tokens)[0, -1], token)
    ratios = []
    for i in row.abs().argsort(descending=True)[:8].tolist():
        layer, feature, pos = int(nodes.layer[i]), int(nodes.feature[i]), int(nodes.pos[i])
        iv = Intervention(layer, feature, (pos,), "scale", 0.5)  # δ = -a/2
        after = steerer.logits(tokens, [iv], constrain_until=lm.n_layers - 1)[0, -1]
        got, want = demeaned(after, token) - base, -0.5 * float(row[i])
        assert got * want > 0, (layer, pos, feature, got, want)
        ratios.append(got / want)
    assert all(0.25 <= r <= 3.0 for r in ratios), ratios
    assert 0.6 <= sorted(ratios)[len(ratios) // 2] <= 1.5, ratios
