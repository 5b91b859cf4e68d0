"""Releases transport positions only when everything before them is durably handled.

Each partition keeps its batches in dispatch order. A batch is done when every sink it
targets has acked it (written durably, or dead-lettered). The committable checkpoint of a
partition is the checkpoint of the last batch in the longest fully done prefix: a later
batch finishing first never lets the position pass an earlier, unfinished one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(slots=True)
class _Pending(Generic[T]):
    partition: str
    waiting_for: set[str]
    checkpoint: T | None
    acked_by: set[str] = field(default_factory=set)


class UnknownBatchError(KeyError):
    pass


class CommitTracker(Generic[T]):
    def __init__(self) -> None:
        self._partitions: dict[str, OrderedDict[int, _Pending[T]]] = {}
        self._batch_partition: dict[int, str] = {}

    def register(
        self, partition: str, batch_id: int, targets: Iterable[str], checkpoint: T | None
    ) -> None:
        """Record a dispatched batch; `checkpoint` becomes committable once it and all
        earlier batches of the partition are done. A batch with no targets is done at once."""
        if batch_id in self._batch_partition:
            raise ValueError(f"batch {batch_id} registered twice")
        queue = self._partitions.setdefault(partition, OrderedDict())
        if queue and batch_id < next(reversed(queue)):
            raise ValueError(f"batch {batch_id} registered out of order in partition {partition}")
        queue[batch_id] = _Pending(partition, set(targets), checkpoint)
        self._batch_partition[batch_id] = partition

    def ack(self, batch_id: int, sink_id: str) -> None:
        partition = self._batch_partition.get(batch_id)
        if partition is None:
            raise UnknownBatchError(batch_id)
        pending = self._partitions[partition][batch_id]
        if sink_id not in pending.waiting_for and sink_id not in pending.acked_by:
            raise ValueError(f"sink {sink_id!r} is not a target of batch {batch_id}")
        pending.waiting_for.discard(sink_id)
        pending.acked_by.add(sink_id)

    def take_committable(self, partition: str) -> T | None:
        """Pop the done prefix of the partition and return its newest checkpoint, if any."""
        queue = self._partitions.get(partition)
        if not queue:
            return None
        newest: T | None = None
        while queue:
            batch_id, pending = next(iter(queue.items()))
            if pending.waiting_for:
                break
            queue.popitem(last=False)
            del self._batch_partition[batch_id]
            if pending.checkpoint is not None:
                newest = pending.checkpoint
        return newest

    def partition_of(self, batch_id: int) -> str | None:
        """The partition of a batch that is still tracked (None once released)."""
        return self._batch_partition.get(batch_id)

    def partitions(self) -> tuple[str, ...]:
        return tuple(self._partitions)

    def pending_count(self, partition: str | None = None) -> int:
        if partition is None:
            return len(self._batch_partition)
        return len(self._partitions.get(partition, ()))

    def waiting_sinks(self) -> dict[str, int]:
        """How many unfinished batches wait on each sink (for health and backpressure)."""
        counts: dict[str, int] = {}
        for queue in self._partitions.values():
            for pending in queue.values():
                for sink_id in pending.waiting_for:
                    counts[sink_id] = counts.get(sink_id, 0) + 1
        return counts
