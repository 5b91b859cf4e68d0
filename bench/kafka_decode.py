"""Avro decode throughput of the Kafka source, one run, Debezium-shaped messages of the bench
table's shape (docs/benchmarks.md):

(a) fastavro alone: the value bodies read with the decoder's parsed schemas (the reference;
    the source reads no relational key body: the row carries its key columns);
(b) the previous text path, kept here for comparison only: fastavro with logical types,
    then each value converted to PostgreSQL text and one `SourceEvent` per message, then
    `domain.blocks.build_blocks` (postgres_text blocks, what the ingest built from them);
(c) the source's path: `TopicDecoder` (fastavro + envelope checks) and
    `adapters.debezium.block_builder.build_blocks` (typed arrow blocks) per poll of
    `--poll` messages; also on a thread pool and on a process pool that sends the blocks
    back, so the `kafka.deser_pool_size` decision rests on a measurement.

`python -m bench.kafka_decode [--messages N] [--rounds R]` (the best of R interleaved rounds):
no server needed (the schemas are looked up in a dict; everything else is the consumer's
code path).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import fastavro

from adapters.debezium.block_builder import build_blocks
from adapters.debezium.envelope import Change, compile_shape
from adapters.kafka.avro import SchemaRegistry, TopicDecoder, unframe
from domain.blocks import ChangeBlock
from domain.blocks import build_blocks as build_text_blocks
from domain.events import Operation, Position, SourceEvent
from tests.support.debezium_avro import Writer, change, envelope, field, key_schema

ROW = [
    {"name": "id", "type": {"type": "long", "connect.default": 0}},
    field("customer_id", "long"),
    field("status", "string"),
    field(
        "amount",
        {
            "type": "bytes",
            "scale": 2,
            "precision": 12,
            "connect.parameters": {"scale": "2", "connect.decimal.precision": "12"},
            "connect.name": "org.apache.kafka.connect.data.Decimal",
            "logicalType": "decimal",
        },
    ),
    field("note", "string"),
    field("created", {"type": "string", "connect.name": "io.debezium.time.ZonedTimestamp"}),
    field("updated", {"type": "long", "connect.name": "io.debezium.time.MicroTimestamp"}),
]
KEY = key_schema("bench.public.orders", [{"name": "id", "type": "long"}])
VALUE = envelope("bench.public.orders", ROW, "postgresql")
Batch = list[tuple[bytes, bytes]]


class _Dict(SchemaRegistry):
    def __init__(self) -> None:
        super().__init__("http://registry.invalid")
        self._by_id.update({1: KEY, 2: VALUE})


def messages(n: int) -> Batch:
    key, value = Writer(KEY, 1), Writer(VALUE, 2)
    out = []
    for i in range(n):
        row = {
            "id": i,
            "customer_id": i % 977,
            "status": "shipped",
            "amount": Decimal(i % 10_000) / 100,
            "note": "x" * 120,
            "created": "2026-01-01T00:00:00Z",
            "updated": 1_700_000_000_000_000 + i,
        }
        out.append((key({"id": i}), value(change("u", None, row, table="orders"))))
    return out


def polls(batch: Batch, size: int) -> list[Batch]:
    return [batch[i : i + size] for i in range(0, len(batch), size)]


# ------------------------------------------------------------------ (a) fastavro alone


def fastavro_alone(batch: Batch) -> int:
    decoder = TopicDecoder(_Dict(), "public", "orders", "bench")
    value_schema = decoder._reader(2)
    read = fastavro.schemaless_reader
    for _k, v in batch:
        read(io.BytesIO(unframe(v)[1]), value_schema, None)
    return len(batch)


# ------------------------------------------- (b) the previous text path (comparison only)

_EPOCH = datetime(1970, 1, 1)


def _text_converters() -> list[Callable[[Any], Any]]:
    """The per-value PostgreSQL text converters the source had for the bench's columns."""

    def integer(v: Any) -> str:
        return str(int(v))

    def text(v: Any) -> Any:
        return v

    def decimal(v: Any) -> str:
        return format(v, "f")

    def micro_timestamp(v: Any) -> str:
        return (_EPOCH + timedelta(microseconds=int(v))).isoformat(sep=" ")

    return [integer, integer, text, decimal, text, text, micro_timestamp]


