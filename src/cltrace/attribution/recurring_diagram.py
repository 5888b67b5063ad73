"""The merged circuit of a prompt set as a `cltrace.circuits` Circuit (JSON + SVG diagram).

Boxes are the report's merged parts (supernodes matched across prompts when there are any
with coverage >= the report's `min_frequency`, else one part per role), drawn at the
positions their roles have in the first prompt; each name carries the part's coverage.
The answer box lists the prompts' answers. Edge weights are the mean over prompts of the
summed pruned-graph edges between the parts' member features (and into the answer logit).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from cltrace.attribution.recurring import Part, RecurringReport


def _parts(report: RecurringReport) -> list[Part]:
    sn = [p for p in report.parts if p.kind == "supernode" and p.coverage >= report.min_frequency]
    return sn or [p for p in report.parts if p.kind == "role"]


def merged_circuit(report: RecurringReport, n_layers: int, model: str = "", transcoder: str = ""):
    """A Circuit drawing the merged parts with their coverage (None without cltrace.circuits)."""
    try:
        from cltrace.circuits.circuit import Circuit, CircuitEdge, CircuitNode
    except ImportError:
        return None
    ref = report.results[0]
    parts = _parts(report)
    part_of: dict[tuple, str] = {}
    nodes = []
    for i, part in enumerate(parts):
        sid = f"sn{i}"
        for k in part.features:
            part_of.setdefault(tuple(k), sid)
        roles = {k[2] for k in part.features}
        positions = sorted(p for p, r in enumerate(ref.roles) if r in roles)
        layers = [k[0] for k in part.features]
        share = sum(sum(r.features.get(tuple(k), 0.0) for k in part.features) for r in report.results)
        ids = [nid for k in part.features for nid in ref.node_ids.get(tuple(k), [])]
        nodes.append(
            CircuitNode(
                id=sid,
                name=f"{part.name} · {part.coverage:.0%}",
                kind="features",
                node_ids=ids,
                positions=positions,
                layers=(min(layers), max(layers)),
                evidence=[],
                influence_share=share / len(report.results),
            )
        )
    answers = sorted({r.answer for r in report.results})
    last = len(ref.tokens) - 1
    nodes.append(
        CircuitNode(
            id="logit",
            name=" / ".join(answers)[:60],
            kind="logit",
            node_ids=[f"{n_layers + 1}_0_{last}"],
            positions=[last],
            layers=None,
            evidence=[],
            influence_share=1.0,
        )
    )
    totals: dict[tuple[str, str], float] = defaultdict(float)
    for r in report.results:
        for (ks, kt), w in r.edges.items():
            s = part_of.get(ks)
            t = "logit" if kt == ("logit",) else part_of.get(kt)
            if s is not None and t is not None and s != t:
                totals[(s, t)] += w / len(report.results)
    edges = [CircuitEdge(source=s, target=t, weight=w) for (s, t), w in totals.items() if w != 0]
    return Circuit(
        prompt=report.template or ref.prompt,
        tokens=list(ref.tokens),
        answer=" / ".join(answers),
        answer_id=-1,
        answer_prob=sum(r.answer_prob for r in report.results) / len(report.results),
        model=model,
        transcoder=transcoder,
        nodes=nodes,
        edges=edges,
        influence_share=sum(n.influence_share for n in nodes[:-1]),
        stats={"kind": "merged circuit of a prompt set", "n_prompts": len(report.results)},
    )


def write_merged(
    report: RecurringReport, json_path: Path, n_layers: int, model: str = "", transcoder: str = ""
) -> Path | None:
    """`<report>.circuit.json` and `.circuit.svg` beside the report JSON; None without circuits."""
    circuit = merged_circuit(report, n_layers, model, transcoder)
    if circuit is None:
        return None
    from cltrace.circuits.diagram import write_svg

    stem = json_path.name[: -len(".json")] if json_path.name.endswith(".json") else json_path.name
    circuit.save(json_path.with_name(stem + ".circuit.json"))
    return write_svg(circuit, json_path.with_name(stem + ".circuit.svg"))
