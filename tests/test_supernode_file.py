"""One supernode file format: what the viewer saves, `cltrace intervene` reads, and back."""

from __future__ import annotations

import json

import pytest

from cltrace.errors import CltraceError
from cltrace.interventions.supernodes import Supernode, load_supernodes, save_supernodes
from cltrace.supernode_file import (
    SupernodeFileError,
    parse_supernodes,
    read_supernodes,
    sidecar_path,
    write_supernodes,
)
from cltrace.viewer.backend import NullBackend
from cltrace.viewer.synthetic import synthetic_graph
from test_viewer_api import _serve, request


def test_viewer_and_interventions_read_each_others_files(tmp_path):
    folder = tmp_path / "graphs"
    (folder / "fact").mkdir(parents=True)
    graph = synthetic_graph(seed=1)
    (folder / "fact" / "dallas.json").write_text(json.dumps(graph))
    ids = [n["node_id"] for n in graph["nodes"][:3]]
    srv = _serve(folder, NullBackend())
    try:
        body = {"supernodes": [{"name": "Texas", "node_ids": ids}]}
        assert request(srv, "POST", "/api/graph/fact/dallas/supernodes", body=body)[0] == 200
        (sn,) = load_supernodes(folder / "fact" / "dallas.json")  # the viewer's file
        assert (sn.name, sn.node_ids) == ("Texas", ids)
        save_supernodes(
            folder / "fact" / "dallas.json", [Supernode("capital", ids[:1])], graph_name="fact/dallas"
        )
        status, reply = request(srv, "GET", "/api/graph/fact/dallas/supernodes")  # and back
        assert status == 200 and reply == {
            "supernodes": [{"name": "capital", "node_ids": ids[:1]}],
            "source": "sidecar",
        }
    finally:
        srv.shutdown()
        srv.server_close()
    saved = json.loads(sidecar_path(folder / "fact" / "dallas.json").read_text())
    assert saved == {"graph": "fact/dallas", "supernodes": [{"name": "capital", "node_ids": ids[:1]}]}


def test_accepted_forms_and_errors(tmp_path):
    groups = [{"name": "a", "node_ids": ["0_1_2"]}]
    assert parse_supernodes({"a": ["0_1_2"]}) == groups
    assert parse_supernodes({"graph": "g", "supernodes": groups}) == groups
    assert parse_supernodes(groups) == groups
    path = write_supernodes(tmp_path / "g.json", groups)
    assert path.name == "g.supernodes.json" and read_supernodes(path) == groups
    for bad in ([{"name": "a"}], [{"name": "a", "node_ids": "0_1_2"}], "x", 3):
        with pytest.raises(SupernodeFileError):
            parse_supernodes(bad)
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CltraceError, match="not valid JSON"):  # shown without a traceback
        read_supernodes(tmp_path / "deep.json")
    with pytest.raises(CltraceError, match="no supernode file"):
        load_supernodes(tmp_path / "missing.json")
