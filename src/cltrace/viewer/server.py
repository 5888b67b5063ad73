"""HTTP plumbing for the viewer: a stdlib `ThreadingHTTPServer` in front of `ViewerApp`.

Local-only by default (127.0.0.1). Requests whose Host header names another machine are
refused (DNS rebinding), and POSTs must be `application/json` so that a web page elsewhere
cannot submit them as a plain form.
"""

from __future__ import annotations

import threading
import webbrowser
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from cltrace.viewer.api import Response, ViewerApp, error_response, internal_error
from cltrace.viewer.backend import NullBackend, ViewerBackend
from cltrace.viewer.graphs import GraphStore
from cltrace.viewer.validation import MAX_BODY_BYTES

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
WILDCARD_HOSTS = {"0.0.0.0", "::", ""}
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'",
    "Referrer-Policy": "no-referrer",
}


@dataclass
class ViewerConfig:
    """How `cltrace serve` runs."""

    graph_dirs: list[Path] = field(default_factory=list)  # folders of graph JSON files
    host: str = "127.0.0.1"  # interface to bind; 0.0.0.0 exposes the viewer to the network
    port: int = 8765  # 0 picks a free port
    open_browser: bool = False

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is outside 0-65535")


class ViewerServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, config: ViewerConfig, app: ViewerApp):
        self.config = config
        self.app = app
        super().__init__((config.host, config.port), ViewerHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        if isinstance(host, (bytes, bytearray)):  # typeshed allows bytes; AF_INET(6) servers give str
            host = host.decode()
        host = "127.0.0.1" if host in WILDCARD_HOSTS else host
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"

    def host_allowed(self, header: str | None) -> bool:
        if self.config.host in WILDCARD_HOSTS or header is None:
            return True
        name = header.rsplit(":", 1)[0] if not header.endswith("]") else header
        return name.lower() in LOOPBACK_NAMES | {self.config.host.lower()}


class ViewerHandler(BaseHTTPRequestHandler):
    server: ViewerServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        """Every request gets a reply: an unexpected exception becomes a JSON 500."""
        try:
            response = self._respond(method)
        except Exception as err:
            self.close_connection = True
            response = internal_error(err)
        self._send(response)

    def _respond(self, method: str) -> Response:
        if not self.server.host_allowed(self.headers.get("Host")):
            return error_response(403, "unexpected Host header")
        body = b""
        if method == "POST":
            body_or_error = self._read_body()
            if isinstance(body_or_error, Response):
                return body_or_error
            body = body_or_error
        url = urlsplit(self.path)
        path = unquote(url.path)
        if "\x00" in path:
            return error_response(400, "invalid path")
        return self.server.app.handle(method, path, parse_qs(url.query), body)

    def _read_body(self) -> bytes | Response:
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            self.close_connection = True
            return error_response(415, "POST bodies must be sent as application/json")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            return error_response(411, "Content-Length required")
        if not 0 <= length <= MAX_BODY_BYTES:
            self.close_connection = True
            return error_response(413, f"body over {MAX_BODY_BYTES} bytes")
        return self.rfile.read(length)

    def _send(self, response: Response) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.send_header("Cache-Control", "no-store")
        for key, value in {**SECURITY_HEADERS, **response.headers}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(response.body)

    def log_message(self, format: str, *args) -> None:  # quieter than the default
        if getattr(self.server, "verbose", False):
            super().log_message(format, *args)


def make_server(config: ViewerConfig, backend: ViewerBackend | None = None) -> ViewerServer:
    """A bound (not yet serving) server; port 0 binds a free port."""
    app = ViewerApp(GraphStore(config.graph_dirs), backend or NullBackend())
    return ViewerServer(config, app)


def start_in_thread(
    config: ViewerConfig, backend: ViewerBackend | None = None
) -> tuple[ViewerServer, threading.Thread]:
    """Serve in a daemon thread (tests, notebooks); stop with `server.shutdown()`."""
    server = make_server(config, backend)
    thread = threading.Thread(target=server.serve_forever, name="cltrace-viewer", daemon=True)
    thread.start()
    return server, thread


def serve(config: ViewerConfig, backend: ViewerBackend | None = None) -> None:
    """Serve until interrupted, printing the address (and opening a browser if asked)."""
    server = make_server(config, backend)
    folders = ", ".join(map(str, config.graph_dirs))
    print(f"cltrace viewer: {server.url}  (graphs from {folders})", flush=True)
    if config.open_browser and not _open(server.url):
        print(f"no browser found; open {server.url} yourself")
    try:
        server.serve_forever()
    finally:
        server.server_close()


def _open(url: str) -> bool:
    try:
        return webbrowser.open(url)
    except webbrowser.Error:
        return False
