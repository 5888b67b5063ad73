// The side panel for one node: a feature's dashboard from /api/feature, or a node summary.

import { el, getJSON } from "./api.js";
import { featureIndex } from "./model.js";

export async function showNode(panel, graphName, node) {
  panel.replaceChildren(el("h3", { id: "dashboard-title", textContent: title(node) }));
  if (node.type !== "feature") {
    panel.append(el("p", { className: "muted", textContent: describe(node) }));
    return;
  }
  const layer = parseInt(node.layer, 10), index = featureIndex(node.raw);
  const url = `/api/feature/${layer}/${index}?graph=${encodeURIComponent(graphName)}`;
  panel.append(el("p", { className: "muted", textContent: "loading…" }));
  try {
    renderCard(panel, await getJSON(url), node);
  } catch (err) {
    panel.lastChild.replaceWith(el("p", { className: "error", textContent: err.message }));
  }
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

function renderCard(panel, card, node) {
  const activation = node.raw.activation != null ? Number(node.raw.activation).toFixed(3) : "–";
  panel.lastChild.replaceWith(
    el("div", { id: "dashboard", "data-testid": "dashboard" },
      el("p", { id: "dashboard-label", className: "label", textContent: card.label || "(no label)" }),
      el("p", { className: "muted", textContent:
        `activation here ${activation}` + (card.density != null ? ` · density ${fmtDensity(card.density)}` : "") }),
      card.message ? el("p", { id: "dashboard-message", className: "muted", textContent: card.message }) : "",
      section("Top activating contexts", contexts(card.contexts || [])),
      section("Promoted tokens", tokenList(card.promoted || [], "dashboard-promoted", "pos")),
      section("Suppressed tokens", tokenList(card.suppressed || [], "dashboard-suppressed", "neg"))));
}

function fmtDensity(d) { return d < 0.001 ? d.toExponential(1) : `${(100 * d).toFixed(2)}%`; }

function section(heading, body) {
  return el("section", {}, el("h4", { textContent: heading }), body);
}

function contexts(items) {
  const list = el("ol", { id: "dashboard-contexts", className: "contexts" });
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
