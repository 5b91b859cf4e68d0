"""HTTP /healthz, /readyz and /metrics for Kubernetes probes and Prometheus.

The server runs in a thread and serves a snapshot that the event loop refreshes, so a busy
or blocked loop never makes the probe itself hang.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest


class HealthState:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshot: dict[str, Any] = {"status": "starting", "ready": False}

    def update(self, snapshot: dict[str, Any]) -> None:
        with self._lock:
            self._snapshot = snapshot

    def get(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._snapshot)


def serve_health(
    state: HealthState,
    port: int,
    host: str = "0.0.0.0",
    registry: CollectorRegistry = REGISTRY,
) -> ThreadingHTTPServer:
    """Serve in a thread; `/metrics` is `registry` (each stage passes its own, see
    services/metrics.py)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/healthz":
                self._reply(200, {"status": "alive"})
            elif self.path == "/readyz":
                snapshot = state.get()
                self._reply(200 if snapshot.get("ready") else 503, snapshot)
            elif self.path == "/metrics":
                body = generate_latest(registry)
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self._reply(404, {"error": "not found"})

        def _reply(self, code: int, payload: dict[str, Any]) -> None:
            body = json.dumps(payload, default=str).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return  # probes every few seconds would flood the log

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="health-http", daemon=True).start()
    return server
