// The graph page: load the graph, draw it, wire thresholds, hover, selection and panels.
// Sets window.__viewerReady (and __viewerReadyMs, ms since navigation) once the first frame
// is on screen, and __viewerLinksDoneMs when every link of the current pruning is painted.

import { el, getJSON, graphPath } from "./api.js";
import { showNode } from "./dashboard.js";
import { buildRequest, interventionTargets, runIntervention } from "./intervene.js";
import { buildModel, layout, prune } from "./model.js";
import { LinkPainter, MARGIN, drawNodesLayer, drawOverlay, hitTest, sizeCanvas } from "./render.js";
import { Supernodes } from "./supernodes.js";

const $ = (id) => document.getElementById(id);
const graphName = decodeURIComponent(location.pathname.slice("/graph/".length));
const state = {
  model: null, view: null, size: null, ctx: {},  // ctx: weak, strong, nodes, overlay
  ui: { selected: new Set(), hover: null, box: null, groups: [] },
};
let supernodes = null;
const painter = new LinkPainter();
let overlayQueued = false;

function markReady(error = null) {
  window.__viewerError = error;
  // For tests and benchmarks: screen positions (CSS px, canvas-relative) of visible nodes.
  window.__viewerNodes = () => state.model.nodes.filter((n) => state.view.nodeOn[n.i])
    .map((n) => ({ id: n.id, type: n.type, x: n.x, y: n.y, label: n.label }));
  window.__viewerReadyMs = performance.now();
  window.__viewerReady = true;
}

function showError(message) {
  const box = $("error-box");
  box.textContent = `Cannot show graph “${graphName}”: ${message}`;
  box.hidden = false;
}

// --- drawing ------------------------------------------------------------------------------
function resize() {
  const wrap = $("graph-wrap");
  const width = wrap.clientWidth, height = wrap.clientHeight;
  for (const layer of ["weak", "strong", "nodes", "overlay"]) {
    state.ctx[layer] = sizeCanvas($(`${layer}-canvas`), width, height);
  }
  const box = { left: MARGIN.left, top: MARGIN.top,
    width: width - MARGIN.left - MARGIN.right, height: height - MARGIN.top - MARGIN.bottom };
  state.size = { width, height, box, grid: layout(state.model, box) };
  repaint();
}

function repaint() {
  const nodeT = Number($("node-threshold").value), edgeT = Number($("edge-threshold").value);
  $("node-threshold-value").textContent = nodeT.toFixed(2);
  $("edge-threshold-value").textContent = edgeT.toFixed(2);
  state.view = prune(state.model, nodeT, edgeT);
  $("node-count").textContent = String(state.view.nNodes);
  $("edge-count").textContent = String(state.view.nLinks);
  drawNodesLayer(state.ctx.nodes, state.model, state.view, state.size);
  paintOverlay();
  window.__viewerLinksDoneMs = null;
  const { strong, weak } = state.ctx;
  painter.paint(strong, weak, state.model, state.view, state.size).then((done) => {
    if (done) window.__viewerLinksDoneMs = performance.now();
  });
}

function paintOverlay() {
  drawOverlay(state.ctx.overlay, state.model, state.view, state.ui, state.size);
  $("selection-count").textContent = String(state.ui.selected.size);
  const n = interventionTargets(state.model, currentTargetIds()).length;
  $("intervene-targets").textContent = n ? `${n} feature(s) will be steered` : "select features or tick supernodes";
}

function queueOverlay() {
  if (overlayQueued) return;
  overlayQueued = true;
  requestAnimationFrame(() => { overlayQueued = false; paintOverlay(); });
}

// --- pointer ------------------------------------------------------------------------------
function pointer(event) {
  const rect = $("overlay-canvas").getBoundingClientRect();
  return { x: event.clientX - rect.left, y: event.clientY - rect.top };
}

function showTooltip(node, p) {
  const tip = $("tooltip");
  if (!node) { tip.hidden = true; return; }
  const { links, nodes } = state.model;
  const strongest = (list, end) => list.filter((j) => state.view.linkOn[j]).slice(0, 5)
    .map((j) => el("li", { className: links.w[j] >= 0 ? "pos" : "neg",
      textContent: `${nameOf(nodes[end[j]])}  ${links.w[j].toFixed(3)}` }));
  tip.replaceChildren(el("b", { textContent: nameOf(node) }),
    el("div", { className: "muted", textContent: node.id }),
    el("div", { textContent: "strongest inputs" }), el("ul", {}, ...strongest(node.ins, links.src)),
    el("div", { textContent: "strongest outputs" }), el("ul", {}, ...strongest(node.outs, links.tgt)));
  tip.hidden = false;
  tip.style.left = `${Math.min(p.x + 14, state.size.width - tip.offsetWidth - 4)}px`;
  tip.style.top = `${Math.max(0, Math.min(p.y - 10, state.size.height - tip.offsetHeight - 4))}px`;
}

