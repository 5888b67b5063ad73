// Graph model: parse the Neuronpedia-schema JSON into flat arrays, lay it out, prune it.
//
// Nodes become small objects; links live in typed arrays (100k links stay cheap).
// Rows: embeddings at row 0, transcoder layer l at row l + 1, logits on the top row.

export const TYPES = ["feature", "error", "embedding", "logit"];

function nodeType(featureType) {
  if (featureType === "mlp reconstruction error") return "error";
  if (featureType === "embedding") return "embedding";
  if (featureType === "logit") return "logit";
  return "feature";
}

// A feature's transcoder index: from the id `{layer}_{feature}_{pos}` (circuit-tracer's
// `feature` field holds a Cantor pairing), else the `feature` field.
export function featureIndex(raw) {
  const parts = String(raw.node_id).split("_");
  if (parts.length === 3 && parts.every((p) => /^-?\d+$/.test(p))) return Number(parts[1]);
  return Number.isInteger(raw.feature) ? raw.feature : null;
}

export function buildModel(json) {
  const nodes = json.nodes.map((raw, i) => ({
    i, id: String(raw.node_id), raw, type: nodeType(raw.feature_type),
    layer: raw.layer, ctx: Number(raw.ctx_idx) || 0,
    influence: typeof raw.influence === "number" ? raw.influence : null,
    label: raw.clerp || "", x: 0, y: 0, row: 0, ins: [], outs: [],
  }));
  const byId = new Map(nodes.map((n) => [n.id, n]));
  assignRows(nodes);
  normaliseInfluence(nodes);
  const links = buildLinks(json.links, byId, nodes);
  const tokens = json.metadata.prompt_tokens || [];
  const nPos = nodes.reduce((m, n) => Math.max(m, n.ctx + 1), Math.max(tokens.length, 1));
  const nRows = nodes.reduce((m, n) => Math.max(m, n.row), 1) + 1;
  const ranked = nodes.filter((n) => n.type === "feature" || n.type === "error")
    .sort((x, y) => (x.influence ?? 1) - (y.influence ?? 1));  // strongest first
  return { nodes, byId, links, tokens, nPos, nRows, ranked, metadata: json.metadata };
}

function assignRows(nodes) {
  let maxLayer = 0;
  for (const n of nodes) {
    if (n.type === "feature" || n.type === "error") {
      n.layerNum = parseInt(n.layer, 10) || 0;
      maxLayer = Math.max(maxLayer, n.layerNum);
      n.row = n.layerNum + 1;
    }
  }
  for (const n of nodes) {
    if (n.type === "embedding") n.row = 0;
    if (n.type === "logit") n.row = maxLayer + 2;
  }
}

// Influence in circuit-tracer is the cumulative share of total influence reached when the
// node is included (lower = more important), so `influence <= threshold` keeps a node. Other
// producers may write raw scores; those are turned into cumulative shares by rank.
function normaliseInfluence(nodes) {
  const scored = nodes.filter((n) => n.influence !== null);
  if (scored.every((n) => n.influence >= 0 && n.influence <= 1.0001)) return;
  scored.sort((a, b) => Math.abs(b.influence) - Math.abs(a.influence));
  const total = scored.reduce((s, n) => s + Math.abs(n.influence), 0) || 1;
  let acc = 0;
  for (const n of scored) { acc += Math.abs(n.influence); n.influence = acc / total; }
}

