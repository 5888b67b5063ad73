// The pinned subgraph: pinned node ids, supernodes grouped from them, its scores, saving and
// loading (POST /api/graph/<name>/subgraphs) and Neuronpedia's qParams
// ({pinnedIds: [id], supernodes: [[name, id, ...]], ...}) in and out.

import { el, getJSON, graphPath, postJSON } from "./api.js";
import { graphScores } from "./scores.js";

const $ = (id) => document.getElementById(id);

export class Pins {
  constructor(graphName, model, onChange) {
    this.graphName = graphName;
    this.model = model;
    this.onChange = onChange;  // redraw + URL after any change
    this.pinned = [];          // node ids, in pin order
    this.groups = [];          // [[name, id, ...]] over pinned ids
    this.saved = [];
    this.base = `/api/graph/${graphPath(graphName)}/subgraphs`;
  }

  has(id) { return this.pinned.includes(id); }

  toggle(ids) {
    const list = Array.isArray(ids) ? ids : [ids];
    const allPinned = list.every((id) => this.has(id));
    for (const id of list) {
      if (allPinned) this.unpin(id);
      else if (!this.has(id) && this.model.byId.has(id)) this.pinned.push(id);
    }
    this.changed();
  }

  unpin(id) {
    this.pinned = this.pinned.filter((x) => x !== id);
    this.groups = this.groups.map((g) => g.filter((x, k) => k === 0 || x !== id)).filter((g) => g.length > 1);
  }

  set(pinned, groups) {
    this.pinned = [...new Set(pinned)].filter((id) => this.model.byId.has(id));
    const ok = new Set(this.pinned);
    this.groups = groups.map((g) => [g[0], ...g.slice(1).filter((id) => ok.has(id))]).filter((g) => g.length > 1);
    this.changed();
  }

  group(name, ids) {
    const members = ids.filter((id) => this.has(id));
    if (!name.trim()) return this.say("name the supernode first", true);
    if (members.length < 1) return this.say("select pinned nodes first (shift-click them)", true);
    const taken = new Set(members);
    this.groups = this.groups.map((g) => [g[0], ...g.slice(1).filter((id) => !taken.has(id))]).filter((g) => g.length > 1);
    this.groups.push([name.trim(), ...members]);
    this.changed();
  }

  changed() { this.render(); this.onChange(); }

  scores() {
    return graphScores(this.model, new Set(this.pinned));
  }

  qParams(clickedId = "") {
    return { pinnedIds: [...this.pinned], supernodes: this.groups.map((g) => [...g]), linkType: "both",
      clickedId: clickedId || "" };
  }

  // Accepts a qParams object, a whole graph document with qParams, or a Neuronpedia URL.
  importText(text) {
    let q;
    try { q = parseQParams(text.trim()); } catch (err) { return this.say(`cannot import: ${err.message}`, true); }
    const ids = [...q.pinnedIds, ...q.supernodes.flatMap((g) => g.slice(1))];
    const unknown = [...new Set(ids.filter((id) => !this.model.byId.has(id)))];
    this.set([...q.pinnedIds, ...q.supernodes.flatMap((g) => g.slice(1))], q.supernodes);
    this.say(`imported ${this.pinned.length} pinned node(s), ${this.groups.length} supernode(s)` +
      (unknown.length ? `; ${unknown.length} id(s) not in this graph were dropped: ${unknown.slice(0, 3).join(", ")}` : ""),
      unknown.length > 0);
  }

  async loadSaved() {
    try { this.saved = (await getJSON(this.base)).subgraphs; } catch (err) { this.say(err.message, true); }
    this.render();
  }

  async save(name) {
    if (!name.trim()) return this.say("name the subgraph first", true);
    if (!this.pinned.length) return this.say("pin nodes first (ctrl-click or the pin button)", true);
    const item = { name: name.trim(), pinnedIds: [...this.pinned], supernodes: this.groups };
    const next = this.saved.filter((s) => s.name !== item.name).concat([item]);
    try {
      const reply = await postJSON(this.base, { subgraphs: next });
      this.saved = next;
      this.say(`saved “${item.name}” to ${reply.file}`);
    } catch (err) { this.say(`not saved: ${err.message}`, true); }
    this.render();
  }

  say(text, isError = false) {
    const status = $("pin-status");
    status.textContent = text;
    status.className = isError ? "error" : "muted";
  }

  render() {
    $("pin-count").textContent = String(this.pinned.length);
    const grouped = new Set(this.groups.flatMap((g) => g.slice(1)));
    $("pin-list").replaceChildren(...this.pinned.filter((id) => !grouped.has(id)).map((id) => {
      const n = this.model.byId.get(id);
      return el("li", { "data-testid": "pin-item" }, el("span", { textContent: n.label || id, title: id }),
        el("button", { textContent: "×", title: "unpin", onclick: () => { this.unpin(id); this.changed(); } }));
    }));
    $("pin-groups").replaceChildren(...this.groups.map((g, k) => el("li", { "data-testid": "pin-group" },
      el("span", { className: "name", textContent: g[0] }), el("span", { className: "muted", textContent: ` ${g.length - 1} nodes ` }),
      el("button", { textContent: "ungroup", onclick: () => { this.groups.splice(k, 1); this.changed(); } }))));
    const s = this.pinned.length ? this.scores() : null;
    $("subgraph-scores").textContent = s
      ? `replacement ${s.replacement.toFixed(3)} · completeness ${s.completeness.toFixed(3)}` : "pin nodes to score a subgraph";
    $("subgraph-saved").replaceChildren(...this.saved.map((item) => el("li", { "data-testid": "saved-subgraph" },
      el("span", { className: "name", textContent: item.name }),
      el("span", { className: "muted", textContent: ` ${item.pinnedIds.length} pinned ` }),
      el("button", { textContent: "load", onclick: () => { this.set(item.pinnedIds, item.supernodes || []); this.say(`loaded “${item.name}”`); } }))));
  }
}

export function parseQParams(text) {
  let q;
  if (/^https?:\/\/|^\?|pinnedIds=/.test(text)) {
    const params = new URLSearchParams(text.includes("?") ? text.slice(text.indexOf("?") + 1) : text);
    q = { pinnedIds: (params.get("pinnedIds") || "").split(",").filter(Boolean),
      supernodes: params.get("supernodes") ? JSON.parse(params.get("supernodes")) : [] };
  } else {
    const doc = JSON.parse(text);
    q = doc && typeof doc === "object" && doc.qParams ? doc.qParams : doc;
  }
  if (!q || typeof q !== "object" || Array.isArray(q)) throw new Error("expected a qParams object");
  const pinned = q.pinnedIds ?? [];
  if (!Array.isArray(pinned) || !pinned.every((x) => typeof x === "string")) {
    throw new Error("pinnedIds must be a list of node id strings");
  }
  const groups = q.supernodes ?? [];
  if (!Array.isArray(groups) || !groups.every((g) => Array.isArray(g) && g.length > 1
      && g.every((x) => typeof x === "string"))) {
    throw new Error("supernodes must be a list of [name, node id, ...] lists of strings");
  }
  return { pinnedIds: pinned, supernodes: groups };
}
