"""The supervisor's restart rules and shutdown budget, with stand-in child processes."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from services import lifecycle
from services.supervisor import FAST_FAILURE_SECONDS, MAX_FAST_FAILURES, Child, Supervisor


@pytest.fixture(autouse=True)
def _restore_signal_handlers() -> object:
    """Supervisor.run() installs its own SIGTERM/SIGINT handlers in this process."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def _supervisor(ingest: str, sink: str = "import time; time.sleep(60)") -> Supervisor:
    supervisor = Supervisor("pipeline.yaml", None, ["s1"])
    supervisor.sinks = [Child("sink:s1", [sys.executable, "-c", sink])]
    supervisor.ingest = Child("ingest", [sys.executable, "-c", ingest])
    supervisor.configure_lifecycle(shutdown_timeout=4.0, lock_fd=None)
    return supervisor


def test_a_child_exiting_2_is_not_restarted_and_the_run_exits_2() -> None:
    supervisor = _supervisor("raise SystemExit(2)")
    started = time.monotonic()
    assert supervisor.run() == lifecycle.EXIT_STARTUP
    assert time.monotonic() - started < 10
    assert supervisor.ingest.restarts == 0
    assert not supervisor.sinks[0].alive()


def test_the_same_fast_failure_in_a_row_stops_the_run() -> None:
    supervisor = _supervisor("raise SystemExit(1)")
    assert supervisor.run() == 1
    assert supervisor.ingest.restarts == MAX_FAST_FAILURES - 1
    assert supervisor.ingest.fast_failures == MAX_FAST_FAILURES


def test_failures_far_apart_do_not_count_as_a_loop() -> None:
    supervisor = _supervisor("raise SystemExit(1)")
    child = supervisor.ingest
    for _ in range(MAX_FAST_FAILURES * 2):
        assert not supervisor._gave_up(child, 1, FAST_FAILURE_SECONDS + 1)
    # Alternating codes are not "the same way" either.
    for code in [1, 3] * MAX_FAST_FAILURES:
        assert not supervisor._gave_up(child, code, 0.1)


def test_a_child_ignoring_sigterm_is_killed_at_the_budget_and_the_run_exits_3(
    tmp_path: Path,
) -> None:
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    supervisor = _supervisor(stubborn)
    for child in supervisor.children:
        child.start(supervisor._keep_fds, supervisor._env)
    time.sleep(0.5)  # let the children install their handlers
    started = time.monotonic()
    code = supervisor._stop_children()
    took = time.monotonic() - started
    assert code == lifecycle.EXIT_DRAIN_INCOMPLETE
    assert supervisor.ingest.killed and not supervisor.sinks[0].killed
    assert took <= supervisor.shutdown_timeout + 0.5, took


def test_the_drain_budget_fits_inside_the_shutdown_budget() -> None:
    for total in (2.0, 10.0, 25.0, 55.0, 600.0):
        drain = lifecycle.ingest_drain_seconds(total)
        assert 0 < drain < total - lifecycle.sink_stop_seconds(total), total


def test_the_default_budget_fits_the_helm_chart_grace_period() -> None:
    import yaml

    from adapters.config import PlatformConfig

    values = Path(__file__).resolve().parents[2] / "helm/cdc-platform/charts/pipeline/values.yaml"
    grace = yaml.safe_load(values.read_text())["terminationGracePeriodSeconds"]
    budget = PlatformConfig().shutdown_timeout_seconds
    assert budget + 5 <= grace, (budget, grace)
    assert budget + 5 <= 30  # Kubernetes' own default grace period too


def test_lock_is_exclusive_and_names_the_holder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(lifecycle.RUNTIME_DIR_ENV, str(tmp_path))
    first = lifecycle.PipelineLock("p1").acquire()
    try:
        assert lifecycle.running_here("p1") == os.getpid()
        with pytest.raises(lifecycle.PipelineRunningError, match=r"'p1' is already running.*pid"):
            lifecycle.PipelineLock("p1").acquire()
        lifecycle.PipelineLock("p2").acquire().release()  # other pipelines are independent
    finally:
        first.release()
    assert lifecycle.running_here("p1") is None
    lifecycle.PipelineLock("p1").acquire().release()


def test_the_capture_stage_is_a_child_stopped_first(tmp_path: Path) -> None:
    """transport pubsub / kinesis: `cdc capture` runs as a child too, and on stop it is
    signalled before the ingest (it confirms what the broker acknowledged first)."""
    plain = Supervisor("pipeline.yaml", None, ["s1"])
    assert plain.capture is None and len(plain.children) == 2
    supervisor = Supervisor("pipeline.yaml", None, ["s1"], capture=True)
    assert supervisor.capture is not None
    argv = supervisor.capture.argv
    assert argv[argv.index("capture") + 1] == "pipeline.yaml" and "--http-port" in argv
    order = tmp_path / "order"
    record = (
        "import signal, sys, time\n"
        "def stop(*_):\n"
        f"    open({str(order)!r}, 'a').write(sys.argv[1] + '\\n'); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "time.sleep(60)\n"
    )
    supervisor.sinks = [Child("sink:s1", [sys.executable, "-c", record, "sink"])]
    supervisor.ingest = Child("ingest", [sys.executable, "-c", record, "ingest"])
    supervisor.capture = Child("capture", [sys.executable, "-c", record, "capture"])
    supervisor.configure_lifecycle(shutdown_timeout=6.0, lock_fd=None)
    for child in supervisor.children:
        child.start(supervisor._keep_fds, supervisor._env)
    time.sleep(0.5)
    assert supervisor._stop_children() == lifecycle.EXIT_OK
    assert order.read_text().split() == ["capture", "ingest", "sink"]
