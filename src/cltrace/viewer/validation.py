"""Checks on request bodies: every failure is a `BadRequest` whose message names the field."""

from __future__ import annotations

import json
import math
from typing import Any

from cltrace.viewer.backend import Intervention, InterventionRequest
from cltrace.viewer.swap import SwapRequest

MAX_BODY_BYTES = 1 << 20
MAX_INTERVENTIONS = 256
MAX_GENERATE = 256
MAX_VALUE = 1e6
MAX_LAYER = 10_000
MAX_FEATURE = 2**31 - 1
MAX_GROUPS = 500
MAX_GROUP_NODES = 5_000
MAX_GROUP_NAME = 120
MAX_PROMPT = 4_000
MAX_LABEL = 200


class BadRequest(Exception):
    """A request the server refuses with HTTP 400."""


def parse_json(body: bytes) -> dict:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise BadRequest(f"body is not valid JSON: {err}") from err
    except RecursionError:
        raise BadRequest("body is nested too deeply") from None
    if not isinstance(data, dict):
        raise BadRequest("body must be a JSON object")
    return data


def _int(value: Any, field: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BadRequest(f"{field} must be an integer in [{lo}, {hi}]")
    return value


def _list(value: Any, field: str, hi: int, lo: int = 0) -> list:
    if not isinstance(value, list) or not lo <= len(value) <= hi:
        raise BadRequest(f"{field} must be a list of {lo} to {hi} items")
    return value


def _intervention(item: Any, i: int, n_pos: int | None) -> Intervention:
    where = f"interventions[{i}]"
    if not isinstance(item, dict):
        raise BadRequest(f"{where} must be an object")
    layer = _int(item.get("layer"), f"{where}.layer", 0, MAX_LAYER)
    feature = _int(item.get("feature"), f"{where}.feature", 0, MAX_FEATURE)
    pos = item.get("pos")
    if pos is not None:
        pos = _int(pos, f"{where}.pos", 0, (n_pos - 1) if n_pos else MAX_LAYER)
    mode = item.get("mode")
    if mode not in ("set", "scale"):
        raise BadRequest(f"{where}.mode must be 'set' or 'scale'")
    value = item.get("value")
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or abs(value) > MAX_VALUE
    ):
        raise BadRequest(f"{where}.value must be a finite number with |value| <= {MAX_VALUE:g}")
    return Intervention(layer, feature, pos, mode, float(value))


def parse_intervention(data: dict, n_pos: int | None = None) -> InterventionRequest:
    """Validate `{graph, interventions:[{layer, feature, pos|null, mode, value}], generate}`.

    `n_pos`, the prompt length, bounds `pos` when known.
    """
    graph = data.get("graph")
    if not isinstance(graph, str) or not graph:
        raise BadRequest("graph must be a non-empty string")
    items = _list(data.get("interventions"), "interventions", MAX_INTERVENTIONS, lo=1)
    generate = _int(data.get("generate", 0), "generate", 0, MAX_GENERATE)
    freeze = data.get("freeze_attention", False)
    if not isinstance(freeze, bool):
        raise BadRequest("freeze_attention must be true or false")
    return InterventionRequest(
        graph, [_intervention(x, i, n_pos) for i, x in enumerate(items)], generate, freeze
    )


def parse_supernodes(data: dict, node_ids: set[str]) -> list[dict]:
    """Validate `{supernodes: [{name, node_ids: [...]}]}` against the graph's node ids."""
    groups = _list(data.get("supernodes"), "supernodes", MAX_GROUPS)
    clean = []
    for i, group in enumerate(groups):
        where = f"supernodes[{i}]"
        name = _named(group, where)
        ids = _ids(group.get("node_ids"), f"{where}.node_ids", node_ids, lo=1)
        clean.append({"name": name, "node_ids": ids})
    return clean


MAX_SUBGRAPHS = 200


