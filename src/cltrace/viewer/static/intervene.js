// Interventions panel: steer selected features (or ticked supernodes), show old vs new top-k.

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
  };
}

export async function runIntervention(request, out) {
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
  } catch (err) {
    out.result.replaceChildren();
    out.error.textContent = err.message;
  }
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

function fmt(p) { return typeof p === "number" ? p.toFixed(4) : ""; }
