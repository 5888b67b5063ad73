"""A circuit as an SVG figure, drawn like the paper's: input tokens at the bottom, supernodes
as labelled boxes placed by token position (x) and layer (y), the answer's logit at the top,
edges as arrows (width: the edge's share of its target's inputs; colour: sign).

Each box shows the supernode's name, its share of the logit influence, its position and
layers, and once validated the graph-predicted and measured change of the answer's logit
("pred -1.9 · meas -1.4"); a failed prediction gets a dashed red border. Pure string
building, as report/svg.py (no plotting dependency).
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape
from pathlib import Path

from cltrace.circuits.circuit import Circuit, CircuitNode

COL_W, BOX_W, LINE_H, PAD = 176, 158, 14, 6
LAYER_H, GAP, LEFT, TOP = 30, 10, 56, 104
EMB_GAP = 2.5  # layer heights between the token row and layer 0 (room for its edges)
POSITIVE, NEGATIVE = "#1c64d9", "#e8590c"
FILL = {"features": "#fff8db", "embedding": "#eef1f4", "logit": "#dcf5df", "error": "#f3f0f7"}
STROKE = {"features": "#8a8f98", "embedding": "#8a8f98", "logit": "#2b8a3e", "error": "#b0a8bb"}
ARROW_SIZES = (8, 12, 16)  # arrowheads for thin, medium and thick edges
MAX_CHARS = 24  # per text line in a box (12px sans-serif in 158px)


@dataclass
class Box:
    node: CircuitNode
    x: float  # centre
    y: float  # top
    lines: list[str]
    n_name: int  # the first lines are the name (bold)

    @property
    def h(self) -> float:
        return len(self.lines) * LINE_H + 2 * PAD

    @property
    def bottom(self) -> float:
        return self.y + self.h


def n_layers_of(circuit: Circuit) -> int:
    """The model's layers, from the logit node's id `{n_layers+1}_{token}_{pos}`."""
    for n in circuit.nodes:
        if n.kind == "logit" and n.node_ids:
            head = n.node_ids[0].split("_")[0]
            if head.isdigit():
                return int(head) - 1
    return 1 + max((n.layers[1] for n in circuit.nodes if n.layers), default=0)


def wrap(text: str, width: int = MAX_CHARS, max_lines: int = 2) -> list[str]:
    """Split a name into at most `max_lines` lines, preferring breaks before "→" and at " · "."""
    if len(text) <= width:
        return [text]
    lines: list[str] = []
    rest = text
    while rest and len(lines) < max_lines:
        if len(rest) <= width:
            lines.append(rest)
            rest = ""
            break
        cut = max(
            rest.rfind(" → ", 0, width + 1), rest.rfind(" · ", 0, width + 1), rest.rfind(" ", 0, width + 1)
        )
        cut = cut if cut > width // 3 else width
        lines.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip(" ·")
    if rest:
        lines[-1] = lines[-1][: width - 1].rstrip() + "…"
    return lines


def _unit(node: CircuitNode) -> str:
    one = {"features": "feature", "error": "error node"}.get(node.kind, "node")
    return one if len(node.node_ids) == 1 else one + "s"


def _signed(x: float) -> str:
    return f"{x:+.2f}".replace("-", "−")


def box_lines(node: CircuitNode, circuit: Circuit) -> tuple[list[str], list[str]]:
    """The text lines of a node's box: (name lines, lines saying where / how much / validation)."""
    if node.kind == "embedding":
        return [repr(node.name)[:MAX_CHARS]], [f"@{node.positions[0]} · {node.influence_share:.0%}"]
    if node.kind == "logit":
        return wrap(f"logit {node.name!r}"), [f"p = {circuit.answer_prob:.3f}"]
    at = f"@{node.positions[0]}" if len(node.positions) == 1 else f"@{node.positions[0]}-{node.positions[-1]}"
    lay = (
        ""
        if node.layers is None
        else (
            f" L{node.layers[0]}"
            if node.layers[0] == node.layers[1]
            else f" L{node.layers[0]}-{node.layers[1]}"
        )
    )
    where = f" · {at}{lay}" if node.evidence or node.kind != "features" else ""  # else in the name
    info = [f"{node.influence_share:.1%}{where} · {len(node.node_ids)} {_unit(node)}"]
    if len(info[0]) > MAX_CHARS + 2:
        info = [f"{node.influence_share:.1%}{where} · n={len(node.node_ids)}"]
    if node.predicted is not None or node.measured is not None:
        pred = "?" if node.predicted is None else _signed(node.predicted)
        meas = "?" if node.measured is None else _signed(node.measured)
        info.append(f"pred {pred} · meas {meas}")
    return wrap(node.name), info


