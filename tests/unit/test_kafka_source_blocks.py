"""KafkaEventSource._build: a poll's changes of one partition -> its chunk's typed blocks,
the messages whose values their columns cannot hold dead-lettered. The broker paths are in
tests/integration/test_kafka_source.py; here the dead-letter producer is a stand-in, so a
write that stopping interrupts can be shown."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from adapters.kafka.consumer import KafkaEventSource, KafkaSourceSettings, _Lane
from adapters.kafka.dead_letters import Poison
from domain.ports import SourceChunk
from tests.unit.test_debezium_avro import _decoder, _raw_message

TOO_WIDE = (10**12).to_bytes(6, "big", signed=True)  # does not fit numeric(12,2)


@dataclass
class _Message:
    key_bytes: bytes
    value_bytes: bytes

    def key(self) -> bytes:
        return self.key_bytes

    def value(self) -> bytes:
        return self.value_bytes


@dataclass
class _DeadLetters:
    delivered: bool
    sent: list[Poison] = field(default_factory=list)

    def send(self, poison: Poison, stopping: Any) -> bool:
        self.sent.append(poison)
        return self.delivered

    def close(self) -> None:
        pass


def _lane(*prices: bytes | None) -> _Lane:
    decoder = _decoder()
    lane = _Lane(SourceChunk("t:0", [], len(prices), blocks=[]))
    for offset, price in enumerate(prices):
        key, value = _raw_message(offset + 1, price=price)
        change = decoder.decode(key, value, offset).change
        assert change is not None
        lane.changes.append(change)
        lane.messages[offset] = _Message(key, value)
    return lane


def _source(dead: _DeadLetters) -> KafkaEventSource:
    source = KafkaEventSource(KafkaSourceSettings({}, {"t": "public.orders"}, "http://x.invalid"))
    source._dead = dead  # type: ignore[assignment]
    return source


def _offsets(lane: _Lane) -> list[int]:
    assert lane.chunk.blocks is not None
    return [p for b in lane.chunk.blocks for p in b.records.column("@position").to_pylist()]


def test_the_bad_message_is_dead_lettered_and_the_rest_delivered() -> None:
    dead = _DeadLetters(delivered=True)
    source = _source(dead)
    lane = _lane(None, TOO_WIDE, None, TOO_WIDE, None)
    source._build(lane)
    assert [(p.offset, p.error_class) for p in dead.sent] == [
        (1, "EnvelopeError"),
        (3, "EnvelopeError"),
    ]
    assert "decimal(12,2)" in dead.sent[0].error_message
    assert _offsets(lane) == [0, 2, 4]
    assert lane.chunk.ack == 5
    assert source.dead_lettered == 2


def test_an_interrupted_dead_letter_write_ends_the_chunk_before_its_message() -> None:
    dead = _DeadLetters(delivered=False)  # stopping came first: not written
    source = _source(dead)
    lane = _lane(None, None, TOO_WIDE, None)
    source._build(lane)
    assert _offsets(lane) == [0, 1]
    assert lane.chunk.ack == 2  # the bad message's offset: it is read again next time
    assert source.dead_lettered == 0
