"""Changes the Iceberg sink cannot write (a key without a value, a value that does not fit
its column), kept in the Iceberg table `<table_namespace>._cdc_dead_letters`, committed
before the batch that carried them is acknowledged."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import pyarrow as pa
from pyiceberg.catalog import Catalog
from pyiceberg.schema import Schema
from pyiceberg.types import LongType, NestedField, StringType, TimestamptzType

from adapters.config.pipeline import IcebergSinkConfig
from domain.blocks import ChangeBlock, events_of

TABLE = "_cdc_dead_letters"
_SCHEMA = Schema(
    NestedField(1, "pipeline_id", StringType(), required=False),
    NestedField(2, "sink_id", StringType(), required=False),
    NestedField(3, "source_table", StringType(), required=False),
    NestedField(4, "operation", StringType(), required=False),
    NestedField(5, "position", LongType(), required=False),
    NestedField(6, "sequence", LongType(), required=False),
    NestedField(7, "lane", StringType(), required=False),
    NestedField(8, "error", StringType(), required=False),
    NestedField(9, "row", StringType(), required=False),
    NestedField(10, "failed_at", TimestamptzType(), required=False),
)


class DeadLetterTable:
    def __init__(
        self, catalog: Catalog, settings: IcebergSinkConfig, pipeline_id: str, sink_id: str
    ) -> None:
        self.catalog = catalog
        self.identifier = (settings.table_namespace, TABLE)
        self.pipeline_id = pipeline_id
        self.sink_id = sink_id
        self.pending: list[dict[str, object]] = []

    def add(self, block: ChangeBlock, lanes: Sequence[str], source_table: str) -> None:
        names = [c.name for c in block.schema.columns]
        now = int(time.time() * 1_000_000)
        for _, ev in events_of(block, lanes):
            row = ev.after if ev.after is not None else ev.before
            self.pending.append(
                {
                    "pipeline_id": self.pipeline_id,
                    "sink_id": self.sink_id,
                    "source_table": source_table,
                    "operation": ev.operation.value,
                    "position": ev.position.major,
                    "sequence": ev.position.minor,
                    "lane": lanes[0] if lanes else "",
                    "error": _reason(block, row, names),
                    "row": json.dumps(dict(zip(names, row or (), strict=False)), default=str),
                    "failed_at": now,
                }
            )

    def commit(self) -> None:
        if not self.pending:
            return
        self.catalog.create_namespace_if_not_exists(self.identifier[0])
        table = self.catalog.create_table_if_not_exists(self.identifier, schema=_SCHEMA)
        arrow = pa.Table.from_pylist(self.pending, schema=_arrow_schema())
        table.append(arrow)
        self.pending = []

    def count(self) -> int:
        try:
            table = self.catalog.load_table(self.identifier)
        except Exception:
            return 0
        return int(table.scan().to_arrow().num_rows)


def _arrow_schema() -> pa.Schema:
    return pa.schema(
        [
            pa.field("pipeline_id", pa.large_string()),
            pa.field("sink_id", pa.large_string()),
            pa.field("source_table", pa.large_string()),
            pa.field("operation", pa.large_string()),
            pa.field("position", pa.int64()),
            pa.field("sequence", pa.int64()),
            pa.field("lane", pa.large_string()),
            pa.field("error", pa.large_string()),
            pa.field("row", pa.large_string()),
            pa.field("failed_at", pa.timestamp("us", tz="UTC")),
        ]
    )


def _reason(block: ChangeBlock, row: object, names: list[str]) -> str:
    keys = [c.name for c in block.schema.columns if c.is_key]
    if isinstance(row, tuple) and any(row[names.index(k)] is None for k in keys):
        return f"primary key {', '.join(keys)} has no value"
    return "a value does not fit its Iceberg column type"
