"""Chunks of ``arrow`` change blocks for tests of the ingest pump, as a source that decodes
straight into columns hands them out (`SourceChunk.blocks`): changes of several tables,
one block per table, `@index` numbering the chunk's changes in change order across them,
`@lane` 0. The blocks themselves are tests/support/arrow_blocks.py's."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from domain.blocks import COMMIT_TIME, ENCODING_ARROW, INDEX, ChangeBlock
from domain.events import Operation, Position, TableSchema
from domain.ports import SourceChunk
from tests.support.arrow_blocks import TypedChange, arrow_block


@dataclass(frozen=True)
class Change:
    """One change of `table` with typed values (see `TypedChange`) and its commit time."""

    table: TableSchema
    op: Operation
    position: Position
    row: tuple[Any, ...]
    before: tuple[Any, ...] | None = None
    commit_us: int = 0


def block_of(changes: Sequence[Change], indices: Sequence[int]) -> ChangeBlock:
    """The changes (all of one table) as one block, `indices[i]` the `@index` of changes[i]."""
    typed = [TypedChange(c.op, c.position, c.row, before=c.before) for c in changes]
    rb = arrow_block(changes[0].table, typed).records
    for name, values in (
        (INDEX, pa.array(indices, pa.uint32())),
        (COMMIT_TIME, pa.array([c.commit_us for c in changes], pa.timestamp("us", tz="UTC"))),
    ):
        i = rb.schema.get_field_index(name)
        rb = rb.set_column(i, rb.schema.field(i), values)
    return ChangeBlock(changes[0].table, rb, ENCODING_ARROW)


def blocks_of(changes: Sequence[Change]) -> list[ChangeBlock]:
    """One block per table, in order of first change; `@index` is each change's place."""
    by_table: dict[str, tuple[list[Change], list[int]]] = {}
    for i, change in enumerate(changes):
        picked, indices = by_table.setdefault(change.table.qualified_name, ([], []))
        picked.append(change)
        indices.append(i)
    return [block_of(picked, indices) for picked, indices in by_table.values()]


def block_chunk(lane: str, changes: Sequence[Change], ack: Any, **extra: Any) -> SourceChunk:
    """A chunk of `changes` as a columnar source hands it out."""
    return SourceChunk(lane, [], ack, blocks=blocks_of(changes), **extra)


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
