"""The metrics port: `/metrics` for Prometheus and `/healthz` for probes.

prometheus_client's own `start_http_server` answers 200 on every path, but
the chart's worker startup/liveness probes and the image HEALTHCHECK read
`GET /healthz` as "the model is loaded": so this small server answers
`/healthz` 200 only once `ready` is set (503 before), `/metrics` with the
registry, and 404 elsewhere.
"""

from __future__ import annotations

import errno
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import choose_encoder

from dexserve.telemetry.settings import DEFAULT_METRICS_HOST

log = logging.getLogger(__name__)

GATEWAY_METRICS_PORT = 9464
WORKER_METRICS_PORT = 9465


class MetricsServer:
    def __init__(self, port: int, host: str = DEFAULT_METRICS_HOST, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self.ready = threading.Event()
        handler = _handler(self)
        try:
            self._server = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or port == 0:
                raise
            # Several workers on one machine (`dex up`): the later ones take any free port.
            log.warning("metrics port %d is in use; serving metrics on a free port instead", port)
            self._server = ThreadingHTTPServer((host, 0), handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)

    def start(self) -> "MetricsServer":
        self._thread.start()
        log.info("metrics on :%d (/metrics, /healthz)", self.port)
        return self

    def set_ready(self, ready: bool = True) -> None:
        if ready:
            self.ready.set()
        else:
            self.ready.clear()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(owner: MetricsServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept"))
                self._reply(200, encoder(owner.registry), content_type)
            elif path == "/healthz":
                ok = owner.ready.is_set()
                self._reply(200 if ok else 503, b"ok\n" if ok else b"not ready\n", "text/plain; charset=utf-8")
            else:
                self._reply(404, b"not found: try /metrics or /healthz\n", "text/plain; charset=utf-8")

        def _reply(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # scrapes every 15 s must not flood the log
            pass

    return Handler
