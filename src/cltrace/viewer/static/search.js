// The search box: features by label, by `layer:index` (`L3:212`, `3/212`), or by token (the
// nodes at positions whose token matches). Matches are highlighted; picking one focuses it.
// With label scores loaded (`node.score`, the label's detection score), results can be sorted
// by score and features below a minimum score hidden.

import { el } from "./api.js";
import { featureIndex } from "./model.js";

const MAX_LISTED = 30, MAX_MARKED = 2000;

export function findNodes(model, query) {
  const q = query.trim().toLowerCase();
  if (!q) return [];
  const id = /^l?(\d+)\s*[:/#]\s*(\d+)$/.exec(q);
  if (id) {
    const [layer, index] = [Number(id[1]), Number(id[2])];
    return model.nodes.filter((n) => n.type === "feature" && parseInt(n.layer, 10) === layer
      && featureIndex(n.raw) === index);
  }
  const positions = new Set();
  model.tokens.forEach((t, p) => { if (String(t).trim().toLowerCase() === q) positions.add(p); });
  const byToken = model.ranked.filter((n) => positions.has(n.ctx));
  const byLabel = model.ranked.filter((n) => n.label && n.label.toLowerCase().includes(q) && !positions.has(n.ctx));
  const ends = model.nodes.filter((n) => (n.type === "embedding" || n.type === "logit")
    && (positions.has(n.ctx) && n.type === "embedding" || (n.label || "").toLowerCase().includes(q)));
  return [...byLabel, ...byToken, ...ends];
}

// Sort by label score (best first, unscored last) and drop features below `min`.
export function rankByScore(nodes, order, min) {
  const kept = Number.isFinite(min) ? nodes.filter((n) => n.type !== "feature" || (n.score ?? -1) >= min) : nodes;
  if (order !== "score") return kept;
  return [...kept].sort((a, b) => (b.score ?? -1) - (a.score ?? -1));
}

export function search(input, list, state, { onPick, onMatches }) {
  let timer = null, found = [];
  const pick = (n) => { list.hidden = true; onPick(n); };
  const update = () => {
    const min = document.getElementById("search-min").value;
    found = rankByScore(findNodes(state.model, input.value), document.getElementById("search-sort").value,
      min === "" ? NaN : Number(min));
    state.ui.matches = new Set(found.slice(0, MAX_MARKED).map((n) => n.id));
    onMatches();
    if (!input.value.trim()) { list.hidden = true; return; }
    list.replaceChildren(...found.slice(0, MAX_LISTED).map((n) => el("li", { "data-testid": "search-result",
      onmousedown: (e) => { e.preventDefault(); pick(n); } },
      el("span", { textContent: n.label || n.id }), el("span", { className: "muted", textContent: ` ${n.id}` }),
      n.score != null ? el("span", { className: "score", textContent: ` ${n.score.toFixed(2)}` }) : "")));
    if (!found.length) list.append(el("li", { className: "muted", textContent: "no match" }));
    else if (found.length > MAX_LISTED) list.append(el("li", { className: "muted", textContent: `… ${found.length} matches` }));
    list.hidden = false;
  };
  input.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(update, 120); });
  for (const id of ["search-sort", "search-min"]) document.getElementById(id).addEventListener("change", update);
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") { clearTimeout(timer); update(); if (found.length) pick(found[0]); }
    if (e.key === "Escape") { input.value = ""; update(); }
  });
  input.addEventListener("blur", () => setTimeout(() => { list.hidden = true; }, 150));
}
