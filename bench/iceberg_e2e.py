"""`python -m bench.iceberg_e2e`: end to end, PostgreSQL -> `cdc ingest` (direct) -> gRPC ->
`cdc sink` (Iceberg upsert, SQLite catalog, local-file warehouse), as two processes on one
embedded PostgreSQL. The workload: inserts then updates of random keys, in 10k-row
transactions, then an end-marker row; measured from the workload's start to the end marker
being visible in the Iceberg table; the table is then compared with the source row by row."""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

import psycopg
import structlog
from pyiceberg.expressions import EqualTo

from services.stack.postgres import PostgresServer
from tests.support.iceberg import assert_equal, iceberg_sink, load_table, use_sinks
from tests.support.pipeline import (
    free_port,
    http_status,
    ingest_stage,
    new_pipeline,
    sink_stage,
    stage_logs,
    wait_until,
)
from tests.support.postgres import PgTestContext

MARKER = 2_000_000_000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.iceberg_e2e", description=__doc__)
    p.add_argument("--inserts", type=int, default=200_000)
    p.add_argument("--updates", type=int, default=100_000)
    p.add_argument("--batch-max-events", type=int, default=2000)
    p.add_argument("--sink-batch-size", type=int, default=20_000)
    args = p.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    tmp = Path(tempfile.mkdtemp(prefix="bench-iceberg-e2e-"))
    server = PostgresServer()
    server.start()
    stages = []
    try:
        pg = PgTestContext(server)
        source, _, files = new_pipeline(
            pg, tmp, batch_max_events=args.batch_max_events, snapshot_mode="never"
        )
        lake = iceberg_sink(
            "lake", tmp, batch_size=args.sink_batch_size, flush_interval_seconds=1.0
        )
        use_sinks(files, [lake])
        port = free_port()
        sink = sink_stage(files, tmp, port, "lake").start()
        ingest = ingest_stage(files, tmp, {"lake": port}).start()
        stages = [ingest, sink]
        wait_until(lambda: http_status(files.health_port, "/readyz") == 200, 60, "ready")
        started = time.monotonic()
        with psycopg.connect(source, autocommit=True) as conn:
            for lo in range(0, args.inserts, 10_000):
                hi = min(args.inserts, lo + 10_000)
                conn.execute(
                    "INSERT INTO orders (id, customer_id, amount, note) SELECT g, g %% 97,"
                    " g * 1.25, 'order ' || g FROM generate_series(%s::int, %s::int) g",
                    (lo + 1, hi),
                )
            changes = args.inserts + 1  # + the marker
            for _ in range(0, args.updates, 10_000):
                changes += conn.execute(
                    "UPDATE orders SET amount = amount + 1, paid = true WHERE id IN"
                    " (SELECT 1 + floor(random() * %s::int)::int FROM generate_series(1, 10000))",
                    (args.inserts,),
                ).rowcount
            conn.execute(
                "INSERT INTO orders (id, customer_id, amount) VALUES (%s, 0, 0)", (MARKER,)
            )
            changes = (
                args.inserts + conn.execute("SELECT count(*) FROM orders WHERE paid").fetchone()[0]
            )  # rows updated at least once (each update of a row is one change)
        made = time.monotonic() - started

        def marker_visible() -> bool:
            table = load_table(lake, "public.orders")
            if table is None:
                return False
            return table.scan(row_filter=EqualTo("id", MARKER)).to_arrow().num_rows == 1

        wait_until(marker_visible, 600, "end marker in Iceberg\n" + stage_logs(ingest, sink))
        seconds = time.monotonic() - started
        assert_equal(source, lake, ["public.orders"])
        table = load_table(lake, "public.orders")
        print(
            "| pipeline | changes | seconds (workload start -> end marker in Iceberg) |"
            " changes/s | commits | workload alone (s) |\n|---|---:|---:|---:|---:|---:|"
        )
        print(
            f"| direct -> Iceberg upsert (ingest batch_max_events {args.batch_max_events},"
            f" sink batch_size {args.sink_batch_size}) | {changes:,} | {seconds:.1f} |"
            f" {changes / seconds:,.0f} | {len(table.snapshots())} | {made:.1f} |"
        )
        return 0
    finally:
        for stage in stages:
            if stage.alive():
                stage.terminate()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
