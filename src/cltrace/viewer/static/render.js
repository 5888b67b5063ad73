// Canvas drawing on stacked canvases: links (painted progressively by LinkPainter), nodes +
// axes (redrawn when the pruning, the size or the view changes) and an overlay (hover,
// selection, pins, paths, labels, box; redrawn often). Links are batched into a few paths by
// sign and width per chunk. Every position goes through the view transform `tf` = {k, x, y}:
// screen = layout position * k + (x, y); node sizes stay constant on screen.

export const COLORS = {
  feature: "#e0a030", error: "#9aa0a6", embedding: "#2e9e6a", logit: "#7b4fd6",
  positive: "37, 99, 235", negative: "220, 38, 38", selected: "#111", hover: "#f43f5e",
  pinned: "#0f766e", match: "#db2777", path: "#111",
};
const LABEL_COUNT = 12;  // labels drawn at zoom 1 (strongest nodes first)
export const MARGIN = { left: 70, right: 16, top: 16, bottom: 56 };
export const IDENTITY = { k: 1, x: 0, y: 0 };
export const sx = (n, tf) => n.x * tf.k + tf.x;
export const sy = (n, tf) => n.y * tf.k + tf.y;
const WIDTH_BINS = [0.05, 0.2, 0.5, Infinity];  // |w| / max |w|
const GROUP_COLORS = ["#0ea5e9", "#10b981", "#f97316", "#a855f7", "#ec4899", "#84cc16"];

export function sizeCanvas(canvas, width, height) {
  const dpr = window.devicePixelRatio || 1;
  canvas.width = Math.round(width * dpr); canvas.height = Math.round(height * dpr);
  canvas.style.width = `${width}px`; canvas.style.height = `${height}px`;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  return ctx;
}

// Axes and nodes: cheap, redrawn in one go.
export function drawNodesLayer(ctx, model, view, size, tf = IDENTITY) {
  ctx.clearRect(0, 0, size.width, size.height);
  drawAxes(ctx, model, size, tf);
  drawNodes(ctx, model, view.nodeOn, tf);
}

function drawAxes(ctx, model, size, tf) {
  const colW = size.grid.colW * tf.k, rowH = size.grid.rowH * tf.k;
  ctx.font = "11px system-ui, sans-serif"; ctx.fillStyle = "#555"; ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (let r = 0; r < model.nRows; r++) {
    const y = (MARGIN.top + size.box.height) * tf.k + tf.y - (r + 0.5) * rowH;
    if (y < 0 || y > size.height) continue;
    const label = r === 0 ? "Emb" : r === model.nRows - 1 ? "Logit" : `L${r - 1}`;
    ctx.fillText(label, MARGIN.left - 8, y);
    ctx.strokeStyle = "#f0f0f0"; ctx.beginPath();
    ctx.moveTo(MARGIN.left, y + rowH / 2); ctx.lineTo(size.width - MARGIN.right, y + rowH / 2);
    ctx.stroke();
  }
  ctx.textAlign = "center"; ctx.textBaseline = "top";
  ctx.fillStyle = "rgba(255,255,255,0.85)";
  ctx.fillRect(0, size.height - MARGIN.bottom + 4, size.width, MARGIN.bottom - 4);
  ctx.fillStyle = "#222";
  for (let p = 0; p < model.nPos; p++) {
    const x = (MARGIN.left + (p + 0.5) * size.grid.colW) * tf.k + tf.x;
    if (x < -colW || x > size.width + colW) continue;
    const token = String(model.tokens[p] ?? "").replace(/\n/g, "⏎");
    ctx.fillText(fitText(ctx, token, colW - 4), x, size.height - MARGIN.bottom + 8);
  }
}

function fitText(ctx, text, width) {
  if (ctx.measureText(text).width <= width) return text;
  let cut = text;
  while (cut.length > 1 && ctx.measureText(cut + "…").width > width) cut = cut.slice(0, -1);
  return cut + "…";
}

// Links are painted in chunks, strongest first, so the page answers input while 100k links
// are still arriving. The first (strongest) chunk goes on its own canvas above the rest:
// compositing later chunks *under* it with destination-over is ~8x slower in software.
// Strokes wider than 1 px take the slow general stroker (far slower than hairlines in
// software rendering), so only the strongest links get width.
const CHUNK = 8000;
const WIDTHS = [0.6, 1, 1, 2];

export class LinkPainter {
  constructor() { this.job = 0; }

  // Paint `view`'s links: the strongest chunk on `strongCtx`, the rest on `weakCtx`.
  // Resolves true when done, false when a newer paint superseded it.
  paint(strongCtx, weakCtx, model, view, size, tf = IDENTITY) {
    const job = ++this.job;
    strongCtx.clearRect(0, 0, size.width, size.height);
    weakCtx.clearRect(0, 0, size.width, size.height);
    const alpha = view.nLinks > 20000 ? 0.15 : view.nLinks > 2000 ? 0.25 : 0.45;
    let k = paintChunk(strongCtx, model, view, 0, alpha, tf);
    return new Promise((resolve) => {
      const step = () => {
        if (job !== this.job) return resolve(false);
        if (k >= model.links.n) return resolve(true);
        k = paintChunk(weakCtx, model, view, k, alpha, tf);
        requestAnimationFrame(step);
      };
      requestAnimationFrame(step);
    });
  }
}

