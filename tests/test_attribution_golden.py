"""Attribution graphs stay what they were (a regression pin, not a proof).

tests/data/attribution_golden/<case>/ holds a tiny transcoder and the graph that `attribute`
built from it on a tiny random model (tests/tiny.py) before graph.py was split into modules
(issue 10). Node ids, positions and all metadata must match exactly, float tensors to float
rounding (the pins were made on an AMX CPU; other CPUs' matmul paths round differently, by
~1e-6): a change of node order, of the influence ranking, of batching or of any edge value
shows here even when the exactness tests (test_attribution.py) still pass.

If a change is meant to alter graphs, regenerate the pins (and say why in the commit):
    .venv/bin/python tests/test_attribution_golden.py --regenerate
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from cltrace.attribution.build import attribute
from cltrace.attribution.config import AttributionConfig
from cltrace.attribution.graph import Graph
from cltrace.transcoders.model import Transcoder
from tiny import tiny_model

GOLDEN = Path(__file__).parent / "data" / "attribution_golden"
PROMPT = "Fact : the capital of the state containing Dallas is"

#: (family, transcoder kind, config): influence ranking, prefix forwards, skip, bf16 edges.
CASES = {
    "gemma-plt": ("gemma", "plt", dict(max_feature_nodes=20, batch_size=3, update_interval=2)),
    "gpt2-skip": (
        "gpt2",
        "skip",
        dict(max_feature_nodes=30, batch_size=5, update_interval=1, prefix_buckets=3),
    ),
    "qwen3-clt": ("qwen3", "clt", dict(max_feature_nodes=15, edge_dtype="bfloat16", batch_size=4)),
}

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: pins made with 1 thread


def build(case: str, tc: Transcoder) -> Graph:
    family, _, kw = CASES[case]
    cfg = AttributionConfig(progress=False, **kw)
    return attribute(tiny_model(family), tc, PROMPT, cfg, transcoder_id="t")


@pytest.mark.parametrize("case", sorted(CASES))
def test_graph_matches_its_pin(case):
    graph = build(case, Transcoder.load(GOLDEN / case / "transcoder"))
    ref = Graph.load(GOLDEN / case / "graph.safetensors")
    bf16_edges = CASES[case][2].get("edge_dtype") == "bfloat16"
    for name, value in graph._tensors().items():
        pinned = getattr(ref, name)
        if not value.dtype.is_floating_point:  # node ids, positions, layers: exact
            assert torch.equal(value, pinned), f"{case}: {name} differs from the pin"
            continue
        # float rounding differs between CPU kinds (AMX, AVX512, AVX2 matmul paths): seen here
        # up to 1.4e-6 in float32 and one bf16 step in bf16 edges; a real change is far larger
        rtol = 2**-7 if bf16_edges and name == "adjacency" else 1e-5
        assert value.dtype == pinned.dtype and value.shape == pinned.shape, f"{case}: {name}"
        assert torch.allclose(value, pinned, rtol=rtol, atol=1e-5), f"{case}: {name} differs from the pin"
    assert graph._meta() == ref._meta()


def regenerate() -> None:
    """Write the pins: transcoders made as in test_attribution.make_transcoder, their graphs."""
    from test_attribution import make_transcoder

    torch.set_num_threads(1)
    for case, (family, kind, _) in CASES.items():
        tc = make_transcoder(tiny_model(family), kind)
        tc.save(GOLDEN / case / "transcoder")
        build(case, tc).save(GOLDEN / case / "graph.safetensors")
        print("wrote", GOLDEN / case)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    if sys.argv[1:] == ["--regenerate"]:
        regenerate()
    else:
        print(__doc__)