def text_path(batch: Batch) -> list[ChangeBlock]:
    shape = compile_shape("public", "orders", VALUE, KEY)
    table = shape.table
    names = table.column_names
    converters = _text_converters()
    key_schema, value_schema = fastavro.parse_schema(KEY), fastavro.parse_schema(VALUE)
    read = fastavro.schemaless_reader
    events = []
    for offset, (k, v) in enumerate(batch):
        read(io.BytesIO(unframe(k)[1]), key_schema, None)
        value: Any = read(io.BytesIO(unframe(v)[1]), value_schema, None)
        after = value["after"]
        row = tuple(
            None if after[n] is None else convert(after[n])
            for n, convert in zip(names, converters, strict=True)
        )
        source = value["source"]
        events.append(
            SourceEvent(
                Operation.UPDATE,
                table,
                Position(offset, 0),
                None,
                row,
                int(source["ts_ms"]) * 1000,
                int(source["txId"] or 0),
                "bench",
            )
        )
    return build_text_blocks(events)


# ------------------------------------------------------------ (c) the source's path


def typed_path(batch: Batch) -> list[ChangeBlock]:
    decoder = TopicDecoder(_Dict(), "public", "orders", "bench")
    changes: list[Change] = []
    for offset, (k, v) in enumerate(batch):
        decoded = decoder.decode(k, v, offset)
        assert decoded.change is not None
        changes.append(decoded.change)
    built = build_blocks(changes)
    assert not built.rejected
    return built.blocks


def typed_count(batch: Batch) -> int:
    return sum(len(b) for b in typed_path(batch))


def _rate(n: int, fn: Callable[[], Any], clock: Callable[[], float] = time.perf_counter) -> float:
    t = clock()
    fn()
    return n / (clock() - t)


def _cpu_rate(n: int, fn: Callable[[], Any]) -> float:
    """Messages per CPU second of this process (one thread: less disturbed by the other
    processes of a shared machine than the wall clock)."""
    return _rate(n, fn, time.process_time)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--poll", type=int, default=2_000, help="messages per poll (block)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    n = args.messages
    data = messages(n)
    chunks = polls(data, args.poll)
    typed_path(chunks[0])  # warm-up (imports, schema parsing)
    # Interleaved rounds, the best of each (per CPU second): the machine is shared, the best
    # is the least disturbed.
    alone = text = typed = 0.0
    for _ in range(args.rounds):
        alone = max(alone, _cpu_rate(n, lambda: [fastavro_alone(c) for c in chunks]))
        text = max(text, _cpu_rate(n, lambda: [text_path(c) for c in chunks]))
        typed = max(typed, _cpu_rate(n, lambda: [typed_path(c) for c in chunks]))
    print("one thread, messages per CPU second:")
    print(f"(a) fastavro alone:                    {alone:>10,.0f} msg/s")
    print(f"(b) previous text path (events+blocks):{text:>10,.0f} msg/s  {text / alone:.2f} of (a)")
    print(
        f"(c) decode + typed blocks:             {typed:>10,.0f} msg/s  {typed / alone:.2f} of (a)"
    )
    print(f"    (c) / (b):                         {typed / text:>10.2f}x")
    print("wall clock:")
    one = _rate(n, lambda: [typed_path(c) for c in chunks])
    print(f"(c) on one thread:                     {one:>10,.0f} msg/s")
    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
        threads = _rate(n, lambda: sum(pool.map(typed_count, chunks)))
    print(f"(c) on {args.workers} threads:                   {threads:>10,.0f} msg/s")
    with concurrent.futures.ProcessPoolExecutor(args.workers) as pool:
        list(pool.map(typed_count, chunks[:2]))  # start the workers

        def blocks_back() -> None:
            got = sum(len(b) for blocks in pool.map(typed_path, chunks) for b in blocks)
            assert got == n

        procs = _rate(n, blocks_back)
    print(f"(c) on {args.workers} processes (blocks back):   {procs:>10,.0f} msg/s")
    print(f"cores: {os.cpu_count()}, load: {os.getloadavg()[0]:.1f}, {datetime.now(UTC):%H:%M} UTC")


if __name__ == "__main__":
    main()
