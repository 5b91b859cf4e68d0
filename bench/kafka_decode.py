"""Avro decode throughput of the Kafka source: Debezium-shaped messages (the bench table's
shape) through `TopicDecoder` on one thread, on a thread pool, and on a process pool, so the
`kafka.deser_pool_size` decision rests on a measurement (docs/benchmarks.md).

`python -m bench.kafka_decode [--messages N]`: no server needed (the schemas are looked up in
a dict; everything else is the consumer's code path).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import time
from decimal import Decimal
from typing import Any

from adapters.kafka.avro import SchemaRegistry, TopicDecoder
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


class _Dict(SchemaRegistry):
    def __init__(self) -> None:
        super().__init__("http://registry.invalid")
        self._by_id.update({1: KEY, 2: VALUE})


def messages(n: int) -> list[tuple[bytes, bytes]]:
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


def decode_all(batch: list[tuple[bytes, bytes]]) -> int:
    decoder = TopicDecoder(_Dict(), "public", "orders", "bench")
    return sum(1 for k, v in batch if decoder.decode(k, v, 0).event is not None)


def decode_rows(batch: list[tuple[bytes, bytes]]) -> list[Any]:
    """What a worker process would send back: the events themselves (pickled)."""
    decoder = TopicDecoder(_Dict(), "public", "orders", "bench")
    return [decoder.decode(k, v, 0).event for k, v in batch]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    data = messages(args.messages)
    chunks = [data[i : i + 2_000] for i in range(0, len(data), 2_000)]
    t = time.perf_counter()
    decode_all(data)
    one = args.messages / (time.perf_counter() - t)
    print(f"one thread:                 {one:>10,.0f} msg/s")
    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
        t = time.perf_counter()
        sum(pool.map(decode_all, chunks))
        threads = args.messages / (time.perf_counter() - t)
    print(f"{args.workers} threads:                  {threads:>10,.0f} msg/s")
    with concurrent.futures.ProcessPoolExecutor(args.workers) as pool:
        list(pool.map(decode_all, chunks[:2]))  # start the workers
        t = time.perf_counter()
        got = sum(len(r) for r in pool.map(decode_rows, chunks))
        procs = args.messages / (time.perf_counter() - t)
    assert got == args.messages
    print(f"{args.workers} processes (events back):  {procs:>10,.0f} msg/s")
    print(f"cores: {os.cpu_count()}")


if __name__ == "__main__":
    main()
