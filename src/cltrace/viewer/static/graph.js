// The graph page: load the graph (and its circuit file), show the circuit, the full graph
// (canvas, zoom and pan through a view transform) or the pinned subgraph; wire search, paths,
// panels, pins, interventions and the URL.
// Sets window.__viewerReady (and __viewerReadyMs, ms since navigation) once the first frame
// is on screen, and __viewerLinksDoneMs when every link of the current pruning is painted.

import { el, getJSON, graphPath } from "./api.js";
import { CircuitView, circuitSummary } from "./circuit.js";
import { showNode } from "./dashboard.js";
import { buildRequest, buildSwapRequest, interventionTargets, runIntervention, runSwap } from "./intervene.js";
import { buildModel, layout, prune } from "./model.js";
import { Pins } from "./pins.js";
import { LinkPainter, MARGIN, drawNodesLayer, drawOverlay, hitTest, sizeCanvas, sx, sy } from "./render.js";
import { search } from "./search.js";
import { Supernodes } from "./supernodes.js";
import { readUrl, writeUrl } from "./urlstate.js";
import { aggregateEdges, drawUnits, unitFromNodes } from "./units.js";
import { fitTransform, panBy, zoomAt } from "./viewtf.js";

const $ = (id) => document.getElementById(id);
const graphName = decodeURIComponent(location.pathname.slice("/graph/".length));
const state = {
  model: null, view: null, size: null, ctx: {}, mode: "graph", circuit: null, json: null,
  tf: { k: 1, x: 0, y: 0 }, painted: { k: 1, x: 0, y: 0 }, clicked: null, swapGroup: null,
  ui: { selected: new Set(), hover: null, box: null, groups: [], pinned: [], matches: new Set(), paths: null },
};
let supernodes = null, pins = null;
const painter = new LinkPainter();
let overlayQueued = false, settleTimer = null;

function markReady(error = null) {
  window.__viewerError = error;
  // For tests and benchmarks: screen positions (CSS px, canvas-relative) of visible nodes.
  window.__viewerNodes = () => state.model.nodes.filter((n) => state.view.nodeOn[n.i])
    .map((n) => ({ id: n.id, type: n.type, x: sx(n, state.tf), y: sy(n, state.tf), label: n.label,
      n_in: n.ins.length, n_out: n.outs.length }));
  window.__viewerState = () => ({ mode: state.mode, tf: { ...state.tf }, pinned: [...pins.pinned],
    groups: pins.groups, clicked: state.clicked, selected: [...state.ui.selected], labels: state.ui.labelCount,
    paths: state.ui.paths ? state.ui.paths.links.length : 0, matches: state.ui.matches.size });
  window.__viewerReadyMs = performance.now();
  window.__viewerReady = true;
}

function showError(message) {
  const box = $("error-box");
  box.textContent = `Cannot show graph “${graphName}”: ${message}`;
  box.hidden = false;
}

function notice(message) {
  const box = $("notice-box");
  box.textContent = message;
  box.hidden = !message;
}

// --- the full graph on canvases -----------------------------------------------------------
function resize(paint = true) {
  const wrap = $("graph-wrap");
  const width = wrap.clientWidth, height = wrap.clientHeight;
  for (const layer of ["weak", "strong", "nodes", "overlay"]) {
    state.ctx[layer] = sizeCanvas($(`${layer}-canvas`), width, height);
  }
  const box = { left: MARGIN.left, top: MARGIN.top,
    width: width - MARGIN.left - MARGIN.right, height: height - MARGIN.top - MARGIN.bottom };
  state.size = { width, height, box, grid: layout(state.model, box) };
  if (!paint) return;
  if (state.mode === "graph") repaint(); else drawUnitView();
}

