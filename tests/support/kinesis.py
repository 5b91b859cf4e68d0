"""Kinesis test helpers: settings and clients pointed at a moto server (the `moto_server`
fixture of tests/support/stack.py), waiting helpers."""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

from adapters.kinesis.settings import Backoff, KinesisSettings, client

# moto accepts any credentials; boto3 needs some.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def set_aws_env() -> None:
    for k, v in AWS_ENV.items():
        os.environ.setdefault(k, v)


def settings_for(
    endpoint_url: str,
    tables: tuple[str, ...] = ("public.items",),
    shards: int = 2,
    **overrides: Any,
) -> KinesisSettings:
    """Settings with names unique to the test (streams and table live on a shared server)."""
    set_aws_env()
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
