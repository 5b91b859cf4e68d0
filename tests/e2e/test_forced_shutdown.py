"""A stage whose stop hangs still ends within its shutdown budget (services/lifecycle.py):
the watchdog thread started with the stop request exits with EXIT_DRAIN_INCOMPLETE and logs
`process.shutdown_forced`, whatever the event loop is stuck on."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from services import lifecycle
from tests.support.pipeline import (
    Stage,
    free_port,
    http_status,
    new_pipeline,
    sink_stage,
    stage_logs,
    wait_until,
)

SHUTDOWN_TIMEOUT = 6.0


def test_ingest_whose_read_loop_ignores_its_cancel_is_ended_by_the_watchdog(
    pg, tmp_path: Path
) -> None:
    _, _, files = new_pipeline(
        pg, tmp_path, seed_rows=50, extra_platform={"shutdown_timeout_seconds": SHUTDOWN_TIMEOUT}
    )
    sink_port = free_port()
    sink = sink_stage(files, tmp_path, sink_port).start()
    argv = [
        sys.executable,
        "-m",
        "tests.support.hung_ingest",
        "ingest",
        str(files.pipeline),
        "--platform-config",
        str(files.platform),
        "--sink-endpoint",
        f"replica=127.0.0.1:{sink_port}",
    ]
    ingest = Stage("ingest", argv, tmp_path).start()
    try:
        wait_until(
            lambda: not ingest.alive() or http_status(files.health_port, "/readyz") == 200,
            90,
            "ready",
        )
        assert ingest.alive(), stage_logs(ingest, sink)
        assert ingest.process is not None
        stopped_at = time.monotonic()
        ingest.process.terminate()  # SIGTERM
        code = ingest.process.wait(60)
        took = time.monotonic() - stopped_at
    finally:
        for stage in (ingest, sink):
            if stage.alive():
                assert stage.process is not None
                stage.process.kill()
                stage.process.wait(10)
    log = ingest.log_path.read_text(errors="replace")
    budget = lifecycle.ingest_stop_seconds(SHUTDOWN_TIMEOUT)
    limit = budget + lifecycle.WATCHDOG_MARGIN_SECONDS
    assert code == lifecycle.EXIT_DRAIN_INCOMPLETE, (code, log[-3000:])
    assert log.count("process.shutdown_forced") == 1, log[-3000:]
    # the stop hung (the read loop never ended): it did not get to drain or stop on its own
    assert "ingest.draining" not in log and "ingest.stopped" not in log, log[-3000:]
    assert limit - 0.5 <= took <= limit + 5, (took, limit)