function repaint() {
  const nodeT = Number($("node-threshold").value), edgeT = Number($("edge-threshold").value);
  $("node-threshold-value").textContent = nodeT.toFixed(2);
  $("edge-threshold-value").textContent = edgeT.toFixed(2);
  state.view = prune(state.model, nodeT, edgeT);
  $("node-count").textContent = String(state.view.nNodes);
  $("edge-count").textContent = String(state.view.nLinks);
  if (state.clicked) state.ui.paths = tracePaths(state.model.byId.get(state.clicked));
  paintAll();
}

function takeSnapshot(snap) {
  const src = ["weak", "strong", "nodes", "overlay"].map((id) => $(`${id}-canvas`));
  snap.width = src[0].width; snap.height = src[0].height;
  snap.style.width = src[0].style.width; snap.style.height = src[0].style.height;
  const ctx = snap.getContext("2d");
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, snap.width, snap.height);
  for (const canvas of src) ctx.drawImage(canvas, 0, 0);
  snap.hidden = false;
  $("canvas-stack").style.visibility = "hidden";
}

function paintAll() {
  clearTimeout(settleTimer);
  $("snap-canvas").hidden = true;
  $("canvas-stack").style.visibility = "";
  state.painted = { ...state.tf };
  drawNodesLayer(state.ctx.nodes, state.model, state.view, state.size, state.tf);
  paintOverlay();
  window.__viewerLinksDoneMs = null;
  const { strong, weak } = state.ctx;
  painter.paint(strong, weak, state.model, state.view, state.size, state.tf).then((done) => {
    if (done) window.__viewerLinksDoneMs = performance.now();
  });
}

function paintOverlay() {
  state.ui.pinned = pins ? pins.pinned : [];
  if (state.mode === "graph") drawOverlay(state.ctx.overlay, state.model, state.view, state.ui, state.size, state.tf);
  $("selection-count").textContent = String(state.ui.selected.size);
  const n = interventionTargets(state.model, currentTargetIds()).length;
  $("intervene-targets").textContent = n ? `${n} feature(s) will be steered` : "select or pin features, or tick supernodes";
  const name = swapName();
  $("swap-name").textContent = name ? `a swap matches supernode “${name}” in the second graph's circuit file, if it has one` : "";
}

function queueOverlay() {
  if (overlayQueued) return;
  overlayQueued = true;
  requestAnimationFrame(() => { overlayQueued = false; paintOverlay(); });
}

// While zooming or panning, a snapshot of the four painted layers (one canvas) moves by a CSS
// transform: one composited layer a frame, no repaint. 150 ms after the last move everything
// is repainted crisply at the new transform.
function setTransform(tf) {
  state.tf = tf;
  const s = tf.k / state.painted.k;
  const dx = tf.x - state.painted.x * s, dy = tf.y - state.painted.y * s;
  const snap = $("snap-canvas");
  if (snap.hidden) takeSnapshot(snap);
  snap.style.transform = `translate(${dx}px, ${dy}px) scale(${s})`;
  clearTimeout(settleTimer);
  settleTimer = setTimeout(() => { paintAll(); scheduleUrl(); }, 150);
}

function fit() {
  const visible = state.model.nodes.filter((n) => state.view.nodeOn[n.i]);
  setTransform(fitTransform(visible, state.size));
}

function centerOn(node) {
  const k = Math.max(state.tf.k, 2);
  setTransform({ k, x: state.size.width / 2 - node.x * k, y: state.size.height / 2 - node.y * k });
}

// Upstream and downstream of a node along links with |w| >= t·max|w| (visible links only).
function tracePaths(node) {
  if (!node) return null;
  const { links, nodes } = state.model;
  const limit = Number($("path-threshold").value) * links.maxAbs;
  const linkSet = new Set(), nodeSet = new Set([node.i]);
  for (const [list, end] of [["ins", links.src], ["outs", links.tgt]]) {
    const stack = [node];
    const seen = new Set([node.i]);
    while (stack.length) {
      const n = stack.pop();
      for (const j of n[list]) {
        if (!state.view.linkOn[j] || Math.abs(links.w[j]) < limit) continue;
        linkSet.add(j);
        const next = end[j];
        if (!seen.has(next)) { seen.add(next); nodeSet.add(next); stack.push(nodes[next]); }
      }
    }
  }
  return { links: [...linkSet], nodes: [...nodeSet] };
}

