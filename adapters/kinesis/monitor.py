"""The Kinesis `SourceMonitor`: per shard, who holds its lease, how far its checkpoint is,
and `MillisBehindLatest` as the reading replica last saw it (each replica stores it with its
lease renewals, so one monitor sees every replica's shards)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from adapters.kinesis.leases import Lease, LeaseTable
from adapters.kinesis.settings import KinesisSettings, client, error_code
from adapters.kinesis.shards import list_shards, readable
from domain.health import ComponentHealth, Status


class KinesisMonitor:
    def __init__(
        self,
        settings: KinesisSettings,
        *,
        interval_seconds: float = 15.0,
        behind_degraded_millis: int = 60_000,
        kinesis_client: Any = None,
        dynamodb_client: Any = None,
    ) -> None:
        self._settings = settings
        self._interval = interval_seconds
        self._behind_degraded = behind_degraded_millis
        self._kinesis = kinesis_client
        self._dynamodb = dynamodb_client
        self._reading: dict[str, Any] = {}
        self._error = ""
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._kinesis is None:
            self._kinesis = client("kinesis", self._settings)
        if self._dynamodb is None:
            self._dynamodb = client("dynamodb", self._settings)
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="kinesis-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.refresh()

    async def refresh(self) -> None:
        try:
            self._reading = await asyncio.to_thread(self._read)
            self._error = ""
        except Exception as exc:
            self._error = f"{error_code(exc)}: {exc}"[:300]

    def _read(self) -> dict[str, Any]:
        s = self._settings
        table = LeaseTable(self._dynamodb, s.checkpoint_table, s.pipeline_id)
        now = time.time()
        leases: dict[tuple[str, str], Lease] = {(x.stream, x.shard_id): x for x in table.leases()}
        shards = []
        for stream in dict.fromkeys(s.streams.values()):
            shards += list_shards(self._kinesis, stream)
        finished = {k: v.finished for k, v in leases.items()}
        active = {sh.key for sh in readable(shards, finished)}
        per_shard: dict[str, Any] = {}
        for shard in shards:
            lease = leases.get(shard.key)
            per_shard[f"{shard.stream}/{shard.shard_id}"] = {
                "owner": lease.owner if lease is not None and lease.live(now) else None,
                "checkpoint": lease.checkpoint if lease else None,
                "millis_behind_latest": lease.millis_behind if lease else None,
                "finished": bool(lease and lease.finished),
                "readable": shard.key in active,
            }
        behind = [
            v["millis_behind_latest"]
            for v in per_shard.values()
            if v["readable"] and v["millis_behind_latest"] is not None
        ]
        return {
            "shards": per_shard,
            "max_millis_behind_latest": max(behind) if behind else None,
            "unowned_shards": sorted(
                k for k, v in per_shard.items() if v["readable"] and not v["owner"]
            ),
        }

    async def lag(self) -> dict[str, Any]:
        return dict(self._reading)

    async def health(self) -> ComponentHealth:
        detail = {**self._reading}
        if self._error:
            return ComponentHealth("kinesis_lag", Status.DEGRADED, {**detail, "error": self._error})
        behind = detail.get("max_millis_behind_latest")
        if behind is not None and behind > self._behind_degraded:
            return ComponentHealth("kinesis_lag", Status.DEGRADED, detail)
        return ComponentHealth("kinesis_lag", Status.OK, detail)
