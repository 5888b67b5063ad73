// The side panel for one node: a feature's dashboard from /api/feature (label and its scores,
// top contexts, quantile examples, token effects, density), or a node summary; then the node's
// strongest inputs and outputs in this graph, each clickable (`links.onNode`), and its QK
// attribution when the graph carries one (qk.js). The label can be
// edited and saved in the feature store (POST /api/feature/<l>/<i>/label; `links.onLabel`).

import { el, getJSON, postJSON } from "./api.js";
import { featureIndex } from "./model.js";
import { qkSection } from "./qk.js";

export async function showNode(panel, graphName, node, links = null) {
  panel.replaceChildren(el("h3", { id: "dashboard-title", textContent: title(node) }));
  if (links) panel.append(pinButton(node, links));
  const connections = links ? connectionLists(node, links) : "";
  if (node.type !== "feature") {
    panel.append(el("p", { className: "muted", textContent: describe(node) }), connections);
    return;
  }
  const layer = parseInt(node.layer, 10), index = featureIndex(node.raw);
  const url = `/api/feature/${layer}/${index}?graph=${encodeURIComponent(graphName)}`;
  const slot = el("p", { className: "muted", textContent: "loading…" });
  panel.append(slot, connections);
  const t0 = performance.now();
  const ctx = { url: `/api/feature/${layer}/${index}/label`, graphName, node, onLabel: links && links.onLabel };
  try {
    slot.replaceWith(cardElement(await getJSON(url), ctx));
  } catch (err) {
    slot.replaceWith(el("p", { id: "dashboard-error", className: "error", textContent: err.message }));
  }
  window.__panelMs = performance.now() - t0;  // for the benchmark: request to rendered card
}

function pinButton(node, links) {
  const pinned = links.pins.has(node.id);
  return el("div", { className: "row" }, el("button", { id: "pin-node", textContent: pinned ? "unpin" : "pin to subgraph",
    onclick: () => { links.pins.toggle(node.id); links.onNode(node); } }));
}

// The node's strongest inputs and outputs in this graph (all links, not only visible ones).
function connectionLists(node, links) {
  const { model } = links;
  const item = (j, end) => {
    const other = model.nodes[end[j]];
    return el("li", { className: model.links.w[j] >= 0 ? "pos" : "neg" },
      el("a", { href: "#", className: "node-link", textContent: other.label || other.id, title: other.id,
        onclick: (e) => { e.preventDefault(); links.onNode(other); } }),
      el("span", { className: "value", textContent: ` ${model.links.w[j].toFixed(3)}` }));
  };
  const list = (ids, end, id) => el("ol", { id, className: "connections" },
    ...ids.slice(0, 8).map((j) => item(j, end)),
    ...(ids.length ? [] : [el("li", { className: "muted", textContent: "none" })]));
  return el("div", { id: "connections" },
    section(`Strongest inputs (${node.ins.length})`, list(node.ins, model.links.src, "inputs-list")),
    section(`Strongest outputs (${node.outs.length})`, list(node.outs, model.links.tgt, "outputs-list")),
    qkSection(node, links));
}

function title(node) {
  if (node.type === "feature") return `Feature L${node.layer} #${featureIndex(node.raw)} @ ${node.ctx}`;
  if (node.type === "error") return `Error node L${node.layer} @ ${node.ctx}`;
  if (node.type === "embedding") return `Embedding @ ${node.ctx}`;
  return `Logit ${node.label || node.id}`;
}

function describe(node) {
  const parts = [node.label, `id ${node.id}`];
  if (node.raw.token_prob) parts.push(`p = ${Number(node.raw.token_prob).toFixed(3)}`);
  if (node.influence !== null) parts.push(`influence ${node.influence.toFixed(3)}`);
  return parts.filter(Boolean).join(" · ");
}

function cardElement(card, ctx) {
  const { node } = ctx;
  const activation = node.raw.activation != null ? Number(node.raw.activation).toFixed(3) : "–";
  const quantiles = card.quantiles || [];
  return (
    el("div", { id: "dashboard", "data-testid": "dashboard" },
      el("p", { id: "dashboard-label", className: "label", textContent: card.label || "(no label)" },
        card.label_source === "user" ? el("span", { id: "dashboard-label-source", className: "muted", textContent: " (your label)" }) : ""),
      labelEditor(card, ctx),
      el("p", { id: "dashboard-score", className: "muted", textContent: scoreText(card) }),
      labelParts(card),
      el("p", { className: "muted", textContent:
        `activation here ${activation}` + (card.density != null ? ` · density ${fmtDensity(card.density)}` : "")
        + (card.max_activation != null ? ` · max ${Number(card.max_activation).toFixed(2)}` : "") }),
      card.message ? el("p", { id: "dashboard-message", className: "muted", textContent: card.message }) : "",
      section("Top activating contexts", contexts(card.contexts || [], "dashboard-contexts")),
      quantiles.length ? section("Examples by activation range", quantileList(quantiles)) : "",
      section("Promoted tokens", tokenList(card.promoted || [], "dashboard-promoted", "pos")),
      section("Suppressed tokens", tokenList(card.suppressed || [], "dashboard-suppressed", "neg"))));
}

