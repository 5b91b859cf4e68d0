"""Arrow-encoded change blocks built from Python values, as a source that decodes into typed
columns (the Kafka source reading Avro) hands them to the sinks; and the Kafka-style table
schemas they belong to (type OID 0, a logical type, `type_name` the PostgreSQL type)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from domain.blocks import (
    ENCODING_ARROW,
    IMAGE_AFTER,
    IMAGE_BEFORE,
    META_COLUMNS,
    ChangeBlock,
    arrow_schema,
)
from domain.events import Column, Operation, Position, TableSchema

COMMIT_TIME = datetime(2024, 1, 1, tzinfo=UTC)  # the `@commit_time` of every change
COMMIT_TIME_US = 1_704_067_200_000_000


def kafka_column(name: str, logical: str, type_name: str, *, key: bool = False) -> Column:
    return Column(name, 0, type_name, key, logical)


@dataclass(frozen=True)
class TypedChange:
    """One change with typed values: `row` is the new row (the old one for a delete);
    `unchanged`: indices of columns the source did not send."""

    op: Operation
    position: Position
    row: tuple[Any, ...]
    unchanged: tuple[int, ...] = ()
    before: tuple[Any, ...] | None = None


def arrow_block(
    table: TableSchema, changes: Sequence[TypedChange], first_index: int = 0
) -> ChangeBlock:
    """The changes as one ``arrow`` block of lane 0 (`@index` from `first_index`)."""
    schema = arrow_schema(table, ENCODING_ARROW)
    m = len(changes)
    n = len(table.columns)
    columns = [[c.row[i] for c in changes] for i in range(n)]
    images = [
        IMAGE_BEFORE
        if c.op is Operation.DELETE
        else IMAGE_AFTER | (IMAGE_BEFORE if c.before is not None else 0)
        for c in changes
    ]
    before_type = schema.field("@before").type
    if any(c.before is not None for c in changes):
        before = pa.array(
            [
                None
                if c.before is None
                else {col.name: v for col, v in zip(table.columns, c.before, strict=True)}
                for c in changes
            ],
            before_type,
        )
    else:
        before = pa.nulls(m, before_type)
    arrays = [
        pa.array(range(first_index, first_index + m), pa.uint32()),
        pa.array([c.op.value for c in changes], pa.string()),
        pa.array([c.position.major for c in changes], pa.uint64()),
        pa.array([c.position.minor for c in changes], pa.uint64()),
        pa.array([COMMIT_TIME] * m, schema.field("@commit_time").type),
        pa.array([0] * m, pa.uint64()),
        pa.array([0] * m, pa.uint16()),
        pa.array(images, pa.uint8()),
        pa.array(
            [list(c.unchanged) if c.unchanged else None for c in changes], pa.list_(pa.int16())
        ),
        before,
        *[
            pa.array(values, schema.field(META_COLUMNS + i).type)
            for i, values in enumerate(columns)
        ],
    ]
    return ChangeBlock(table, pa.RecordBatch.from_arrays(arrays, schema=schema), ENCODING_ARROW)
