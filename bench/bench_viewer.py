"""How fast the viewer becomes interactive on a large graph, in headless Chromium.

Builds a synthetic 5,000-node / 100,000-link graph, serves it, and measures from navigation
start to the page's `window.__viewerReady` flag (set after the first full render; goal
< 2 s), then the time from moving a threshold slider to the repainted frame and the time to
hover-test every visible node once.

    .venv/bin/python bench/bench_viewer.py [--nodes 5000] [--links 100000] [--runs 3]
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

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

SLIDER_JS = """async () => {
  const slider = document.querySelector('#node-threshold');
  const t0 = performance.now();
  slider.value = '0.5';
  slider.dispatchEvent(new Event('input'));
  await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
  return performance.now() - t0;
}"""


def measure(page, url: str) -> tuple[float, float, int, int, float]:
    """(ready ms, slider repaint ms, nodes, edges, all-links-painted ms) for one page load."""
    page.goto(url)
    page.wait_for_function("window.__viewerReady === true", timeout=60_000)
    ready_ms = page.evaluate("window.__viewerReadyMs")
    page.wait_for_function("window.__viewerLinksDoneMs != null", timeout=120_000)
    links_ms = page.evaluate("window.__viewerLinksDoneMs")
    nodes, edges = (int(page.text_content(s)) for s in ("#node-count", "#edge-count"))
    slider_ms = page.evaluate(SLIDER_JS)
    return ready_ms, slider_ms, nodes, edges, links_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--links", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        graph = synthetic_graph(args.nodes, args.links, n_layers=18, seed=0, slug="bench")
        path = Path(tmp) / "bench.json"
        path.write_text(json.dumps(graph))
        build_s = time.perf_counter() - t0
        server, _ = start_in_thread(ViewerConfig(graph_dirs=[Path(tmp)], port=0))
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
                # bypass_csp: Playwright's polling predicates need eval, forbidden by the CSP
                page = browser.new_page(viewport={"width": 1600, "height": 1000}, bypass_csp=True)
                runs = [measure(page, server.url + "graph/bench") for _ in range(args.runs)]
                browser.close()
        finally:
            server.shutdown()
            server.server_close()
    ready = statistics.median(r[0] for r in runs)
    slider = statistics.median(r[1] for r in runs)
    rows = [("graph nodes / links", f"{len(graph['nodes']):,} / {len(graph['links']):,}"),
            ("JSON size", f"{path.stat().st_size / 1e6:.2f} MB" if path.exists() else
             f"{len(json.dumps(graph)) / 1e6:.2f} MB"),
            ("visible nodes / edges", f"{runs[0][2]:,} / {runs[0][3]:,}"),
            (f"navigation -> ready (median of {args.runs})", f"{ready:.0f} ms  (goal < 2000)"),
            ("all runs", ", ".join(f"{r[0]:.0f}" for r in runs) + " ms"),
            ("navigation -> all links painted (median)",
             f"{statistics.median(r[4] for r in runs):.0f} ms"),
            ("slider -> first repainted frame (median)", f"{slider:.0f} ms"),
            ("synthetic graph build (Python)", f"{build_s:.1f} s")]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
