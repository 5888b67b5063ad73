// Canvas drawing on three stacked canvases: links (painted progressively by LinkPainter),
// nodes + axes (redrawn when the pruning or the size changes) and an overlay (hover,
// selection, supernodes, box; redrawn often). Links are batched into a few paths by sign
// and width per chunk.

export const COLORS = {
  feature: "#e0a030", error: "#9aa0a6", embedding: "#2e9e6a", logit: "#7b4fd6",
  positive: "37, 99, 235", negative: "220, 38, 38", selected: "#111", hover: "#f43f5e",
};
export const MARGIN = { left: 70, right: 16, top: 16, bottom: 56 };
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
export function drawNodesLayer(ctx, model, view, size) {
  ctx.clearRect(0, 0, size.width, size.height);
  drawAxes(ctx, model, size);
  drawNodes(ctx, model, view.nodeOn);
}

function drawAxes(ctx, model, size) {
  const { colW, rowH } = size.grid;
  ctx.font = "11px system-ui, sans-serif"; ctx.fillStyle = "#555"; ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (let r = 0; r < model.nRows; r++) {
    const y = MARGIN.top + size.box.height - (r + 0.5) * rowH;
    const label = r === 0 ? "Emb" : r === model.nRows - 1 ? "Logit" : `L${r - 1}`;
    ctx.fillText(label, MARGIN.left - 8, y);
    ctx.strokeStyle = "#f0f0f0"; ctx.beginPath();
    ctx.moveTo(MARGIN.left, y + rowH / 2); ctx.lineTo(MARGIN.left + size.box.width, y + rowH / 2);
    ctx.stroke();
  }
  ctx.textAlign = "center"; ctx.textBaseline = "top"; ctx.fillStyle = "#222";
  for (let p = 0; p < model.nPos; p++) {
    const x = MARGIN.left + (p + 0.5) * colW;
    const token = String(model.tokens[p] ?? "").replace(/\n/g, "⏎");
    ctx.fillText(fitText(ctx, token, colW - 4), x, MARGIN.top + size.box.height + 8);
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
  paint(strongCtx, weakCtx, model, view, size) {
    const job = ++this.job;
    strongCtx.clearRect(0, 0, size.width, size.height);
    weakCtx.clearRect(0, 0, size.width, size.height);
    const alpha = view.nLinks > 20000 ? 0.15 : view.nLinks > 2000 ? 0.25 : 0.45;
    let k = paintChunk(strongCtx, model, view, 0, alpha);
    return new Promise((resolve) => {
      const step = () => {
        if (job !== this.job) return resolve(false);
        if (k >= model.links.n) return resolve(true);
        k = paintChunk(weakCtx, model, view, k, alpha);
        requestAnimationFrame(step);
      };
      requestAnimationFrame(step);
    });
  }
}

// Paint up to CHUNK visible links from position k of the strongest-first order.
function paintChunk(ctx, model, view, k, alpha) {
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
    path.moveTo(a.x, a.y); path.lineTo(b.x, b.y);
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

function drawNodes(ctx, model, nodeOn) {
  const paths = { feature: new Path2D(), error: new Path2D(), embedding: new Path2D(), logit: new Path2D() };
  for (const n of model.nodes) {
    if (nodeOn[n.i]) shape(paths[n.type], n);
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
export function shape(path, n) {
  const r = nodeRadius(n), { x, y } = n;
  path.moveTo(x + r, y);
  if (n.type === "feature") path.arc(x, y, r, 0, 2 * Math.PI);
  else if (n.type === "error") path.rect(x - r, y - r, 2 * r, 2 * r);
  else if (n.type === "embedding") {
    path.moveTo(x, y - r); path.lineTo(x + r, y); path.lineTo(x, y + r); path.lineTo(x - r, y);
  } else { path.moveTo(x, y - r); path.lineTo(x + r, y + r); path.lineTo(x - r, y + r); }
  path.closePath();
}

export function drawOverlay(ctx, model, view, ui, size) {
  ctx.clearRect(0, 0, size.width, size.height);
  ui.groups.forEach((g, k) => drawGroup(ctx, model, g, GROUP_COLORS[k % GROUP_COLORS.length], k));
  for (const id of ui.selected) ring(ctx, model.byId.get(id), COLORS.selected, 2);
  if (ui.hover) drawHover(ctx, model, view, ui.hover);
  if (ui.box) {
    const { x0, y0, x1, y1 } = ui.box;
    ctx.setLineDash([4, 3]); ctx.strokeStyle = "#333"; ctx.lineWidth = 1;
    ctx.strokeRect(Math.min(x0, x1), Math.min(y0, y1), Math.abs(x1 - x0), Math.abs(y1 - y0));
    ctx.setLineDash([]);
  }
}

function ring(ctx, n, color, width) {
  if (!n) return;
  ctx.strokeStyle = color; ctx.lineWidth = width; ctx.beginPath();
  ctx.arc(n.x, n.y, nodeRadius(n) + 3, 0, 2 * Math.PI); ctx.stroke();
}

function drawHover(ctx, model, view, n) {
  const { links, nodes } = model;
  ctx.lineWidth = 2;
  for (const j of [...n.ins, ...n.outs]) {
    if (!view.linkOn[j]) continue;
    const a = nodes[links.src[j]], b = nodes[links.tgt[j]];
    ctx.strokeStyle = `rgba(${links.w[j] >= 0 ? COLORS.positive : COLORS.negative}, 0.9)`;
    ctx.beginPath(); ctx.moveTo(a.x, a.y); ctx.lineTo(b.x, b.y); ctx.stroke();
  }
  ring(ctx, n, COLORS.hover, 2.5);
}

function drawGroup(ctx, model, group, color, k) {
  const members = group.node_ids.map((id) => model.byId.get(id)).filter(Boolean);
  if (!members.length) return;
  members.forEach((n) => ring(ctx, n, color, 3));
  const cx = members.reduce((s, n) => s + n.x, 0) / members.length;
  const top = members.reduce((m, n) => Math.min(m, n.y), Infinity) - 10 - 12 * (k % 3);
  ctx.font = "bold 11px system-ui, sans-serif"; ctx.textAlign = "center";
  ctx.textBaseline = "bottom"; ctx.fillStyle = color; ctx.fillText(group.name, cx, top);
}

// The visible node under (x, y), if any.
export function hitTest(model, view, x, y) {
  let best = null, bestD = 64;
  for (const n of model.nodes) {
    if (!view.nodeOn[n.i]) continue;
    const d = (n.x - x) ** 2 + (n.y - y) ** 2;
    if (d < bestD && d <= (nodeRadius(n) + 3) ** 2) { best = n; bestD = d; }
  }
  return best;
}
