"""The supernode file: named groups of graph node ids, saved beside the graph they belong to.

One format, written by the viewer (`POST /api/graph/<name>/supernodes`) and by
`cltrace.interventions.save_supernodes`, read by both and by `cltrace intervene --supernodes`:

    <graph>.supernodes.json
    {"graph": "<graph name>", "supernodes": [{"name": "Texas", "node_ids": ["3_1022_5", ...]}]}

Readers also accept the hand-written forms `{"Texas": ["3_1022_5", ...]}` and
`[{"name": ..., "node_ids": [...]}]`. Standard library only: the viewer imports it without torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cltrace.errors import CltraceError
from cltrace.io import atomic_write_json

SIDECAR_SUFFIX = ".supernodes.json"
FORMAT_HINT = (
    'a supernode file holds {"supernodes": [{"name": ..., "node_ids": [...]}]} or {name: [node ids]}'
)


class SupernodeFileError(CltraceError, ValueError):
    """A supernode file that is missing, not JSON, or not in the format above."""


def sidecar_path(graph_path: str | Path) -> Path:
    """`graphs/x.json` -> `graphs/x.supernodes.json`."""
    path = Path(graph_path)
    stem = path.name.removesuffix(".json")
    return path.with_name(stem + SIDECAR_SUFFIX)


def write_supernodes(
    graph_path: str | Path, groups: Sequence[Mapping[str, Any]], graph_name: str | None = None
) -> Path:
    """Save `groups` ([{name, node_ids}]) atomically as the sidecar of `graph_path`.

    `graph_name` is recorded in the file (default: the graph file's name without `.json`).
    """
    name = graph_name or Path(graph_path).name.removesuffix(".json")
    return atomic_write_json(
        {"graph": name, "supernodes": parse_supernodes(list(groups))}, sidecar_path(graph_path), indent=1
    )


def read_supernodes(path: str | Path) -> list[dict]:
    """The groups of a supernode file as [{"name": str, "node_ids": [str]}]."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SupernodeFileError(f"no supernode file at {path}", FORMAT_HINT) from None
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise SupernodeFileError(f"{path.name} is not valid JSON: {err}", FORMAT_HINT) from None
    return parse_supernodes(data, where=path.name)


def parse_supernodes(data: Any, where: str = "supernodes") -> list[dict]:
    """Any accepted form -> [{"name": str, "node_ids": [str]}] (SupernodeFileError otherwise)."""
    if isinstance(data, dict) and "supernodes" in data:
        data = data["supernodes"]
    if isinstance(data, dict):
        data = [{"name": k, "node_ids": v} for k, v in data.items()]
    if not isinstance(data, list):
        raise SupernodeFileError(f"{where}: expected a list of groups or an object", FORMAT_HINT)
    return [_group(g, f"{where}[{i}]") for i, g in enumerate(data)]


def _group(group: Any, where: str) -> dict:
    if not isinstance(group, Mapping) or "name" not in group or "node_ids" not in group:
        raise SupernodeFileError(f"{where}: a group needs a name and node_ids", FORMAT_HINT)
    ids = group["node_ids"]
    if not isinstance(ids, list) or not all(isinstance(i, (str, int)) for i in ids):
        raise SupernodeFileError(f"{where}: node_ids must be a list of node id strings", FORMAT_HINT)
    return {"name": str(group["name"]), "node_ids": [str(i) for i in ids]}
