"""The notebook API at the package root: lazily imported, and the same results as the library
calls the CLI makes (tiny saved model + transcoder)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

import cltrace
from cltrace.attribution.graph import AttributionConfig, Graph, attribute
from cltrace.features.store import FeatureStore, FeatureStoreConfig, build_feature_store
from cltrace.interventions.steer import Steerer
from test_attribution import make_transcoder
from test_features import documents
from tiny import tiny_model

PROMPT = "the capital of Texas is"


def test_import_cltrace_loads_neither_torch_nor_transformers():
    code = (
        "import sys, cltrace; assert cltrace.__version__; "
        "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules)); "
        "print(sorted(n for n in ('load', 'trace', 'intervene', 'feature') if n in dir(cltrace)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert lines == ["[]", "['feature', 'intervene', 'load', 'trace']"]
    with pytest.raises(AttributeError):
        cltrace.no_such_name  # noqa: B018


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    lm = tiny_model("gemma")
    lm.model.save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    tc = make_transcoder(lm, "clt")
    tc.cfg = dataclasses.replace(tc.cfg, model_name=str(root / "model"))
    tc.save(root / "run" / "transcoder")
    return root, lm, tc


def test_load_trace_intervene_features_match_the_library(saved, tmp_path):
    root, lm, tc = saved
    run = cltrace.load(root / "run", device="cpu")
    assert isinstance(run, cltrace.LoadedRun) and run.model_name == str(root / "model")
    assert run.run.name == "run" and run.device == "cpu"

    traced = cltrace.trace(run, PROMPT, out=tmp_path / "g.json", max_feature_nodes=20)
    direct = attribute(
        lm, tc.requires_grad_(False), PROMPT, AttributionConfig(max_feature_nodes=20), transcoder_id="run"
    )
    torch.testing.assert_close(traced.graph.adjacency, direct.adjacency, rtol=1e-4, atol=1e-5)
    assert traced.graph.transcoder_id == "run" and (tmp_path / "g.json").is_file()
    assert torch.equal(Graph.load(traced.graph_path).adjacency, traced.graph.adjacency)
    assert json.loads((tmp_path / "g.json").read_text())["nodes"]

    iv = cltrace.Intervention(layer=1, feature=3, positions=(-1,), mode="scale", value=0.0)
    got = cltrace.intervene(run, PROMPT, [iv], top_k=4, generate=2)
    want = Steerer(lm, tc).run(PROMPT, [iv], top_k=4, generate=2)
    assert got.to_dict() == want.to_dict() and got.table() == want.table()
    swap = cltrace.swap_interventions(run, PROMPT, "the currency of Japan is", n_auto=3)
    assert swap == Steerer(lm, tc).swap_interventions(PROMPT, "the currency of Japan is", n_auto=3)

    build_feature_store(
        run.run.feature_store,
        lm,
        tc,
        documents=documents(40),
        config=FeatureStoreConfig(context_len=16),
        max_tokens=300,
    )
    with FeatureStore(run.run.feature_store) as store:
        want_card = store.dashboard(2, 5)
    assert cltrace.feature(run, 2, 5) == want_card
    assert cltrace.feature(root / "run", 2, 5) == want_card  # a run folder
    assert cltrace.feature(run.run.feature_store, 2, 5) == want_card  # the store file itself


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(cltrace.errors.CltraceError, match="no transcoder run"):
        cltrace.load(tmp_path / "missing")
