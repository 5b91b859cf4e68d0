"""The ingest's `EventSource` for Kinesis.

- Lanes: the capture stage's key-hash lanes (one partition key each). A lane lives in one
  shard at a time (a child shard is read only after its parents are finished), so the
  sinks' positions per lane (the LSNs the payload carries) keep increasing, and a replayed
  record is skipped by them.
- Ack handles: (shard, sequence number) per record. A shard's checkpoint moves to the
  newest sequence number below which every record read is released by the pump (durable at
  every sink or dead-lettered); records of several lanes interleave in a shard, so it is the
  shard's contiguous durable prefix, not one lane's.
- Leases: a shard is read only under its DynamoDB lease (adapters/kinesis/leases.py),
  renewed while read; a replica that cannot renew stops reading the shard and revokes its
  lanes (`SourceChunk.revoked`), so their in-flight batches are never acked by it. A dead
  replica's leases expire and are taken by the others; a replica holding more than its
  share (`ceil(shards / live replicas)`) gives the excess up.
- Resharding: shards are listed with pagination and read parents first.
- Iterators: an expired (or unusable) iterator is replaced by one after the last record read.
- Poison records (data that is not a batch of changes) go to the stream's DLQ stream with
  what is known about them, then are acked like any other record.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from adapters.kinesis.leases import Lease, LeaseTable
from adapters.kinesis.settings import KinesisSettings, client, error_code
from adapters.kinesis.shards import Shard, list_shards, readable
from domain.capture import ChangeCodec
from domain.health import ComponentHealth, Status
from domain.ports import SourceChunk

log = structlog.get_logger(__name__)

DLQ_MAGIC = b"CDCDLQ1\n"
_THROTTLED = {"ProvisionedThroughputExceededException", "LimitExceededException"}


@dataclass(frozen=True, slots=True)
class RecordHandle:
    stream: str
    shard_id: str
    generation: int  # which holding of the lease read it (a late ack of an older one is ignored)
    sequence: int  # compared as an integer (moto's are small integers, AWS' 56-digit ones)
    sequence_text: str


@dataclass
class _Owned:
    shard: Shard
    generation: int
    expires_at: float
    checkpoint: str | None  # durable prefix (to store)
    stored: str | None  # what the table holds
    last_read: str | None = None
    inflight: OrderedDict[int, list[Any]] = field(default_factory=OrderedDict)
    lanes: set[str] = field(default_factory=set)
    ended: bool = False
    millis_behind: int | None = None
    task: asyncio.Task[None] | None = None
    last_write: float = 0.0


def encode_dead_letter(header: dict[str, Any], data: bytes, limit: int = 1_000_000) -> bytes:
    """A DLQ record: magic line, one JSON header line, then the original data (truncated,
    and said so in the header, when the whole would not fit in a record)."""
    room = limit - len(DLQ_MAGIC) - len(json.dumps(header)) - 64
    if len(data) > room:
        header = {**header, "truncated_from": len(data)}
        data = data[: max(0, room)]
    return DLQ_MAGIC + json.dumps(header).encode() + b"\n" + data


def decode_dead_letter(record: bytes) -> tuple[dict[str, Any], bytes]:
    if not record.startswith(DLQ_MAGIC):
        raise ValueError("not a dead letter record")
    header, _, data = record[len(DLQ_MAGIC) :].partition(b"\n")
    return json.loads(header), data


class KinesisEventSource:
    def __init__(
        self,
        settings: KinesisSettings,
        codec: ChangeCodec,
        *,
        worker_id: str | None = None,
        max_buffered_records: int = 1000,
        kinesis_client: Any = None,
        dynamodb_client: Any = None,
    ) -> None:
        self._settings = settings
        self._codec = codec
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._kinesis = kinesis_client
        self._dynamodb = dynamodb_client
        self._table: LeaseTable | None = None
        self._owned: dict[tuple[str, str], _Owned] = {}
        self._finished: dict[tuple[str, str], bool] = {}
        self._generation = 0
        self._out: asyncio.Queue[tuple[RecordHandle, SourceChunk] | None] = asyncio.Queue()
        self._buffer = asyncio.Semaphore(max(1, max_buffered_records))
        self._revoked: set[str] = set()
        self._lease_task: asyncio.Task[None] | None = None
        self._relist = asyncio.Event()
        self._last_error = ""
        self._errors_since: float | None = None
        self._workers = 1
        self.dead_lettered = 0
        self.records_read = 0

    # ------------------------------------------------------------------ the port

    async def start(self) -> None:
        if self._kinesis is None:
            self._kinesis = client("kinesis", self._settings)
        if self._dynamodb is None:
            self._dynamodb = client("dynamodb", self._settings)
        self._table = LeaseTable(
            self._dynamodb, self._settings.checkpoint_table, self._settings.pipeline_id
        )
        await self._wait_provisioned()
        await self._balance()
        self._lease_task = asyncio.create_task(self._lease_loop(), name="kinesis-leases")

    async def _wait_provisioned(self) -> None:
        """The capture stage provisions the streams and the table; an ingest started with it
        (`cdc run`, a Deployment) waits for them, saying what it waits for."""
        assert self._table is not None
        attempt = 0
        while True:
            missing = []
            for stream in self._streams:
                try:
                    await asyncio.to_thread(
                        self._kinesis.describe_stream_summary, StreamName=stream
                    )
                except Exception as exc:
                    if error_code(exc) != "ResourceNotFoundException":
                        raise
                    missing.append(f"stream {stream}")
            try:
                await asyncio.to_thread(self._dynamodb.describe_table, TableName=self._table.table)
            except Exception as exc:
                if error_code(exc) != "ResourceNotFoundException":
                    raise
                missing.append(f"DynamoDB table {self._table.table}")
            if not missing:
                return
            self._last_error = "not provisioned yet: " + ", ".join(missing)
            log.warning("kinesis.waiting_for_provisioning", missing=missing)
            await asyncio.sleep(min(5.0, 0.5 * 2**attempt))
            attempt += 1

    async def chunks(self) -> AsyncIterator[SourceChunk]:
        while True:
            if self._revoked:
                lanes = frozenset(self._revoked)
                self._revoked.clear()
                yield SourceChunk(sorted(lanes)[0], [], None, revoked=lanes)
                continue
            item = await self._out.get()
            if item is None:  # a wake-up: revocations to announce
                continue
            self._buffer.release()
            handle, chunk = item
            owned = self._owned.get((handle.stream, handle.shard_id))
            if owned is None or owned.generation != handle.generation:
                continue  # read under a lease since lost: its new holder reads it again
            owned.lanes.add(chunk.lane)
            yield chunk

    async def ack(self, lane: str, handles: Sequence[Any]) -> None:
        now = time.monotonic()
        touched: list[_Owned] = []
        for handle in handles:
            assert isinstance(handle, RecordHandle)
            owned = self._owned.get((handle.stream, handle.shard_id))
            if owned is None or owned.generation != handle.generation:
                continue
            entry = owned.inflight.get(handle.sequence)
            if entry is not None:
                entry[1] = True
                touched.append(owned)
        for owned in {id(o): o for o in touched}.values():
            while owned.inflight:
                text, done = next(iter(owned.inflight.values()))
                if not done:
                    break
                owned.inflight.popitem(last=False)
                owned.checkpoint = text
            if owned.checkpoint != owned.stored and (
                now - owned.last_write >= self._settings.checkpoint_interval_seconds
                or (owned.ended and not owned.inflight)
            ):
                await self._renew(owned)

    async def health(self) -> ComponentHealth:
        detail = {
            "worker_id": self.worker_id,
            "shards_owned": sorted(f"{s}/{sh}" for s, sh in self._owned),
            "live_workers": self._workers,
            "records_read": self.records_read,
            "dead_lettered": self.dead_lettered,
            "last_error": self._last_error,
        }
        if self._lease_task is None or self._lease_task.done():
            return ComponentHealth("kinesis", Status.ERROR, {**detail, "error": "not running"})
        if self._errors_since is not None and time.monotonic() - self._errors_since > 30:
            return ComponentHealth("kinesis", Status.DEGRADED, detail)
        return ComponentHealth("kinesis", Status.OK, detail)

    async def stop(self) -> None:
        if self._lease_task is not None:
            self._lease_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lease_task
            self._lease_task = None
        for owned in list(self._owned.values()):
            await self._give_up(owned, revoke=False)
        if self._table is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._table.forget_worker, self.worker_id)

    # ------------------------------------------------------------------ leases

    @property
    def _streams(self) -> list[str]:
        return list(dict.fromkeys(self._settings.streams.values()))

    @property
    def _tick(self) -> float:
        s = self._settings
        return min(s.lease_seconds / 3, max(0.2, s.checkpoint_interval_seconds))

    async def _lease_loop(self) -> None:
        last_balance = time.monotonic()
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._relist.wait(), self._tick)
            try:
                for owned in list(self._owned.values()):
                    if owned.ended and not owned.inflight:
                        await self._finish(owned)
                    else:
                        await self._renew(owned)
                if self._relist.is_set() or time.monotonic() - last_balance >= self._tick * 3:
                    self._relist.clear()
                    await self._balance()
                    last_balance = time.monotonic()
                self._errors_since = None
            except Exception as exc:  # DynamoDB / Kinesis unreachable: keep trying
                self._error("kinesis.lease_loop_failed", exc)

    async def _renew(self, owned: _Owned, finished: bool = False) -> bool:
        assert self._table is not None
        s = owned.shard
        checkpoint = owned.checkpoint if owned.checkpoint != owned.stored else None
        expires = await asyncio.to_thread(
            self._table.renew,
            s.stream,
            s.shard_id,
            self.worker_id,
            self._settings.lease_seconds,
            checkpoint,
            finished,
            owned.millis_behind,
        )
        if expires is None:
            log.warning("kinesis.lease_lost", stream=s.stream, shard=s.shard_id)
            await self._give_up(owned, revoke=True, release=False)
            return False
        owned.expires_at = expires
        owned.stored = owned.checkpoint
        owned.last_write = time.monotonic()
        return True

    async def _finish(self, owned: _Owned) -> None:
        """The shard was read to its end and all of it is durable: its children may go."""
        if await self._renew(owned, finished=True):
            self._finished[owned.shard.key] = True
            log.info(
                "kinesis.shard_finished", stream=owned.shard.stream, shard=owned.shard.shard_id
            )
            await self._give_up(owned, revoke=False)
            self._relist.set()

    async def _give_up(self, owned: _Owned, revoke: bool, release: bool = True) -> None:
        """Stop reading a shard: its lanes revoked (lease lost or handed over), its durable
        checkpoint stored and its lease released when it is still ours."""
        key = owned.shard.key
        if self._owned.get(key) is not owned:
            return
        del self._owned[key]
        if owned.task is not None:
            owned.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await owned.task
        if revoke and owned.lanes:
            self._revoked |= owned.lanes
            self._out.put_nowait(None)
        if release and self._table is not None:
            s = owned.shard
            try:
                if owned.checkpoint != owned.stored:
                    await asyncio.to_thread(
                        self._table.renew,
                        s.stream,
                        s.shard_id,
                        self.worker_id,
                        self._settings.lease_seconds,
                        owned.checkpoint,
                    )
                await asyncio.to_thread(self._table.release, s.stream, s.shard_id, self.worker_id)
            except Exception as exc:  # it expires on its own
                self._error("kinesis.release_failed", exc)

    async def _balance(self) -> None:
        """Take free or expired leases up to this replica's share; give one excess up."""
        assert self._table is not None
        table = self._table
        now = time.time()
        await asyncio.to_thread(table.heartbeat, self.worker_id, now + self._settings.lease_seconds)
        shards: list[Shard] = []
        for stream in self._streams:
            shards += await asyncio.to_thread(list_shards, self._kinesis, stream)
        leases: dict[tuple[str, str], Lease] = {
            (lease.stream, lease.shard_id): lease for lease in await asyncio.to_thread(table.leases)
        }
        for key, lease in leases.items():
            if lease.finished:
                self._finished[key] = True
        candidates = readable(shards, self._finished)
        workers = await asyncio.to_thread(table.live_workers, now)
        self._workers = len(workers | {self.worker_id})
        share = math.ceil(len(candidates) / self._workers) if candidates else 0
        mine = len(self._owned)
        for shard in candidates:
            if mine >= share:
                break
            if shard.key in self._owned:
                continue
            held = leases.get(shard.key)
            if held is not None and held.live(now) and held.owner != self.worker_id:
                continue
            taken = await asyncio.to_thread(
                table.acquire,
                shard.stream,
                shard.shard_id,
                self.worker_id,
                self._settings.lease_seconds,
            )
            if taken is None:
                continue
            if taken.finished:
                self._finished[shard.key] = True
                await asyncio.to_thread(table.release, shard.stream, shard.shard_id, self.worker_id)
                continue
            self._take(shard, taken)
            mine += 1
        if mine > share and share > 0:
            # hand one over: the one with the least in flight (re-read by its next holder)
            excess = min(self._owned.values(), key=lambda o: len(o.inflight))
            log.info(
                "kinesis.lease_handed_over",
                stream=excess.shard.stream,
                shard=excess.shard.shard_id,
                share=share,
                workers=self._workers,
            )
            await self._give_up(excess, revoke=True)

    def _take(self, shard: Shard, lease: Lease) -> None:
        self._generation += 1
        owned = _Owned(
            shard, self._generation, lease.expires_at, lease.checkpoint, lease.checkpoint
        )
        owned.last_write = time.monotonic()
        self._owned[shard.key] = owned
        owned.task = asyncio.create_task(self._read(owned), name=f"kinesis-{shard.shard_id}")
        log.info(
            "kinesis.lease_taken",
            stream=shard.stream,
            shard=shard.shard_id,
            checkpoint=lease.checkpoint,
            worker=self.worker_id,
        )

    def _error(self, event: str, exc: BaseException) -> None:
        self._last_error = f"{error_code(exc)}: {exc}"[:300]
        if self._errors_since is None:
            self._errors_since = time.monotonic()
        log.warning(event, error=self._last_error)

    # ------------------------------------------------------------------ reading

    async def _iterator(self, owned: _Owned) -> str:
        after = owned.last_read or owned.checkpoint
        kwargs: dict[str, Any] = {"StreamName": owned.shard.stream, "ShardId": owned.shard.shard_id}
        if after:
            kwargs |= {
                "ShardIteratorType": "AFTER_SEQUENCE_NUMBER",
                "StartingSequenceNumber": after,
            }
        else:
            kwargs["ShardIteratorType"] = "TRIM_HORIZON"
        response = await asyncio.to_thread(self._kinesis.get_shard_iterator, **kwargs)
        return str(response["ShardIterator"])

    async def _read(self, owned: _Owned) -> None:
        s = self._settings
        iterator: str | None = None
        attempt = 0
        while True:
            if time.time() > owned.expires_at - 0.5:  # lease about to lapse: wait for renewal
                await asyncio.sleep(0.1)
                continue
            try:
                if iterator is None:
                    iterator = await self._iterator(owned)
                response = await asyncio.to_thread(
                    self._kinesis.get_records, ShardIterator=iterator, Limit=s.max_records_per_shard
                )
            except Exception as exc:
                code = error_code(exc)
                if code == "ExpiredIteratorException":
                    log.info("kinesis.iterator_expired", shard=owned.shard.shard_id)
                    iterator = None
                    continue
                # Throttled, or an internal error (moto answers a bad iterator with a 500):
                # back off, then resume after the last record read with a new iterator.
                self._error("kinesis.get_records_failed", exc)
                if code not in _THROTTLED:
                    iterator = None
                await asyncio.sleep(s.backoff.wait(attempt))
                attempt += 1
                continue
            attempt = 0
            self._errors_since = None
            owned.millis_behind = response.get("MillisBehindLatest")
            records = response.get("Records", [])
            for record in records:
                await self._buffer.acquire()
                try:
                    item = await self._chunk(owned, record)
                except BaseException:  # cancelled (lease given up) while dead-lettering
                    self._buffer.release()
                    raise
                owned.last_read = item[0].sequence_text
                owned.inflight[item[0].sequence] = [item[0].sequence_text, False]
                self._out.put_nowait(item)
                self.records_read += 1
            iterator = response.get("NextShardIterator")
            if iterator is None:
                owned.ended = True
                log.info("kinesis.shard_end", stream=owned.shard.stream, shard=owned.shard.shard_id)
                self._relist.set()
                return
            if not records:
                await asyncio.sleep(s.poll_interval_seconds)

    async def _chunk(
        self, owned: _Owned, record: dict[str, Any]
    ) -> tuple[RecordHandle, SourceChunk]:
        text = str(record["SequenceNumber"])
        handle = RecordHandle(
            owned.shard.stream, owned.shard.shard_id, owned.generation, int(text), text
        )
        lane = f"{owned.shard.stream}/{record.get('PartitionKey', '')}"
        data = bytes(record["Data"])
        try:
            events = self._codec.decode(data)
        except Exception as exc:
            await self._dead_letter(owned, record, data, exc)
            return handle, SourceChunk(lane, [], handle)
        return handle, SourceChunk(lane, list(events), handle)

    async def _dead_letter(
        self, owned: _Owned, record: dict[str, Any], data: bytes, exc: BaseException
    ) -> None:
        """Keep a record nobody can read in the DLQ stream (retried until it is in), so
        reading goes on and nothing is silently dropped."""
        stream = owned.shard.stream
        dlq = self._settings.dlq_stream(stream)
        header = {
            "error": f"{type(exc).__name__}: {exc}"[:1000],
            "stage": "kinesis-source",
            "pipeline_id": self._settings.pipeline_id,
            "stream": stream,
            "shard_id": owned.shard.shard_id,
            "sequence_number": str(record["SequenceNumber"]),
            "partition_key": record.get("PartitionKey", ""),
        }
        log.error("kinesis.poison_record", dlq_stream=dlq, **header)
        self.dead_lettered += 1
        if dlq is None:
            return  # dlq.enabled: false: logged only
        attempt = 0
        while True:
            try:
                await asyncio.to_thread(
                    self._kinesis.put_record,
                    StreamName=dlq,
                    Data=encode_dead_letter(header, data)
                    if self._settings.dlq_headers
                    else data[:1_000_000],
                    PartitionKey=header["partition_key"] or "dlq",
                )
                return
            except Exception as put_exc:
                self._error("kinesis.dlq_put_failed", put_exc)
                await asyncio.sleep(self._settings.backoff.wait(attempt))
                attempt += 1
