// The compare page: two graphs as a difference (features and supernodes that appear, vanish
// or change, from /api/compare) or side by side (two graph pages).

import { el, getJSON, graphPath } from "./api.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);

function fill(select, names, chosen) {
  select.replaceChildren(...names.map((n) => el("option", { value: n, textContent: n, selected: n === chosen })));
}

function tokens(side, slots, key) {
  const changed = new Set(slots.filter((s) => s.status === "changed").flatMap((s) => s[key]));
  return el("span", { className: "context" }, ...side.tokens.map((t, p) => el("span", {
    className: changed.has(p) ? "tok active" : "tok", textContent: t })));
}

function row(n) {
  const side = n.a || n.b;
  const act = (x) => (x ? x.activation.toFixed(2) : "–");
  return el("tr", { "data-testid": "compare-row", className: n.status },
    el("td", { textContent: n.status }), el("td", { textContent: `L${n.layer} #${n.feature}` }),
    el("td", { textContent: String(n.slot) }), el("td", { textContent: side.label || "" }),
    el("td", { textContent: act(n.a) }), el("td", { textContent: act(n.b) }),
    el("td", { textContent: n.delta_activation.toFixed(2) }));
}

function supernodeList(items) {
  if (!items) return el("p", { className: "muted", textContent: "supernodes: a circuit file beside both graphs is needed" });
  return el("ul", { id: "compare-sn" }, ...items.map((s) => el("li", { "data-testid": "compare-sn" },
    `${s.status}: ${(s.a || {}).name ?? "–"} → ${(s.b || {}).name ?? "–"} (Δ share ${s.delta_influence.toFixed(3)})`)));
}

async function show() {
  const a = $("compare-a").value, b = $("compare-b").value;
  history.replaceState(null, "", `/compare?a=${encodeURIComponent(a)}&b=${encodeURIComponent(b)}&mode=${mode()}`);
  const side = mode() === "side";
  $("compare-side").hidden = !side; $("compare-diff").hidden = side;
  $("compare-error").textContent = "";
  if (side) {
    $("frame-a").src = `/graph/${graphPath(a)}`; $("frame-b").src = `/graph/${graphPath(b)}`;
    return;
  }
  try {
    const d = await getJSON(`/api/compare?a=${encodeURIComponent(a)}&b=${encodeURIComponent(b)}`);
    $("compare-prompts").replaceChildren(el("div", {}, "A: ", tokens(d.a, d.alignment, "a")),
      el("div", {}, "B: ", tokens(d.b, d.alignment, "b")));
    $("compare-counts").textContent = `${d.counts.appeared} appeared · ${d.counts.vanished} vanished · ${d.counts.changed} changed`;
    $("compare-supernodes").replaceChildren(supernodeList(d.supernodes));
    document.querySelector("#compare-table tbody").replaceChildren(...d.nodes.map(row));
  } catch (err) {
    $("compare-error").textContent = err.message;
  }
  window.__compareReady = true;
}

const mode = () => document.querySelector("input[name=compare-mode]:checked").value;

async function main() {
  let names = [];
  try {
    names = (await getJSON("/api/graphs")).graphs.filter((g) => !g.error).map((g) => g.name);
  } catch (err) { $("compare-error").textContent = err.message; }
  fill($("compare-a"), names, params.get("a") || names[0]);
  fill($("compare-b"), names, params.get("b") || names[1] || names[0]);
  if (params.get("mode") === "side") document.querySelector("input[value=side]").checked = true;
  for (const id of ["compare-a", "compare-b"]) $(id).addEventListener("change", show);
  document.querySelectorAll("input[name=compare-mode]").forEach((r) => r.addEventListener("change", show));
  if (names.length) await show();
  window.__compareReady = true;
}

main();
