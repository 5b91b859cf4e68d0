"""`python -m bench.iceberg`: the Iceberg sink on its own (SQLite catalog, local-file
warehouse on this machine's disk).

1. rows/s of the sink alone for one upsert batch of 1k, 10k and 100k changes (write() +
   flush(): typing, collapse, key lookup, data + delete files, commit);
2. commit time of a 10k-change upsert batch (70% updates of random existing keys, 20% new
   keys, 10% deletes) into tables of 100k, 1M and 5M rows: ours (position deletes through
   the key index) next to pyiceberg's `Table.upsert` on a copy of the same table with the
   same changes.

Prints a Markdown table (paste into docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from adapters.config.pipeline import IcebergSinkConfig
from adapters.iceberg.writer import IcebergSinkWriter
from domain.blocks import ChangeBlock, arrow_schema
from domain.events import Column, TableSchema
from domain.ports import SinkBatch

TABLE = TableSchema(
    "public",
    "items",
    (
        Column("id", 20, "bigint", is_key=True),
        Column("qty", 23, "integer"),
        Column("price", 1700, "numeric(12,2)"),
        Column("note", 25, "text"),
        Column("at", 1184, "timestamp with time zone"),
    ),
)


class Changes:
    """Text blocks as the WAL reader makes them, with increasing positions."""

    def __init__(self) -> None:
        self.position = 1

    def block(self, ops: list[str], ids: list[int], qty: int) -> ChangeBlock:
        n = len(ids)
        schema = arrow_schema(TABLE)
        idx = pa.array(range(n), pa.uint32())
        pos = pa.array(range(self.position, self.position + n), pa.uint64())
        self.position += n
        id_text = pc.cast(pa.array(ids, pa.int64()), pa.string())
        arrays = [
            idx,
            pa.array(ops, pa.string()),
            pos,
            pa.repeat(pa.scalar(0, pa.uint64()), n),
            pa.repeat(pa.scalar(1_700_000_000_000_000, pa.timestamp("us", tz="UTC")), n),
            pa.repeat(pa.scalar(1, pa.uint64()), n),
            pa.repeat(pa.scalar(0, pa.uint16()), n),
            pa.array([2 if o == "d" else 1 for o in ops], pa.uint8()),
            pa.nulls(n, schema.field("@unchanged").type),
            pa.nulls(n, schema.field("@before").type),
            id_text,
            pa.repeat(pa.scalar(str(qty)), n),
            pc.binary_join_element_wise(id_text, pa.repeat(pa.scalar("25"), n), "."),
            pc.binary_join_element_wise(pa.repeat(pa.scalar("note for item"), n), id_text, " "),
            pa.repeat(pa.scalar("2024-05-01 10:00:00.123456+00"), n),
        ]
        return ChangeBlock(TABLE, pa.RecordBatch.from_arrays(arrays, schema=schema))


def settings(root: Path) -> IcebergSinkConfig:
    return IcebergSinkConfig(
        catalog_uri=f"sqlite:///{root}/catalog.db",
        warehouse=str(root / "warehouse"),
        table_name="{schema}_{table}",
        write_mode="upsert",
        batch_size=10_000_000,
        flush_interval_seconds=3600,
    )


LOAD_BATCH = [1_000_000]


async def load(writer: IcebergSinkWriter, changes: Changes, rows: int) -> None:
    step = LOAD_BATCH[0]
    for start in range(0, rows, step):
        ids = list(range(start, min(rows, start + step)))
        block = changes.block(["c"] * len(ids), ids, 1)
        await writer.write(SinkBatch("bench", "0", 1, blocks=[block]))
        await writer.flush()


def mixed_batch(changes: Changes, rows: int, size: int, rng: random.Random) -> ChangeBlock:
    updates = rng.sample(range(rows), int(size * 0.8))
    deletes, updates = updates[: size // 10], updates[size // 10 :]
    inserts = list(
        range(rows + changes.position, rows + changes.position + size - len(updates) - len(deletes))
    )
    ops = ["u"] * len(updates) + ["c"] * len(inserts) + ["d"] * len(deletes)
    return changes.block(ops, updates + inserts + deletes, 7)


async def sink_alone(sizes: list[int]) -> list[tuple[int, float, float]]:
    out = []
    for size in sizes:
        root = Path(tempfile.mkdtemp(prefix="bench-iceberg-"))
        try:
            w = IcebergSinkWriter(settings(root), "bench", "lake")
            await w.start()
            changes = Changes()
            await load(w, changes, 100_000)
            block = mixed_batch(changes, 100_000, size, random.Random(size))
            started = time.perf_counter()
            await w.write(SinkBatch("bench", "0", 2, blocks=[block]))
            await w.flush()
            seconds = time.perf_counter() - started
            out.append((size, seconds, size / seconds))
            await w.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return out


async def commit_vs_size(
    sizes: list[int], batch: int, pyiceberg_upto: int
) -> list[tuple[int, float, float, float | None]]:
    out: list[tuple[int, float, float, float | None]] = []
    for rows in sizes:
        root = Path(tempfile.mkdtemp(prefix="bench-iceberg-"))
        try:
            w = IcebergSinkWriter(settings(root), "bench", "lake")
            await w.start()
            changes = Changes()
            await load(w, changes, rows)
            live = set(range(rows))
            first = mixed_batch(changes, rows, batch, random.Random(1))
            apply(live, first)
            w.tables["public.items"].index = None  # as after a restart
            started = time.perf_counter()
            await w.write(SinkBatch("bench", "0", 2, blocks=[first]))
            await w.flush()  # the key index is built (once per process) by this first batch
            cold = time.perf_counter() - started
            block = mixed_batch(changes, rows, batch, random.Random(2))
            apply(live, block)
            theirs: float | None = None
            if rows <= pyiceberg_upto:
                theirs = pyiceberg_upsert(w, block)
            started = time.perf_counter()
            await w.write(SinkBatch("bench", "0", 3, blocks=[block]))
            await w.flush()
            ours = time.perf_counter() - started
            check(w, live, theirs is not None)
            out.append((rows, cold, ours, theirs))
            shown = "not run" if theirs is None else f"{theirs:.2f} s"
            print(f"  {rows:>9} rows: ours {ours:.2f} s, Table.upsert {shown}", flush=True)
            await w.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return out


def apply(live: set[int], block: ChangeBlock) -> None:
    """The expected key set after `block` (a model of the source table)."""
    rb = block.records
    for op, key in zip(rb.column("@op").to_pylist(), rb.column("id").to_pylist(), strict=True):
        if op == "d":
            live.discard(int(key))
        else:
            live.add(int(key))


def check(writer: IcebergSinkWriter, live: set[int], compare: bool) -> None:
    """Ours holds exactly the live keys, one row each; Table.upsert's copy the same rows."""
    assert writer.catalog is not None
    ours = writer.tables["public.items"].table.scan(selected_fields=("id", "qty")).to_arrow()
    assert pc.count_distinct(ours.column("id")).as_py() == ours.num_rows
    assert set(ours.column("id").to_pylist()) == live
    if compare:
        copy = writer.catalog.load_table(("cdc", "items_copy"))
        theirs = copy.scan(selected_fields=("id", "qty")).to_arrow()
        assert ours.sort_by("id") == theirs.sort_by("id"), "Table.upsert and ours differ"
        writer.catalog.drop_table(("cdc", "items_copy"))


