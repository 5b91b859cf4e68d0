"""`cdc run` on the Kafka transport (PostgreSQL -> Debezium on Kafka Connect -> Tansu ->
ingest -> PostgreSQL sink) as one real process tree, for the e2e tests: fresh source and
replica databases with the given DDL and seed, configs pointing at the test broker, Schema
Registry and Connect worker."""

from __future__ import annotations

import signal
import subprocess
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import psycopg
import yaml

from tests.support.pipeline import REPO, PipelineFiles, cdc_argv, write_configs


@dataclass
class KafkaRun:
    files: PipelineFiles
    source_dsn: str
    replica_dsn: str
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> KafkaRun:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            cdc_argv(
                "run", str(self.files.pipeline), "--platform-config", str(self.files.platform)
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        return self

    def stage_pid(self, name: str) -> int:
        assert self.process is not None
        for child in psutil.Process(self.process.pid).children(recursive=True):
            argv = child.cmdline()
            if name in argv[1:4]:  # `python [-m services.cli.main | .../cdc] ingest ...`
                return int(child.pid)
        raise AssertionError(f"no {name} stage running")

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(90)


def kafka_run(
    pg: Any,
    broker: Any,
    registry: Any,
    connect_url: str,
    tmp_path: Path,
    ddl: str,
    seed: str,
    tables: Sequence[str] = ("public.items",),
) -> KafkaRun:
    """A KafkaRun (not started) capturing `tables` of a new source database made by `ddl`
    and `seed`, into a new replica database."""
    suffix = uuid.uuid4().hex[:8]
    source_db, replica_db = pg.new_database("src"), pg.new_database("replica")
    source_dsn, replica_dsn = pg.dsn(source_db), pg.dsn(replica_db)
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute(ddl)
        conn.execute(seed)
    files = write_configs(
        tmp_path,
        host=pg.host,
        port=pg.port,
        source_db=source_db,
        replica_db=replica_db,
        tables=list(tables),
        pipeline_id=f"dbz-{suffix}",
    )
    pipeline = yaml.safe_load(files.pipeline.read_text())
    pipeline["topic_prefix"] = f"dbz{suffix}"
    pipeline["source"]["password"] = "unused"  # trust auth; the connector wants one
    pipeline["source"]["heartbeat_mode"] = "none"
    files.pipeline.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    platform = yaml.safe_load(files.platform.read_text())
    platform.pop("wal_reader")
    platform["transport_mode"] = "kafka"
    platform["kafka"] = {
        "bootstrap_servers": broker.bootstrap_servers,
        "schema_registry_url": registry.url,
        "group_id": f"dbz-{suffix}",
        "poll_batch_size": 500,
        "topic_num_partitions": 1,
    }
    platform["connector"] = {"connect_url": connect_url, "timeout_seconds": 30}
    platform["retry"] = {"initial_wait_seconds": 0.2, "max_wait_seconds": 2}
    platform["schema_monitor_interval_seconds"] = 1.0
    files.platform.write_text(yaml.safe_dump(platform, sort_keys=False))
    return KafkaRun(files, source_dsn, replica_dsn, tmp_path / "run.log")
