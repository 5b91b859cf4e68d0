"""`cdc run`: the ingest stage and one sink stage per enabled sink, as supervised children,
plus the capture stage (`cdc capture`: WAL -> broker) for transports fed by our WAL reader
(pubsub, kinesis).

A child that dies is restarted with backoff while the others carry on, unless it failed at
startup (exit code 2: a port in use, a setting this release cannot run) or keeps failing the
same way within seconds of its start: then the whole run stops with that reason. SIGTERM /
SIGINT stop the ingest first (it drains and confirms its final position), then the sinks,
all within `shutdown_timeout_seconds`. The children die with the supervisor even on
`kill -9` (services/lifecycle.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import structlog

from services import lifecycle
from services.net import find_free_port

log = structlog.get_logger(__name__)

# A child that exits this many times in a row with the same code, each time within
# FAST_FAILURE_SECONDS of its start, is not restarted again.
MAX_FAST_FAILURES = 5
FAST_FAILURE_SECONDS = 10.0


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    backoff: float = 0.5
    next_start: float = 0.0
    started_at: float = field(default=0.0)
    fast_failures: int = 0
    last_code: int | None = None
    killed: bool = False

    def start(self, keep_fds: tuple[int, ...] = (), env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            # SIGTERM to the child when the supervisor dies, even by SIGKILL (Linux).
            lifecycle.with_parent_death_signal(self.argv),
            pass_fds=keep_fds,
            env=env,
        )
        self.started_at = time.monotonic()
        log.info("child.started", child=self.name, pid=self.process.pid)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal_stop(self) -> None:
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)

    def wait_until(self, deadline: float) -> int | None:
        """Wait for the child until `deadline` (monotonic), SIGKILL it then; its exit code
        (None when it was not running)."""
        if self.process is None:
            return None
        try:
            return self.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("child.kill", child=self.name, reason="did not stop within the budget")
            self.killed = True
            self.process.kill()
            return self.process.wait()


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
        capture: bool = False,
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
        self.capture: Child | None = None
        if capture:
            self.capture = Child(
                "capture",
                [*cdc_command(), "capture", *common, "--http-port", str(find_free_port())],
            )
        self._stopping = False
        self._failed = 0
        self.shutdown_timeout = 25.0
        self._keep_fds: tuple[int, ...] = ()
        self._env: dict[str, str] | None = None
        self._parent_pipe: int | None = None

    def configure_lifecycle(self, shutdown_timeout: float, lock_fd: int | None) -> None:
        """The shutdown budget, and the pipeline lock the children inherit (they keep it
        held until the last of them is gone)."""
        self.shutdown_timeout = shutdown_timeout
        read_end, self._parent_pipe = os.pipe()  # the write end stays here, never inherited
        self._keep_fds = (read_end,) if lock_fd is None else (read_end, lock_fd)
        self._env = dict(
            os.environ,
            **{
                lifecycle.PARENT_PIPE_ENV: str(read_end),
                lifecycle.PARENT_PID_ENV: str(os.getpid()),
            },
        )

    @property
    def children(self) -> list[Child]:
        return [*self.sinks, self.ingest, *([self.capture] if self.capture else [])]

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for child in self.children:
            self._start(child)
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
                    if self._gave_up(child, code, now - child.started_at):
                        self._stopping = True
                        break
                    child.next_start = now + child.backoff
                    log.warning("child.died", child=child.name, code=code, restart_in=child.backoff)
                    child.backoff = min(child.backoff * 2, 30.0)
                elif now >= child.next_start:
                    child.restarts += 1
                    child.next_start = 0.0
                    self._start(child)
            time.sleep(0.2)
        return self._stop_children()

    def _start(self, child: Child) -> None:
        child.start(self._keep_fds, self._env)

    def _gave_up(self, child: Child, code: int, uptime: float) -> bool:
        """True (and the reason logged) when restarting `child` would not help."""
        if code == lifecycle.EXIT_STARTUP:
            log.error(
                "child.startup_failed",
                child=child.name,
                code=code,
                reason="exit code 2: a configuration or startup error (its own log line above "
                "names the setting); restarting it would fail the same way, stopping the run",
            )
            self._failed = lifecycle.EXIT_STARTUP
            return True
        if uptime < FAST_FAILURE_SECONDS and code == child.last_code:
            child.fast_failures += 1
        else:
            child.fast_failures = 1 if uptime < FAST_FAILURE_SECONDS else 0
        child.last_code = code
        if child.fast_failures >= MAX_FAST_FAILURES:
            log.error(
                "child.crash_loop",
                child=child.name,
                code=code,
                failures=child.fast_failures,
                reason=f"exited {child.fast_failures} times in a row with code {code}, each "
                f"within {FAST_FAILURE_SECONDS:.0f} s of its start; stopping the run",
            )
            self._failed = 1
            return True
        return False

    def _stop_children(self) -> int:
        """Ingest first (it drains while the sinks still ack), then the sinks, all within
        the shutdown budget. 0, or 3 when the drain did not complete or a child had to be
        killed, or the startup / crash-loop failure that stopped the run."""
        started = time.monotonic()
        deadline = started + self.shutdown_timeout
        capture_code = None
        if self.capture is not None:
            # First: it stops reading the WAL and confirms what the broker acknowledged.
            self.capture.signal_stop()
            capture_code = self.capture.wait_until(
                deadline - 2 * lifecycle.sink_stop_seconds(self.shutdown_timeout)
            )
        self.ingest.signal_stop()
        ingest_code = self.ingest.wait_until(
            deadline - lifecycle.sink_stop_seconds(self.shutdown_timeout)
        )
        for child in self.sinks:
            child.signal_stop()
        for child in self.sinks:
            child.wait_until(deadline)
        if self._parent_pipe is not None:
            os.close(self._parent_pipe)
            self._parent_pipe = None
        seconds = round(time.monotonic() - started, 2)
        if self._failed:
            log.error("run.failed", code=self._failed, stop_seconds=seconds)
            return self._failed
        killed = [c.name for c in self.children if c.killed]
        incomplete = lifecycle.EXIT_DRAIN_INCOMPLETE in (ingest_code, capture_code)
        if killed or incomplete:
            log.error(
                "run.stopped_incomplete",
                killed=killed,
                ingest_code=ingest_code,
                capture_code=capture_code,
                stop_seconds=seconds,
                budget_seconds=self.shutdown_timeout,
                note="unacked batches are redelivered on the next start; nothing is lost",
            )
            return lifecycle.EXIT_DRAIN_INCOMPLETE
        log.info("run.stopped", stop_seconds=seconds)
        return lifecycle.EXIT_OK

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stopping = True
