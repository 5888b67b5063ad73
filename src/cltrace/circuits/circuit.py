"""A readable circuit: a handful of named supernodes, the edges between them, and how far the
graph's predictions about them held on the real model (issue 11, METHOD.md §7).

The JSON written by `Circuit.save` is documented field by field in docs/CIRCUIT_FORMAT.md
(`<slug>.circuit.json` beside `<slug>.json` and `<slug>.graph.safetensors`). Python field
names and JSON keys agree except `predicted` / `measured`, written as `predicted_effect` /
`measured_effect`, and the node list, written as `supernodes`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cltrace.errors import CltraceError

FORMAT_VERSION = 1
NodeKind = Literal["features", "embedding", "logit", "error"]
NODE_KINDS = ("features", "embedding", "logit", "error")
FAITHFULNESS_KEYS = ("spearman_supernodes", "spearman_features", "n_supernodes", "n_features")
_JSON_NAMES = {"predicted": "predicted_effect", "measured": "measured_effect"}


@dataclass
class CircuitNode:
    """One supernode of a circuit."""

    id: str  # "sn0", "sn1", ...; "emb:<pos>" for embeddings; "logit" for the answer
    name: str  # readable name from member labels, e.g. "Tokyo · Japan → Japanese"
    kind: NodeKind
    node_ids: list[str]  # member frontend node ids (attribution/export.py)
    positions: list[int]  # token positions covered, sorted
    layers: tuple[int, int] | None  # (min, max) layer of the member features; None for non-features
    evidence: list[str]  # label evidence words (read side and write side)
    influence_share: float  # share of the graph's logit influence carried by the members
    predicted: float | None = None  # graph-predicted change of the answer's logit when ablated
    measured: float | None = None  # measured change of the answer's logit on the real model
    measured_prob: float | None = None  # answer probability after the ablation
    failed: bool | None = None  # prediction failed (sign wrong or far off)

    def __post_init__(self):
        if self.kind not in NODE_KINDS:
            raise CltraceError(f"circuit node kind must be one of {NODE_KINDS}, got {self.kind!r}")
        if self.layers is not None:
            self.layers = (int(self.layers[0]), int(self.layers[1]))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else None
        return {_JSON_NAMES.get(k, k): v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CircuitNode":
        back = {v: k for k, v in _JSON_NAMES.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {back.get(k, k): v for k, v in d.items() if back.get(k, k) in known}
        if kw.get("layers") is not None:
            kw["layers"] = tuple(kw["layers"])
        return cls(**kw)


@dataclass
class CircuitEdge:
    """An edge between two supernodes: the signed sum of the member edges (row = target)."""

    source: str
    target: str
    weight: float

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "target": self.target, "weight": float(self.weight)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CircuitEdge":
        return cls(str(d["source"]), str(d["target"]), float(d["weight"]))


@dataclass
class Circuit:
    """A graph summarised as supernodes; `stats` holds how it was made (config, counts, times)."""

    prompt: str
    tokens: list[str]
    answer: str
    answer_id: int
    answer_prob: float
    model: str
    transcoder: str
    nodes: list[CircuitNode]
    edges: list[CircuitEdge]
    influence_share: float  # share of total logit influence the feature supernodes carry
    faithfulness: dict[str, float | int | None] = field(
        default_factory=lambda: {k: None for k in FAITHFULNESS_KEYS}
    )
    stats: dict[str, Any] = field(default_factory=dict)

    def node(self, node_id: str) -> CircuitNode:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(node_id)

    @property
    def feature_nodes(self) -> list[CircuitNode]:
        return [n for n in self.nodes if n.kind == "features"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "prompt": self.prompt,
            "tokens": list(self.tokens),
            "answer": self.answer,
            "answer_id": int(self.answer_id),
            "answer_prob": float(self.answer_prob),
            "model": self.model,
            "transcoder": self.transcoder,
            "influence_share": float(self.influence_share),
            "faithfulness": dict(self.faithfulness),
            "supernodes": [n.to_dict() for n in self.nodes],
            "edges": [e.to_dict() for e in self.edges],
            "stats": self.stats,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Circuit":
        if d.get("version") != FORMAT_VERSION:
            raise CltraceError(
                f"circuit format {d.get('version')!r} is not supported",
                f"this cltrace reads version {FORMAT_VERSION}; re-run `cltrace trace --circuit`",
            )
        try:
            return cls(
                prompt=d["prompt"],
                tokens=list(d["tokens"]),
                answer=d["answer"],
                answer_id=int(d["answer_id"]),
                answer_prob=float(d["answer_prob"]),
                model=d["model"],
                transcoder=d["transcoder"],
                nodes=[CircuitNode.from_dict(n) for n in d["supernodes"]],
                edges=[CircuitEdge.from_dict(e) for e in d["edges"]],
                influence_share=float(d["influence_share"]),
                faithfulness=dict(d.get("faithfulness") or {}),
                stats=dict(d.get("stats") or {}),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise CltraceError(f"not a cltrace circuit document ({err!r})") from None

    def save(self, path: str | Path) -> Path:
        """Write `<slug>.circuit.json` atomically (indented: circuits are small)."""
        from cltrace.io import atomic_write_json

        return atomic_write_json(self.to_dict(), path, indent=1)

    @classmethod
    def load(cls, path: str | Path) -> "Circuit":
        path = Path(path)
        if not path.is_file():
            raise CltraceError(f"no circuit file at {path}", "run `cltrace trace ... --circuit`")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise CltraceError(f"{path} is not a circuit JSON file ({err})") from None
        return cls.from_dict(data)


def circuit_path(graph_json: str | Path) -> Path:
    """`graphs/x.json` -> `graphs/x.circuit.json` (the SVG is `x.circuit.svg`)."""
    p = Path(graph_json)
    stem = p.name[: -len(".json")] if p.name.endswith(".json") else p.name
    return p.with_name(stem + ".circuit.json")
