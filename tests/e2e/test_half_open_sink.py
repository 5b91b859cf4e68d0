"""A half-open connection between the ingest and its sink: nothing passes any more and
nobody closes it (a vanished host, a route dropping packets), while a new connection would
reach the sink at once. The ingest must notice on its own (`ingest.ack_timeout_seconds`),
reconnect and resend; the sink must end up equal to the source, nothing lost or doubled.
Before, the pipeline stalled until TCP gave up (about 15 minutes) or forever."""

from __future__ import annotations

import time
from pathlib import Path

from tests.support.pipeline import (
    assert_tables_equal,
    free_port,
    http_status,
    ingest_stage,
    new_pipeline,
    sink_stage,
    stage_logs,
    tables_equal,
    wait_until,
)
from tests.support.proxy import TcpProxy
from tests.support.workload import TABLES, run_workload

ACK_TIMEOUT = 4.0


def test_pipeline_recovers_from_a_frozen_connection_to_the_sink(pg, tmp_path: Path) -> None:
    platform = {"ingest": {"grpc_port": free_port(), "ack_timeout_seconds": ACK_TIMEOUT}}
    source_dsn, replica_dsn, files = new_pipeline(
        pg, tmp_path, seed_rows=200, extra_platform=platform
    )
    sink_port = free_port()
    sink = sink_stage(files, tmp_path, sink_port).start()
    proxy = TcpProxy(sink_port).start()
    ingest = ingest_stage(files, tmp_path, {"replica": proxy.port}).start()
    try:
        wait_until(
            lambda: not ingest.alive() or http_status(files.health_port, "/readyz") == 200,
            90,
            "ready",
        )
        assert ingest.alive() and sink.alive(), stage_logs(ingest, sink)
        wait_until(lambda: tables_equal(source_dsn, replica_dsn, TABLES), 60, "snapshot")
        assert proxy.accepted == 1

        proxy.freeze()
        frozen_at = time.monotonic()
        # Changes made while frozen: sent on the frozen stream, never acked there.
        run_workload(source_dsn, changes=5_000, big_transaction=1_000)
        wait_until(
            lambda: tables_equal(source_dsn, replica_dsn, TABLES),
            ACK_TIMEOUT + 40,
            "sink = source after the freeze",
        )
        recovered_in = time.monotonic() - frozen_at
        assert_tables_equal(source_dsn, replica_dsn, TABLES)
        assert ingest.alive() and sink.alive(), stage_logs(ingest, sink)
    finally:
        proxy.stop()
        codes = [stage.terminate() for stage in (ingest, sink) if stage.alive()]
    log = ingest.log_path.read_text(errors="replace")
    assert "sink.ack_timeout" in log, log[-3000:]
    assert proxy.accepted >= 2, "the ingest never opened a new connection"
    assert recovered_in >= ACK_TIMEOUT, recovered_in  # not before the timeout
    assert codes == [0, 0], (codes, stage_logs(ingest, sink))