def layout(circuit: Circuit) -> tuple[list[Box], float, float, list[int]]:
    """Boxes placed by position (column) and layer (row); overlaps in a column pushed up."""
    L = n_layers_of(circuit)
    cols = sorted({p for n in circuit.nodes for p in n.positions})
    col_of = {p: k for k, p in enumerate(cols)}
    base = TOP + (L + 1 + EMB_GAP) * LAYER_H  # top of the embedding row
    boxes = []
    for n in circuit.nodes:
        x = LEFT + COL_W * (sum(col_of[p] for p in n.positions) / len(n.positions) + 0.5)
        name, info = box_lines(n, circuit)
        lines = name + info
        h = len(lines) * LINE_H + 2 * PAD
        if n.kind == "embedding":
            y = base
        elif n.kind == "logit":
            y = TOP - h / 2
        else:
            mid = (n.layers[0] + n.layers[1]) / 2 if n.layers else L / 2
            y = base - (mid + EMB_GAP) * LAYER_H - h / 2
        boxes.append(Box(n, x, y, lines, len(name)))
    _push_up(boxes)
    shift = max(0.0, TOP - min(b.y for b in boxes)) if boxes else 0.0
    for b in boxes:
        b.y += shift
    width = LEFT + COL_W * max(len(cols), 1) + 20
    height = max((b.bottom for b in boxes), default=base) + 70
    return boxes, width, height, cols


def _push_up(boxes: list[Box]) -> None:
    """Within each column, move a box up until it clears the boxes below it."""
    for x in {round(b.x) for b in boxes}:
        column = sorted(
            (b for b in boxes if round(b.x) == x and b.node.kind != "embedding"), key=lambda b: -b.bottom
        )
        floor = min((b.y for b in boxes if round(b.x) == x and b.node.kind == "embedding"), default=1e9)
        for b in column:
            if b.bottom > floor - GAP:
                b.y = floor - GAP - b.h
            floor = b.y
    logit = [b for b in boxes if b.node.kind == "logit"]
    others = [b for b in boxes if b.node.kind != "logit"]
    for lb in logit:  # the answer stays above everything
        top = min((b.y for b in others), default=lb.bottom + GAP)
        lb.y = min(lb.y, top - 3 * GAP - lb.h)


