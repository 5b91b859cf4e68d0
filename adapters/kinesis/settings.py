"""What the Kinesis adapters need from platform.yaml and pipeline.yaml, as plain values, and
the boto3 clients they talk through (every one pointed at `endpoint_url` when set)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

# Stream names: 1-128 of [a-zA-Z0-9_.-].
_STREAM_FORBIDDEN = re.compile(r"[^A-Za-z0-9_.-]")


def stream_name(prefix: str, schema: str, table: str) -> str:
    """`<topic_prefix>-<schema>-<table>` (the guide's `cdc-public-customers`), characters a
    stream name cannot hold replaced by `_`."""
    name = _STREAM_FORBIDDEN.sub("_", f"{prefix}-{schema}-{table}")
    if len(name) > 128:
        raise ValueError(f"stream name {name!r} is longer than Kinesis allows (128)")
    return name


@dataclass(frozen=True)
class Backoff:
    """Waits between retries of a failed put / read (platform.yaml `retry`, without its
    max_attempts: a publish is retried until it succeeds)."""

    initial_seconds: float = 0.2
    max_seconds: float = 10.0
    multiplier: float = 2.0
    jitter: bool = True

    def wait(self, attempt: int) -> float:
        import random

        base = min(self.max_seconds, self.initial_seconds * self.multiplier ** max(0, attempt))
        return base * random.uniform(0.75, 1.25) if self.jitter else base


@dataclass(frozen=True)
class KinesisSettings:
    pipeline_id: str
    # captured table ("schema.table") -> its stream
    streams: dict[str, str]
    shard_count: int = 1
    lanes_per_table: int = 1  # key-hash lanes per stream (= shard_count by default)
    checkpoint_table: str = "cdc-kinesis-checkpoints"
    region: str | None = None
    endpoint_url: str | None = None
    dlq_suffix: str | None = "dlq"  # None: no DLQ stream (dlq.enabled false)
    dlq_headers: bool = True  # dlq.include_headers: the JSON header line in a DLQ record
    poll_interval_seconds: float = 1.0
    max_records_per_shard: int = 100
    max_events_per_record: int = 100  # wal_reader.batch_size: changes per published record
    lease_seconds: float = 10.0
    backoff: Backoff = field(default_factory=Backoff)
    # an idle shard is checkpointed at most this often; a busy one on every ack
    checkpoint_interval_seconds: float = 1.0

    def dlq_stream(self, stream: str) -> str | None:
        return f"{stream}-{self.dlq_suffix}" if self.dlq_suffix else None

    @property
    def all_streams(self) -> list[str]:
        streams = list(dict.fromkeys(self.streams.values()))
        dlqs = [d for s in streams if (d := self.dlq_stream(s)) is not None]
        return streams + dlqs


def client(service: str, settings: KinesisSettings) -> Any:
    """A boto3 client for `kinesis` or `dynamodb`, at the emulator when `endpoint_url` says
    so. Credentials come from the usual boto3 chain (IRSA, instance profile, environment)."""
    import boto3  # type: ignore[import-untyped]
    from botocore.config import Config  # type: ignore[import-untyped]

    config = Config(
        retries={"max_attempts": 1, "mode": "standard"},  # we retry ourselves, with backoff
        connect_timeout=5,
        read_timeout=30,
        max_pool_connections=32,
    )
    return boto3.session.Session().client(
        service,
        region_name=settings.region or "us-east-1",
        endpoint_url=settings.endpoint_url,
        config=config,
    )


def error_code(exc: BaseException) -> str:
    """The AWS error code of a botocore ClientError, else the exception's class name."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        if code:
            return str(code)
    return type(exc).__name__
