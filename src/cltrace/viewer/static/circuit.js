// The circuit view: the supernodes of <slug>.circuit.json (docs/CIRCUIT_FORMAT.md) as merged,
// labelled nodes with the circuit's aggregated edges. Clicking a feature supernode expands
// it into its member features (edges to and from them summed from the graph's links).

import { el } from "./api.js";
import { aggregateEdges, unitFromNodes } from "./units.js";

const fmt = (v) => (v === null || v === undefined ? "–" : Number(v).toFixed(2));

// Second text line: influence share, and predicted vs measured ablation effect.
export function marks(sn) {
  const share = sn.kind === "logit" ? `p ${fmt(sn.measured_prob ?? null)}` : `${(100 * (sn.influence_share || 0)).toFixed(0)}%`;
  if (sn.kind === "logit") return "answer";
  if (sn.kind !== "features") return sn.influence_share ? share : "";
  if (sn.measured_effect == null && sn.predicted_effect == null) return `${share} · not validated`;
  return `${share} · pred ${fmt(sn.predicted_effect)} / meas ${fmt(sn.measured_effect)}` + (sn.failed ? " ✗" : "");
}

export class CircuitView {
  constructor(circuit, model) {
    this.circuit = circuit;
    this.model = model;
    this.expanded = new Set();
    this.missing = [];  // member ids absent from the graph JSON
  }

  units() {
    const units = [];
    this.missing = [];
    for (const sn of this.circuit.supernodes) {
      const members = (sn.node_ids || []).map((id) => this.model.byId.get(String(id)));
      this.missing.push(...(sn.node_ids || []).filter((_, k) => !members[k]));
      const present = members.filter(Boolean);
      if (!present.length) continue;
      const expandable = sn.kind === "features" && present.length > 1;
      if (expandable && this.expanded.has(sn.id)) {
        for (const n of present) {
          units.push(unitFromNodes(n.id, n.label || n.id, "feature", [n], this.model.nRows,
            { sub: `L${n.layer} #${n.id.split("_")[1]} · in ${sn.name}`.slice(0, 40), parent: sn.id }));
        }
        continue;
      }
      units.push(unitFromNodes(sn.id, sn.name || sn.id, sn.kind, present, this.model.nRows,
        { sub: marks(sn), failed: sn.failed === true, expandable, supernode: sn }));
    }
    return units;
  }

  // The circuit's own edges between unexpanded supernodes; graph links for expanded members.
  edges(units) {
    const plain = new Set(units.filter((u) => u.supernode).map((u) => u.id));
    const own = this.circuit.edges.filter((e) => plain.has(e.source) && plain.has(e.target));
    if (!this.expanded.size) return own;
    return own.concat(aggregateEdges(this.model, units, (s, t) => plain.has(s) && plain.has(t)));
  }

  toggle(id) {
    if (this.expanded.has(id)) this.expanded.delete(id); else this.expanded.add(id);
  }
}

// The side panel's circuit summary: answer, faithfulness, shares, failed parts.
export function circuitSummary(circuit) {
  const f = circuit.faithfulness || {};
  const failed = circuit.supernodes.filter((s) => s.failed === true).map((s) => s.name);
  const validated = circuit.supernodes.some((s) => s.measured_effect != null);
  return el("div", { id: "circuit-summary" },
    el("p", {}, el("b", { textContent: "Circuit" }),
      ` → “${circuit.answer ?? "?"}” (p ${fmt(circuit.answer_prob)}) · ${circuit.supernodes.length} supernodes`),
    el("p", { className: "muted", textContent:
      `influence carried by the feature supernodes ${(100 * (circuit.influence_share || 0)).toFixed(0)}%` }),
    el("p", { id: "circuit-validation", className: validated ? "" : "muted", textContent: validated
      ? `measured vs predicted ablation effects: Spearman ${fmt(f.spearman_supernodes)} over ${f.n_supernodes ?? "?"} supernodes`
        + (failed.length ? ` · failed: ${failed.join(", ")}` : " · no failed supernode")
      : "not validated: predicted and measured effects are missing (trace with a model to validate)" }),
    el("p", { className: "muted", textContent:
      "Click a supernode to expand it into its features; solid blue = positive, red = negative; dashed red border = failed prediction." }));
}