// --- circuit and subgraph views (SVG) -----------------------------------------------------
function drawUnitView() {
  const container = $("unit-view");
  const units = state.mode === "circuit" ? state.circuit.units() : subgraphUnits();
  const edges = state.mode === "circuit" ? state.circuit.edges(units) : aggregateEdges(state.model, units);
  for (const u of units) u.selected = u.nodeIds.every((id) => state.ui.selected.has(id));
  if (state.mode === "subgraph" && !units.length) {
    container.replaceChildren(el("p", { id: "subgraph-empty", className: "muted empty",
      textContent: "No pinned nodes yet: ctrl-click nodes in the full graph or the circuit, or use “pin to subgraph” in a node's panel." }));
  } else {
    const drawn = drawUnits(container, state.model, units, edges, { click: onUnitClick },
      { testid: state.mode === "circuit" ? "circuit-svg" : "subgraph-svg" });
    $("edge-count").textContent = String(drawn.nEdges);
  }
  $("node-count").textContent = String(units.length);
  if (state.mode === "subgraph" && units.length) {
    const s = pins.scores();
    container.prepend(el("p", { id: "unit-caption", className: "unit-caption", textContent:
      `pinned subgraph: replacement ${s.replacement.toFixed(3)} · completeness ${s.completeness.toFixed(3)}` }));
  }
  container.querySelectorAll("g.unit").forEach((g) => {
    const u = units.find((x) => x.id === g.dataset.unit);
    if (u && u.selected) g.classList.add("selected");
  });
}

function subgraphUnits() {
  const { model } = state;
  const grouped = new Set(pins.groups.flatMap((g) => g.slice(1)));
  const units = pins.groups.map((g, k) => unitFromNodes(`group:${k}`, g[0], "features",
    g.slice(1).map((id) => model.byId.get(id)).filter(Boolean), model.nRows, { sub: `${g.length - 1} nodes` }));
  for (const id of pins.pinned) {
    if (grouped.has(id)) continue;
    const n = model.byId.get(id);
    units.push(unitFromNodes(id, n.label || id, n.type, [n], model.nRows, { sub: shortId(n), pinned: true }));
  }
  return units.filter((u) => u.nodeIds.length);
}

function shortId(n) {
  if (n.type === "feature") return `L${n.layer} #${n.id.split("_")[1]} @${n.ctx}`;
  return `${n.type} @${n.ctx}`;
}

function onUnitClick(unit, event) {
  if (event.ctrlKey || event.metaKey) { pins.toggle(unit.nodeIds); return; }
  if (event.shiftKey) {
    const all = unit.nodeIds.every((id) => state.ui.selected.has(id));
    unit.nodeIds.forEach((id) => (all ? state.ui.selected.delete(id) : state.ui.selected.add(id)));
    drawUnitView(); paintOverlay();
    return;
  }
  if (state.mode === "circuit" && unit.expandable) {
    state.circuit.toggle(unit.id);
    if (state.circuit.expanded.has(unit.id)) showGroup(unit);
    drawUnitView();
    scheduleUrl();
    return;
  }
  state.ui.selected = new Set(unit.nodeIds);
  if (unit.nodeIds.length === 1) openNode(state.model.byId.get(unit.nodeIds[0]));
  else showGroup(unit);
  drawUnitView(); paintOverlay();
}

