"""Releases a source's ack handles only when everything before them is durably handled.

A *lane* is the unit whose order is kept (a replication slot, a Kafka partition, a key-hash
lane of a Pub/Sub or Kinesis publisher). Each lane keeps its batches in dispatch order; one
batch may carry several lanes, with one ack handle per lane (or none: a batch that ends
inside a transaction has nothing to release yet). A batch is done when every sink it
targets has made it durable (written, or dead-lettered). `take_released(lane)` pops the
longest done prefix of the lane and returns *all* its handles, in order: a source whose
acks are positions (an LSN, an offset, a sequence number) commits the newest, one whose
acks are per message (Pub/Sub) acks each. A later batch finishing first never releases
past an earlier, unfinished one.

`revoke(lanes)` forgets the lanes a source lost (a Kafka rebalance, a Kinesis lease): their
in-flight batches are abandoned, nothing of theirs is released afterwards, and late acks of
them are ignored.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(slots=True)
class _Pending(Generic[T]):
    waiting_for: set[str]
    handles: dict[str, T | None]  # lane -> its ack handle in this batch
    acked_by: set[str] = field(default_factory=set)


class UnknownBatchError(KeyError):
    pass


class CommitTracker(Generic[T]):
    def __init__(self) -> None:
        self._lanes: dict[str, OrderedDict[int, _Pending[T]]] = {}
        self._batches: dict[int, _Pending[T]] = {}

    def register(
        self, batch_id: int, targets: Iterable[str], handles: Mapping[str, T | None]
    ) -> None:
        """Record a dispatched batch of the lanes in `handles` (lane -> ack handle, None when
        the lane has nothing to release with this batch). A batch with no targets is done
        at once."""
        if batch_id in self._batches:
            raise ValueError(f"batch {batch_id} registered twice")
        if not handles:
            raise ValueError(f"batch {batch_id} has no lane")
        for lane in handles:
            queue = self._lanes.get(lane)
            if queue and batch_id < next(reversed(queue)):
                raise ValueError(f"batch {batch_id} registered out of order in lane {lane}")
        pending = _Pending(set(targets), dict(handles))
        self._batches[batch_id] = pending
        for lane in handles:
            self._lanes.setdefault(lane, OrderedDict())[batch_id] = pending

    def ack(self, batch_id: int, sink_id: str) -> tuple[str, ...]:
        """`sink_id` made the batch durable; returns the lanes it is still tracked in (empty
        for a batch of revoked lanes, whose late acks are ignored)."""
        pending = self._batches.get(batch_id)
        if pending is None:
            return ()
        if sink_id not in pending.waiting_for and sink_id not in pending.acked_by:
            raise ValueError(f"sink {sink_id!r} is not a target of batch {batch_id}")
        pending.waiting_for.discard(sink_id)
        pending.acked_by.add(sink_id)
        return tuple(pending.handles)

    def take_released(self, lane: str) -> list[T]:
        """Pop the done prefix of the lane; its ack handles, oldest first."""
        queue = self._lanes.get(lane)
        released: list[T] = []
        while queue:
            batch_id, pending = next(iter(queue.items()))
            if pending.waiting_for:
                break
            queue.popitem(last=False)
            handle = pending.handles.pop(lane)
            if not pending.handles:
                del self._batches[batch_id]
            if handle is not None:
                released.append(handle)
        return released

    def take_committable(self, lane: str) -> T | None:
        """`take_released` for positions: only the newest handle matters."""
        released = self.take_released(lane)
        return released[-1] if released else None

    def revoke(self, lanes: Iterable[str]) -> int:
        """Forget `lanes`: their unreleased batches are abandoned. Returns how many batches
        were dropped from them."""
        dropped = 0
        for lane in lanes:
            queue = self._lanes.pop(lane, None)
            if not queue:
                continue
            for batch_id, pending in queue.items():
                dropped += 1
                pending.handles.pop(lane, None)
                if not pending.handles:
                    del self._batches[batch_id]
        return dropped

    def lanes_of(self, batch_id: int) -> tuple[str, ...]:
        """The lanes a batch is still tracked in (empty once released or revoked)."""
        pending = self._batches.get(batch_id)
        return tuple(pending.handles) if pending is not None else ()

    def lanes(self) -> tuple[str, ...]:
        return tuple(self._lanes)

    def pending_count(self, lane: str | None = None) -> int:
        if lane is None:
            return len(self._batches)
        return len(self._lanes.get(lane, ()))

    def waiting_sinks(self) -> dict[str, int]:
        """How many unfinished batches wait on each sink (for health and backpressure)."""
        counts: dict[str, int] = {}
        for pending in self._batches.values():
            for sink_id in pending.waiting_for:
                counts[sink_id] = counts.get(sink_id, 0) + 1
        return counts
