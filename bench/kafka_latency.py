"""End-to-end latency through Kafka: PostgreSQL -> Debezium on Kafka Connect -> Tansu ->
`cdc run` (transport_mode kafka) -> PostgreSQL sink, at a fixed rate (the bench's steady
workload, default 5,000 changes/s for 20 s from 4 clients).

`python -m bench.kafka_latency [--rate R] [--seconds S]`. Source and sink databases are on
one PostgreSQL server with `track_commit_timestamp`, so each row's latency is its sink
commit time minus its source commit time (both `pg_xact_commit_timestamp(xmin)`), as for the
`direct` steady measurement in docs/benchmarks.md. It starts Tansu, the schema registry,
Kafka Connect and PostgreSQL of its own and stops them all at the end.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psycopg

from bench import workload
from bench.kafka_run import log_tail, postgres_sink, start_cdc, stop_all, write_configs
from bench.runners import _row_latencies
from services.net import find_free_port
from services.stack import connect, schema_registry, tansu
from services.stack.postgres import PostgresServer


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _count(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        try:
            row = conn.execute(f"SELECT count(*) FROM {workload.TABLE}").fetchone()
        except psycopg.errors.UndefinedTable:
            return -1
    return int(row[0]) if row else 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--poll-batch-size", type=int, default=1000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-kafka-latency-"))
    server = PostgresServer(settings={"track_commit_timestamp": "on"}).start()
    broker = tansu.start(work / "tansu")
    registry = schema_registry.start(work / "registry")
    worker = connect.start(
        work / "connect", bootstrap_servers=broker.bootstrap_servers, registry_url=registry.url
    )
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE src")
            conn.execute("CREATE DATABASE dst")
        src, dst = server.dsn("src"), server.dsn("dst")
        with psycopg.connect(src, autocommit=True) as conn:
            conn.execute(workload.SCHEMA_SQL)
        health = find_free_port()
        pipeline = {
            "pipeline_id": "latency",
            "topic_prefix": "lat",
            "source": {
                "host": server.host,
                "port": server.port,
                "database": "src",
                "username": "postgres",
                "password": "unused",  # trust auth; the connector wants one
                "tables": [workload.TABLE],
                "snapshot_mode": "never",
                "heartbeat_mode": "none",
            },
            "sinks": [postgres_sink(server, "dst")],
        }
        platform = {
            "transport_mode": "kafka",
            "health_port": health,
            "max_buffered_messages": 20_000,
            "ingest": {"grpc_port": find_free_port()},
            "kafka": {
                "bootstrap_servers": broker.bootstrap_servers,
                "schema_registry_url": registry.url,
                "poll_batch_size": args.poll_batch_size,
            },
            "connector": {"connect_url": worker.url},
        }
        run = start_cdc(work, "run", ["run", *write_configs(work, pipeline, platform)])
        procs.append(run)
        deadline = time.monotonic() + 240
        while not _ready(health):
            if time.monotonic() > deadline or run.poll() is not None:
                raise SystemExit("not ready: " + log_tail(work, "run"))
            time.sleep(0.5)
        workload.insert_marker(src, workload.START_MARKER)
        while _count(dst) < 1:  # the path is warm: one change went through
            if time.monotonic() > deadline:
                raise SystemExit("no change came through: " + log_tail(work, "run"))
            time.sleep(0.2)
        result = workload.steady(src, workload.SteadySpec(rate=args.rate, seconds=args.seconds))
        deadline = time.monotonic() + 300
        while _count(dst) != _count(src):
            if time.monotonic() > deadline:
                raise SystemExit(f"sink {_count(dst)} rows, source {_count(src)}")
            time.sleep(0.5)
        lat = _row_latencies(src, dst)
        print(
            f"PostgreSQL -> Debezium on Connect -> Tansu -> cdc run -> PostgreSQL at"
            f" {result.rate:,.0f} changes/s offered ({result.changes:,} changes,"
            f" {result.behind_ticks} late ticks): p50 {lat['p50']:.0f} ms, p95 {lat['p95']:.0f}"
            f" ms, p99 {lat['p99']:.0f} ms, max {lat['max']:.0f} ms over {lat['count']:.0f} rows",
            flush=True,
        )
    finally:
        stop_all(work, procs, [worker, registry, broker, server], wait=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
