// A node's QK attribution in its connections (`qk_tracing_results`, docs/QK_FORMAT.md): for each
// explained head, why it attends from the query position to the key position: the head
// (layer.head), query → key positions and tokens, the pre-softmax score, the one-line summary
// and the top (query-side source × key-side source) pairs with their contributions. A source
// that is a node of this graph is a link (`links.onNode` selects it); `bias`, `bos` and sources
// pruned away are plain text. Nodes without QK data get nothing ("").

import { el } from "./api.js";

const TOP_PAIRS = 8;

export function qkSection(node, links) {
  const qk = node.raw && node.raw.qk_tracing_results;
  if (!qk || typeof qk !== "object") return "";
  const heads = Array.isArray(qk.heads) && qk.heads.length ? qk.heads : [qk];
  return el("section", { id: "qk-section" },
    el("h4", { textContent: `Why attention reaches here (QK, ${heads.length} head${heads.length === 1 ? "" : "s"})` }),
    el("ol", { id: "qk-heads", className: "qk-heads" }, ...heads.map((h) => headItem(h, links))));
}

function headItem(h, links) {
  const { tokens } = links.model;
  const pos = (p) => (Number.isInteger(p) ? `${p} “${tokens[p] ?? "?"}”` : "?");
  const name = `${h.layer}.${h.head}`;
  const facts = [`score ${num(h.score)}`];
  if (typeof h.pair_sum === "number") facts.push(`pairs sum ${num(h.pair_sum)}`);
  if (typeof h.pattern === "number") facts.push(`pattern ${num(h.pattern)}`);
  if (typeof h.constant_part === "number") facts.push(`constants ${num(h.constant_part)}`);
  if (typeof h.softcap === "number") facts.push(`softcap ${h.softcap}`);
  const pairs = Array.isArray(h.pair_wise_contributors) ? h.pair_wise_contributors.slice(0, TOP_PAIRS) : [];
  return el("li", { className: "qk-head", "data-head": name },
    el("div", {}, el("b", { className: "qk-head-name", textContent: `head ${name}` }),
      el("span", { className: "qk-positions", textContent: ` q ${pos(h.q_pos)} → k ${pos(h.k_pos)}` })),
    el("div", { className: "muted qk-facts", textContent: facts.join(" · ") }),
    h.summary ? el("div", { className: "qk-summary", textContent: h.summary }) : "",
    el("ol", { className: "connections qk-pairs" },
      ...pairs.map((p) => pairItem(p, links)),
      ...(pairs.length ? [] : [el("li", { className: "muted", textContent: "no pairs" })]),
      ...(h.n_pairs > pairs.length ? [el("li", { className: "muted more", textContent: `of ${h.n_pairs} pairs` })] : [])));
}

function pairItem([qId, kId, value], links) {
  return el("li", { className: `qk-pair ${value >= 0 ? "pos" : "neg"}` },
    source(qId, "q", links), el("span", { className: "muted", textContent: " × " }), source(kId, "k", links),
    el("span", { className: "value", textContent: ` ${num(value)}` }));
}

function source(id, side, links) {
  const node = links.model.byId.get(String(id));
  const title = `${side === "q" ? "query" : "key"}-side source ${id}`;
  if (!node) {
    const text = id === "bias" ? "bias" : id === "bos" ? "bos (first token)" : String(id);
    const constant = id === "bias" || id === "bos";
    return el("span", { className: "qk-source", title: constant ? title : `${title} (not in this graph)`,
      textContent: text, "data-source": String(id) });
  }
  return el("a", { href: "#", className: "node-link qk-source", title, "data-source": node.id,
    textContent: node.label || node.id, onclick: (e) => { e.preventDefault(); links.onNode(node); } });
}

function num(x) {
  return typeof x === "number" && Number.isFinite(x) ? x.toFixed(3) : "–";
}