// Paint up to CHUNK visible links from position k of the strongest-first order.
function paintChunk(ctx, model, view, k, alpha, tf) {
  const { links, nodes } = model;
  const paths = WIDTHS.map(() => [new Path2D(), new Path2D()]);  // [bin][positive, negative]
  let drawn = 0;
  for (; k < links.n && drawn < CHUNK; k++) {
    const j = links.order[k];
    if (!view.linkOn[j]) continue;
    const a = nodes[links.src[j]], b = nodes[links.tgt[j]];
    const rel = Math.abs(links.w[j]) / links.maxAbs;
    const bin = WIDTH_BINS.findIndex((edge) => rel < edge);
    const path = paths[bin][links.w[j] >= 0 ? 0 : 1];
    path.moveTo(a.x * tf.k + tf.x, a.y * tf.k + tf.y); path.lineTo(b.x * tf.k + tf.x, b.y * tf.k + tf.y);
    drawn++;
  }
  for (let bin = WIDTHS.length - 1; bin >= 0; bin--) {
    ctx.lineWidth = WIDTHS[bin];
    const a = Math.min(1, alpha + bin * 0.15);
    ctx.strokeStyle = `rgba(${COLORS.positive}, ${a})`; ctx.stroke(paths[bin][0]);
    ctx.strokeStyle = `rgba(${COLORS.negative}, ${a})`; ctx.stroke(paths[bin][1]);
  }
  return k;
}

function drawNodes(ctx, model, nodeOn, tf) {
  const paths = { feature: new Path2D(), error: new Path2D(), embedding: new Path2D(), logit: new Path2D() };
  for (const n of model.nodes) {
    if (nodeOn[n.i]) shape(paths[n.type], n, tf);
  }
  ctx.lineWidth = 0.6; ctx.strokeStyle = "rgba(0,0,0,0.45)";
  for (const [type, path] of Object.entries(paths)) {
    ctx.fillStyle = COLORS[type]; ctx.fill(path); ctx.stroke(path);
  }
}

export function nodeRadius(n) {
  if (n.type === "logit" && n.raw.is_target_logit) return 7;
  return n.type === "feature" ? 3.5 : 4.5;
}

// feature: circle, error: square, embedding: diamond, logit: triangle.
export function shape(path, n, tf = IDENTITY) {
  const r = nodeRadius(n), x = sx(n, tf), y = sy(n, tf);
  path.moveTo(x + r, y);
  if (n.type === "feature") path.arc(x, y, r, 0, 2 * Math.PI);
  else if (n.type === "error") path.rect(x - r, y - r, 2 * r, 2 * r);
  else if (n.type === "embedding") {
    path.moveTo(x, y - r); path.lineTo(x + r, y); path.lineTo(x, y + r); path.lineTo(x - r, y);
  } else { path.moveTo(x, y - r); path.lineTo(x + r, y + r); path.lineTo(x - r, y + r); }
  path.closePath();
}

export function drawOverlay(ctx, model, view, ui, size, tf = IDENTITY) {
  ctx.clearRect(0, 0, size.width, size.height);
  if (ui.paths) drawPaths(ctx, model, ui.paths, tf);
  ui.groups.forEach((g, k) => drawGroup(ctx, model, g, GROUP_COLORS[k % GROUP_COLORS.length], k, tf));
  for (const id of ui.pinned) pinMark(ctx, model.byId.get(id), tf);
  for (const id of ui.matches) ring(ctx, model.byId.get(id), COLORS.match, 2, tf);
  for (const id of ui.selected) ring(ctx, model.byId.get(id), COLORS.selected, 2, tf);
  drawLabels(ctx, model, view, ui, size, tf);
  if (ui.hover) drawHover(ctx, model, view, ui.hover, tf);
  if (ui.box) {
    const { x0, y0, x1, y1 } = ui.box;
    ctx.setLineDash([4, 3]); ctx.strokeStyle = "#333"; ctx.lineWidth = 1;
    ctx.strokeRect(Math.min(x0, x1), Math.min(y0, y1), Math.abs(x1 - x0), Math.abs(y1 - y0));
    ctx.setLineDash([]);
  }
}

function ring(ctx, n, color, width, tf) {
  if (!n) return;
  ctx.strokeStyle = color; ctx.lineWidth = width; ctx.beginPath();
  ctx.arc(sx(n, tf), sy(n, tf), nodeRadius(n) + 3, 0, 2 * Math.PI); ctx.stroke();
}

