"""Listing a stream's shards (with pagination) and the order resharding imposes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Shard:
    stream: str
    shard_id: str
    parents: tuple[str, ...]  # ParentShardId, AdjacentParentShardId (a merge has two)
    closed: bool  # has an ending sequence number: read to SHARD_END, then its children

    @property
    def key(self) -> tuple[str, str]:
        return (self.stream, self.shard_id)


def list_shards(kinesis: Any, stream: str) -> list[Shard]:
    """Every shard of the stream, following `NextToken` (a call with a token must not name
    the stream)."""
    shards: list[Shard] = []
    kwargs: dict[str, Any] = {"StreamName": stream, "MaxResults": 1000}
    while True:
        page = kinesis.list_shards(**kwargs)
        for s in page.get("Shards", []):
            parents = tuple(
                p for p in (s.get("ParentShardId"), s.get("AdjacentParentShardId")) if p
            )
            closed = "EndingSequenceNumber" in s.get("SequenceNumberRange", {})
            shards.append(Shard(stream, s["ShardId"], parents, closed))
        token = page.get("NextToken")
        if not token:
            return shards
        kwargs = {"NextToken": token, "MaxResults": 1000}


def readable(shards: Iterable[Shard], finished: Mapping[tuple[str, str], bool]) -> list[Shard]:
    """The shards that may be read now: not finished, and every parent still listed is
    finished (read to its end with all of it durable). A parent trimmed away by retention is
    no longer listed and holds nothing to wait for. Parents come before children, so a key
    whose records moved to a child shard keeps its order."""
    listed = {s.shard_id for s in shards}
    out = []
    for shard in shards:
        if finished.get(shard.key):
            continue
        waiting = [p for p in shard.parents if p in listed and not finished.get((shard.stream, p))]
        if not waiting:
            out.append(shard)
    return out