def parse_subgraphs(data: dict, node_ids: set[str]) -> list[dict]:
    """Validate `{subgraphs: [{name, pinnedIds: [id], supernodes: [[name, id, ...]]}]}`
    (Neuronpedia's qParams names) against the graph's node ids."""
    items = _list(data.get("subgraphs"), "subgraphs", MAX_SUBGRAPHS)
    clean = []
    for i, item in enumerate(items):
        where = f"subgraphs[{i}]"
        name = _named(item, where)
        pinned = _ids(item.get("pinnedIds"), f"{where}.pinnedIds", node_ids)
        groups = _list(item.get("supernodes", []), f"{where}.supernodes", MAX_GROUPS)
        supernodes = []
        for k, group in enumerate(groups):
            if not isinstance(group, list) or len(group) < 2 or not isinstance(group[0], str):
                raise BadRequest(f"{where}.supernodes[{k}] must be [name, node id, ...]")
            supernodes.append(
                [group[0][:MAX_GROUP_NAME], *_ids(group[1:], f"{where}.supernodes[{k}]", node_ids)]
            )
        clean.append({"name": name, "pinnedIds": pinned, "supernodes": supernodes})
    return clean


def _named(item: Any, where: str) -> str:
    """`item` must be an object whose `name` has 1 to MAX_GROUP_NAME characters; returns it stripped."""
    if not isinstance(item, dict):
        raise BadRequest(f"{where} must be an object")
    name = item.get("name")
    if not isinstance(name, str) or not 0 < len(name.strip()) <= MAX_GROUP_NAME:
        raise BadRequest(f"{where}.name must be a string of 1 to {MAX_GROUP_NAME} characters")
    return name.strip()


def _ids(value: Any, field: str, node_ids: set[str], lo: int = 0) -> list[str]:
    """At most MAX_GROUP_NODES (and at least `lo`) ids, all in the graph; duplicates dropped in order."""
    ids = _list(value, field, MAX_GROUP_NODES, lo=lo)
    unknown = [x for x in ids if not isinstance(x, str) or x not in node_ids]
    if unknown:
        raise BadRequest(f"{field} has ids not in the graph: {unknown[:3]}")
    return list(dict.fromkeys(ids))


def parse_label(data: dict) -> tuple[str, str]:
    """Validate `{graph, label}` (one line, at most MAX_LABEL characters; "" clears it)."""
    graph, label = data.get("graph"), data.get("label")
    if not isinstance(graph, str) or not graph:
        raise BadRequest("graph must be a non-empty string")
    if not isinstance(label, str) or len(label) > MAX_LABEL or "\n" in label or "\r" in label:
        raise BadRequest(
            f'label must be one line of at most {MAX_LABEL} characters ("" reverts to the automatic label)'
        )
    return graph, label.strip()


def parse_swap(data: dict, node_ids: set[str]) -> SwapRequest:
    """Validate `{graph, node_ids: [...], name?, source_graph | source_prompt, generate?}`."""
    graph = data.get("graph")
    if not isinstance(graph, str) or not graph:
        raise BadRequest("graph must be a non-empty string")
    ids = _list(data.get("node_ids"), "node_ids", MAX_GROUP_NODES, lo=1)
    unknown = [x for x in ids if not isinstance(x, str) or x not in node_ids]
    if unknown:
        raise BadRequest(f"node_ids has ids not in the graph: {unknown[:3]}")
    name = data.get("name")
    if name is not None and (not isinstance(name, str) or len(name) > MAX_GROUP_NAME):
        raise BadRequest(f"name must be a string of at most {MAX_GROUP_NAME} characters")
    source_graph, source_prompt = data.get("source_graph"), data.get("source_prompt")
    if (source_graph is None) == (source_prompt is None):
        raise BadRequest(
            "give the second prompt as source_graph (a graph name) or source_prompt (text), not both"
        )
    for value, key in ((source_graph, "source_graph"), (source_prompt, "source_prompt")):
        if value is not None and (not isinstance(value, str) or not value.strip() or len(value) > MAX_PROMPT):
            raise BadRequest(f"{key} must be a non-empty string of at most {MAX_PROMPT} characters")
    generate = _int(data.get("generate", 0), "generate", 0, MAX_GENERATE)
    return SwapRequest(graph, list(dict.fromkeys(ids)), name or None, source_graph, source_prompt, generate)
