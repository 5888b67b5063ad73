// Interventions panel: steer, ablate or swap the selected / pinned features or supernodes, show
// old vs new top-k and continuations; every run is kept in a side list (#intervene-history).
// A swap (POST /api/swap, viewer/swap.py) replaces the targets by the matching features of a
// second prompt (another graph of the folder, or typed) with the library's graph-guided swap.

import { el, postJSON } from "./api.js";
import { featureIndex } from "./model.js";

export function interventionTargets(model, ids) {
  const seen = new Set(), targets = [];
  for (const id of ids) {
    const n = model.byId.get(id);
    if (!n || n.type !== "feature" || seen.has(id)) continue;
    seen.add(id);
    targets.push(n);
  }
  return targets;
}

export function buildRequest(graphName, targets, form) {
  return {
    graph: graphName,
    interventions: targets.map((n) => ({
      layer: parseInt(n.layer, 10), feature: featureIndex(n.raw),
      pos: form.allPositions ? null : n.ctx, mode: form.mode, value: form.value,
    })),
    generate: form.generate,
    freeze_attention: Boolean(form.freeze),
  };
}

export async function runIntervention(request, out, describe = "") {
  out.error.textContent = "";
  out.result.replaceChildren(el("p", { className: "muted", textContent: "running…" }));
  out.continuation.textContent = "";
  try {
    const reply = await postJSON("/api/intervene", request);
    out.result.replaceChildren(comparisonTable(reply.before || [], reply.after || []));
    if (reply.continuation) {
      out.continuation.textContent = `continuation: ${reply.continuation}`;
      if (reply.continuation_before) out.continuation.textContent += `  (was: ${reply.continuation_before})`;
    }
    if (out.history) out.history.prepend(historyItem(request, reply, describe));
  } catch (err) {
    out.result.replaceChildren();
    out.error.textContent = err.message;
  }
}

// The swap request: the target feature ids of this graph, the supernode's name (matched in the
// second graph's circuit), and the second prompt as a graph name or as text.
export function buildSwapRequest(graphName, targets, name, source, generate) {
  const request = { graph: graphName, node_ids: targets.map((n) => n.id), generate };
  if (name) request.name = name;
  if (source.graph) request.source_graph = source.graph; else request.source_prompt = source.prompt;
  return request;
}

export async function runSwap(request, out, describe = "") {
  out.error.textContent = "";
  out.summary.textContent = "";
  out.result.replaceChildren(el("p", { className: "muted", textContent: "swapping… (the first swap with a new prompt traces it)" }));
  out.continuation.textContent = "";
  try {
    const reply = await postJSON("/api/swap", request);
    out.result.replaceChildren(comparisonTable(reply.before || [], reply.after || []));
    out.summary.textContent = swapSummary(reply.swap);
    if (reply.continuation) {
      out.continuation.textContent = `continuation: ${reply.continuation}`;
      if (reply.continuation_before) out.continuation.textContent += `  (was: ${reply.continuation_before})`;
    }
    if (out.history) out.history.prepend(swapHistoryItem(reply, describe));
    return reply;
  } catch (err) {
    out.result.replaceChildren();
    out.error.textContent = err.message;
    return null;
  }
}

function swapSummary(s) {
  return `swap ${s.flipped ? "flipped" : "did not flip"} the answer: ${s.pairs_touched} (feature, position) pairs touched `
    + `(${s.n_candidates[0]} pinned and ${s.n_candidates[1]} B features at the differing tokens; ${s.source}) · `
    + `P(“${s.answer_b}”) ${fmt(s.p_b[0])} → ${fmt(s.p_b[1])} · P(“${s.answer_a}”) ${fmt(s.p_a[0])} → ${fmt(s.p_a[1])}`;
}

function swapHistoryItem(reply, describe) {
  const s = reply.swap;
  const b = (reply.before || [])[0] || {}, a = (reply.after || [])[0] || {};
  return el("li", { "data-testid": "intervene-history-item", className: "swap" },
    el("b", { textContent: `swap ${describe}` }), ` ← “${s.prompt_b}”, ${s.pairs_touched} pairs${s.flipped ? ", flipped" : ""}: `,
    el("code", { textContent: b.token ?? "" }), ` ${fmt(b.prob)} → `, el("code", { textContent: a.token ?? "" }),
    ` ${fmt(a.prob)}`, reply.continuation ? el("div", { className: "continuation", textContent: `“${reply.continuation}”` }) : "");
}

function comparisonTable(before, after) {
  const rows = Math.max(before.length, after.length);
  const table = el("table", { id: "intervene-table", className: "compare" },
    el("thead", {}, el("tr", {}, ...["before", "p", "after", "p"].map((h) => el("th", { textContent: h })))));
  const body = el("tbody");
  for (let k = 0; k < rows; k++) {
    const b = before[k] || {}, a = after[k] || {};
    body.append(el("tr", { "data-testid": "intervene-row" },
      el("td", {}, el("code", { textContent: b.token ?? "" })), el("td", { textContent: fmt(b.prob) }),
      el("td", {}, el("code", { textContent: a.token ?? "" })),
      el("td", { className: "after-prob", textContent: fmt(a.prob) })));
  }
  table.append(body);
  return table;
}

// One line per run: what was done, the top token before → after, the continuation.
function historyItem(request, reply, describe) {
  const first = request.interventions[0];
  const what = `${first.mode === "set" ? "set to" : "×"} ${first.value}` + (request.freeze_attention ? " · frozen attention" : "");
  const b = (reply.before || [])[0] || {}, a = (reply.after || [])[0] || {};
  return el("li", { "data-testid": "intervene-history-item" },
    el("b", { textContent: describe || `${request.interventions.length} feature(s)` }), ` ${what}: `,
    el("code", { textContent: b.token ?? "" }), ` ${fmt(b.prob)} → `, el("code", { textContent: a.token ?? "" }),
    ` ${fmt(a.prob)}`, reply.continuation ? el("div", { className: "continuation", textContent: `“${reply.continuation}”` }) : "");
}

function fmt(p) { return typeof p === "number" ? p.toFixed(4) : ""; }
