"""The exactness identities on the bundled gemma-3-270m (slow: loads the real model)."""

from __future__ import annotations

import pytest
import torch

from cltrace.attribution.graph import AttributionConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    from cltrace.models import bundled
    from cltrace.models.loading import load_model

    if bundled.model_status("gemma-3-270m") == "package missing":
        pytest.skip("the gemma-3-270m package is not installed")
    return load_model("gemma-3-270m")


@pytest.mark.parametrize("kind", ["clt", "plt"])
def test_identities_on_gemma_3_270m(gemma, kind):
    from test_attribution import PROMPT, check_identities, make_transcoder

    tc = make_transcoder(gemma, kind, n_features=256, fire=0.02)
    tokens = gemma.tokenize(PROMPT.replace(" :", ":"))[0]
    graph = check_identities(
        gemma, tc, tokens, AttributionConfig(max_feature_nodes=None, progress=False), rtol=1e-4
    )
    assert graph.n_features > 50
    # Gemma's final logit softcapping: probabilities come after it, logit targets before it
    probs = torch.softmax(gemma.run(tokens[None])[0, -1], -1)
    torch.testing.assert_close(graph.logit_probabilities, probs[graph.logit_tokens])
