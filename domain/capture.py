"""What a capture stage needs to spread changes over lanes and to put them into messages.

A capture stage (services/capture) reads the WAL and publishes to a broker (Pub/Sub,
Kinesis). It chooses each change's *lane* by a hash of the table and the key, so one hot
key or table does not cap throughput while the order per key holds (a lane's messages are
published in order: a Pub/Sub ordering key, a Kinesis partition key). Pure functions and a
Protocol only.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Protocol

from domain.events import SourceEvent


def lane_name(index: int) -> str:
    return f"k{index}"


def lane_names(count: int) -> tuple[str, ...]:
    return tuple(lane_name(i) for i in range(count))


def lane_index(event: SourceEvent, lanes: int) -> int:
    """The lane of a change: a stable hash (crc32, the same in every process and release)
    of its table and key values. A change without a key (a TRUNCATE, a table without a
    primary key or replica identity) goes to its table's lane, so a table's change log
    keeps its order."""
    if lanes <= 1:
        return 0
    table = event.table.qualified_name
    key = event.key if event.table.key_columns else {}
    if not key:
        text = table
    else:
        # \x1f cannot appear in an identifier; \x1e separates values (None is \x00).
        text = table + "\x1f" + "\x1e".join("\x00" if v is None else v for v in key.values())
    return zlib.crc32(text.encode("utf-8", "surrogatepass")) % lanes


def split_by_lane(events: Sequence[SourceEvent], lanes: int) -> dict[int, list[SourceEvent]]:
    """The changes of each lane, each list in the order of `events`."""
    out: dict[int, list[SourceEvent]] = {}
    for event in events:
        out.setdefault(lane_index(event, lanes), []).append(event)
    return out


class ChangeCodec(Protocol):
    """The payload of one published message: the changes of one lane, with their positions
    (so sinks can skip replays). Injected into transport adapters by the registry."""

    def encode(self, pipeline_id: str, lane: str, events: Sequence[SourceEvent]) -> bytes: ...

    def decode(self, data: bytes) -> list[SourceEvent]: ...
