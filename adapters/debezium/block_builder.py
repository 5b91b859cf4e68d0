"""Debezium `Change`s (adapters/debezium/envelope.py) -> ``arrow``-encoded change blocks
(domain/blocks.py): one block per run of changes of one shape, each column built at once by
its column builder (adapters/debezium/columns.py).

Row metadata: ``@op`` the operation's letter, ``@position`` the offset (``@sequence`` 0),
``@commit_time`` the source's ts_us / ts_ms, ``@xid`` its txId, ``@lane`` 0, ``@image``
after for c / r / u, before for d, both bits when an update carries its old row (which goes,
typed, into ``@before``); a truncate has no row image. Unavailable (unchanged TOASTed)
values are null and listed in ``@unchanged`` (the old row's as column count + index).

A value no column builder can represent makes its message *rejected*: the block is built
from the other changes and the rejected ones are returned with the reason, for the caller to
dead-letter. The culprit is found by building that column's values one at a time, so one
bad value costs one column rebuilt per message, and only then.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from adapters.debezium.columns import Built, ColumnBuilder, ColumnError
from adapters.debezium.envelope import Change, EnvelopeShape
from domain.blocks import (
    ENCODING_ARROW,
    IMAGE_AFTER,
    IMAGE_BEFORE,
    ChangeBlock,
    arrow_schema,
)
from domain.events import Operation

_COMMIT_TIME = pa.timestamp("us", tz="UTC")
_UNCHANGED = pa.list_(pa.int16())
_LETTERS = {op: op.value for op in Operation}


@dataclass
class Blocks:
    """The blocks of a run of changes, and the changes left out with why."""

    blocks: list[ChangeBlock] = field(default_factory=list)
    rejected: list[tuple[Change, str]] = field(default_factory=list)


def build_blocks(changes: Sequence[Change], first_index: int = 0) -> Blocks:
    """The blocks of `changes` (in change order), `@index` numbering the accepted changes
    from `first_index` on, one block per run of one shape."""
    out = Blocks()
    index = first_index
    start = 0
    for end in range(1, len(changes) + 1):
        if end < len(changes) and changes[end].shape is changes[start].shape:
            continue
        block = _build_run(changes[start:end], index, out.rejected)
        if block is not None:
            out.blocks.append(block)
            index += len(block)
        start = end
    return out


def _build_run(
    changes: Sequence[Change], first_index: int, rejected: list[tuple[Change, str]]
) -> ChangeBlock | None:
    while changes:
        bad = _try_build(changes, first_index)
        if isinstance(bad, ChangeBlock):
            return bad
        rejected.extend((changes[i], reason) for i, reason in sorted(bad.items()))
        changes = [c for i, c in enumerate(changes) if i not in bad]
    return None


def _column(builder: ColumnBuilder, values: Sequence[Any], bad: dict[int, str]) -> Built | None:
    """The column, or None with the culprits added to `bad` (position -> reason)."""
    try:
        return builder.build(values)
    except ColumnError:
        pass
    parts: list[Built] = []
    found = False
    for i, value in enumerate(values):
        try:
            parts.append(builder.build([value]))
        except ColumnError as exc:
            bad.setdefault(i, str(exc))
            found = True
    if found:
        return None
    # Every value builds alone: put the column together from them.
    array = pa.concat_arrays([p.array for p in parts])
    return Built(array, [i for i, p in enumerate(parts) if p.unavailable])


def _try_build(changes: Sequence[Change], first_index: int) -> ChangeBlock | dict[int, str]:
    shape: EnvelopeShape = changes[0].shape
    table = shape.table
    n = len(table.columns)
    m = len(changes)
    empty: tuple[Any, ...] = (None,) * n
    rows: list[tuple[Any, ...]] = []
    images: list[int] = []
    befores: list[tuple[Any, ...]] = []
    with_before: list[int] = []
    for j, change in enumerate(changes):
        after, before = change.after, change.before
        if after is not None:
            rows.append(after)
            if before is not None:
                images.append(IMAGE_AFTER | IMAGE_BEFORE)
                befores.append(before)
                with_before.append(j)
            else:
                images.append(IMAGE_AFTER)
        elif before is not None:
            rows.append(before)
            images.append(IMAGE_BEFORE)
        else:
            rows.append(empty)
            images.append(0)
    bad: dict[int, str] = {}
    columns = list(zip(*rows, strict=True)) if n else []
    built: list[Built | None] = []
    for i, builder in enumerate(shape.builders):
        built.append(_column(builder, columns[i], bad))
    old: list[Built | None] = []
    if befores:
        old_columns = list(zip(*befores, strict=True))
        old_bad: dict[int, str] = {}
        for i, builder in enumerate(shape.builders):
            old.append(_column(builder, old_columns[i], old_bad))
        for k, reason in old_bad.items():
            bad.setdefault(with_before[k], f"before: {reason}")
    if bad:
        return {i: f"{table.qualified_name}: {reason}" for i, reason in bad.items()}
    unchanged: list[list[int] | None] = [None] * m
    for i, column in enumerate(built):
        assert column is not None
        for j in column.unavailable:
            unchanged[j] = [*(unchanged[j] or []), i]
    for i, column in enumerate(old):
        assert column is not None
        for k in column.unavailable:
            j = with_before[k]
            unchanged[j] = [*(unchanged[j] or []), n + i]
    schema = arrow_schema(table, ENCODING_ARROW)
    before_type = schema.field("@before").type
    if befores:
        before_array = _spread_struct(
            [c.array for c in old if c is not None], before_type, with_before, m
        )
    else:
        before_array = pa.nulls(m, before_type)
    any_unchanged = any(u is not None for u in unchanged)
    arrays: list[pa.Array] = [
        pa.array(range(first_index, first_index + m), pa.uint32()),
        pa.array([_LETTERS[c.operation] for c in changes], pa.string()),
        pa.array([c.offset for c in changes], pa.uint64()),
        pa.repeat(pa.scalar(0, pa.uint64()), m),
        pa.array([c.commit_time_us for c in changes], pa.int64()).cast(_COMMIT_TIME),
        pa.array([c.transaction_id for c in changes], pa.uint64()),
        pa.repeat(pa.scalar(0, pa.uint16()), m),
        pa.array(images, pa.uint8()),
        pa.array(unchanged, _UNCHANGED) if any_unchanged else pa.nulls(m, _UNCHANGED),
        before_array,
        *[c.array for c in built if c is not None],
    ]
    records = pa.RecordBatch.from_arrays(arrays, schema=schema)
    return ChangeBlock(table, records, encoding=ENCODING_ARROW)


def _spread_struct(
    children: list[pa.Array], struct_type: pa.DataType, at: list[int], m: int
) -> pa.Array:
    """A struct array of `m` rows whose rows `at` are the rows of `children` (others null)."""
    if len(at) == m:
        return pa.StructArray.from_arrays(children, fields=list(struct_type))
    positions: list[int | None] = [None] * m
    for k, j in enumerate(at):
        positions[j] = k
    dense = pa.StructArray.from_arrays(children, fields=list(struct_type))
    return dense.take(pa.array(positions, pa.int32()))
