"""What bench.kafka_latency and bench.kafka_throughput both do around the measurement: the
PostgreSQL sink they write to, the pipeline and platform files, the `cdc` processes (logs in
the work directory) and stopping everything they started."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Protocol

import yaml

from services.stack.postgres import PostgresServer

REPO = Path(__file__).resolve().parents[1]


class _Stoppable(Protocol):
    def stop(self) -> Any: ...


def postgres_sink(server: PostgresServer, database: str) -> dict[str, Any]:
    """The pipeline's `sinks` entry: sink `replica`, tables into `database`.public."""
    return {
        "sink_id": "replica",
        "sink_type": "postgres",
        "postgres": {
            "host": server.host,
            "port": server.port,
            "database": database,
            "username": "postgres",
            "target_schema": "public",
        },
    }


def write_configs(work: Path, pipeline: dict[str, Any], platform: dict[str, Any]) -> list[str]:
    """Writes both files into `work`; the `cdc` arguments that name them."""
    (work / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    (work / "platform.yaml").write_text(yaml.safe_dump(platform))
    return [str(work / "pipeline.yaml"), "--platform-config", str(work / "platform.yaml")]


def start_cdc(work: Path, name: str, args: list[str]) -> subprocess.Popen[bytes]:
    """`cdc <args>` from this checkout, its output in `work/<name>.log`."""
    log = (work / f"{name}.log").open("wb")
    env = dict(os.environ, PYTHONPATH=str(REPO), CDC_LOG_LEVEL="WARNING")
    return subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )


def log_tail(work: Path, name: str) -> str:
    return (work / f"{name}.log").read_text()[-3000:]


def stop_all(
    work: Path, procs: list[subprocess.Popen[bytes]], servers: list[_Stoppable], wait: float
) -> None:
    """Terminates the processes (killed after `wait` s), stops the servers in order and
    removes the work directory."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(wait)
        except subprocess.TimeoutExpired:
            p.kill()
    for server in servers:
        server.stop()
    shutil.rmtree(work, ignore_errors=True)
