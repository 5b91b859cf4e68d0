"""PostgreSQL sink throughput for the same changes as ``postgres_text`` blocks (a PostgreSQL
source) and as ``arrow`` blocks (typed columns, the Kafka source decoding Avro), in one run
on one server, so the cost of converting typed columns at the sink's entry
(`domain.blocks.to_postgres_text`) shows next to the whole write (docs/benchmarks.md).

`python -m bench.sink_encodings [--changes N] [--batch N] [--rounds N]`: starts its own
embedded PostgreSQL. Each round writes the changes once per encoding into its own table
(inserts, then updates of the same keys: upserts), alternating which goes first; the table
reports the median round.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from adapters.config.pipeline import PostgresSinkConfig
from adapters.postgres.sink.writer import PostgresSinkWriter
from domain.blocks import ChangeBlock, events_of, to_postgres_text
from domain.events import Operation, Position, TableSchema
from domain.ports import SinkBatch
from services.stack.postgres import PostgresServer
from tests.support.arrow_blocks import TypedChange, arrow_block, kafka_column

COLUMNS = (
    kafka_column("id", "int64", "bigint", key=True),
    kafka_column("customer_id", "int64", "bigint"),
    kafka_column("status", "string", "text"),
    kafka_column("amount", "decimal(12,2)", "numeric(12,2)"),
    kafka_column("ratio", "float64", "double precision"),
    kafka_column("paid", "bool", "boolean"),
    kafka_column("note", "string", "text"),
    kafka_column("created", "timestamptz", "timestamp with time zone"),
    kafka_column("updated", "timestamp", "timestamp"),
    kafka_column("lines", "list<int32>", "integer[]"),
)
_T0 = datetime(2026, 1, 1, tzinfo=UTC)


def typed_batches(table: TableSchema, changes: int, batch: int) -> list[ChangeBlock]:
    """`changes` changes in blocks of `batch`: inserts of keys 0.., then updates of them."""
    keys = changes // 2
    out: list[ChangeBlock] = []
    pending: list[TypedChange] = []
    for n in range(changes):
        key = n % keys
        op = Operation.CREATE if n < keys else Operation.UPDATE
        row: tuple[Any, ...] = (
            key,
            key % 977,
            "shipped" if op is Operation.UPDATE else "new",
            Decimal(key % 10_000) / 100,
            key / 7,
            key % 2 == 0,
            "x" * 120,
            _T0 + timedelta(seconds=key),
            (_T0 + timedelta(microseconds=n)).replace(tzinfo=None),
            [key % 5, key % 7, key % 11],
        )
        pending.append(TypedChange(op, Position(1, n + 1), row))
        if len(pending) == batch:
            out.append(arrow_block(table, pending))
            pending = []
    if pending:
        out.append(arrow_block(table, pending))
    return out


async def write_all(writer: PostgresSinkWriter, lane: str, blocks: list[ChangeBlock]) -> float:
    started = time.perf_counter()
    for i, block in enumerate(blocks):
        result = await writer.write(SinkBatch("bench", lane, i + 1, blocks=[block]))
        assert result.written == len(block), result
    return time.perf_counter() - started


def _retarget(blocks: list[ChangeBlock], table: TableSchema) -> list[ChangeBlock]:
    return [ChangeBlock(table, b.records, b.encoding) for b in blocks]


async def run(dsn: str, changes: int, batch: int, rounds: int) -> dict[str, list[float]]:
    settings = PostgresSinkConfig(dsn=dsn, target_schema="sink", batch_size=batch)
    writer = PostgresSinkWriter(settings, "bench", "sink")
    await writer.start()
    seconds: dict[str, list[float]] = {"text": [], "arrow": [], "convert": [], "events": []}
    try:
        for r in range(rounds):
            arrow = typed_batches(TableSchema("public", f"arrow_{r}", COLUMNS), changes, batch)
            text_table = TableSchema("public", f"text_{r}", COLUMNS)
            text = _retarget([to_postgres_text(b) for b in arrow], text_table)
            started = time.perf_counter()
            for b in arrow:
                to_postgres_text(b)
            seconds["convert"].append(time.perf_counter() - started)
            started = time.perf_counter()
            for b in arrow:
                events_of(b)
            seconds["events"].append(time.perf_counter() - started)
            order = [("text", text), ("arrow", arrow)]
            for name, blocks in order if r % 2 == 0 else reversed(order):
                seconds[name].append(await write_all(writer, f"{name}_{r}", blocks))
    finally:
        await writer.stop()
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sink_encodings", description=__doc__)
    p.add_argument("--changes", type=int, default=200_000)
    p.add_argument("--batch", type=int, default=2_000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        server = PostgresServer(Path(workdir)).start()
        try:
            seconds = asyncio.run(run(server.dsn(), args.changes, args.batch, args.rounds))
        finally:
            server.stop()
    n = args.changes
    print(
        f"{n:,} changes ({n // 2:,} inserts then {n // 2:,} updates) in blocks of"
        f" {args.batch:,}, {len(COLUMNS)} columns, median of {args.rounds} rounds"
    )
    print("| PostgreSQL sink, same changes | changes/s | seconds |")
    print("|---|---|---|")
    for name, label in (
        ("text", "postgres_text blocks"),
        ("arrow", "arrow blocks (to_postgres_text on entry)"),
        ("convert", "to_postgres_text alone"),
        ("events", "events_of an arrow block alone (the row view)"),
    ):
        s = statistics.median(seconds[name])
        print(f"| {label} | {n / s:,.0f} | {s:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
