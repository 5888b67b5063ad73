// Replacement and completeness scores of a subgraph, computed in the page on the graph JSON's
// links: the same formulas as cltrace.attribution.prune.graph_scores (METHOD.md §4), with the
// graph file's links standing in for the full adjacency (equal to it for an unpruned export).
//
//   Â = |A| with rows scaled to sum to 1 (A[target, source] = link weight)
//   I = w·(Â + Â² + ...), w = the logit nodes' probabilities
//   replacement  = I(embeddings) / (I(embeddings) + I(error nodes))
//   completeness = Σ_i (1 - Σ_{j error} Â[i, j]) (I_i + w_i) / Σ_i (I_i + w_i)
//
// With a subgraph (`keep`, a Set of node ids), every feature outside it is folded into the
// error node of its (layer, position), as graph_scores does with a node mask: its outgoing
// weights are added to that error node's (signed, before |·|) and its own inputs dropped. A
// dropped feature whose error node is not in the file stands as an error node of its own.

export function graphScores(model, keep = null) {
  const { nodes } = model;
  const dropped = new Uint8Array(nodes.length), isError = new Uint8Array(nodes.length);
  for (const n of nodes) {
    if (n.type === "error") isError[n.i] = 1;
    if (keep && n.type === "feature" && !keep.has(n.id)) dropped[n.i] = 1;
  }
  const links = foldedLinks(model, dropped, isError);
  const rowSum = new Float64Array(nodes.length);
  for (let j = 0; j < links.n; j++) rowSum[links.tgt[j]] += Math.abs(links.w[j]);
  const norm = new Float64Array(links.n);
  for (let j = 0; j < links.n; j++) norm[j] = Math.abs(links.w[j]) / Math.max(rowSum[links.tgt[j]], 1e-10);
  const w = new Float64Array(nodes.length);
  for (const n of nodes) if (n.type === "logit") w[n.i] = Number(n.raw.token_prob) || 0;
  const infl = influence(links, norm, w, nodes.length);
  const errShare = new Float64Array(nodes.length);
  for (let j = 0; j < links.n; j++) if (isError[links.src[j]]) errShare[links.tgt[j]] += norm[j];
  let tokens = 0, errors = 0, num = 0, den = 0;
  for (const n of nodes) {
    if (n.type === "embedding") tokens += infl[n.i];
    if (isError[n.i]) errors += infl[n.i];
    const out = infl[n.i] + w[n.i];
    num += (1 - errShare[n.i]) * out; den += out;
  }
  return { replacement: tokens + errors > 0 ? tokens / (tokens + errors) : 0,
           completeness: den > 0 ? num / den : 0 };
}

// The links after folding: inputs of dropped features removed, their outputs moved to their
// error node and summed with its own (marks `isError` for dropped features left alone).
function foldedLinks(model, dropped, isError) {
  const { links, nodes } = model;
  const errorAt = new Map();
  for (const n of nodes) if (n.type === "error") errorAt.set(`${n.layerNum}:${n.ctx}`, n.i);
  const sums = new Map();  // `${target}:${source}` -> summed weight, sources after folding
  for (let j = 0; j < links.n; j++) {
    const t = links.tgt[j];
    if (dropped[t]) continue;
    let s = links.src[j];
    if (dropped[s]) {
      const err = errorAt.get(`${nodes[s].layerNum}:${nodes[s].ctx}`);
      if (err === undefined) isError[s] = 1; else s = err;
    }
    const key = t * nodes.length + s;
    sums.set(key, (sums.get(key) || 0) + links.w[j]);
  }
  const n = sums.size, src = new Int32Array(n), tgt = new Int32Array(n), w = new Float64Array(n);
  let j = 0;
  for (const [key, value] of sums) {
    tgt[j] = Math.floor(key / nodes.length); src[j] = key % nodes.length; w[j] = value; j++;
  }
  return { n, src, tgt, w };
}

// I = w·(Â + Â² + ...) by propagating from the logits down the links until nothing moves.
function influence(links, norm, w, n) {
  const total = new Float64Array(n);
  let current = Float64Array.from(w);
  for (let step = 0; step < 1000; step++) {
    const next = new Float64Array(n);
    let any = false;
    for (let j = 0; j < links.n; j++) {
      const add = current[links.tgt[j]] * norm[j];
      if (add) { next[links.src[j]] += add; any = true; }
    }
    if (!any) return total;
    for (let i = 0; i < n; i++) total[i] += next[i];
    current = next;
  }
  throw new Error("influence did not converge: the graph has a cycle");
}
