"""`cdc run`: the ingest stage and one sink stage per enabled sink, as supervised children.

A child that dies is restarted with backoff while the others carry on. SIGTERM/SIGINT stop
the ingest first (it drains and confirms its final position), then the sinks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import structlog

from services.stack.postgres import find_free_port

log = structlog.get_logger(__name__)


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    backoff: float = 0.5
    next_start: float = 0.0
    started_at: float = field(default=0.0)

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv)
        self.started_at = time.monotonic()
        log.info("child.started", child=self.name, pid=self.process.pid)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def terminate(self, timeout: float) -> None:
        if not self.alive():
            return
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("child.kill", child=self.name)
            self.process.kill()
            self.process.wait()


def cdc_command() -> list[str]:
    """The installed `cdc` script when there is one, so `ps` shows `cdc ingest ...`."""
    script = os.path.join(os.path.dirname(sys.executable), "cdc")
    if os.path.exists(script):
        return [sys.executable, script]
    return [sys.executable, "-m", "services.cli.main"]


class Supervisor:
    def __init__(
        self,
        pipeline_path: str,
        platform_path: str | None,
        sink_ids: list[str],
        sink_host: str = "127.0.0.1",
    ) -> None:
        common = [pipeline_path] + (["--platform-config", platform_path] if platform_path else [])
        self.sinks: list[Child] = []
        endpoints: list[str] = []
        for sink_id in sink_ids:
            port = find_free_port()
            endpoints += ["--sink-endpoint", f"{sink_id}={sink_host}:{port}"]
            # Each sink serves /metrics and /readyz; the ingest lists them for `cdc status`.
            http_port = str(find_free_port())
            endpoints += ["--sink-http-endpoint", f"{sink_id}={sink_host}:{http_port}"]
            args = ["--sink-id", sink_id, "--port", str(port), "--http-port", http_port]
            self.sinks.append(Child(f"sink:{sink_id}", [*cdc_command(), "sink", *common, *args]))
        self.ingest = Child(
            "ingest",
            [*cdc_command(), "ingest", *common, *endpoints, "--grpc-port", str(find_free_port())],
        )
        self._stopping = False

    @property
    def children(self) -> list[Child]:
        return [*self.sinks, self.ingest]

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for child in self.children:
            child.start()
        while not self._stopping:
            now = time.monotonic()
            for child in self.children:
                if child.alive():
                    if now - child.started_at > 60:
                        child.backoff = 0.5
                    continue
                if child.process is not None and child.next_start == 0.0:
                    code = child.process.returncode
                    if child is self.ingest and code == 0:
                        log.info("ingest.finished")
                        self._stopping = True
                        break
                    child.next_start = now + child.backoff
                    log.warning("child.died", child=child.name, code=code, restart_in=child.backoff)
                    child.backoff = min(child.backoff * 2, 30.0)
                elif now >= child.next_start:
                    child.restarts += 1
                    child.next_start = 0.0
                    child.start()
            time.sleep(0.2)
        self.ingest.terminate(timeout=60)
        for child in self.sinks:
            child.terminate(timeout=30)
        return 0

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stopping = True
