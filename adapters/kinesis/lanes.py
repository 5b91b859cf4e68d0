"""Key-hash lanes and the limits of one `put_records` call (pure functions).

A change goes to lane `hash(table, key) mod lanes` of its table's stream
(`domain.capture.lane_index`, shared with Pub/Sub), so every change of one key is in one
lane and keeps its order. A lane is one partition key; its records carry an
explicit hash key in the middle of the lane's equal slice of the 128-bit hash space, so with
as many lanes as shards each shard holds one lane, whatever MD5 of the key would have said.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from domain import capture
from domain.events import SourceEvent

HASH_SPACE = 2**128
MAX_RECORDS_PER_CALL = 500
MAX_BYTES_PER_CALL = 5 * 1024 * 1024
MAX_BYTES_PER_RECORD = 1024 * 1024  # data + partition key


def partition_key(lane: int) -> str:
    return capture.lane_name(lane)


def explicit_hash_key(lane: int, lanes: int) -> str:
    """The middle of lane `lane`'s slice of the hash space (decimal, as Kinesis wants it)."""
    width = HASH_SPACE // lanes
    return str(lane * width + width // 2)


def lane_name(stream: str, lane: int) -> str:
    """The lane as the pump and the sinks know it: sinks keep their applied position per
    lane, so the name must never change for a pipeline."""
    return f"{stream}/{partition_key(lane)}"


@dataclass(frozen=True, slots=True)
class Entry:
    """One record of a `put_records` call."""

    stream: str
    lane: str
    partition_key: str
    explicit_hash_key: str
    data: bytes
    ref: int = 0  # the caller's reference (which batch it belongs to)

    @property
    def size(self) -> int:
        return len(self.data) + len(self.partition_key.encode())


def calls(entries: Sequence[Entry]) -> Iterator[list[Entry]]:
    """Split entries into `put_records` calls: one stream per call, at most 500 records and
    5 MiB (data + partition keys) each; the order of entries is kept within each stream."""
    by_stream: dict[str, list[Entry]] = {}
    for entry in entries:
        if entry.size > MAX_BYTES_PER_RECORD:
            raise ValueError(f"record of {entry.size} bytes exceeds Kinesis' 1 MiB limit")
        by_stream.setdefault(entry.stream, []).append(entry)
    for stream_entries in by_stream.values():
        call: list[Entry] = []
        size = 0
        for entry in stream_entries:
            if call and (
                len(call) == MAX_RECORDS_PER_CALL or size + entry.size > MAX_BYTES_PER_CALL
            ):
                yield call
                call, size = [], 0
            call.append(entry)
            size += entry.size
        if call:
            yield call


def split_to_fit(
    events: Sequence[SourceEvent], encode: object, limit: int = MAX_BYTES_PER_RECORD - 512
) -> Iterable[tuple[Sequence[SourceEvent], bytes]]:
    """Encode events into records of at most `limit` bytes, halving a part that is too big
    (one change larger than the limit cannot be published: ValueError)."""
    assert callable(encode)
    data: bytes = encode(events)
    if len(data) <= limit:
        return [(events, data)]
    if len(events) == 1:
        raise ValueError(
            f"one change of {events[0].table.qualified_name} encodes to {len(data)} bytes,"
            f" more than a Kinesis record holds ({limit})"
        )
    middle = len(events) // 2
    return [
        *split_to_fit(events[:middle], encode, limit),
        *split_to_fit(events[middle:], encode, limit),
    ]
