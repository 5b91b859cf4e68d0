"""The capture stage's `Outlet` for Kinesis: changes spread over key-hash lanes, one
partition key per lane, published with `put_records`.

Nothing is dropped and per-lane order holds under partial failures: a call carries at most
one record per lane, so a lane's next record is sent only after the previous one is in (a
retried record can never land behind a later record of its lane). Failed records (throttled,
internal errors, the whole call failing) are retried with backoff until they succeed. A batch
is acknowledged (`DeliveryAck`, durable) only when every one of its records is in the stream;
only then may the capture stage confirm the slot's LSN past it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from adapters.kinesis import lanes as L
from adapters.kinesis.settings import KinesisSettings, client, error_code
from domain.capture import ChangeCodec, lane_index
from domain.events import SourceEvent
from domain.health import ComponentHealth, Status
from domain.ports import DeliveryAck, OutboundBatch

log = structlog.get_logger(__name__)

AckHandler = Callable[[str, DeliveryAck], Awaitable[None]]


@dataclass
class _Pending:
    batch: OutboundBatch
    records_left: int
    events: int


@dataclass
class PublisherStats:
    records_put: int = 0
    records_failed: int = 0  # failed attempts (each retried)
    calls_failed: int = 0
    last_error: str = ""
    failing_since: float | None = None
    by_code: dict[str, int] = field(default_factory=dict)


class KinesisPublisher:
    """`Outlet` of `cdc capture` for transport_mode kinesis."""

    def __init__(
        self,
        settings: KinesisSettings,
        codec: ChangeCodec,
        on_ack: AckHandler,
        *,
        max_in_flight: int = 8,
        name: str = "kinesis",
        kinesis_client: Any = None,
    ) -> None:
        self._settings = settings
        self._codec = codec
        self._on_ack = on_ack
        self._name = name
        self._client = kinesis_client
        self._credits = asyncio.Semaphore(max_in_flight)
        self._queue: asyncio.Queue[OutboundBatch] = asyncio.Queue()
        self._unacked = 0
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self.stats = PublisherStats()
        self._fatal: Exception | None = None

    @property
    def name(self) -> str:
        return self._name

    @property
    def unacked(self) -> int:
        return self._unacked

    def start(self) -> None:
        if self._client is None:
            self._client = client("kinesis", self._settings)
        self._task = asyncio.create_task(self._run(), name="kinesis-publisher")

    async def send(self, batch: OutboundBatch) -> None:
        batch.require_events(self._name)
        if self._fatal is not None:
            raise self._fatal
        await self._credits.acquire()
        if self._fatal is not None:
            raise self._fatal
        self._unacked += 1
        self._idle.clear()
        self._queue.put_nowait(batch)

    async def drain(self, timeout: float) -> bool:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        return self._unacked == 0

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def health(self) -> ComponentHealth:
        s = self.stats
        detail = {
            "records_put": s.records_put,
            "records_failed": s.records_failed,
            "unacked_batches": self._unacked,
            "last_error": s.last_error,
        }
        if self._fatal is not None:
            detail["error"] = f"cannot publish: {self._fatal}"
            return ComponentHealth(f"publisher:{self._name}", Status.ERROR, detail)
        if s.failing_since is not None:
            failing = time.monotonic() - s.failing_since
            status = Status.ERROR if failing > 60 else Status.DEGRADED
            return ComponentHealth(f"publisher:{self._name}", status, detail)
        return ComponentHealth(f"publisher:{self._name}", Status.OK, detail)

    # ------------------------------------------------------------------ publishing

    def _entries(self, ref: int, events: Sequence[SourceEvent]) -> list[L.Entry]:
        """The records of one batch: per table stream and key-hash lane, in event order."""
        settings = self._settings
        n = settings.lanes_per_table
        groups: dict[tuple[str, int], list[SourceEvent]] = {}
        for event in events:
            table = event.table.qualified_name
            stream = settings.streams.get(table)
            if stream is None:
                raise ValueError(f"no Kinesis stream for table {table} (not in source.tables)")
            groups.setdefault((stream, lane_index(event, n)), []).append(event)
        entries = []
        per_record = max(1, settings.max_events_per_record)
        for (stream, lane), group in groups.items():
            name = L.lane_name(stream, lane)
            parts = [group[i : i + per_record] for i in range(0, len(group), per_record)]
            entries += self._encoded(name, stream, lane, n, parts, ref)
        return entries

    def _encoded(
        self,
        name: str,
        stream: str,
        lane: int,
        n: int,
        parts: list[list[SourceEvent]],
        ref: int,
    ) -> list[L.Entry]:
        entries = []
        settings = self._settings
        for part in parts:
            for _, data in L.split_to_fit(
                part, lambda evs, name=name: self._codec.encode(settings.pipeline_id, name, evs)
            ):
                entries.append(
                    L.Entry(
                        stream, name, L.partition_key(lane), L.explicit_hash_key(lane, n), data, ref
                    )
                )
        return entries

    async def _run(self) -> None:
        try:
            while True:
                first = await self._queue.get()
                group = [first]
                while not self._queue.empty() and len(group) < 64:
                    group.append(self._queue.get_nowait())
                await self._publish_group(group)
                if self._unacked == 0:
                    self._idle.set()
        except Exception as exc:
            # A change that cannot become a record (larger than 1 MiB, a table without a
            # stream): nothing after it may be published out of order, so the outlet stops;
            # the capture stage exits and the slot keeps everything from it on.
            self._fatal = exc
            log.error("kinesis.publisher_failed", error=str(exc))

    async def _publish_group(self, group: list[OutboundBatch]) -> None:
        pending: dict[int, _Pending] = {}
        per_lane: dict[str, deque[L.Entry]] = {}
        for batch in group:
            entries = self._entries(batch.batch_id, batch.events)
            pending[batch.batch_id] = _Pending(batch, len(entries), len(batch.events))
            for entry in entries:
                per_lane.setdefault(entry.lane, deque()).append(entry)
        # batches without a record (no events) are in at once
        await self._ack_done(pending)
        attempt = 0
        while per_lane:
            heads = [queue[0] for queue in per_lane.values()]
            landed = await self._put(heads)
            for entry in landed:
                queue = per_lane[entry.lane]
                queue.popleft()
                if not queue:
                    del per_lane[entry.lane]
                pending[entry.ref].records_left -= 1
            await self._ack_done(pending)
            if len(landed) < len(heads):
                wait = self._settings.backoff.wait(attempt)
                attempt += 1
                log.warning(
                    "kinesis.put_retry",
                    failed=len(heads) - len(landed),
                    attempt=attempt,
                    wait_seconds=round(wait, 2),
                    error=self.stats.last_error,
                )
                await asyncio.sleep(wait)
            else:
                attempt = 0

    async def _ack_done(self, pending: dict[int, _Pending]) -> None:
        for batch_id in [b for b, p in pending.items() if p.records_left == 0]:
            done = pending.pop(batch_id)
            self._unacked -= 1
            self._credits.release()
            await self._on_ack(
                self._name, DeliveryAck(batch_id, accepted=True, durable=True, written=done.events)
            )

    async def _put(self, entries: list[L.Entry]) -> list[L.Entry]:
        """One attempt at every entry (one `put_records` per stream and size limit); returns
        those that are in the stream."""
        landed: list[L.Entry] = []
        for call in L.calls(entries):
            try:
                response = await asyncio.to_thread(
                    self._client.put_records,
                    StreamName=call[0].stream,
                    Records=[
                        {
                            "Data": e.data,
                            "PartitionKey": e.partition_key,
                            "ExplicitHashKey": e.explicit_hash_key,
                        }
                        for e in call
                    ],
                )
            except Exception as exc:  # the whole call failed: every record is retried
                self._failed(error_code(exc), str(exc), len(call), whole_call=True)
                continue
            results = response.get("Records", [])
            if len(results) != len(call):  # never trust a short answer: retry all of it
                self._failed("ShortResponse", f"{len(results)} results for {len(call)}", len(call))
                continue
            for entry, result in zip(call, results, strict=True):
                if result.get("ErrorCode"):
                    self._failed(result["ErrorCode"], result.get("ErrorMessage", ""), 1)
                else:
                    landed.append(entry)
            self.stats.records_put += sum(1 for r in results if not r.get("ErrorCode"))
        if len(landed) == len(entries):
            self.stats.failing_since = None
        return landed

    def _failed(self, code: str, message: str, records: int, whole_call: bool = False) -> None:
        s = self.stats
        s.records_failed += records
        s.calls_failed += int(whole_call)
        s.by_code[code] = s.by_code.get(code, 0) + records
        s.last_error = f"{code}: {message}"[:300]
        if s.failing_since is None:
            s.failing_since = time.monotonic()
