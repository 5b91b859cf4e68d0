"""Whole-block operations the ingest pump needs to carry ``arrow`` change blocks (a source's
`SourceChunk.blocks`, domain/blocks.py) from the source to the sinks without a row view:
cutting a chunk into batches, joining chunks of several lanes into one batch, and reading
counts, commit times and positions off the metadata columns. Everything runs in Arrow
compute kernels, never per change in Python."""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc

from domain.blocks import BlockError, ChangeBlock, last_positions
from domain.events import Position

_INDEX, _LANE, _COMMIT_TIME = 0, 6, 4  # column numbers of @index, @lane, @commit_time


def change_count(blocks: Sequence[ChangeBlock]) -> int:
    return sum(len(b) for b in blocks)


def split_changes(blocks: Sequence[ChangeBlock], size: int) -> list[list[ChangeBlock]]:
    """The changes of `blocks` (`@index` 0..n-1 across them) in parts of `size` consecutive
    changes, in change order; each part's `@index` renumbered from 0. Rows of a block that
    are already grouped by part (the usual case: a block's rows in change order) are zero-copy
    slices; otherwise they are filtered out."""
    if size < 1:
        raise BlockError(f"part size {size} < 1")
    total = change_count(blocks)
    parts: list[list[ChangeBlock]] = [[] for _ in range(-(-total // size))]
    for block in blocks:
        rb = block.records
        if not rb.num_rows:
            continue
        index = rb.column(_INDEX)
        top = pc.max(index).as_py()
        if top >= total:
            raise BlockError(f"change @index {top} in a chunk of {total} changes")
        part_of = pc.divide(index, pa.scalar(size, index.type))  # integer division
        pieces: list[tuple[int, pa.RecordBatch]] = []
        if _non_decreasing(part_of):
            counts = pc.value_counts(part_of)
            start = 0
            for part, count in zip(
                counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True
            ):
                pieces.append((part, rb.slice(start, count)))
                start += count
        else:
            for part in pc.unique(part_of).to_pylist():
                pieces.append((part, rb.filter(pc.equal(part_of, pa.scalar(part, index.type)))))
        for part, records in pieces:
            renumbered = _shift_index(records, -part * size)
            parts[part].append(ChangeBlock(block.schema, renumbered, block.encoding))
    return parts


def in_lane(blocks: Sequence[ChangeBlock], lane: int, index_offset: int) -> list[ChangeBlock]:
    """`blocks` of one lane (`@lane` 0) as part of a batch of several lanes: `@lane` set to
    `lane` (the lane's index in the batch) and `@index` moved up by `index_offset` (the
    changes of the batch's lanes before it)."""
    if not lane and not index_offset:
        return list(blocks)
    out: list[ChangeBlock] = []
    for block in blocks:
        rb = _shift_index(block.records, index_offset)
        if lane:
            lanes = pa.repeat(pa.scalar(lane, pa.uint16()), rb.num_rows)
            rb = rb.set_column(_LANE, rb.schema.field(_LANE), lanes)
        out.append(ChangeBlock(block.schema, rb, block.encoding))
    return out


def joined_per_table(blocks: Sequence[ChangeBlock]) -> list[ChangeBlock]:
    """`blocks` with those of one table shape and encoding (of several lanes of a batch)
    joined into one, in order of their first block: fewer, bigger blocks for the wire and
    the sinks (each block is an IPC stream and, at the PostgreSQL sink, a statement)."""
    shapes: dict[tuple[str, str], list[list[ChangeBlock]]] = {}  # name, encoding -> groups
    groups: list[list[ChangeBlock]] = []  # in order of their first block
    for block in blocks:
        same_name = shapes.setdefault((block.schema.qualified_name, block.encoding), [])
        group = next((g for g in same_name if g[0].schema == block.schema), None)
        if group is None:
            group = []
            same_name.append(group)
            groups.append(group)
        group.append(block)
    if len(groups) == len(blocks):
        return list(blocks)
    out: list[ChangeBlock] = []
    for group in groups:
        if len(group) == 1:
            out.append(group[0])
            continue
        try:
            records = pa.concat_batches([g.records for g in group])
        except pa.ArrowInvalid:  # the same table shape in other Arrow types: left apart
            out.extend(group)
            continue
        out.append(ChangeBlock(group[0].schema, records, group[0].encoding))
    return out


def changes_per_table(blocks: Sequence[ChangeBlock]) -> dict[str, int]:
    """The number of changes per source table name (`schema.table`)."""
    out: dict[str, int] = {}
    for block in blocks:
        name = block.schema.qualified_name
        out[name] = out.get(name, 0) + len(block)
    return out


def newest_commit_time_us(blocks: Sequence[ChangeBlock]) -> int:
    """The latest `@commit_time` of `blocks`, in microseconds since the epoch (0: none)."""
    newest = 0
    for block in blocks:
        top = pc.max(block.records.column(_COMMIT_TIME)).value  # None when empty
        if top is not None and top > newest:
            newest = top
    return int(newest)


def last_positions_by_lane(blocks: Sequence[ChangeBlock]) -> dict[int, Position]:
    """The highest position of each lane (by index) across `blocks`."""
    out: dict[int, Position] = {}
    for block in blocks:
        for lane, position in last_positions(block).items():
            seen = out.get(lane)
            if seen is None or position > seen:
                out[lane] = position
    return out


def _non_decreasing(values: pa.Array) -> bool:
    if len(values) < 2:
        return True
    return bool(pc.all(pc.greater_equal(values[1:], values[:-1])).as_py())


def _shift_index(records: pa.RecordBatch, by: int) -> pa.RecordBatch:
    if not by:
        return records
    index = records.column(_INDEX)
    step = pa.scalar(abs(by), index.type)
    shifted = pc.add(index, step) if by > 0 else pc.subtract(index, step)
    return records.set_column(_INDEX, records.schema.field(_INDEX), shifted)
