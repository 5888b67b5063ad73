"""Headless Chromium for the viewer tests: Debian's /usr/bin/chromium driven by Playwright for Python
(no `playwright install`). tests/conftest.py turns these into the `browser` (one per module) and `page`
fixtures; the viewer test modules skip themselves when either is missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1400, "height": 900}


@contextmanager
def launch() -> Iterator[Any]:
    """A headless Chromium (a Playwright `Browser`), closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@contextmanager
def open_page(browser: Any, *, console_errors: bool = True) -> Iterator[Any]:
    """A page in a fresh context; its uncaught errors (and console errors, unless told not to) collect in
    `page.errors`. The context closes on exit."""
    # bypass_csp: Playwright's polling predicates need eval, which the page's CSP forbids
    context = browser.new_context(viewport=VIEWPORT, bypass_csp=True)
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda err: page.errors.append(str(err)))
    if console_errors:
        page.on("console", lambda msg: msg.type == "error" and page.errors.append(msg.text))
    try:
        yield page
    finally:
        context.close()


@contextmanager
def serving(folder: Path, backend: Any) -> Iterator[str]:
    """The viewer on a free port, serving the graphs in `folder` with `backend`; yields its base URL
    (no trailing slash) and shuts the server down on exit."""
    from cltrace.viewer.server import ViewerConfig, start_in_thread

    server, _ = start_in_thread(ViewerConfig(graph_dirs=[folder], port=0), backend)
    try:
        yield server.url.rstrip("/")
    finally:
        server.shutdown()
        server.server_close()
