// The compare page: two graphs as a difference (features and supernodes that appear, vanish
// or change, from /api/compare), side by side (two graph pages), or a document written by
// `cltrace diff` (docs/DIFF_FORMAT.md: influence recomputed on the full graphs, paths).

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
  const act = (x) => (x && x.activation != null ? Number(x.activation).toFixed(2) : "–");
  const delta = n.delta_influence ?? n.delta_activation ?? 0;
  const what = n.kind === "error" ? `error L${n.layer}` : `L${n.layer} #${n.feature}`;
  return el("tr", { "data-testid": "compare-row", className: n.status },
    el("td", { textContent: n.status }), el("td", { textContent: what }),
    el("td", { textContent: String(n.slot) }), el("td", { textContent: side.label || (side.node_ids || []).join(" ") }),
    el("td", { textContent: act(n.a) }), el("td", { textContent: act(n.b) }),
    el("td", { textContent: Number(delta).toFixed(3) }));
}

function render(d, deltaName) {
  $("compare-prompts").replaceChildren(el("div", {}, "A: ", tokens(d.a, d.alignment, "a")),
    el("div", {}, "B: ", tokens(d.b, d.alignment, "b")));
  $("compare-counts").textContent = `${d.counts.appeared} appeared · ${d.counts.vanished} vanished · ${d.counts.changed} changed`
    + (d.answer_changed ? " · the answer changed" : "");
  $("compare-supernodes").replaceChildren(supernodeList(d.supernodes));
  $("compare-delta").textContent = deltaName;
  document.querySelector("#compare-table tbody").replaceChildren(...d.nodes.map(row));
  const paths = [...((d.paths || {}).a || []).map((x) => ["A", x]), ...((d.paths || {}).b || []).map((x) => ["B", x])];
  $("compare-paths").replaceChildren(...paths.map(([side, x]) => el("li", { "data-testid": "compare-path" },
    `${side}: ${x.nodes.join(" → ")} (strength ${Number(x.strength).toFixed(3)})`)));
}

async function showFile() {
  const name = $("compare-file").value;
  if (!name) { $("compare-error").textContent = "no `cltrace diff` file (diff-*.json) in the graph folders"; return; }
  try {
    const d = await getJSON(`/api/diff/${graphPath(name)}`);
    d.a.tokens = d.a.tokens || []; d.b.tokens = d.b.tokens || [];
    render(d, "Δ influence");
  } catch (err) { $("compare-error").textContent = err.message; }
}

function supernodeList(items) {
  if (!items) return el("p", { className: "muted", textContent: "supernodes: a circuit file beside both graphs is needed" });
  return el("ul", { id: "compare-sn" }, ...items.map((s) => el("li", { "data-testid": "compare-sn" },
    `${s.status}: ${(s.a || {}).name ?? "–"} → ${(s.b || {}).name ?? "–"} (Δ share ${s.delta_influence.toFixed(3)})`)));
}

async function show() {
  const a = $("compare-a").value, b = $("compare-b").value;
  history.replaceState(null, "", `/compare?a=${encodeURIComponent(a)}&b=${encodeURIComponent(b)}&mode=${mode()}`
    + (mode() === "file" ? `&file=${encodeURIComponent($("compare-file").value)}` : ""));
  const side = mode() === "side";
  $("compare-side").hidden = !side; $("compare-diff").hidden = side;
  $("compare-error").textContent = "";
  if (side) {
    $("frame-a").src = `/graph/${graphPath(a)}`; $("frame-b").src = `/graph/${graphPath(b)}`;
    return;
  }
  if (mode() === "file") { await showFile(); window.__compareReady = true; return; }
  try {
    const d = await getJSON(`/api/compare?a=${encodeURIComponent(a)}&b=${encodeURIComponent(b)}`);
    render(d, "Δ activation");
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
  let files = [];
  try { files = (await getJSON("/api/diffs")).diffs; } catch (err) { $("compare-error").textContent = err.message; }
  $("compare-file").replaceChildren(...files.map((f) => el("option", { value: f.name, selected: f.name === params.get("file"),
    textContent: f.error ? `${f.name} (${f.error})` : `${f.name}: ${f.a} | ${f.b}` })));
  const wanted = params.get("mode");
  if (wanted === "side" || wanted === "file") document.querySelector(`input[value=${wanted}]`).checked = true;
  for (const id of ["compare-a", "compare-b", "compare-file"]) $(id).addEventListener("change", show);
  document.querySelectorAll("input[name=compare-mode]").forEach((r) => r.addEventListener("change", show));
  if (names.length || mode() === "file") await show();
  window.__compareReady = true;
}

main();
