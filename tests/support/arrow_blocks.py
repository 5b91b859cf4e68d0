"""``arrow``-encoded change blocks for tests, as a source that decodes straight into columns
hands them out (`SourceChunk.blocks`): typed values, `@lane` 0, `@index` numbering a chunk's
changes in change order across its blocks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from domain.blocks import (
    BEFORE,
    ENCODING_ARROW,
    IMAGE_AFTER,
    IMAGE_BEFORE,
    ChangeBlock,
    arrow_schema,
)
from domain.events import Operation, Position, TableSchema
from domain.ports import SourceChunk


@dataclass(frozen=True)
class Change:
    """One change of a table: its row image (the new row; a delete's old row) in Python
    values of the columns' Arrow types, and the old row of an update when sent."""

    table: TableSchema
    op: Operation
    position: Position
    row: tuple[Any, ...]
    before: tuple[Any, ...] | None = None
    commit_us: int = 0
    xid: int = 0


def arrow_block(changes: Sequence[Change], indices: Sequence[int]) -> ChangeBlock:
    """The changes (all of one table) as one block, `indices[i]` the `@index` of changes[i]."""
    table = changes[0].table
    schema = arrow_schema(table, ENCODING_ARROW)
    value_fields = list(schema.field(BEFORE).type)
    images = [
        (IMAGE_BEFORE if c.op is Operation.DELETE else IMAGE_AFTER)
        | (IMAGE_BEFORE if c.before is not None else 0)
        for c in changes
    ]
    befores = [
        None if c.before is None else dict(zip(table.column_names, c.before, strict=True))
        for c in changes
    ]
    meta = [
        pa.array(indices, pa.uint32()),
        pa.array([c.op.value for c in changes], pa.string()),
        pa.array([c.position.major for c in changes], pa.uint64()),
        pa.array([c.position.minor for c in changes], pa.uint64()),
        pa.array([c.commit_us for c in changes], pa.timestamp("us", tz="UTC")),
        pa.array([c.xid for c in changes], pa.uint64()),
        pa.array([0] * len(changes), pa.uint16()),
        pa.array(images, pa.uint8()),
        pa.nulls(len(changes), pa.list_(pa.int16())),
        pa.array(befores, pa.struct(value_fields)),
    ]
    values = [pa.array([c.row[i] for c in changes], f.type) for i, f in enumerate(value_fields)]
    return ChangeBlock(
        table, pa.RecordBatch.from_arrays(meta + values, schema=schema), ENCODING_ARROW
    )


def arrow_blocks(changes: Sequence[Change]) -> list[ChangeBlock]:
    """One block per table, in order of first change; `@index` is each change's place."""
    by_table: dict[str, tuple[list[Change], list[int]]] = {}
    for i, change in enumerate(changes):
        picked, indices = by_table.setdefault(change.table.qualified_name, ([], []))
        picked.append(change)
        indices.append(i)
    return [arrow_block(picked, indices) for picked, indices in by_table.values()]


def block_chunk(lane: str, changes: Sequence[Change], ack: Any, **extra: Any) -> SourceChunk:
    """A chunk of `changes` as a columnar source hands it out."""
    return SourceChunk(lane, [], ack, blocks=arrow_blocks(changes), **extra)


def changes_in_order(blocks: Sequence[ChangeBlock]) -> list[tuple[int, int, str, Position]]:
    """(@index, @lane, table, position) of every change of `blocks`, by `@index`."""
    out: list[tuple[int, int, str, Position]] = []
    for block in blocks:
        rb = block.records
        for index, lane, major, minor in zip(
            rb.column("@index").to_pylist(),
            rb.column("@lane").to_pylist(),
            rb.column("@position").to_pylist(),
            rb.column("@sequence").to_pylist(),
            strict=True,
        ):
            out.append((index, lane, block.schema.qualified_name, Position(major, minor)))
    return sorted(out)
