// The search box: features by label, by `layer:index` (`L3:212`, `3/212`), or by token (the
// nodes at positions whose token matches). Matches are highlighted; picking one focuses it.

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

export function search(input, list, state, { onPick, onMatches }) {
  let timer = null, found = [];
  const pick = (n) => { list.hidden = true; onPick(n); };
  const update = () => {
    found = findNodes(state.model, input.value);
    state.ui.matches = new Set(found.slice(0, MAX_MARKED).map((n) => n.id));
    onMatches();
    if (!input.value.trim()) { list.hidden = true; return; }
    list.replaceChildren(...found.slice(0, MAX_LISTED).map((n) => el("li", { "data-testid": "search-result",
      onmousedown: (e) => { e.preventDefault(); pick(n); } },
      el("span", { textContent: n.label || n.id }), el("span", { className: "muted", textContent: ` ${n.id}` }))));
    if (!found.length) list.append(el("li", { className: "muted", textContent: "no match" }));
    else if (found.length > MAX_LISTED) list.append(el("li", { className: "muted", textContent: `… ${found.length} matches` }));
    list.hidden = false;
  };
  input.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(update, 120); });
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") { clearTimeout(timer); update(); if (found.length) pick(found[0]); }
    if (e.key === "Escape") { input.value = ""; update(); }
  });
  input.addEventListener("blur", () => setTimeout(() => { list.hidden = true; }, 150));
}
