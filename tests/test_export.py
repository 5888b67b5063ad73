"""Pruned graphs export to JSON that fits Neuronpedia's graph schema."""

from __future__ import annotations

import json

import jsonschema
import pytest

from cltrace.attribution.export import NEURONPEDIA_GRAPH_SCHEMA, to_frontend_json, validate, write_json
from cltrace.attribution.graph import AttributionConfig, attribute
from cltrace.attribution.prune import graph_scores, prune
from shared_files import shared_file


@pytest.fixture(scope="module")
def exported():
    from test_attribution import PROMPT, make_transcoder
    from tiny import tiny_model

    lm = tiny_model("llama")
    graph = attribute(
        lm,
        make_transcoder(lm, "clt"),
        PROMPT,
        AttributionConfig(max_feature_nodes=None, progress=False),
        transcoder_id="tiny-clt",
    )
    res = prune(graph)
    strings = dict(zip(graph.logit_tokens.tolist(), lm.token_strings(graph.logit_tokens.tolist())))
    doc = to_frontend_json(
        graph,
        res,
        slug="tiny",
        logit_strings=strings,
        scores={"pruned": graph_scores(graph, res.node_mask), "unpruned": graph_scores(graph)},
    )
    return graph, res, doc


def test_validates_against_the_schema(exported):
    _, _, doc = exported
    validate(doc)
    jsonschema.Draft7Validator.check_schema(NEURONPEDIA_GRAPH_SCHEMA)


def test_validates_against_the_published_schema(exported):
    """Neuronpedia's own schema file (shared/interop): fails under CI when it is missing."""
    _, _, doc = exported
    published = json.loads(shared_file("interop/neuronpedia-graph-schema.json").read_text())
    jsonschema.validate(doc, published)
    with pytest.raises(jsonschema.ValidationError):  # it can fail
        jsonschema.validate({k: v for k, v in doc.items() if k != "qParams"}, published)


def test_node_ids_are_unique_and_links_resolve(exported):
    graph, res, doc = exported
    ids = [n["node_id"] for n in doc["nodes"]]
    assert len(ids) == len(set(ids))
    assert {n["feature_type"] for n in doc["nodes"]} >= {"embedding", "logit"}
    known = set(ids)
    assert all(l["source"] in known and l["target"] in known for l in doc["links"])
    assert len(doc["links"]) == res.n_edges
    errors = [n for n in doc["nodes"] if n["feature_type"] == "mlp reconstruction error"]
    assert all(n["node_id"].startswith("err_") for n in errors)
    logits = [n for n in doc["nodes"] if n["feature_type"] == "logit"]
    assert len(logits) == graph.n_logits and logits[0]["is_target_logit"]
    assert all(n["node_id"].startswith(f"{graph.n_layers + 1}_") for n in logits)
    emb = [n for n in doc["nodes"] if n["feature_type"] == "embedding"]
    assert len(emb) == graph.n_pos and all(n["node_id"].startswith("E_") for n in emb)


def test_error_ids_cannot_collide_with_layer0_features():
    from cltrace.attribution.export import node_id

    class G:
        n_layers = 3

    # circuit-tracer would write error (layer 5, pos 2) as 0_5_2 = feature 5 of layer 0 at pos 2
    assert node_id(G, "error", 5, 2, -1, -1) != node_id(G, "feature", 0, 2, 5, -1)


def test_invalid_documents_are_rejected(exported):
    _, _, doc = exported
    bad = json.loads(json.dumps(doc))
    del bad["nodes"][0]["jsNodeId"]
    with pytest.raises(ValueError, match="jsNodeId"):
        validate(bad)


def test_write_json_is_atomic(tmp_path, exported):
    _, _, doc = exported
    path = write_json(doc, tmp_path / "g.json")
    assert json.loads(path.read_text())["metadata"]["slug"] == "tiny"
    assert [p.name for p in tmp_path.iterdir()] == ["g.json"]