def pyiceberg_upsert(writer: IcebergSinkWriter, block: ChangeBlock) -> float:
    """`Table.upsert` of the same changes (updates + inserts; then a delete of the deleted
    keys, which upsert cannot express) on a copy of the table as it stands."""
    from pyiceberg.expressions import In

    sink = writer.tables["public.items"]
    typed = sink.typed(block)[0]
    assert writer.catalog is not None
    copy = writer.catalog.create_table(
        ("cdc", "items_copy"), schema=sink.table.schema(), properties={"format-version": "2"}
    )
    copy.append(sink.table.scan().to_arrow())
    live = typed.filter(pc.not_equal(typed.column("_cdc_op"), "d"))
    gone = typed.filter(pc.equal(typed.column("_cdc_op"), "d")).column("id").to_pylist()
    started = time.perf_counter()
    copy.upsert(live, join_cols=["id"])
    copy.delete(In("id", gone))
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.iceberg", description=__doc__)
    p.add_argument("--sizes", default="100000,1000000,5000000")
    p.add_argument("--batches", default="1000,10000,100000")
    p.add_argument(
        "--pyiceberg-upto", type=int, default=5_000_000, help="largest table for Table.upsert"
    )
    p.add_argument(
        "--load-batch", type=int, default=1_000_000, help="rows per commit when filling the table"
    )
    args = p.parse_args(argv)
    LOAD_BATCH[0] = args.load_batch
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    alone = asyncio.run(sink_alone([int(x) for x in args.batches.split(",")]))
    print("\n| upsert batch (changes) | write + commit (s) | changes/s |\n|---:|---:|---:|")
    for size, seconds, rate in alone:
        print(f"| {size:,} | {seconds:.2f} | {rate:,.0f} |")
    print("\ncommit time of one 10k-change upsert batch:", flush=True)
    growth = asyncio.run(
        commit_vs_size([int(x) for x in args.sizes.split(",")], 10_000, args.pyiceberg_upto)
    )
    print(
        "\n| table rows | ours: 10k-change upsert (s) | ours: first batch after a start,"
        " builds the key index (s) | pyiceberg `Table.upsert` + delete (s) |\n|---:|---:|---:|---:|"
    )
    for rows, cold, ours, theirs in growth:
        shown = "not run" if theirs is None else f"{theirs:.2f}"
        print(f"| {rows:,} | {ours:.2f} | {cold:.2f} | {shown} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
