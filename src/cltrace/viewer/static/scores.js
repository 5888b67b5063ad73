// Replacement and completeness scores of a subgraph, computed in the page on the graph JSON's
// links: the same formulas as cltrace.attribution.prune.graph_scores (METHOD.md §4), with the
// pruned graph's links standing in for the full adjacency.
//
//   Â = |A| with rows scaled to sum to 1 (A[target, source] = link weight)
//   I = w·(Â + Â² + ...), w = the logit nodes' probabilities
//   replacement  = I(embeddings) / (I(embeddings) + I(error nodes))
//   completeness = Σ_i (1 - Σ_{j error} Â[i, j]) (I_i + w_i) / Σ_i (I_i + w_i)
//
// With a subgraph (`keep`, a Set of node ids), every feature outside it is folded into the
// error nodes, as graph_scores does with a node mask: it counts as an error node and its own
// inputs are dropped.

export function graphScores(model, keep = null) {
  const { nodes, links } = model;
  const isError = new Uint8Array(nodes.length), dropped = new Uint8Array(nodes.length);
  for (const n of nodes) {
    if (n.type === "error") isError[n.i] = 1;
    if (keep && n.type === "feature" && !keep.has(n.id)) { isError[n.i] = 1; dropped[n.i] = 1; }
  }
  const rowSum = new Float64Array(nodes.length);
  for (let j = 0; j < links.n; j++) {
    if (!dropped[links.tgt[j]]) rowSum[links.tgt[j]] += Math.abs(links.w[j]);
  }
  const norm = (j) => (dropped[links.tgt[j]] || rowSum[links.tgt[j]] <= 0 ? 0
    : Math.abs(links.w[j]) / rowSum[links.tgt[j]]);
  const w = new Float64Array(nodes.length);
  for (const n of nodes) if (n.type === "logit") w[n.i] = Number(n.raw.token_prob) || 0;
  const infl = influence(links, norm, w, nodes.length);
  let tokens = 0, errors = 0, num = 0, den = 0;
  const errShare = new Float64Array(nodes.length);
  for (let j = 0; j < links.n; j++) if (isError[links.src[j]]) errShare[links.tgt[j]] += norm(j);
  for (const n of nodes) {
    if (n.type === "embedding") tokens += infl[n.i];
    if (isError[n.i]) errors += infl[n.i];
    const out = infl[n.i] + w[n.i];
    num += (1 - errShare[n.i]) * out; den += out;
  }
  return { replacement: tokens + errors > 0 ? tokens / (tokens + errors) : 0,
           completeness: den > 0 ? num / den : 0 };
}

// I = w·(Â + Â² + ...) by propagating from the logits down the links until nothing moves.
function influence(links, norm, w, n) {
  const total = new Float64Array(n);
  let current = Float64Array.from(w);
  for (let step = 0; step < 1000; step++) {
    const next = new Float64Array(n);
    let any = false;
    for (let j = 0; j < links.n; j++) {
      const v = current[links.tgt[j]];
      if (v !== 0) { const add = v * norm(j); if (add) { next[links.src[j]] += add; any = true; } }
    }
    if (!any) return total;
    for (let i = 0; i < n; i++) total[i] += next[i];
    current = next;
  }
  throw new Error("influence did not converge: the graph has a cycle");
}
