// The page state in the URL, with Neuronpedia's parameter names where they exist:
//   ?view=circuit|graph|subgraph&pinnedIds=a,b&supernodes=[["name","a"]]&clickedId=a
//    &expanded=sn0,sn3&zoom=k,x,y
// written with history.replaceState, so a view can be bookmarked and reopened.

export function readUrl() {
  const p = new URLSearchParams(location.search);
  const list = (key) => (p.get(key) || "").split(",").filter(Boolean);
  let groups = [];
  try {
    const raw = JSON.parse(p.get("supernodes") || "[]");
    if (Array.isArray(raw)) groups = raw.filter((g) => Array.isArray(g) && g.length > 1 && g.every((x) => typeof x === "string"));
  } catch { groups = []; }
  const view = ["circuit", "graph", "subgraph"].includes(p.get("view")) ? p.get("view") : null;
  const z = list("zoom").map(Number);
  const tf = z.length === 3 && z.every(Number.isFinite) && z[0] > 0 ? { k: z[0], x: z[1], y: z[2] } : null;
  return { view, pinned: list("pinnedIds"), groups, clicked: p.get("clickedId") || null,
    expanded: list("expanded"), tf };
}

export function writeUrl({ view, pinned, groups, clicked, expanded, tf }) {
  const p = new URLSearchParams();
  p.set("view", view);
  if (pinned.length) p.set("pinnedIds", pinned.join(","));
  if (groups.length) p.set("supernodes", JSON.stringify(groups));
  if (clicked) p.set("clickedId", clicked);
  if (expanded.length) p.set("expanded", expanded.join(","));
  if (view === "graph" && (tf.k !== 1 || tf.x !== 0 || tf.y !== 0)) {
    p.set("zoom", [tf.k, tf.x, tf.y].map((v) => Number(v.toFixed(3))).join(","));
  }
  const next = `${location.pathname}?${p.toString()}`;
  if (next !== location.pathname + location.search) history.replaceState(null, "", next);
}
