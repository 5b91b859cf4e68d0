"""Dead letters of a kinesis pipeline in its DLQ streams: the `ErrorRouter` a sink that needs
the transport's dead letters uses (the webhook sink), and the `DeadLetterStore` of `cdc dlq`.

A dead letter is one record of the DLQ stream of the change's table stream
(`<stream>-<dlq.topic_suffix>`), in the format of the source's poison records
(adapters/kinesis/source.py `encode_dead_letter`): a JSON header line (`stage`, `sink_id`,
`lane`, `error_class`, `error`, `attempts`, `created_at`) and the change as a cdc.v2 batch
of one event (its position kept, so a replay is skipped where it was applied meanwhile).
`dead_letter` returns only once `put_records` accepted every letter; entries it refused are
retried with backoff, and the call raises when some are still refused (the sink then holds
its position back).

Records cannot be deleted from a stream, so a removed (replayed) dead letter is marked by an
item `<pipeline>/#dlq-removed/<dlq stream>/<sequence number>` in the lease table
(`kinesis.checkpoint_table_name`); listing is the DLQ streams' records minus the marked ones.
Its id in `cdc dlq` is `<dlq stream>/<sequence number>`; one change of one sink stored
twice (dead-lettered again) is listed once, as its newest record. The source's poison records
(`stage` kinesis-source: data that is not a batch of changes) are not changes and are not
listed. A dead letter stays as long as the stream's retention (the provisioner sets 7 days
on DLQ streams it creates).
"""

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import structlog

from adapters.kinesis.leases import KEY
from adapters.kinesis.settings import KinesisSettings, client, error_code
from adapters.kinesis.shards import list_shards
from adapters.kinesis.source import decode_dead_letter, encode_dead_letter
from domain.capture import ChangeCodec
from domain.ports import DeadLetter, StoredDeadLetter

log = structlog.get_logger(__name__)

MAX_SCAN = 10_000  # records one list / fetch / remove reads per DLQ stream
PUT_ATTEMPTS = 5  # put_records calls for one dead_letter() before it raises
SINK_STAGES = frozenset({"sink"})
MAX_CHANGE_BYTES = 1_000_000 - 16_000  # a record's 1 MiB minus the header's room


