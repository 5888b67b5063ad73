// The full graph's view transform {k, x, y}: screen = layout position * k + (x, y).

export const MIN_ZOOM = 0.25, MAX_ZOOM = 40;

// Zoom by `factor` keeping the screen point (px, py) fixed.
export function zoomAt(tf, px, py, factor) {
  const k = Math.min(MAX_ZOOM, Math.max(MIN_ZOOM, tf.k * factor));
  const s = k / tf.k;
  return { k, x: px - (px - tf.x) * s, y: py - (py - tf.y) * s };
}

export function panBy(tf, dx, dy) {
  return { k: tf.k, x: tf.x + dx, y: tf.y + dy };
}

// The transform that fits the nodes' bounding box into the drawing box (identity when the
// nodes already span it, as the layout makes them).
export function fitTransform(nodes, size) {
  if (!nodes.length) return { k: 1, x: 0, y: 0 };
  let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
  for (const n of nodes) {
    x0 = Math.min(x0, n.x); x1 = Math.max(x1, n.x); y0 = Math.min(y0, n.y); y1 = Math.max(y1, n.y);
  }
  const { box } = size, pad = 12;
  const k = Math.min(MAX_ZOOM, Math.max(MIN_ZOOM, Math.min((box.width - 2 * pad) / Math.max(x1 - x0, 1),
    (box.height - 2 * pad) / Math.max(y1 - y0, 1))));
  return { k, x: box.left + box.width / 2 - k * (x0 + x1) / 2, y: box.top + box.height / 2 - k * (y0 + y1) / 2 };
}
