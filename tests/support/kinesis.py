"""Kinesis test helpers: a moto server (until tests/support/stack.py's `moto_server` is
used), the settings and clients pointed at it, and waiting helpers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.kinesis.settings import Backoff, KinesisSettings, client
from services.net import find_free_port

# moto accepts any credentials; boto3 needs some.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def set_aws_env() -> None:
    for k, v in AWS_ENV.items():
        os.environ.setdefault(k, v)


@dataclass
class MotoServer:
    endpoint_url: str
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_moto(log_dir: Path) -> MotoServer:
    port = find_free_port()
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    log = open(log_dir / f"moto-{port}.log", "wb")  # noqa: SIM115 (the child holds it)
    process = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1).read()
            return MotoServer(url, process)
        except Exception:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"moto_server did not start; see {log.name}") from None
            time.sleep(0.1)


def moto_server_fixture(tmp_path_factory: Any) -> Iterator[MotoServer]:
    set_aws_env()
    server = start_moto(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        server.stop()


def settings_for(
    endpoint_url: str,
    tables: tuple[str, ...] = ("public.items",),
    shards: int = 2,
    **overrides: Any,
) -> KinesisSettings:
    """Settings with names unique to the test (streams and table live on a shared server)."""
    tag = uuid.uuid4().hex[:8]
    streams = {t: f"t{tag}-{t.replace('.', '-')}" for t in tables}
    values: dict[str, Any] = {
        "pipeline_id": f"p{tag}",
        "streams": streams,
        "shard_count": shards,
        "lanes_per_table": shards,
        "checkpoint_table": f"cp-{tag}",
        "region": "us-east-1",
        "endpoint_url": endpoint_url,
        "poll_interval_seconds": 0.05,
        "lease_seconds": 3.0,
        "checkpoint_interval_seconds": 0.2,
        "backoff": Backoff(0.05, 0.5, 2.0, False),
    }
    values.update(overrides)
    return KinesisSettings(**values)


def clients(settings: KinesisSettings) -> tuple[Any, Any]:
    set_aws_env()
    return client("kinesis", settings), client("dynamodb", settings)


def wait_for(predicate: Any, timeout: float = 30.0, interval: float = 0.1, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(interval)