function pinMark(ctx, n, tf) {
  if (!n) return;
  ring(ctx, n, COLORS.pinned, 2.5, tf);
  ctx.fillStyle = COLORS.pinned; ctx.beginPath();
  ctx.arc(sx(n, tf) + nodeRadius(n) + 3, sy(n, tf) - nodeRadius(n) - 3, 2.5, 0, 2 * Math.PI); ctx.fill();
}

// Upstream and downstream paths of the clicked node above the threshold: bold, on top.
function drawPaths(ctx, model, paths, tf) {
  const { links, nodes } = model;
  ctx.lineWidth = 1.6;
  for (const [sign, color] of [[1, COLORS.positive], [-1, COLORS.negative]]) {
    ctx.strokeStyle = `rgba(${color}, 0.85)`; ctx.beginPath();
    for (const j of paths.links) {
      if ((links.w[j] >= 0 ? 1 : -1) !== sign) continue;
      const a = nodes[links.src[j]], b = nodes[links.tgt[j]];
      ctx.moveTo(sx(a, tf), sy(a, tf)); ctx.lineTo(sx(b, tf), sy(b, tf));
    }
    ctx.stroke();
  }
  for (const i of paths.nodes) ring(ctx, nodes[i], COLORS.path, 1.5, tf);
}

// Labels of the strongest visible nodes (more when zoomed in), skipping overlaps.
function drawLabels(ctx, model, view, ui, size, tf) {
  const want = Math.round(LABEL_COUNT * Math.min(6, tf.k));
  const placed = [];
  ctx.font = "11px system-ui, sans-serif"; ctx.textAlign = "left"; ctx.textBaseline = "middle";
  let shown = 0;
  for (const n of model.ranked) {
    if (shown >= want) break;
    if (!view.nodeOn[n.i] || !n.label || n.type === "logit") continue;
    const x = sx(n, tf) + 6, y = sy(n, tf);
    if (x < 0 || x > size.width || y < 0 || y > size.height) continue;
    const text = n.label.length > 28 ? n.label.slice(0, 27) + "…" : n.label;
    const w = ctx.measureText(text).width;
    if (placed.some((b) => x < b.x + b.w && x + w > b.x && Math.abs(y - b.y) < 12)) continue;
    placed.push({ x, y, w });
    ctx.fillStyle = "rgba(255,255,255,0.8)"; ctx.fillRect(x - 1, y - 6, w + 2, 12);
    ctx.fillStyle = "#333"; ctx.fillText(text, x, y);
    shown++;
  }
  ui.labelCount = shown;
}

function drawHover(ctx, model, view, n, tf) {
  const { links, nodes } = model;
  ctx.lineWidth = 2;
  for (const j of [...n.ins, ...n.outs]) {
    if (!view.linkOn[j]) continue;
    const a = nodes[links.src[j]], b = nodes[links.tgt[j]];
    ctx.strokeStyle = `rgba(${links.w[j] >= 0 ? COLORS.positive : COLORS.negative}, 0.9)`;
    ctx.beginPath(); ctx.moveTo(sx(a, tf), sy(a, tf)); ctx.lineTo(sx(b, tf), sy(b, tf)); ctx.stroke();
  }
  ring(ctx, n, COLORS.hover, 2.5, tf);
  ctx.font = "bold 12px system-ui, sans-serif"; ctx.textAlign = "left"; ctx.textBaseline = "bottom";
  const text = n.label || n.id;
  const w = ctx.measureText(text).width;
  ctx.fillStyle = "rgba(255,255,255,0.9)"; ctx.fillRect(sx(n, tf) + 6, sy(n, tf) - 22, w + 4, 15);
  ctx.fillStyle = "#111"; ctx.fillText(text, sx(n, tf) + 8, sy(n, tf) - 8);
}

function drawGroup(ctx, model, group, color, k, tf) {
  const members = group.node_ids.map((id) => model.byId.get(id)).filter(Boolean);
  if (!members.length) return;
  members.forEach((n) => ring(ctx, n, color, 3, tf));
  const cx = members.reduce((s, n) => s + sx(n, tf), 0) / members.length;
  const top = members.reduce((m, n) => Math.min(m, sy(n, tf)), Infinity) - 10 - 12 * (k % 3);
  ctx.font = "bold 11px system-ui, sans-serif"; ctx.textAlign = "center";
  ctx.textBaseline = "bottom"; ctx.fillStyle = color; ctx.fillText(group.name, cx, top);
}

// The visible node under screen point (x, y), if any.
export function hitTest(model, view, x, y, tf = IDENTITY) {
  let best = null, bestD = 64;
  for (const n of model.nodes) {
    if (!view.nodeOn[n.i]) continue;
    const d = (sx(n, tf) - x) ** 2 + (sy(n, tf) - y) ** 2;
    if (d < bestD && d <= (nodeRadius(n) + 3) ** 2) { best = n; bestD = d; }
  }
  return best;
}