class KinesisDeadLetters:
    def __init__(
        self,
        settings: KinesisSettings,
        codec: ChangeCodec,
        *,
        kinesis_client: Any = None,
        dynamodb_client: Any = None,
    ) -> None:
        self._settings = settings
        self._codec = codec
        self._kinesis = kinesis_client
        self._dynamodb = dynamodb_client
        # listed id -> ids of older records of the same dead letter (set by _scan)
        self._older: dict[str, builtins.list[str]] = {}

    @property
    def pipeline_id(self) -> str:
        return self._settings.pipeline_id

    def _clients(self) -> tuple[Any, Any]:
        if self._kinesis is None:
            self._kinesis = client("kinesis", self._settings)
        if self._dynamodb is None:
            self._dynamodb = client("dynamodb", self._settings)
        return self._kinesis, self._dynamodb

    def dlq_streams(self) -> builtins.list[str]:
        streams = dict.fromkeys(self._settings.streams.values())
        return [d for s in streams if (d := self._settings.dlq_stream(s)) is not None]

    def _dlq_for(self, letter: DeadLetter) -> str:
        """The DLQ stream of the change's table stream (else of the lane's stream: a lane
        read from Kinesis is `<stream>/<partition key>`)."""
        s = self._settings
        stream = s.streams.get(letter.event.table.qualified_name)
        if stream is None:
            head = letter.lane.partition("/")[0]
            stream = head if head in s.streams.values() else None
        if stream is None:
            raise ValueError(
                f"no Kinesis stream for table {letter.event.table.qualified_name}: it is not"
                f" among pipeline '{s.pipeline_id}''s source.tables"
            )
        dlq = s.dlq_stream(stream)
        if dlq is None:
            raise RuntimeError("dlq.enabled is false: the kinesis transport has no DLQ stream")
        return dlq

    # ---------------------------------------------------------------- ErrorRouter

    async def dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        """Returns once Kinesis accepted every letter; raises otherwise."""
        if not letters:
            return
        by_stream: dict[str, builtins.list[dict[str, Any]]] = {}
        now = datetime.now(UTC).isoformat()
        for letter in letters:
            pipeline_id = letter.pipeline_id or self.pipeline_id
            header = {
                "stage": letter.stage,
                "pipeline_id": pipeline_id,
                "sink_id": letter.sink_id,
                "lane": letter.lane,
                "error_class": letter.error_class or letter.stage,
                "error": letter.error[:4000],
                "attempts": letter.attempts,
                "created_at": now,
                **{k: v for k, v in letter.attributes.items() if k == "event_id"},
            }
            data = self._codec.encode(pipeline_id, letter.lane, [letter.event])
            if len(data) > MAX_CHANGE_BYTES:
                # Truncated it could not be replayed: refuse, so the sink holds it back.
                raise ValueError(
                    f"dead letter of sink '{letter.sink_id}' is {len(data)} bytes; a Kinesis"
                    f" record holds at most 1 MiB ({MAX_CHANGE_BYTES} for the change)"
                )
            record = {
                "Data": encode_dead_letter(header, data),
                "PartitionKey": (letter.lane or letter.sink_id or "dlq")[:256],
            }
            by_stream.setdefault(self._dlq_for(letter), []).append(record)
        for stream, records in by_stream.items():
            for start in range(0, len(records), 100):  # well within 500 records / 5 MiB
                await asyncio.to_thread(self._put, stream, records[start : start + 100])

    def _put(self, stream: str, records: builtins.list[dict[str, Any]]) -> None:
        kinesis, _ = self._clients()
        pending = records
        for attempt in range(PUT_ATTEMPTS):
            try:
                response = kinesis.put_records(StreamName=stream, Records=pending)
            except Exception as exc:
                if attempt + 1 == PUT_ATTEMPTS:
                    raise
                log.warning("kinesis.dlq_put_failed", stream=stream, error=error_code(exc))
            else:
                results = response.get("Records", [])
                pending = [r for r, res in zip(pending, results, strict=True) if "ErrorCode" in res]
                if not pending:
                    return
                log.warning(
                    "kinesis.dlq_put_partly_failed",
                    stream=stream,
                    failed=len(pending),
                    error=next(r.get("ErrorCode") for r in results if "ErrorCode" in r),
                )
            time.sleep(self._settings.backoff.wait(attempt))
        raise RuntimeError(
            f"Kinesis refused {len(pending)} dead letter record(s) for {stream}"
            f" after {PUT_ATTEMPTS} attempts"
        )

    # ------------------------------------------------------------ DeadLetterStore

    async def list(
        self, sink_id: str | None = None, limit: int | None = None
    ) -> Sequence[StoredDeadLetter]:
        found = await asyncio.to_thread(self._scan)
        found = [d for d in found if sink_id is None or d.sink_id == sink_id]
        found.sort(key=_arrival)
        return found if limit is None else found[:limit]

    async def fetch(self, ids: Sequence[str]) -> Sequence[StoredDeadLetter]:
        wanted = set(ids)
        return [d for d in await asyncio.to_thread(self._scan) if d.id in wanted]

    async def remove(self, ids: Sequence[str]) -> int:
        """Mark the listed ones removed; returns how many were there (not removed before)."""
        present = {d.id for d in await self.fetch(ids)}
        older = [o for i in present for o in self._older.get(i, [])]
        await asyncio.to_thread(self._mark, sorted(present) + older)
        return len(present)

    async def close(self) -> None:
        self._kinesis = None
        self._dynamodb = None

    def _marker(self, letter_id: str) -> str:
        return f"{self.pipeline_id}/#dlq-removed/{letter_id}"

    def _mark(self, ids: builtins.list[str]) -> None:
        _, dynamodb = self._clients()
        for letter_id in ids:
            dynamodb.put_item(
                TableName=self._settings.checkpoint_table,
                Item={
                    KEY: {"S": self._marker(letter_id)},
                    "pipeline": {"S": self.pipeline_id},
                    "removed_at": {"S": datetime.now(UTC).isoformat()},
                },
            )

    def _removed(self) -> set[str]:
        _, dynamodb = self._clients()
        prefix = self._marker("")
        kwargs: dict[str, Any] = {
            "TableName": self._settings.checkpoint_table,
            "ConsistentRead": True,
            "FilterExpression": "begins_with(#k, :p)",
            "ExpressionAttributeNames": {"#k": KEY},
            "ExpressionAttributeValues": {":p": {"S": prefix}},
            "ProjectionExpression": "#k",
        }
        out: set[str] = set()
        while True:
            page = dynamodb.scan(**kwargs)
            out |= {item[KEY]["S"][len(prefix) :] for item in page.get("Items", [])}
            last = page.get("LastEvaluatedKey")
            if not last:
                return out
            kwargs["ExclusiveStartKey"] = last

    def _scan(self) -> builtins.list[StoredDeadLetter]:
        """The letters not marked removed; one change of one sink dead-lettered again (a
        batch resent after a restart, a replay refused again) is listed once, as its newest
        record, and removing it marks the older ones too."""
        removed = self._removed()
        newest: dict[tuple[str, ...], StoredDeadLetter] = {}
        self._older = {}
        for stream in self.dlq_streams():
            for record in self._records(stream):
                letter = self._stored(stream, record)
                if letter is None or letter.id in removed:
                    continue
                same = (
                    letter.sink_id,
                    letter.lane,
                    letter.event.table.qualified_name,
                    str(letter.event.position),
                )
                earlier = newest.get(same)
                if earlier is not None:
                    kept = self._older.pop(earlier.id, [])
                    if _arrival(letter) < _arrival(earlier):
                        letter, earlier = earlier, letter
                    self._older[letter.id] = [*kept, earlier.id]
                newest[same] = letter
        return list(newest.values())

    def _records(self, stream: str) -> builtins.list[dict[str, Any]]:
        """Every record the stream still holds (all shards, oldest first), at most MAX_SCAN."""
        kinesis, _ = self._clients()
        try:
            shards = list_shards(kinesis, stream)
        except Exception as exc:
            if error_code(exc) == "ResourceNotFoundException":
                return []  # not provisioned (yet): holds nothing
            raise
        records: builtins.list[dict[str, Any]] = []
        for shard in shards:
            iterator = kinesis.get_shard_iterator(
                StreamName=stream, ShardId=shard.shard_id, ShardIteratorType="TRIM_HORIZON"
            )["ShardIterator"]
            while iterator and len(records) < MAX_SCAN:
                page = kinesis.get_records(ShardIterator=iterator, Limit=1000)
                records += page.get("Records", [])
                iterator = page.get("NextShardIterator")
                if not page.get("Records") and not page.get("MillisBehindLatest"):
                    break  # caught up with the shard's tip
        return records

    def _stored(self, stream: str, record: dict[str, Any]) -> StoredDeadLetter | None:
        try:
            header, data = decode_dead_letter(bytes(record["Data"]))
        except ValueError:
            return None  # written with dlq.include_headers false: not one of ours
        if header.get("stage") not in SINK_STAGES:
            return None
        if header.get("pipeline_id", self.pipeline_id) != self.pipeline_id:
            return None
        try:
            events = self._codec.decode(data)
        except Exception:
            return None
        if len(events) != 1:
            return None
        created = header.get("created_at")
        arrived = record.get("ApproximateArrivalTimestamp")
        return StoredDeadLetter(
            id=f"{stream}/{record['SequenceNumber']}",
            pipeline_id=self.pipeline_id,
            sink_id=str(header.get("sink_id", "")),
            lane=str(header.get("lane", "")),
            event=events[0],
            error_class=str(header.get("error_class", "")),
            error=str(header.get("error", "")),
            attempts=int(header.get("attempts", 1) or 1),
            created_at=datetime.fromisoformat(created)
            if isinstance(created, str)
            else arrived
            if isinstance(arrived, datetime)
            else None,
            location=stream,
        )


def _arrival(letter: StoredDeadLetter) -> tuple[datetime, str, int]:
    """Oldest first; within one put, in stream order (sequence numbers compare as integers:
    AWS' have 56 digits, an emulator's may be short)."""
    sequence = letter.id.rpartition("/")[2]
    return (
        letter.created_at or datetime.min.replace(tzinfo=UTC),
        letter.location,
        int(sequence) if sequence.isdigit() else 0,
    )