// Edit the label: saved as the user's label in the feature store; "" reverts to the automatic one.
// The refreshed card replaces this one; the node's label in the graph follows.
function labelEditor(card, ctx) {
  const status = el("span", { id: "label-status", className: "muted" });
  const input = el("input", { id: "label-input", maxLength: 200, placeholder: "your label",
    value: card.label_source === "user" ? card.label : (card.label || "") });
  const save = async (label) => {
    status.className = "muted"; status.textContent = "saving…";
    try {
      const fresh = await postJSON(ctx.url, { graph: ctx.graphName, label });
      const next = cardElement(fresh, ctx);
      document.getElementById("dashboard").replaceWith(next);
      next.querySelector("#label-status").textContent = label ? "saved" : "automatic label restored";
      ctx.node.label = fresh.label || ctx.node.label;
      if (ctx.onLabel) ctx.onLabel(ctx.node);
    } catch (err) {
      status.className = "error"; status.textContent = err.message;
    }
  };
  input.addEventListener("keydown", (e) => { if (e.key === "Enter") save(input.value.trim()); });
  return el("details", { id: "label-editor" }, el("summary", { textContent: "edit label" }),
    el("div", { className: "row" }, input,
      el("button", { id: "label-save", textContent: "save", onclick: () => save(input.value.trim()) }),
      card.label_source === "user" ? el("button", { id: "label-clear", textContent: "use the automatic label", onclick: () => save("") }) : ""),
    status);
}

// `detection 0.93 · output 0.88`, as features/dashboard.score_text words it.
export function scoreText(card) {
  if (card.label_broad) return "label not scored (broad feature)";
  const parts = [["detection", card.label_detection], ["output", card.label_output]]
    .filter(([, v]) => typeof v === "number").map(([k, v]) => `${k} ${v.toFixed(2)}`);
  if (parts.length) return `label score: ${parts.join(" · ")}` + (card.label_source === "user" && card.auto_label ? ` (of the automatic label “${card.auto_label}”)` : "");
  return "label not scored";
}

function labelParts(card) {
  const reads = card.label_reads || [], writes = card.label_writes || [];
  if (!reads.length && !writes.length) return "";
  return el("p", { id: "dashboard-label-parts", className: "muted",
    textContent: `reads: ${reads.join(", ") || "–"} · writes: ${writes.join(", ") || "–"}` });
}

function quantileList(bins) {
  return el("div", { id: "dashboard-quantiles" }, ...bins.map((bin) => el("details", {},
    el("summary", { textContent: `${Number(bin.low).toFixed(2)} – ${Number(bin.high).toFixed(2)} (${(bin.examples || []).length})` }),
    contexts(bin.examples || [], null))));
}

function fmtDensity(d) { return d < 0.001 ? d.toExponential(1) : `${(100 * d).toFixed(2)}%`; }

function section(heading, body) {
  return el("section", {}, el("h4", { textContent: heading }), body);
}

function contexts(items, id) {
  const list = el("ol", id ? { id, className: "contexts" } : { className: "contexts" });
  for (const ctx of items) {
    const row = el("li", { className: "context" });
    (ctx.tokens || []).forEach((tok, k) => row.append(el("span", {
      className: k === ctx.active_index ? "tok active" : "tok", textContent: tok,
      title: k === ctx.active_index ? `activation ${ctx.value}` : "",
    })));
    row.append(el("span", { className: "value", textContent: ` ${Number(ctx.value).toFixed(2)}` }));
    list.append(row);
  }
  if (!items.length) list.append(el("li", { className: "muted", textContent: "none" }));
  return list;
}

function tokenList(items, id, cls) {
  const list = el("ul", { id, className: `tokens ${cls}` });
  for (const t of items) {
    list.append(el("li", {}, el("code", { textContent: t.token }),
      el("span", { className: "value", textContent: ` ${Number(t.value).toFixed(3)}` })));
  }
  if (!items.length) list.append(el("li", { className: "muted", textContent: "none" }));
  return list;
}