function showGroup(unit) {
  const panel = $("node-panel");
  const target = () => {
    state.ui.selected = new Set(unit.nodeIds);
    document.querySelector("input[name=intervene-on][value=selection]").checked = true;
  };
  const ablate = () => { target(); onRun(true); };
  const swap = () => {
    target();
    state.swapGroup = { name: unit.name, ids: new Set(unit.nodeIds) };
    paintOverlay();
    $("swap-row").scrollIntoView({ block: "center" });
    $(($("swap-source").value ? "swap-run" : "swap-prompt")).focus();
  };
  panel.replaceChildren(el("h3", { id: "dashboard-title", textContent: unit.name }),
    el("p", { className: "muted", textContent: unit.sub || "" }),
    el("div", { className: "row" },
      el("button", { id: "group-pin", textContent: "pin all", onclick: () => pins.toggle(unit.nodeIds) }),
      el("button", { id: "group-ablate", textContent: "ablate group", onclick: ablate }),
      el("button", { id: "group-swap", textContent: "swap group…", title: "swap with a second prompt (Intervene panel)", onclick: swap })),
    el("ol", { id: "group-members", className: "connections" }, ...unit.nodeIds.map((id) => {
      const n = state.model.byId.get(id);
      return el("li", {}, el("a", { href: "#", className: "node-link", textContent: n.label || id, title: id,
        onclick: (e) => { e.preventDefault(); openNode(n); } }),
      n.score != null ? el("span", { className: "score", textContent: ` ${n.score.toFixed(2)}` }) : "");
    })));
}

// --- views --------------------------------------------------------------------------------
function setView(mode) {
  if (mode === "circuit" && !state.circuit) mode = "graph";
  state.mode = mode;
  const graph = mode === "graph";
  document.body.dataset.view = mode;
  for (const id of ["canvas-stack", "hint"]) $(id).hidden = !graph;
  $("unit-view").hidden = graph;
  $("circuit-panel").hidden = mode !== "circuit";
  document.querySelectorAll(".tabs button").forEach((b) => b.classList.toggle("active", b.dataset.view === mode));
  $("tooltip").hidden = true;
  if (graph) repaint(); else drawUnitView();
  scheduleUrl();
}

