"""How fast the viewer becomes interactive on a large graph, in headless Chromium.

Builds a synthetic 5,000-node / 100,000-link graph, serves it, and measures from navigation
start to the page's `window.__viewerReady` flag (set after the first frame; goal <= 1.5 s),
the time from moving a threshold slider to the repainted frame, frames per second while
zooming (a wheel event every frame) and while panning (a drag step every frame) for 2 s
each (goal >= 30), and the time from clicking a feature to its rendered panel (median over
--clicks features; from a real feature store with --features DB, the graph's feature indices
then drawn within the store's width so every click opens a real dashboard, else the
synthetic back-end).

    .venv/bin/python bench/bench_viewer.py [--nodes 5000] [--links 100000] [--runs 3] [--features DB]
                                           [--clicks 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from cltrace.viewer.server import ViewerConfig, start_in_thread
from cltrace.viewer.synthetic import synthetic_graph

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

SLIDER_JS = """async () => {
  const slider = document.querySelector('#node-threshold');
  const t0 = performance.now();
  slider.value = '0.5';
  slider.dispatchEvent(new Event('input'));
  await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
  return performance.now() - t0;
}"""


FPS_JS = """async (kind) => {
  const canvas = document.querySelector('#overlay-canvas');
  const r = canvas.getBoundingClientRect();
  const at = (x, y) => ({ clientX: r.left + x, clientY: r.top + y, bubbles: true, cancelable: true });
  let frames = 0, worst = 0, last = performance.now(), x = r.width / 2, y = r.height / 2, step = 0;
  if (kind === 'pan') canvas.dispatchEvent(new MouseEvent('mousedown', at(x, y)));
  const t0 = performance.now();
  await new Promise((done) => {
    const tick = (now) => {
      frames++; worst = Math.max(worst, now - last); last = now; step++;
      if (kind === 'idle') {
        // nothing: the frame rate the browser reaches on this machine with no work
      } else if (kind === 'zoom') {
        canvas.dispatchEvent(new WheelEvent('wheel', { ...at(x, y), deltaY: (step % 60 < 30 ? -40 : 40) }));
      } else {
        x += step % 80 < 40 ? 6 : -6; y += step % 80 < 40 ? 3 : -3;
        canvas.dispatchEvent(new MouseEvent('mousemove', at(x, y)));
      }
      if (now - t0 < 2000) requestAnimationFrame(tick); else done();
    };
    requestAnimationFrame(tick);
  });
  const seconds = (performance.now() - t0) / 1000;
  if (kind === 'pan') window.dispatchEvent(new MouseEvent('mouseup', at(x, y)));
  return [frames / seconds, worst];
}"""


def panel_ms(page, n_clicks: int = 1) -> float:
    """Click the `n_clicks` strongest visible features in turn; median ms from the request to the
    rendered panel. A panel that shows an error instead of a dashboard is an error here."""
    feats = [n for n in page.evaluate("window.__viewerNodes()") if n["type"] == "feature"]
    box = page.locator("#overlay-canvas").bounding_box()
    times = []
    for node in feats[:n_clicks]:
        page.evaluate("window.__panelMs = null")
        page.mouse.click(box["x"] + node["x"], box["y"] + node["y"])
        page.wait_for_function("window.__panelMs != null", timeout=30_000)
        if page.locator("#dashboard-error").count():
            raise SystemExit(f"feature panel of {node['id']}: {page.text_content('#dashboard-error')}")
        times.append(page.evaluate("window.__panelMs"))
    return statistics.median(times)


def measure(page, url: str, n_clicks: int = 1) -> tuple[float, ...]:
    """(ready ms, slider repaint ms, nodes, edges, all-links-painted ms, zoom fps, zoom worst
    frame ms, pan fps, pan worst frame ms, panel ms) for one page load."""
    page.goto(url)
    page.wait_for_function("window.__viewerReady === true", timeout=60_000)
    ready_ms = page.evaluate("window.__viewerReadyMs")
    page.wait_for_function("window.__viewerLinksDoneMs != null", timeout=120_000)
    links_ms = page.evaluate("window.__viewerLinksDoneMs")
    nodes, edges = (int(page.text_content(s)) for s in ("#node-count", "#edge-count"))
    slider_ms = page.evaluate(SLIDER_JS)
    page.evaluate(
        "document.querySelector('#node-threshold').value = '1'; "
        "document.querySelector('#node-threshold').dispatchEvent(new Event('input'))"
    )
    page.wait_for_function("window.__viewerLinksDoneMs != null", timeout=120_000)
    idle_fps, _ = page.evaluate(FPS_JS, "idle")
    zoom_fps, zoom_worst = page.evaluate(FPS_JS, "zoom")
    pan_fps, pan_worst = page.evaluate(FPS_JS, "pan")
    page.click("#fit")
    page.wait_for_timeout(300)
    return (
        ready_ms,
        slider_ms,
        nodes,
        edges,
        links_ms,
        zoom_fps,
        zoom_worst,
        pan_fps,
        pan_worst,
        panel_ms(page, n_clicks),
        idle_fps,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--links", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--features", default=None, help="feature store for the panel timing")
    parser.add_argument(
        "--clicks", type=int, default=10, help="features clicked per run for the panel timing"
    )
    args = parser.parse_args()
    backend = _backend(args.features)
    width = getattr(getattr(backend, "store", None), "n_features", 4096)  # indices the store has
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        graph = synthetic_graph(args.nodes, args.links, n_layers=18, seed=0, slug="bench", n_features=width)
        path = Path(tmp) / "bench.json"
        path.write_text(json.dumps(graph))
        build_s = time.perf_counter() - t0
        server, _ = start_in_thread(ViewerConfig(graph_dirs=[Path(tmp)], port=0), backend)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
                # bypass_csp: Playwright's polling predicates need eval, forbidden by the CSP
                page = browser.new_page(viewport={"width": 1600, "height": 1000}, bypass_csp=True)
                runs = [measure(page, server.url + "graph/bench", args.clicks) for _ in range(args.runs)]
                browser.close()
        finally:
            server.shutdown()
            server.server_close()
    med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
    ready = statistics.median(r[0] for r in runs)
    slider = statistics.median(r[1] for r in runs)
    rows = [
        ("graph nodes / links", f"{len(graph['nodes']):,} / {len(graph['links']):,}"),
        (
            "JSON size",
            f"{path.stat().st_size / 1e6:.2f} MB"
            if path.exists()
            else f"{len(json.dumps(graph)) / 1e6:.2f} MB",
        ),
        ("visible nodes / edges", f"{runs[0][2]:,} / {runs[0][3]:,}"),
        (f"navigation -> ready (median of {args.runs})", f"{ready:.0f} ms  (goal <= 1500)"),
        ("all runs", ", ".join(f"{r[0]:.0f}" for r in runs) + " ms"),
        ("navigation -> all links painted (median)", f"{statistics.median(r[4] for r in runs):.0f} ms"),
        ("slider -> first repainted frame (median)", f"{slider:.0f} ms"),
        ("idle page: frames per second (median; the machine's ceiling)", f"{med(10):.0f}"),
        ("zooming: frames per second (median)", f"{med(5):.0f}  (goal >= 30; worst {med(6):.0f} ms)"),
        ("panning: frames per second (median)", f"{med(7):.0f}  (goal >= 30; worst {med(8):.0f} ms)"),
        (
            f"click -> feature panel rendered (median of {args.clicks} features, median of runs)",
            f"{med(9):.0f} ms  ({'store ' + args.features if args.features else 'synthetic back-end'})",
        ),
        ("synthetic graph build (Python)", f"{build_s:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def _backend(features: str | None):
    if not features:
        from cltrace.viewer.synthetic import SyntheticBackend

        return SyntheticBackend()
    from cltrace.features.store import FeatureStore
    from cltrace.viewer.model_backend import ModelBackend

    return ModelBackend(store=FeatureStore(features))


if __name__ == "__main__":
    main()
