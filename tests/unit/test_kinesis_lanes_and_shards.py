"""Pure parts of the Kinesis adapters: put_records call limits, explicit hash keys, shard
listing with pagination and the parents-before-children order of resharding.

Resharding is tested here with a fake `list_shards` at the port: moto's resharding is broken
(docs/kinesis.md) and kinesis-local / kinesalite (npm) are not run by this suite. The reader
takes exactly what `readable()` returns, so this is the rule it follows."""

from __future__ import annotations

from typing import Any

import pytest

from adapters.kinesis import lanes as L
from adapters.kinesis.shards import Shard, list_shards, readable
from domain.events import Column, Operation, Position, SourceEvent, TableSchema


def entry(stream: str, size: int, ref: int = 0) -> L.Entry:
    return L.Entry(stream, f"{stream}/k0", "k0", "0", b"x" * size, ref)


def test_calls_keep_within_500_records_and_5_mib_and_one_stream_each() -> None:
    entries = [entry("a", 10, i) for i in range(1200)] + [entry("b", 10, i) for i in range(3)]
    calls = list(L.calls(entries))
    assert [len(c) for c in calls] == [500, 500, 200, 3]
    assert all(len({e.stream for e in c}) == 1 for c in calls)
    assert [e.ref for c in calls[:3] for e in c] == list(range(1200))  # order kept
    big = [entry("a", 900_000, i) for i in range(12)]
    calls = list(L.calls(big))
    assert all(sum(e.size for e in c) <= L.MAX_BYTES_PER_CALL for c in calls)
    assert [len(c) for c in calls] == [5, 5, 2]


def test_a_record_over_one_mib_is_refused() -> None:
    with pytest.raises(ValueError, match="1 MiB"):
        list(L.calls([entry("a", L.MAX_BYTES_PER_RECORD)]))


def test_explicit_hash_keys_put_each_lane_in_its_own_slice() -> None:
    lanes = 4
    keys = [int(L.explicit_hash_key(i, lanes)) for i in range(lanes)]
    width = L.HASH_SPACE // lanes
    assert [k // width for k in keys] == [0, 1, 2, 3]
    assert all(0 <= k < L.HASH_SPACE for k in keys)


T = TableSchema("public", "t", (Column("id", 20, "bigint", True), Column("v", 25, "text")))


def test_split_to_fit_halves_until_each_record_fits() -> None:
    evs = [
        SourceEvent(Operation.CREATE, T, Position(i), after=(str(i), "x" * 100)) for i in range(64)
    ]

    def encode(part: Any) -> bytes:
        return b"y" * (110 * len(part))

    parts = L.split_to_fit(evs, encode, limit=2000)
    assert [e for p, _ in parts for e in p] == evs
    assert all(len(data) <= 2000 for _, data in parts)
    with pytest.raises(ValueError, match="more than a Kinesis record holds"):
        L.split_to_fit(evs[:1], encode, limit=50)


class PagedKinesis:
    """`list_shards` at the port, two shards per page, as AWS pages (a call with NextToken
    must not name the stream)."""

    def __init__(self, shards: list[dict[str, Any]]) -> None:
        self.shards = shards
        self.calls: list[dict[str, Any]] = []

    def list_shards(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(kwargs)
        if "NextToken" in kwargs:
            assert "StreamName" not in kwargs
            start = int(kwargs["NextToken"])
        else:
            start = 0
        page = self.shards[start : start + 2]
        out: dict[str, Any] = {"Shards": page}
        if start + 2 < len(self.shards):
            out["NextToken"] = str(start + 2)
        return out


def shard(shard_id: str, *parents: str, closed: bool = False) -> dict[str, Any]:
    s: dict[str, Any] = {
        "ShardId": shard_id,
        "SequenceNumberRange": {"StartingSequenceNumber": "1"},
    }
    if closed:
        s["SequenceNumberRange"]["EndingSequenceNumber"] = "99"
    if parents:
        s["ParentShardId"] = parents[0]
    if len(parents) > 1:
        s["AdjacentParentShardId"] = parents[1]
    return s


def test_shards_are_listed_across_pages_with_their_parents() -> None:
    # 0 split into 2 and 3; 1 and 2 merged into 4
    fake = PagedKinesis(
        [
            shard("s0", closed=True),
            shard("s1", closed=True),
            shard("s2", "s0", closed=True),
            shard("s3", "s0"),
            shard("s4", "s2", "s1"),
        ]
    )
    shards = list_shards(fake, "st")
    assert [s.shard_id for s in shards] == ["s0", "s1", "s2", "s3", "s4"]
    assert len(fake.calls) == 3
    assert shards[4].parents == ("s2", "s1") and shards[0].closed and not shards[3].closed


def test_children_are_readable_only_after_every_listed_parent_is_finished() -> None:
    shards = [
        Shard("st", "s0", (), True),
        Shard("st", "s1", (), True),
        Shard("st", "s2", ("s0",), True),
        Shard("st", "s3", ("s0",), False),
        Shard("st", "s4", ("s2", "s1"), False),
        Shard("st", "s5", ("trimmed",), False),  # its parent is past retention: not waited for
    ]

    def ids(finished: set[str]) -> list[str]:
        return [s.shard_id for s in readable(shards, {("st", f): True for f in finished})]

    assert ids(set()) == ["s0", "s1", "s5"]
    assert ids({"s0"}) == ["s1", "s2", "s3", "s5"]
    assert ids({"s0", "s2"}) == ["s1", "s3", "s5"]  # s4 still waits for s1 (a merge)
    assert ids({"s0", "s1", "s2"}) == ["s3", "s4", "s5"]
