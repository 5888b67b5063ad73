// Small graphs of "units" drawn as SVG: the circuit view (supernodes of <slug>.circuit.json)
// and the pinned-subgraph view. A unit is one node or a merged group of nodes:
//   {id, name, kind: "features"|"feature"|"error"|"embedding"|"logit", nodeIds, pos, row,
//    sub (second text line), failed (bool|null), expandable, expanded}
// Edges are {source, target, weight} between unit ids: width by |weight|, colour by sign.
// Layout: x from the token position, y from the layer (embeddings at the bottom, logits on top;
// only the layers in use get a level).

const SVG = "http://www.w3.org/2000/svg";
const MAX_EDGES = 300;
const BOX_H = 34, PAD = 24;

function svgEl(tag, attrs = {}, text = null) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== null) node.textContent = text;
  return node;
}

// Row of a unit from its member nodes: mean layer + 1, embeddings 0, logits on top.
export function unitRow(members, nRows) {
  if (members.some((n) => n.type === "logit")) return nRows - 1;
  if (members.every((n) => n.type === "embedding")) return 0;
  const inner = members.filter((n) => n.type !== "embedding");
  return inner.reduce((s, n) => s + n.row, 0) / inner.length;
}

export function unitFromNodes(id, name, kind, members, nRows, extra = {}) {
  const pos = members.reduce((s, n) => s + n.ctx, 0) / Math.max(1, members.length);
  return { id, name, kind, nodeIds: members.map((n) => n.id), pos, row: unitRow(members, nRows),
    sub: "", failed: null, expandable: false, expanded: false, ...extra };
}

// Sum the graph's links between units (self-links inside a unit left out).
export function aggregateEdges(model, units, skip = () => false) {
  const owner = new Map();
  for (const u of units) for (const id of u.nodeIds) owner.set(id, u.id);
  const sums = new Map();
  const { links, nodes } = model;
  for (let j = 0; j < links.n; j++) {
    const s = owner.get(nodes[links.src[j]].id), t = owner.get(nodes[links.tgt[j]].id);
    if (s === undefined || t === undefined || s === t || skip(s, t)) continue;
    const key = `${s}\u0000${t}`;
    sums.set(key, (sums.get(key) || 0) + links.w[j]);
  }
  return [...sums].map(([key, weight]) => {
    const [source, target] = key.split("\u0000");
    return { source, target, weight };
  });
}

// Only the rows that hold units get a level (a real circuit often lives in a few of 18+
// layers), so levels are evenly spaced, in layer order, at most MAX_LEVEL_H apart.
const MAX_LEVEL_H = 140;

function levels(units) {
  const rows = [...new Set(units.map((u) => Math.round(u.row * 2) / 2))].sort((a, b) => a - b);
  return new Map(rows.map((r, k) => [r, k]));
}

function layout(units, nPos, nRows, width, height) {
  const level = levels(units);
  const colW = (width - 2 * PAD) / Math.max(1, nPos);
  const levelH = Math.min(MAX_LEVEL_H, (height - 2 * PAD - 30) / Math.max(1, level.size - 1));
  const cells = new Map();
  for (const u of units) {
    u.cx = PAD + (u.pos + 0.5) * colW;
    u.cy = height - PAD - 30 - level.get(Math.round(u.row * 2) / 2) * levelH;
    const key = `${Math.round(u.pos)}:${Math.round(u.row * 2)}`;
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(u);
  }
  for (const group of cells.values()) {  // spread units that share a cell
    group.forEach((u, k) => {
      u.cx += (k - (group.length - 1) / 2) * Math.min(150, colW * 0.9);
      u.cy += (k % 2) * 14;
    });
  }
  spreadRows(units, width);
}

export function boxWidth(u) {
  const label = u.name.length > 34 ? u.name.slice(0, 33) + "…" : u.name;
  return Math.max(60, Math.min(210, 7 * Math.max(label.length, (u.sub || "").length * 0.85) + 16));
}

// Boxes on one row never overlap: sweep left to right, then pull the row back inside the
// width; a row still too wide is staggered up and down.
function spreadRows(units, width) {
  const rows = new Map();
  for (const u of units) {
    u.w = boxWidth(u);
    const key = Math.round(u.cy / BOX_H);
    if (!rows.has(key)) rows.set(key, []);
    rows.get(key).push(u);
  }
  for (const row of rows.values()) {
    row.sort((a, b) => a.cx - b.cx);
    let right = PAD;
    for (const u of row) { u.cx = Math.max(u.cx, right + u.w / 2 + 4); right = u.cx + u.w / 2; }
    const over = right - (width - PAD);
    if (over > 0) {
      let left = PAD;
      for (const u of row) { u.cx = Math.max(left + u.w / 2, u.cx - over); left = u.cx + u.w / 2 + 4; }
    }
    if (right - PAD > width - 2 * PAD) row.forEach((u, k) => { u.cy += k % 2 ? -BOX_H * 0.6 : BOX_H * 0.6; });
    for (const u of row) u.cx = Math.max(PAD + u.w / 2, Math.min(width - PAD - u.w / 2, u.cx));
  }
}