def _edge_paths(circuit: Circuit, boxes: dict[str, Box]) -> list[str]:
    into: dict[str, float] = {}
    for e in circuit.edges:
        into[e.target] = into.get(e.target, 0.0) + abs(e.weight)
    out = []
    for e in sorted(circuit.edges, key=lambda e: abs(e.weight) / max(into[e.target], 1e-30)):
        s, t = boxes.get(e.source), boxes.get(e.target)
        if s is None or t is None:
            continue
        frac = abs(e.weight) / max(into[e.target], 1e-30)
        width = 0.8 + 7.0 * frac
        colour, marker = (POSITIVE, "pos") if e.weight >= 0 else (NEGATIVE, "neg")
        marker += str(0 if width < 2.5 else 1 if width < 5 else 2)
        x1, y1 = s.x, s.y
        x2, y2 = t.x, t.bottom + 5
        if y2 > y1:  # target not above: go round the side
            x1, y1 = s.x + BOX_W / 2, s.y + s.h / 2
            x2, y2 = t.x + BOX_W / 2, t.y + t.h / 2
            c = max(40.0, abs(y2 - y1) / 2)
            d = f"M{x1:.1f},{y1:.1f} C{x1 + c:.1f},{y1:.1f} {x2 + c:.1f},{y2:.1f} {x2 + 4:.1f},{y2:.1f}"
        else:
            dy = (y1 - y2) / 2
            d = f"M{x1:.1f},{y1:.1f} C{x1:.1f},{y1 - dy:.1f} {x2:.1f},{y2 + dy:.1f} {x2:.1f},{y2:.1f}"
        tip = f"{e.source} → {e.target}: {e.weight:+.3g} ({frac:.0%} of its inputs here)"
        out.append(
            f'<path d="{d}" fill="none" stroke="{colour}" stroke-width="{width:.1f}" '
            f'stroke-opacity="0.55" marker-end="url(#{marker})"><title>{escape(tip)}</title></path>'
        )
    return out


def _box_svg(b: Box) -> str:
    n = b.node
    stroke, dash, sw = STROKE[n.kind], "", 1.2
    if n.failed is True:
        stroke, dash, sw = "#e03131", ' stroke-dasharray="6 3"', 2.4
    elif n.failed is False:
        stroke, sw = "#2b8a3e", 1.8
    tip = (
        f"{n.name}\n{len(n.node_ids)} nodes: {' '.join(n.node_ids[:12])}"
        + ("…" if len(n.node_ids) > 12 else "")
        + (f"\nevidence: {', '.join(n.evidence)}" if n.evidence else "")
    )
    parts = [
        f'<g class="node {n.kind}" id="{escape(n.id)}"><title>{escape(tip)}</title>',
        f'<rect x="{b.x - BOX_W / 2:.1f}" y="{b.y:.1f}" width="{BOX_W}" height="{b.h:.1f}" rx="6" '
        f'fill="{FILL[n.kind]}" stroke="{stroke}" stroke-width="{sw}"{dash}/>',
    ]
    for k, line in enumerate(b.lines):
        weight = ' font-weight="bold"' if k < b.n_name else ""
        colour = "#222" if weight else "#555"
        parts.append(
            f'<text x="{b.x:.1f}" y="{b.y + PAD + (k + 1) * LINE_H - 3:.1f}" text-anchor="middle" '
            f'fill="{colour}"{weight}>{escape(line)}</text>'
        )
    return "".join(parts) + "</g>"


def header_lines(circuit: Circuit) -> list[str]:
    """The figure's title and the lines under it (influence shares, faithfulness)."""
    title = f"{circuit.prompt!r} → {circuit.answer!r} (p = {circuit.answer_prob:.3f})"
    st, f = circuit.stats, circuit.faithfulness or {}
    n_feat = st.get("n_grouped_features")
    lines = [
        title[:140],
        f"{len(circuit.feature_nodes)} supernodes"
        + (f" ({n_feat} features)" if n_feat is not None else "")
        + f" carry {circuit.influence_share:.0%} of the influence on the logits through features and errors",
    ]
    rest = []
    if st.get("error_share") is not None:
        rest.append(f"error nodes carry {st['error_share']:.0%}")
    if st.get("dropped_share") is not None:
        rest.append(f"pruned-graph features in no supernode {st['dropped_share']:.0%}")
    if rest:
        lines.append("; ".join(rest))
    if f.get("spearman_supernodes") is not None:
        line = f"predicted vs measured ablation effect (Spearman): supernodes {f['spearman_supernodes']:.2f}"
        if f.get("spearman_features") is not None:
            line += f", top features {f['spearman_features']:.2f}"
        lines.append(line)
    else:
        lines.append("not validated on the model")
    return lines


