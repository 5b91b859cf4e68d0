"""Iceberg sinks in e2e tests and benchmarks: pipeline configs whose sinks write Iceberg
tables (SQLite SQL catalog; warehouse on local files or an S3 endpoint), and reading those
tables back for a row-by-row comparison with the source."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pyarrow.compute as pc
import yaml

from adapters.config.pipeline import IcebergSinkConfig
from domain.events import Column, Operation, Position, SourceEvent, TableSchema
from domain.ports import SinkBatch
from services.wire import decode_batch, encode_batch
from tests.support.pipeline import PipelineFiles


def iceberg_sink(
    sink_id: str,
    tmp: Path,
    *,
    write_mode: str = "upsert",
    namespace: str = "lake",
    s3: Any = None,
    bucket: str = "",
    **extra: Any,
) -> dict[str, Any]:
    section: dict[str, Any] = {
        "catalog_uri": f"sqlite:///{tmp}/catalog-{sink_id}.db",
        "warehouse": str(tmp / f"warehouse-{sink_id}"),
        "table_name": "{schema}_{table}",
        "table_namespace": namespace,
        "write_mode": write_mode,
        "batch_size": 2000,
        "flush_interval_seconds": 1.0,
        **extra,
    }
    if s3 is not None:
        section.update(
            warehouse=f"s3://{bucket}/{sink_id}",
            s3_endpoint=s3.endpoint_url,
            s3_access_key_id=s3.access_key,
            s3_secret_access_key=s3.secret_key,
            s3_region="us-east-1",
        )
    return {"sink_id": sink_id, "sink_type": "iceberg", "iceberg": section}


def use_sinks(files: PipelineFiles, sinks: Sequence[dict[str, Any]]) -> None:
    doc = yaml.safe_load(files.pipeline.read_text())
    doc["sinks"] = list(sinks)
    files.pipeline.write_text(yaml.safe_dump(doc, sort_keys=False))


def load_table(sink: dict[str, Any], source_table: str) -> Any:
    from adapters.iceberg.catalog import load_catalog, table_identifier

    settings = IcebergSinkConfig(**sink["iceberg"])
    schema, name = source_table.split(".", 1)
    try:
        return load_catalog(settings).load_table(table_identifier(settings, schema, name))
    except Exception:
        return None


def _norm(v: Any) -> Any:
    if isinstance(v, dict | list):
        return json.dumps(v)
    if isinstance(v, uuid.UUID):
        return str(v)
    if isinstance(v, memoryview):
        return bytes(v)
    if isinstance(v, Decimal):
        return v.normalize()
    return v


def source_rows(dsn: str, table: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    with psycopg.connect(dsn) as conn:
        cur = conn.execute(f"SELECT * FROM {table} ORDER BY 1")
        names = [d.name for d in cur.description or ()]
        return names, [tuple(_norm(v) for v in r) for r in cur.fetchall()]


def live_rows(sink: dict[str, Any], table: str, names: Sequence[str]) -> list[tuple[Any, ...]]:
    """The table's rows; for an append (change log) table, each key's last change unless
    it is a delete: what the source holds now."""
    t = load_table(sink, table)
    if t is None:
        return []
    t.refresh()
    data = t.scan().to_arrow()
    if sink["iceberg"].get("write_mode") == "append":
        data = data.sort_by([("_cdc_position", "ascending"), ("_cdc_sequence", "ascending")])
        last: dict[Any, dict[str, Any]] = {}
        for r in data.to_pylist():
            last[r[names[0]]] = r
        rows = [r for r in last.values() if r["_cdc_op"] != "d"]
    else:
        if "_cdc_deleted" in data.column_names:
            data = data.filter(pc.invert(pc.fill_null(data.column("_cdc_deleted"), False)))
        rows = data.to_pylist()
    out = [tuple(_norm(r.get(n)) for n in names) for r in rows]
    return sorted(out, key=lambda r: r[0])


def equal(source_dsn: str, sink: dict[str, Any], tables: Sequence[str]) -> bool:
    for table in tables:
        names, src = source_rows(source_dsn, table)
        if live_rows(sink, table, names) != src:
            return False
    return True


def assert_equal(source_dsn: str, sink: dict[str, Any], tables: Sequence[str]) -> None:
    for table in tables:
        names, src = source_rows(source_dsn, table)
        dst = live_rows(sink, table, names)
        assert len(src) == len(dst), f"{table}: source {len(src)} rows, iceberg {len(dst)}"
        for a, b in zip(src, dst, strict=True):
            assert a == b, f"{table}: source row {a} != iceberg row {b}"


def duplicate_keys(sink: dict[str, Any], table: str, key: str = "id") -> int:
    t = load_table(sink, table)
    if t is None:
        return 0
    col = t.scan(selected_fields=(key,)).to_arrow().column(key)
    return len(col) - pc.count_distinct(col).as_py()


# ----------------------------------------------------- the writer on its own (no pipeline)

ORDERS = TableSchema(
    "public",
    "orders",
    (
        Column("id", 20, "bigint", is_key=True),
        Column("qty", 23, "integer"),
        Column("price", 1700, "numeric(12,2)"),
        Column("at", 1184, "timestamp with time zone"),
        Column("paid", 16, "boolean"),
        Column("note", 25, "text"),
    ),
)
LOG = TableSchema("public", "log", (Column("msg", 25, "text"), Column("n", 23, "integer")))


def settings(tmp: Path, **over: Any) -> IcebergSinkConfig:
    base: dict[str, Any] = {
        "catalog_uri": f"sqlite:///{tmp}/catalog.db",
        "warehouse": str(tmp / "warehouse"),
        "table_name": "{schema}_{table}",
        "write_mode": "upsert",
        "batch_size": 1_000_000,
        "flush_interval_seconds": 3600,
    }
    base.update(over)
    return IcebergSinkConfig(**base)


class Source:
    def __init__(self) -> None:
        self.major = 1000
        self.batch = 0

    def events(
        self, *changes: tuple[str, TableSchema, tuple[str | None, ...]]
    ) -> list[SourceEvent]:
        out = []
        for op, table, row in changes:
            self.major += 1
            p = Position(self.major, 0)
            if op == "d":
                out.append(SourceEvent(Operation.DELETE, table, p, before=row))
            else:
                o = Operation.CREATE if op == "c" else Operation.UPDATE
                out.append(
                    SourceEvent(o, table, p, after=row, commit_time_us=1_700_000_000_000_000)
                )
        return out

    def batch_of(self, events: list[SourceEvent]) -> SinkBatch:
        self.batch += 1
        return decode_batch(encode_batch(self.batch, "it", "slot", events))


def row(i: int, qty: int = 1, note: str | None = "n") -> tuple[str | None, ...]:
    return (str(i), str(qty), f"{i}.50", "2024-05-01 10:00:00+00", "t", note)
