// The graph list page: one row per saved graph, errors shown inline.

import { el, getJSON, graphPath } from "./api.js";

function size(bytes) {
  return bytes > 1e6 ? `${(bytes / 1e6).toFixed(1)} MB` : `${Math.ceil(bytes / 1e3)} kB`;
}

function row(g) {
  const link = el("a", { href: `/graph/${graphPath(g.name)}`, textContent: g.name });
  const prompt = g.error ? el("span", { className: "error", textContent: g.error }) : g.prompt ?? "";
  return el("tr", { "data-testid": "graph-row" }, el("td", {}, link), el("td", {}, prompt),
    el("td", { textContent: g.n_nodes ?? "–" }), el("td", { textContent: g.n_links ?? "–" }),
    el("td", { textContent: size(g.size_bytes) }));
}

async function main() {
  const body = document.querySelector("#graph-list tbody");
  try {
    const { graphs, folders } = await getJSON("/api/graphs");
    document.getElementById("folders").textContent = `from ${folders.join(", ")}`;
    body.replaceChildren(...graphs.map(row));
    if (!graphs.length) body.append(el("tr", {}, el("td", { colSpan: 5, className: "muted",
      textContent: "no graphs yet: run `cltrace trace` to make one" })));
  } catch (err) {
    document.getElementById("list-error").textContent = err.message;
  }
}

main();
