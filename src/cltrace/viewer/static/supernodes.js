// Supernodes: named groups of nodes, saved beside the graph via POST .../supernodes.

import { el, getJSON, graphPath, postJSON } from "./api.js";

export class Supernodes {
  constructor(graphName, ui, onChange) {
    this.base = `/api/graph/${graphPath(graphName)}/supernodes`;
    this.ui = ui;              // shared UI state: ui.groups, ui.selected
    this.onChange = onChange;  // redraw after any change
    this.list = document.getElementById("supernode-list");
    this.status = document.getElementById("supernode-status");
    this.suggestions = document.getElementById("suggestion-list");
  }

  async load() {
    try {
      this.ui.groups = (await getJSON(this.base)).supernodes;
    } catch (err) {
      this.ui.groups = []; this.say(err.message, true);
    }
    this.render();
  }

  async create(name) {
    const ids = [...this.ui.selected];
    if (!name.trim()) return this.say("name the group first", true);
    if (!ids.length) return this.say("select nodes first (shift-click or drag a box)", true);
    this.ui.groups.push({ name: name.trim(), node_ids: ids });
    await this.save();
  }

  async remove(index) {
    this.ui.groups.splice(index, 1);
    await this.save();
  }

  async save() {
    this.render();
    try {
      const reply = await postJSON(this.base, { supernodes: this.ui.groups });
      this.say(`saved ${reply.saved} group(s) to ${reply.file}`);
    } catch (err) {
      this.say(`not saved: ${err.message}`, true);
    }
  }

  async suggest() {
    this.suggestions.replaceChildren(el("li", { className: "muted", textContent: "…" }));
    let items = [];
    try { items = (await getJSON(`${this.base}/suggest`)).suggestions; } catch (err) {
      return this.suggestions.replaceChildren(el("li", { className: "error", textContent: err.message }));
    }
    this.suggestions.replaceChildren(...items.map((s) => el("li", { "data-testid": "suggestion" },
      el("span", { textContent: `${s.name} (${s.node_ids.length})` }),
      el("button", { textContent: "accept", "data-testid": "suggestion-accept",
        onclick: async (e) => { e.target.closest("li").remove(); this.ui.groups.push(s); await this.save(); } }))));
    if (!items.length) this.suggestions.append(el("li", { className: "muted", textContent: "no suggestions" }));
  }

  render() {
    this.list.replaceChildren(...this.ui.groups.map((g, k) => el("li", { "data-testid": "supernode-item" },
      el("input", { type: "checkbox", className: "supernode-use", title: "use in interventions",
        "data-index": String(k) }),
      el("span", { className: "name", textContent: g.name }),
      el("span", { className: "muted", textContent: ` ${g.node_ids.length} nodes ` }),
      el("button", { textContent: "select", onclick: () => { this.ui.selected = new Set(g.node_ids); this.onChange(); } }),
      el("button", { textContent: "×", title: "delete", onclick: () => this.remove(k) }))));
    this.onChange();
  }

  // Node ids of the groups ticked for interventions.
  checkedIds() {
    const ids = [];
    this.list.querySelectorAll(".supernode-use:checked").forEach((box) => {
      ids.push(...this.ui.groups[Number(box.dataset.index)].node_ids);
    });
    return ids;
  }

  say(text, isError = false) {
    this.status.textContent = text;
    this.status.className = isError ? "error" : "muted";
  }
}