// --- pointer (full graph) -----------------------------------------------------------------
function pointer(event) {
  const rect = $("graph-wrap").getBoundingClientRect();  // the overlay itself moves while panning
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
    el("div", { className: "muted", textContent: node.id + (pins.has(node.id) ? " · pinned" : "") }),
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

function onDown(event) {
  if (state.mode !== "graph" || event.button !== 0) return;
  drag = { start: pointer(event), last: pointer(event), moved: false, box: event.shiftKey };
}

function onMove(event) {
  if (state.mode !== "graph") return;
  const p = pointer(event);
  if (drag) {
    const dx = p.x - drag.start.x, dy = p.y - drag.start.y;
    if (drag.moved || dx * dx + dy * dy > 25) {
      drag.moved = true;
      $("tooltip").hidden = true;
      if (drag.box) {
        state.ui.box = { x0: drag.start.x, y0: drag.start.y, x1: p.x, y1: p.y };
        queueOverlay();
      } else {
        setTransform(panBy(state.tf, p.x - drag.last.x, p.y - drag.last.y));
      }
      drag.last = p;
      return;
    }
  }
  const node = hitTest(state.model, state.view, p.x, p.y, state.tf);
  if (node !== state.ui.hover) { state.ui.hover = node; queueOverlay(); }
  showTooltip(node, p);
}

function onUp(event) {
  if (!drag) return;
  const { moved, box } = drag;
  drag = null;
  if (moved) return box ? finishBox(true) : undefined;
  const p = pointer(event), node = hitTest(state.model, state.view, p.x, p.y, state.tf);
  const selected = state.ui.selected;
  if (node && (event.ctrlKey || event.metaKey)) {
    pins.toggle(node.id);
  } else if (node && event.shiftKey) {
    if (selected.has(node.id)) selected.delete(node.id); else selected.add(node.id);
  } else if (node) {
    openNode(node);
  } else if (!event.shiftKey) {
    state.ui.selected = new Set();
    state.clicked = null; state.ui.paths = null;
    scheduleUrl();
  }
  queueOverlay();
}

function onWheel(event) {
  if (state.mode !== "graph") return;
  event.preventDefault();
  const p = pointer(event);
  const factor = Math.exp(-event.deltaY * (event.deltaMode === 1 ? 0.05 : 0.0015));
  setTransform(zoomAt(state.tf, p.x, p.y, factor));
}

function finishBox(additive) {
  const { x0, y0, x1, y1 } = state.ui.box;
  const [left, right, top, bottom] = [Math.min(x0, x1), Math.max(x0, x1), Math.min(y0, y1), Math.max(y0, y1)];
  const picked = state.model.nodes.filter((n) => state.view.nodeOn[n.i]
    && sx(n, state.tf) >= left && sx(n, state.tf) <= right && sy(n, state.tf) >= top && sy(n, state.tf) <= bottom);
  if (!additive) state.ui.selected = new Set();
  picked.forEach((n) => state.ui.selected.add(n.id));
  state.ui.box = null;
  queueOverlay();
}

// Select a node, open its panel, highlight its paths.
function openNode(node) {
  if (!node) return;
  state.clicked = node.id;
  state.ui.selected = new Set([node.id]);
  state.ui.paths = state.mode === "graph" ? tracePaths(node) : null;
  showNode($("node-panel"), graphName, node, { model: state.model, pins, onNode: focusNode, onLabel: onLabelSaved });
  queueOverlay();
  scheduleUrl();
}

// A label saved from the feature panel: the node's new label shows on the canvas or the units.
function onLabelSaved() {
  if (state.mode === "graph") paintAll(); else drawUnitView();
}

// From a link in a panel or a search result: show the node in the full graph.
function focusNode(node) {
  if (state.mode !== "graph") setView("graph");
  if (!state.view.nodeOn[node.i]) {  // pruned away by the sliders: show everything
    $("node-threshold").value = "1"; $("edge-threshold").value = "1";
    repaint();
  }
  openNode(node);
  centerOn(node);
}

// --- panels -------------------------------------------------------------------------------
function currentTargetIds() {
  const on = document.querySelector("input[name=intervene-on]:checked");
  if (on && on.value === "pinned" && pins) return [...pins.pinned];
  return [...state.ui.selected, ...(supernodes ? supernodes.checkedIds() : [])];
}

function onRun(ablate = false) {
  const targets = interventionTargets(state.model, currentTargetIds());
  const out = { result: $("intervene-result"), error: $("intervene-error"), continuation: $("intervene-continuation"),
    history: $("intervene-history") };
  if (!targets.length) { out.error.textContent = "select or pin at least one feature (or tick a supernode)"; return; }
  const value = ablate ? 0 : Number($("intervene-value").value);
  const generate = parseInt($("intervene-generate").value, 10) || 0;
  if (!Number.isFinite(value)) { out.error.textContent = "value must be a number"; return; }
  const form = { mode: ablate ? "set" : $("intervene-mode").value, value, generate,
    allPositions: $("intervene-allpos").checked, freeze: $("intervene-freeze").checked };
  const names = targets.slice(0, 3).map((n) => n.label || n.id).join(", ") + (targets.length > 3 ? ` +${targets.length - 3}` : "");
  runIntervention(buildRequest(graphName, targets, form), out, (ablate ? "ablate " : "") + names);
}

// The supernode name a swap of the current targets carries: the group the targets are exactly
// (a circuit supernode opened with “swap group…”, a pinned group, or a saved supernode).
function swapName() {
  const ids = new Set(currentTargetIds());
  const same = (list) => list.length === ids.size && list.every((id) => ids.has(id));
  if (!ids.size) return null;
  if (state.swapGroup && same([...state.swapGroup.ids])) return state.swapGroup.name;
  const pinGroup = (pins ? pins.groups : []).find((g) => same(g.slice(1)));
  if (pinGroup) return pinGroup[0];
  const saved = state.ui.groups.find((g) => same(g.node_ids));
  return saved ? saved.name : null;
}

function onSwap() {
  const targets = interventionTargets(state.model, currentTargetIds());
  const out = { result: $("intervene-result"), error: $("intervene-error"), continuation: $("intervene-continuation"),
    history: $("intervene-history"), summary: $("swap-summary") };
  const graph = $("swap-source").value, prompt = $("swap-prompt").value.trim();
  if (!targets.length) { out.error.textContent = "pin or select the features to swap (or open a supernode and use “swap group…”)"; return null; }
  if (!graph && !prompt) { out.error.textContent = "pick a second graph or type a second prompt"; return null; }
  const name = swapName();
  const generate = parseInt($("intervene-generate").value, 10) || 0;
  const describe = name ? `“${name}”` : `${targets.length} feature(s)`;
  return runSwap(buildSwapRequest(graphName, targets, name, graph ? { graph } : { prompt }, generate), out, describe);
}

async function loadSwapSources() {
  try {
    const { graphs } = await getJSON("/api/graphs");
    const select = $("swap-source");
    for (const g of graphs) {
      if (g.name === graphName || g.error) continue;
      select.append(el("option", { value: g.name, textContent: `${g.name}: ${g.prompt ?? ""}`.slice(0, 80) }));
    }
  } catch (err) {
    notice(`graph list not loaded: ${err.message}`);
  }
}

function pinPanel() {
  $("pin-selected").addEventListener("click", () => {
    if (!state.ui.selected.size) return pins.say("select nodes first (click or shift-click)", true);
    pins.toggle([...state.ui.selected]);
  });
  $("pin-clear").addEventListener("click", () => pins.set([], []));
  $("pin-group").addEventListener("click", () => {
    pins.group($("pin-group-name").value, [...state.ui.selected]);
    $("pin-group-name").value = "";
  });
  $("subgraph-save").addEventListener("click", () => pins.save($("subgraph-name").value));
  $("qparams-export").addEventListener("click", () => {
    const q = pins.qParams(state.clicked);
    $("qparams-text").value = JSON.stringify(q, null, 1);
    const doc = { ...state.json, qParams: { ...(state.json.qParams || {}), ...q } };
    const link = $("qparams-download");
    if (link.href.startsWith("blob:")) URL.revokeObjectURL(link.href);
    link.href = URL.createObjectURL(new Blob([JSON.stringify(doc)], { type: "application/json" }));
    link.download = `${graphName.split("/").pop()}.json`;
    pins.say("qParams exported: paste them into Neuronpedia, or download the graph with them");
  });
  $("qparams-import").addEventListener("click", () => pins.importText($("qparams-text").value));
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
  $("path-threshold").addEventListener("input", () => {
    $("path-threshold-value").textContent = Number($("path-threshold").value).toFixed(2);
    if (state.clicked) state.ui.paths = tracePaths(state.model.byId.get(state.clicked));
    queueOverlay();
  });
  const canvas = $("graph-wrap");
  canvas.addEventListener("mousedown", onDown);
  canvas.addEventListener("mousemove", onMove);
  canvas.addEventListener("wheel", onWheel, { passive: false });
  window.addEventListener("mouseup", onUp);
  canvas.addEventListener("mouseleave", () => { state.ui.hover = null; showTooltip(null); queueOverlay(); });
  window.addEventListener("resize", () => requestAnimationFrame(resize));
  window.addEventListener("keydown", (e) => {
    if (e.key === "f" && !/INPUT|TEXTAREA|SELECT/.test(document.activeElement.tagName) && state.mode === "graph") fit();
  });
  $("fit").addEventListener("click", fit);
  document.querySelectorAll(".tabs button").forEach((b) => b.addEventListener("click", () => setView(b.dataset.view)));
  $("supernode-create").addEventListener("click", () => supernodes.create($("supernode-name").value)
    .then(() => { $("supernode-name").value = ""; }));
  $("selection-clear").addEventListener("click", () => { state.ui.selected = new Set(); queueOverlay(); });
  $("supernode-suggest").addEventListener("click", () => supernodes.suggest());
  $("supernode-list").addEventListener("change", queueOverlay);
  $("intervene-run").addEventListener("click", () => onRun(false));
  $("intervene-ablate").addEventListener("click", () => onRun(true));
  $("swap-run").addEventListener("click", onSwap);
  $("swap-source").addEventListener("change", () => { $("swap-prompt").disabled = Boolean($("swap-source").value); });
  document.querySelectorAll("input[name=intervene-on]").forEach((r) => r.addEventListener("change", queueOverlay));
  search($("search"), $("search-results"), state, { onPick: focusNode, onMatches: queueOverlay });
  pinPanel();
}

// --- URL ----------------------------------------------------------------------------------
let urlTimer = null;
function scheduleUrl() {
  clearTimeout(urlTimer);
  urlTimer = setTimeout(() => writeUrl({ view: state.mode, pinned: pins.pinned, groups: pins.groups,
    clicked: state.clicked, expanded: state.circuit ? [...state.circuit.expanded] : [], tf: state.tf }), 50);
}

function onPinsChanged() {
  $("tab-pin-count").textContent = String(pins.pinned.length);
  if (state.mode === "subgraph") drawUnitView();
  queueOverlay();
  scheduleUrl();
}

async function loadCircuit() {
  try {
    const reply = await getJSON(`/api/graph/${graphPath(graphName)}/circuit`);
    if (!reply.circuit) return null;
    const view = new CircuitView(reply.circuit, state.model);
    view.units();
    if (view.missing.length) notice(`circuit file: ${view.missing.length} member node(s) are not in this graph file`);
    $("circuit-panel").replaceChildren(circuitSummary(reply.circuit));
    $("tab-circuit").hidden = false;
    return view;
  } catch (err) {
    notice(`circuit not shown: ${err.message}`);
    return null;
  }
}

async function main() {
  $("raw-json").href = `/api/graph/${graphPath(graphName)}`;
  $("compare-link").href = `/compare?a=${encodeURIComponent(graphName)}`;
  document.title = `${graphName} · cltrace`;
  try {
    state.json = await getJSON(`/api/graph/${graphPath(graphName)}`);
    state.model = buildModel(state.json);
  } catch (err) {
    showError(err.message);
    return markReady(err.message);
  }
  $("prompt").textContent = state.json.metadata.prompt ?? "";
  const circuitPromise = loadCircuit();
  supernodes = new Supernodes(graphName, state.ui, queueOverlay);
  pins = new Pins(graphName, state.model, onPinsChanged);
  const url = readUrl();
  pins.pinned = url.pinned.filter((id) => state.model.byId.has(id));
  pins.groups = url.groups;
  pins.render();
  $("tab-pin-count").textContent = String(pins.pinned.length);
  wire();
  state.circuit = await circuitPromise;
  if (state.circuit) url.expanded.forEach((id) => state.circuit.expanded.add(id));
  state.mode = url.view || (state.circuit ? "circuit" : "graph");
  if (url.tf) state.tf = url.tf;
  resize(false);
  setView(state.mode);
  if (url.clicked && state.model.byId.has(url.clicked)) openNode(state.model.byId.get(url.clicked));
  requestAnimationFrame(() => setTimeout(markReady, 0));  // after the first frame is painted
  supernodes.load();
  pins.loadSaved();
  loadLabelScores();
  loadSwapSources();
}

// Label detection scores from the feature store (when served with one) onto the nodes.
async function loadLabelScores() {
  try {
    const { labels } = await getJSON(`/api/graph/${graphPath(graphName)}/labels`);
    for (const [id, info] of Object.entries(labels)) {
      const n = state.model.byId.get(id);
      if (n && typeof info.detection === "number") n.score = info.detection;
    }
    window.__labelScores = Object.keys(labels).length;
  } catch (err) {
    notice(`label scores not loaded: ${err.message}`);
    window.__labelScores = 0;
  }
}

main();