function nameOf(n) {
  if (n.label) return n.label;
  if (n.type === "embedding") return `“${state.model.tokens[n.ctx] ?? ""}” (emb)`;
  return n.id;
}

let drag = null;

function onDown(event) { drag = { start: pointer(event), moved: false }; }

function onMove(event) {
  const p = pointer(event);
  if (drag) {
    const dx = p.x - drag.start.x, dy = p.y - drag.start.y;
    if (drag.moved || dx * dx + dy * dy > 25) {
      drag.moved = true;
      state.ui.box = { x0: drag.start.x, y0: drag.start.y, x1: p.x, y1: p.y };
      return queueOverlay();
    }
  }
  const node = hitTest(state.model, state.view, p.x, p.y);
  if (node !== state.ui.hover) { state.ui.hover = node; queueOverlay(); }
  showTooltip(node, p);
}

function onUp(event) {
  if (!drag) return;
  const wasBox = drag.moved;
  drag = null;
  if (wasBox) return finishBox(event.shiftKey);
  const p = pointer(event), node = hitTest(state.model, state.view, p.x, p.y);
  const selected = state.ui.selected;
  if (node && event.shiftKey) {
    if (selected.has(node.id)) selected.delete(node.id); else selected.add(node.id);
  } else if (node) {
    state.ui.selected = new Set([node.id]);
    showNode($("node-panel"), graphName, node);
  } else if (!event.shiftKey) {
    state.ui.selected = new Set();
  }
  queueOverlay();
}

function finishBox(additive) {
  const { x0, y0, x1, y1 } = state.ui.box;
  const [left, right, top, bottom] = [Math.min(x0, x1), Math.max(x0, x1), Math.min(y0, y1), Math.max(y0, y1)];
  const picked = state.model.nodes.filter((n) => state.view.nodeOn[n.i]
    && n.x >= left && n.x <= right && n.y >= top && n.y <= bottom);
  if (!additive) state.ui.selected = new Set();
  picked.forEach((n) => state.ui.selected.add(n.id));
  state.ui.box = null;
  queueOverlay();
}

// --- panels -------------------------------------------------------------------------------
function currentTargetIds() {
  return [...state.ui.selected, ...(supernodes ? supernodes.checkedIds() : [])];
}

function onRun() {
  const targets = interventionTargets(state.model, currentTargetIds());
  const out = { result: $("intervene-result"), error: $("intervene-error"), continuation: $("intervene-continuation") };
  if (!targets.length) { out.error.textContent = "select at least one feature (or tick a supernode)"; return; }
  const value = Number($("intervene-value").value), generate = parseInt($("intervene-generate").value, 10) || 0;
  if (!Number.isFinite(value)) { out.error.textContent = "value must be a number"; return; }
  const form = { mode: $("intervene-mode").value, value, generate, allPositions: $("intervene-allpos").checked };
  runIntervention(buildRequest(graphName, targets, form), out);
}

function wire() {
  let queued = false;
  const onSlider = () => {
    if (queued) return;
    queued = true;
    requestAnimationFrame(() => { queued = false; repaint(); });
  };
  $("node-threshold").addEventListener("input", onSlider);
  $("edge-threshold").addEventListener("input", onSlider);
  const canvas = $("overlay-canvas");
  canvas.addEventListener("mousedown", onDown);
  canvas.addEventListener("mousemove", onMove);
  window.addEventListener("mouseup", onUp);
  canvas.addEventListener("mouseleave", () => { state.ui.hover = null; showTooltip(null); queueOverlay(); });
  window.addEventListener("resize", () => requestAnimationFrame(resize));
  $("supernode-create").addEventListener("click", () => supernodes.create($("supernode-name").value)
    .then(() => { $("supernode-name").value = ""; }));
  $("selection-clear").addEventListener("click", () => { state.ui.selected = new Set(); queueOverlay(); });
  $("supernode-suggest").addEventListener("click", () => supernodes.suggest());
  $("supernode-list").addEventListener("change", queueOverlay);
  $("intervene-run").addEventListener("click", onRun);
}

async function main() {
  $("raw-json").href = `/api/graph/${graphPath(graphName)}`;
  document.title = `${graphName} · cltrace`;
  let json;
  try {
    json = await getJSON(`/api/graph/${graphPath(graphName)}`);
    state.model = buildModel(json);
  } catch (err) {
    showError(err.message);
    return markReady(err.message);
  }
  $("prompt").textContent = json.metadata.prompt ?? "";
  supernodes = new Supernodes(graphName, state.ui, queueOverlay);
  wire();
  resize();
  requestAnimationFrame(() => setTimeout(markReady, 0));  // after the first frame is painted
  supernodes.load();
}

main();