def _header(lines: list[str]) -> list[str]:
    out = [f'<text x="12" y="22" font-size="14" font-weight="bold">{escape(lines[0])}</text>']
    out += [f'<text x="12" y="{40 + 15 * k}" fill="#444">{escape(t)}</text>' for k, t in enumerate(lines[1:])]
    return out


def _axes(circuit: Circuit, boxes: list[Box], cols: list[int], height: float) -> list[str]:
    L = n_layers_of(circuit)
    base = max((b.y for b in boxes if b.node.kind == "embedding"), default=TOP + (L + 1 + EMB_GAP) * LAYER_H)
    out = []
    for layer in range(0, L, max(1, L // 6)):
        y = base - (layer + EMB_GAP) * LAYER_H
        out.append(
            f'<text x="8" y="{y + 4:.1f}" fill="#999" font-size="10">L{layer}</text>'
            f'<line x1="32" y1="{y:.1f}" x2="40" y2="{y:.1f}" stroke="#ccc"/>'
        )
    for k, p in enumerate(cols):
        x = LEFT + COL_W * (k + 0.5)
        tok = circuit.tokens[p] if 0 <= p < len(circuit.tokens) else "?"
        out.append(
            f'<text x="{x:.1f}" y="{height - 44:.1f}" text-anchor="middle" fill="#333">'
            f"{escape(repr(tok)[:MAX_CHARS])}</text>"
            f'<text x="{x:.1f}" y="{height - 31:.1f}" text-anchor="middle" fill="#999" '
            f'font-size="10">position {p}</text>'
        )
    legend_y = height - 12
    out.append(
        f'<line x1="12" y1="{legend_y - 4}" x2="36" y2="{legend_y - 4}" stroke="{POSITIVE}" '
        'stroke-width="3"/>'
        f'<text x="40" y="{legend_y}" fill="#555" font-size="10">excites</text>'
        f'<line x1="92" y1="{legend_y - 4}" x2="116" y2="{legend_y - 4}" stroke="{NEGATIVE}" '
        'stroke-width="3"/>'
        f'<text x="120" y="{legend_y}" fill="#555" font-size="10">inhibits (width: share of the '
        f"target's inputs)</text>"
        f'<rect x="330" y="{legend_y - 10}" width="18" height="10" fill="none" stroke="#e03131" '
        f'stroke-dasharray="4 2" stroke-width="2"/>'
        f'<text x="352" y="{legend_y}" fill="#555" font-size="10">prediction failed</text>'
    )
    return out


def circuit_svg(circuit: Circuit) -> str:
    """The SVG document of a circuit (module docstring)."""
    boxes, width, height, cols = layout(circuit)
    head = header_lines(circuit)
    width = max(width, 560, 12 + 7.2 * len(head[0]), 12 + 6.3 * max(len(t) for t in head[1:]))
    by_id = {b.node.id: b for b in boxes}
    marker = (
        '<marker id="{0}" viewBox="0 0 10 10" refX="7" refY="5" markerUnits="userSpaceOnUse" '
        'markerWidth="{2}" markerHeight="{2}" orient="auto">'
        '<path d="M0,0 L10,5 L0,10 z" fill="{1}"/></marker>'
    )
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="sans-serif" font-size="12">',
        "<defs>"
        + "".join(
            marker.format(f"{name}{k}", colour, size)
            for name, colour in (("pos", POSITIVE), ("neg", NEGATIVE))
            for k, size in enumerate(ARROW_SIZES)
        )
        + "</defs>",
        f'<rect width="{width:.0f}" height="{height:.0f}" fill="white"/>',
    ]
    parts += _header(head)
    parts += _axes(circuit, boxes, cols, height)
    parts += _edge_paths(circuit, by_id)
    parts += [_box_svg(b) for b in boxes]
    parts.append("</svg>")
    return "\n".join(parts)


def write_svg(circuit: Circuit, path: str | Path) -> Path:
    """Write the circuit's SVG to `path` atomically."""
    from cltrace.io import atomic_write_text

    return atomic_write_text(path, circuit_svg(circuit))