// Draw into `container` (replacing its content). handlers: {click(unit, event), hover(unit|null)}.
export function drawUnits(container, model, units, edges, handlers, opts = {}) {
  const width = container.clientWidth || 800, height = container.clientHeight || 600;
  layout(units, model.nPos, model.nRows, width, height);
  const svg = svgEl("svg", { width, height, viewBox: `0 0 ${width} ${height}`, class: "units",
    "data-testid": opts.testid || "units" });
  drawTokens(svg, model, width, height);
  const byId = new Map(units.map((u) => [u.id, u]));
  const kept = edges.filter((e) => byId.has(e.source) && byId.has(e.target))
    .sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, MAX_EDGES);
  const maxW = kept.reduce((m, e) => Math.max(m, Math.abs(e.weight)), 0) || 1;
  const edgeLayer = svgEl("g", { class: "edges" });
  for (const e of kept) {
    const a = byId.get(e.source), b = byId.get(e.target), rel = Math.abs(e.weight) / maxW;
    if (rel < 0.01) continue;
    const line = svgEl("line", { x1: a.cx, y1: a.cy, x2: b.cx, y2: b.cy,
      class: `edge ${e.weight >= 0 ? "pos" : "neg"}`, "stroke-width": (0.8 + 7 * rel).toFixed(2),
      "stroke-opacity": (0.35 + 0.6 * rel).toFixed(2), "data-source": e.source, "data-target": e.target });
    line.append(svgEl("title", {}, `${a.name} → ${b.name}: ${e.weight.toFixed(3)}`));
    edgeLayer.append(line);
  }
  svg.append(edgeLayer);
  const nodeLayer = svgEl("g", { class: "unit-nodes" });
  for (const u of units) nodeLayer.append(unitBox(u, handlers));
  svg.append(nodeLayer);
  container.replaceChildren(svg);
  return { nEdges: edgeLayer.childElementCount };
}

function unitBox(u, handlers) {
  const label = u.name.length > 34 ? u.name.slice(0, 33) + "…" : u.name;
  const w = u.w;
  const cls = ["unit", u.kind, u.failed ? "failed" : "", u.expanded ? "expanded" : "",
    u.expandable ? "expandable" : "", u.pinned ? "pinned" : ""].filter(Boolean).join(" ");
  const g = svgEl("g", { class: cls, transform: `translate(${u.cx.toFixed(1)},${u.cy.toFixed(1)})`,
    "data-unit": u.id, "data-testid": "unit" });
  g.append(svgEl("rect", { x: -w / 2, y: -BOX_H / 2, width: w, height: BOX_H, rx: u.kind === "features" ? 8 : 3 }));
  g.append(svgEl("text", { class: "name", y: u.sub ? -3 : 4, "text-anchor": "middle" }, label));
  if (u.sub) g.append(svgEl("text", { class: "sub", y: 11, "text-anchor": "middle" }, u.sub));
  g.append(svgEl("title", {}, `${u.name}\n${u.sub || ""}\n${u.nodeIds.length} node(s)` +
    (u.expandable ? (u.expanded ? "\nclick: collapse" : "\nclick: expand into features") : "")));
  g.addEventListener("click", (event) => handlers.click(u, event));
  g.addEventListener("mouseenter", () => handlers.hover && handlers.hover(u));
  g.addEventListener("mouseleave", () => handlers.hover && handlers.hover(null));
  return g;
}

function drawTokens(svg, model, width, height) {
  const colW = (width - 2 * PAD) / Math.max(1, model.nPos);
  const g = svgEl("g", { class: "tokens" });
  for (let p = 0; p < model.nPos; p++) {
    const tok = String(model.tokens[p] ?? "").replace(/\n/g, "⏎");
    const text = tok.length > Math.max(3, colW / 7) ? tok.slice(0, Math.max(2, Math.floor(colW / 7))) + "…" : tok;
    g.append(svgEl("text", { x: PAD + (p + 0.5) * colW, y: height - 10, "text-anchor": "middle" }, text));
  }
  svg.append(g);
}
