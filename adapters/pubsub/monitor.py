"""The ingest stage's view of the Pub/Sub backlog.

Where the Cloud Monitoring API is reachable (real Pub/Sub, `google-cloud-monitoring`
installed, the account may read metrics: `roles/monitoring.viewer`), the subscription's
`num_undelivered_messages` and `oldest_unacked_message_age` (sampled by Google every
minute). Against the emulator (`PUBSUB_EMULATOR_HOST`), or when that read fails, a local
estimate from this process's source: messages received and not yet acked, and the age of
the oldest of them (from its publish time). Either way `source` says which it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Any

import structlog

from adapters.pubsub.source import PubSubEventSource
from domain.health import ComponentHealth, Status

log = structlog.get_logger(__name__)


class PubSubMonitor:
    def __init__(
        self,
        source: PubSubEventSource,
        project: str,
        subscription: str,
        *,
        interval_seconds: float = 60.0,
        use_monitoring_api: bool | None = None,
    ) -> None:
        self.source = source
        self.project = project
        self.subscription = subscription
        self.interval_seconds = interval_seconds
        if use_monitoring_api is None:
            use_monitoring_api = "PUBSUB_EMULATOR_HOST" not in os.environ
        self.use_monitoring_api = use_monitoring_api
        self._api_reading: dict[str, Any] | None = None
        self._api_error = ""
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.use_monitoring_api:
            self._task = asyncio.create_task(self._poll(), name="pubsub-monitor")

    async def _poll(self) -> None:
        while True:
            try:
                self._api_reading = await asyncio.to_thread(self._read_api)
                self._api_error = ""
            except Exception as exc:  # the local estimate stands in
                self._api_reading = None
                self._api_error = repr(exc)[:300]
            await asyncio.sleep(self.interval_seconds)

    def _read_api(self) -> dict[str, Any]:
        from google.cloud import monitoring_v3

        client = monitoring_v3.MetricServiceClient()
        now = time.time()
        interval = monitoring_v3.TimeInterval(
            {"end_time": {"seconds": int(now)}, "start_time": {"seconds": int(now) - 300}}
        )
        reading: dict[str, Any] = {"source": "monitoring_api"}
        for metric, key in (
            ("num_undelivered_messages", "undelivered_messages"),
            ("oldest_unacked_message_age", "oldest_unacked_age_seconds"),
        ):
            series = client.list_time_series(
                request={
                    "name": f"projects/{self.project}",
                    "filter": (
                        f'metric.type = "pubsub.googleapis.com/subscription/{metric}" AND '
                        f'resource.labels.subscription_id = "{self.subscription}"'
                    ),
                    "interval": interval,
                    "view": monitoring_v3.ListTimeSeriesRequest.TimeSeriesView.FULL,
                }
            )
            for ts in series:
                if ts.points:  # newest first
                    reading[key] = ts.points[0].value.int64_value
                    break
        return reading

    def _local(self) -> dict[str, Any]:
        return {
            "source": "local_estimate",
            "outstanding_messages": self.source.outstanding,
            "oldest_unacked_age_seconds": round(self.source.oldest_unacked_age(), 3),
            "received": self.source.received,
            "acked": self.source.acked,
        }

    async def lag(self) -> dict[str, Any]:
        reading = dict(self._api_reading) if self._api_reading else self._local()
        reading["subscription"] = self.subscription
        if self._api_error:
            reading["monitoring_api_error"] = self._api_error
        return reading

    async def health(self) -> ComponentHealth:
        return ComponentHealth("backlog:pubsub", Status.OK, await self.lag())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
