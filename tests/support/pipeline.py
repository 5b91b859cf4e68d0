"""Drive real `cdc` processes against real PostgreSQL: configs, stages, comparisons, audits."""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import yaml

from adapters.postgres.source.catalog import parse_lsn
from services.net import find_free_port as free_port

REPO = Path(__file__).resolve().parents[2]


def cdc_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "services.cli.main", *args]


@dataclass
class PipelineFiles:
    pipeline: Path
    platform: Path
    pipeline_id: str
    slot: str
    publication: str
    health_port: int

    def argv(self, command: str, *args: str) -> list[str]:
        """`cdc COMMAND pipeline.yaml --platform-config platform.yaml ARGS...`"""
        return cdc_argv(command, str(self.pipeline), "--platform-config", str(self.platform), *args)


def write_configs(
    directory: Path,
    *,
    host: str,
    port: int,
    source_db: str,
    replica_db: str,
    tables: Sequence[str],
    pipeline_id: str = "e2e",
    snapshot_mode: str = "initial",
    batch_max_events: int = 500,
    extra_platform: dict[str, Any] | None = None,
    extra_source: dict[str, Any] | None = None,
) -> PipelineFiles:
    slot = f"{pipeline_id.replace('-', '_')}_slot"
    publication = f"{pipeline_id.replace('-', '_')}_pub"
    health_port = free_port()
    pipeline = {
        "pipeline_id": pipeline_id,
        "source": {
            "source_type": "postgres",
            "host": host,
            "port": port,
            "database": source_db,
            "username": "postgres",
            "tables": list(tables),
            "snapshot_mode": snapshot_mode,
            "slot_name": slot,
            "publication_name": publication,
            **(extra_source or {}),
        },
        "sinks": [
            {
                "sink_id": "replica",
                "sink_type": "postgres",
                "postgres": {
                    "host": host,
                    "port": port,
                    "database": replica_db,
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
        "ingest": {"batch_max_events": batch_max_events, "grpc_port": free_port()},
        "wal_reader": {"status_interval_seconds": 1.0},
    }
    platform.update(extra_platform or {})
    directory.mkdir(parents=True, exist_ok=True)
    pipeline_path = directory / "pipeline.yaml"
    platform_path = directory / "platform.yaml"
    pipeline_path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    platform_path.write_text(yaml.safe_dump(platform, sort_keys=False))
    return PipelineFiles(pipeline_path, platform_path, pipeline_id, slot, publication, health_port)


class Stage:
    """One `cdc` process; stdout/stderr go to a log file the test can show on failure."""

    def __init__(
        self, name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None
    ) -> None:
        self.extra_env = env or {}
        self.name = name
        self.argv = argv
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Stage:
        env = dict(os.environ, CDC_LOG_LEVEL="INFO", PYTHONPATH=str(REPO), **self.extra_env)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env
        )
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def terminate(self, timeout: float = 60) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def sink_stage(
    files: PipelineFiles,
    log_dir: Path,
    port: int,
    sink_id: str = "replica",
    env: dict[str, str] | None = None,
) -> Stage:
    argv = files.argv("sink", "--sink-id", sink_id, "--port", str(port))
    return Stage(f"sink-{sink_id}", argv, log_dir, env)


def ingest_stage(
    files: PipelineFiles,
    log_dir: Path,
    endpoints: dict[str, int],
    env: dict[str, str] | None = None,
) -> Stage:
    argv = files.argv("ingest")
    for sink_id, port in endpoints.items():
        argv += ["--sink-endpoint", f"{sink_id}=127.0.0.1:{port}"]
    return Stage("ingest", argv, log_dir, env)


def wait_until(
    predicate: Callable[[], bool], timeout: float, message: str, interval: float = 0.2
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for: {message}")


def table_rows(dsn: str, table: str, key: str | None = None) -> list[tuple[Any, ...]]:
    """All rows in primary-key order (all columns without one); a table the sink has not
    created yet (no change for it) is empty."""
    with psycopg.connect(dsn) as conn:
        try:
            if key is None:
                pk = conn.execute(
                    "SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY k.n)"
                    " FROM pg_index i, unnest(i.indkey) WITH ORDINALITY k(attnum, n),"
                    " pg_attribute a WHERE i.indrelid = %s::regclass AND i.indisprimary"
                    " AND a.attrelid = i.indrelid AND a.attnum = k.attnum",
                    (table,),
                ).fetchone()
                key = pk[0] if pk and pk[0] else "1"
            return conn.execute(f"SELECT * FROM {table} ORDER BY {key}").fetchall()
        except psycopg.errors.UndefinedTable:
            return []


def tables_equal(source_dsn: str, replica_dsn: str, tables: Sequence[str]) -> bool:
    for table in tables:
        name = table.split(".", 1)[1]
        if table_rows(source_dsn, table) != table_rows(replica_dsn, f"public.{name}"):
            return False
    return True


def assert_tables_equal(source_dsn: str, replica_dsn: str, tables: Sequence[str]) -> None:
    for table in tables:
        name = table.split(".", 1)[1]
        src = table_rows(source_dsn, table)
        dst = table_rows(replica_dsn, f"public.{name}")
        assert len(src) == len(dst), f"{table}: source {len(src)} rows, sink {len(dst)} rows"
        for a, b in zip(src, dst, strict=True):
            assert a == b, f"{table}: source row {a} != sink row {b}"


def http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def http_json(port: int, path: str) -> dict[str, Any]:
    import json

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return dict(json.loads(resp.read()))
    except urllib.error.HTTPError as exc:
        return dict(json.loads(exc.read()))


class CommitAudit:
    """Proves the slot's confirmed flush LSN never ran ahead of the sink.

    A second slot on the same publication records every transaction's commit and end LSN.
    A sampler thread reads (confirmed_flush_lsn of the pipeline's slot, then the sink's
    applied position). Invariant: every transaction ending at or before the confirmed
    flush LSN has its commit LSN at or below the sink's applied position.
    """

    def __init__(self, source_dsn: str, publication: str, slot: str, audit_slot: str) -> None:
        self.source_dsn = source_dsn
        self.publication = publication
        self.slot = slot
        self.audit_slot = audit_slot
        self.samples: list[tuple[int, int]] = []

    def create(self) -> None:
        with psycopg.connect(self.source_dsn, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (self.audit_slot,)
            )

    def sample(self, replica_dsn: str, pipeline_id: str) -> None:
        with psycopg.connect(self.source_dsn, autocommit=True) as src:
            row = src.execute(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name=%s",
                (self.slot,),
            ).fetchone()
        if row is None or row[0] is None:
            return
        confirmed = parse_lsn(row[0])
        with psycopg.connect(replica_dsn, autocommit=True) as dst:
            try:
                applied_row = dst.execute(
                    "SELECT max(major) FROM public._cdc_offsets WHERE pipeline_id = %s",
                    (pipeline_id,),
                ).fetchone()
            except psycopg.errors.UndefinedTable:
                applied_row = None
        applied = int(applied_row[0]) if applied_row and applied_row[0] is not None else 0
        self.samples.append((confirmed, applied))

    def transactions(self) -> list[tuple[int, int]]:
        """(commit_lsn, end_lsn) of every transaction on the publication since create()."""
        with psycopg.connect(self.source_dsn, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT data FROM pg_logical_slot_get_binary_changes(%s, NULL, NULL,"
                " 'proto_version', '1', 'publication_names', %s)",
                (self.audit_slot, self.publication),
            ).fetchall()
            conn.execute("SELECT pg_drop_replication_slot(%s)", (self.audit_slot,))
        out = []
        for (data,) in rows:
            if data[:1] == b"C":
                _, commit_lsn, end_lsn, _ = struct.unpack_from("!BQQq", data, 1)
                out.append((commit_lsn, end_lsn))
        return out

    def violations(self, initial_confirmed: int) -> list[str]:
        txs = self.transactions()
        problems = []
        for confirmed, applied in self.samples:
            if confirmed <= initial_confirmed:
                continue
            for commit_lsn, end_lsn in txs:
                if end_lsn <= confirmed and commit_lsn > applied:
                    problems.append(
                        f"slot confirmed {confirmed} past transaction commit {commit_lsn}"
                        f" (end {end_lsn}) while the sink had applied only {applied}"
                    )
                    break
        return problems


def new_pipeline(
    pg: Any, tmp_path: Path, seed_rows: int = 0, **config: Any
) -> tuple[str, str, PipelineFiles]:
    """A source database with the workload's tables, an empty replica database, and the
    config files of a pipeline between them: (source dsn, replica dsn, files)."""
    from tests.support.workload import DDL, TABLES, seed_customers

    source_dsn, replica_dsn, files = pipeline_with_ddl(pg, tmp_path, DDL, TABLES, **config)
    if seed_rows:
        seed_customers(source_dsn, seed_rows)
    return source_dsn, replica_dsn, files


def pipeline_with_ddl(
    pg: Any, tmp_path: Path, ddl: str, tables: Sequence[str], **config: Any
) -> tuple[str, str, PipelineFiles]:
    """A source database with `ddl` run in it, an empty replica, and the pipeline's files:
    (source dsn, replica dsn, files). `config` goes to write_configs."""
    source_db, replica_db = pg.new_database("src"), pg.new_database("replica")
    source_dsn, replica_dsn = pg.dsn(source_db), pg.dsn(replica_db)
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute(ddl)
    files = write_configs(
        tmp_path,
        host=pg.host,
        port=pg.port,
        source_db=source_db,
        replica_db=replica_db,
        tables=tables,
        **config,
    )
    return source_dsn, replica_dsn, files


def stage_logs(*stages: Stage, lines: int = 40) -> str:
    return "\n".join(f"--- {s.name}\n{s.log_tail(lines)}" for s in stages)


@contextlib.contextmanager
def running_stages(
    files: PipelineFiles, tmp_path: Path, sink_ids: Sequence[str] = ("replica",)
) -> Iterator[tuple[Stage, dict[str, Stage]]]:
    """Sink stage(s) and the ingest stage, running until the block ends; they must then stop
    cleanly (exit 0 on SIGTERM). Yields (ingest, {sink id: sink})."""
    ports = {sink_id: free_port() for sink_id in sink_ids}
    sinks = {
        sink_id: sink_stage(files, tmp_path, port, sink_id).start()
        for sink_id, port in ports.items()
    }
    ingest = ingest_stage(files, tmp_path, ports).start()
    stages = [ingest, *sinks.values()]
    try:
        wait_until(
            lambda: (
                not all(s.alive() for s in stages)
                or http_status(files.health_port, "/readyz") == 200
            ),
            90,
            "pipeline ready",
        )
        assert all(s.alive() for s in stages), "a stage exited\n" + stage_logs(*stages)
        yield ingest, sinks
    except BaseException:
        print(stage_logs(*stages))
        raise
    finally:
        codes = {s.name: s.terminate() for s in stages if s.alive()}
    assert all(code == 0 for code in codes.values()), (codes, stage_logs(*stages))


class Background:
    """A loop on a thread for the length of a `with` block: `step()` runs until the block
    ends (writers, samplers)."""

    interval = 0.0

    def __init__(self) -> None:
        self.stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Any:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.step()
            if self.interval:
                time.sleep(self.interval)

    def step(self) -> None:
        raise NotImplementedError


def child_processes(parent_pid: int) -> dict[int, str]:
    """{pid: command line} of the live processes whose parent is `parent_pid`."""
    ps = subprocess.run(
        ["ps", "-eww", "-o", "pid=,ppid=,stat=,args="], capture_output=True, text=True
    ).stdout
    out: dict[int, str] = {}
    for line in ps.splitlines():
        pid, ppid, stat, args = line.split(None, 3)
        if int(ppid) == parent_pid and not stat.startswith("Z"):
            out[int(pid)] = args
    return out


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on host:port."""
    import socket

    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


def cdc_run_stage(
    files: PipelineFiles, log_dir: Path, name: str = "run", env: dict[str, str] | None = None
) -> Stage:
    """`cdc run` of the pipeline as a Stage (its children log into the same file)."""
    return Stage(name, files.argv("run"), log_dir, env)