// Links as typed arrays plus, per link, the share of its target's total |weight| carried by
// the target's stronger links (`cumBefore`): a link passes an edge threshold t when
// cumBefore < t, so t = 0.98 keeps the links that make up 98% of each target's input.
function buildLinks(rawLinks, byId, nodes) {
  const keep = rawLinks.filter((l) => byId.has(String(l.source)) && byId.has(String(l.target)));
  const n = keep.length;
  const src = new Int32Array(n), tgt = new Int32Array(n), w = new Float32Array(n);
  keep.forEach((l, j) => {
    src[j] = byId.get(String(l.source)).i; tgt[j] = byId.get(String(l.target)).i;
    w[j] = Number(l.weight) || 0;
    nodes[src[j]].outs.push(j); nodes[tgt[j]].ins.push(j);
  });
  const cumBefore = new Float32Array(n);
  let maxAbs = 0;
  for (const node of nodes) {
    node.ins.sort((a, b) => Math.abs(w[b]) - Math.abs(w[a]));
    const total = node.ins.reduce((s, j) => s + Math.abs(w[j]), 0) || 1;
    let acc = 0;
    for (const j of node.ins) { cumBefore[j] = acc / total; acc += Math.abs(w[j]); }
    node.outs.sort((a, b) => Math.abs(w[b]) - Math.abs(w[a]));
  }
  for (let j = 0; j < n; j++) maxAbs = Math.max(maxAbs, Math.abs(w[j]));
  const order = Uint32Array.from({ length: n }, (_, j) => j)
    .sort((a, b) => Math.abs(w[b]) - Math.abs(w[a]));  // strongest first, for painting
  return { n, src, tgt, w, cumBefore, order, maxAbs: maxAbs || 1 };
}

// Which nodes and links pass the thresholds. Embeddings and logits always show; features and
// errors need influence <= nodeThreshold and at least one visible link.
export function prune(model, nodeThreshold, edgeThreshold) {
  const { nodes, links } = model;
  const pass = new Uint8Array(nodes.length);
  for (const n of nodes) {
    const always = n.type === "embedding" || n.type === "logit";
    pass[n.i] = always || n.influence === null || n.influence <= nodeThreshold ? 1 : 0;
  }
  const linkOn = new Uint8Array(links.n);
  const degree = new Int32Array(nodes.length);
  let nLinks = 0;
  for (let j = 0; j < links.n; j++) {
    const strongEnough = edgeThreshold >= 1 || links.cumBefore[j] < edgeThreshold;
    if (pass[links.src[j]] && pass[links.tgt[j]] && strongEnough) {
      linkOn[j] = 1; nLinks++; degree[links.src[j]]++; degree[links.tgt[j]]++;
    }
  }
  const nodeOn = new Uint8Array(nodes.length);
  let nNodes = 0;
  for (const n of nodes) {
    const always = n.type === "embedding" || n.type === "logit";
    if (pass[n.i] && (always || degree[n.i] > 0)) { nodeOn[n.i] = 1; nNodes++; }
  }
  return { nodeOn, linkOn, nNodes, nLinks };
}

// Positions in CSS pixels: x from ctx_idx, y from the row; nodes sharing a cell form a grid.
export function layout(model, box) {
  const colW = box.width / model.nPos, rowH = box.height / model.nRows;
  const cells = new Map();
  for (const n of model.nodes) {
    const key = n.row * model.nPos + n.ctx;
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(n);
  }
  for (const members of cells.values()) {
    members.sort((a, b) => (a.influence ?? 1) - (b.influence ?? 1));
    placeCell(members, box.left + members[0].ctx * colW, box.top + box.height - (members[0].row + 1) * rowH, colW, rowH);
  }
  return { colW, rowH };
}

function placeCell(members, x0, y0, w, h) {
  const spacing = Math.max(2, Math.min(12, Math.sqrt(((w - 6) * (h - 6)) / members.length)));
  const perRow = Math.max(1, Math.floor((w - 6) / spacing));
  const rows = Math.ceil(members.length / perRow);
  members.forEach((n, k) => {
    const r = Math.floor(k / perRow), c = k % perRow;
    const inRow = Math.min(perRow, members.length - r * perRow);
    n.x = x0 + w / 2 + (c - (inRow - 1) / 2) * spacing;
    n.y = y0 + h / 2 + (r - (rows - 1) / 2) * spacing;
  });
}
