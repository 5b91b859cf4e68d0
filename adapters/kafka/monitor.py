"""The Kafka `SourceMonitor`: schema versions in the registry and consumer lag.

- **Schema versions**: every `schema_monitor_interval_seconds` it reads the versions of each
  data topic's value subject (``<topic>-value``) and logs ``schema.version_changed`` when a
  new one appears, with the registry's verdict on its compatibility with the previous
  version. (The consumer itself notices a new shape on the first message written with it
  and, with `stop_on_incompatible_schema`, stops there: adapters/kafka/consumer.py.)
- **Lag per partition**: the fetched high watermark minus the committed offset, both kept
  by the consumer. The broker's ListOffsets is not asked: Tansu answers it wrongly (the
  start of the last batch + 1), while the high watermark of fetch responses is right.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

import structlog

from adapters.kafka.avro import RegistryError, SchemaRegistry
from adapters.kafka.consumer import KafkaEventSource
from domain.health import ComponentHealth, Status

log = structlog.get_logger(__name__)


class KafkaSourceMonitor:
    def __init__(
        self,
        source: KafkaEventSource,
        topics: Mapping[str, str],
        registry_url: str,
        registry_auth: tuple[str, str] | None = None,
        interval_seconds: float = 30.0,
    ) -> None:
        self.source = source
        self.topics = dict(topics)
        self.registry = SchemaRegistry(registry_url, registry_auth)
        self.interval_seconds = interval_seconds
        self.versions: dict[str, int] = {}  # subject -> latest version seen
        self.changes = 0
        self._error = ""
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="kafka-source-monitor")

    async def _run(self) -> None:
        while True:
            await self.poll()
            await asyncio.sleep(self.interval_seconds)

    async def poll(self) -> None:
        """One look at the registry (blocking HTTP on a thread)."""
        try:
            await asyncio.to_thread(self._poll)
            self._error = ""
        except RegistryError as exc:
            self._error = str(exc)
            log.warning("kafka.schema_monitor_failed", error=str(exc))

    def _poll(self) -> None:
        for topic, table in self.topics.items():
            subject = f"{topic}-value"
            versions = self.registry.versions(subject)
            if not versions:
                continue
            latest = max(versions)
            previous = self.versions.get(subject)
            self.versions[subject] = latest
            if previous is None or latest == previous:
                continue
            self.changes += 1
            compatible: bool | None = None
            with contextlib.suppress(RegistryError, LookupError, KeyError):
                schema = self.registry.version(subject, latest)["schema"]
                compatible = self.registry.is_compatible(subject, previous, schema)
            log.info(
                "schema.version_changed",
                subject=subject,
                table=table,
                from_version=previous,
                to_version=latest,
                compatible=compatible,
            )

    async def lag(self) -> dict[str, Any]:
        partitions = self.source.lag()
        return {
            "total_lag": sum(p["lag"] for p in partitions.values()),
            "partitions": partitions,
        }

    async def health(self) -> ComponentHealth:
        detail: dict[str, Any] = {**(await self.lag()), "schema_versions": dict(self.versions)}
        if self._error:
            return ComponentHealth(
                "kafka_monitor", Status.DEGRADED, {**detail, "error": self._error}
            )
        return ComponentHealth("kafka_monitor", Status.OK, detail)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
