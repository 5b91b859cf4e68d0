"""Pure parts of the Iceberg sink: types, whole-column casts, schema evolution rules,
partition transforms, table names and catalog settings."""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pytest
from pyiceberg.types import DecimalType, DoubleType, IntegerType, LongType, StringType

from adapters.config.pipeline import IcebergSinkConfig
from adapters.iceberg import columns as cols
from adapters.iceberg.catalog import catalog_properties, shown_uri, table_identifier
from adapters.iceberg.table_sink import PartitionSpecError, _parse_partition
from domain.arrow_types import value_type
from domain.block_text import column_text
from domain.events import Column
from domain.types import LogicalType


def config(**over: object) -> IcebergSinkConfig:
    base: dict[str, object] = {
        "catalog_uri": "sqlite:///c.db",
        "warehouse": "s3://b/w",
        "table_name": "{schema}_{table}",
    }
    base.update(over)
    return IcebergSinkConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("logical", "iceberg"),
    [
        ("int16", "int"),
        ("int64", "long"),
        ("uint32", "long"),
        ("uint64", "decimal(20, 0)"),
        ("float32", "float"),
        ("decimal(12,2)", "decimal(12, 2)"),
        ("decimal", "string"),
        ("timestamptz", "timestamptz"),
        ("uuid", "string"),
        ("list<int32>", "string"),
        ("bytes", "binary"),
    ],
)
def test_iceberg_type_of_each_logical_type(logical: str, iceberg: str) -> None:
    assert str(cols.iceberg_type(LogicalType.parse(logical))) == iceberg


def test_text_columns_are_cast_whole_and_misfits_are_marked() -> None:
    typed, bad = cols.cast_text(pa.array(["1.50", None, "-3"]), pa.decimal128(12, 2))
    assert typed.to_pylist() == [Decimal("1.50"), None, Decimal("-3.00")] and bad is None
    typed, bad = cols.cast_text(pa.array(["t", "f", None]), pa.bool_())
    assert typed.to_pylist() == [True, False, None]
    typed, bad = cols.cast_text(pa.array(["NaN", "-Infinity", "2.5"]), pa.float64())
    assert typed.to_pylist()[1:] == [float("-inf"), 2.5] and bad is None
    typed, bad = cols.cast_text(pa.array(["\\x0aff", None]), pa.large_binary())
    assert typed.to_pylist() == [b"\n\xff", None]
    when = pa.timestamp("us", tz="UTC")
    typed, bad = cols.cast_text(pa.array(["2024-05-01 10:00:00+02", "infinity"]), when)
    assert str(typed[0].as_py()) == "2024-05-01 08:00:00+00:00" and typed[1].as_py() is None
    assert bad is not None and bad.to_pylist() == [False, True]


_AT = datetime(2024, 5, 1, 10, 0, 0, 250000)


@pytest.mark.parametrize(
    ("logical", "values"),
    [
        ("bool", [True, False, None]),
        ("int16", [-32768, 7, None]),
        ("int64", [2**63 - 1, -1]),
        ("uint16", [65535, 0]),
        ("uint32", [2**32 - 1]),
        ("uint64", [2**64 - 1, 0, None]),
        ("float32", [0.1, math.inf, -math.inf]),
        ("float64", [2.5, -math.inf, 1e-300]),
        ("decimal(12,2)", [Decimal("1.50"), Decimal("-0.01"), None]),
        ("decimal(50,3)", [Decimal("1" * 47 + ".125")]),  # Iceberg: string
        ("decimal", ["12.345", "NaN"]),
        ("string", ["a\tb", "", None]),
        ("bytes", [b"\x00\xff", b"", None]),
        ("date", [date(2024, 2, 29), date(1, 1, 1), 3_000_000, -800_000]),
        ("time", [time(13, 45, 7, 250000), time(0, 0), 86_400_000_000]),
        ("timestamp", [_AT, 2**63 - 1, -(2**63), None]),
        ("timestamptz", [_AT.replace(tzinfo=UTC), 2**63 - 1]),
        ("interval", [timedelta(days=3, seconds=1.5), -timedelta(hours=2)]),
        ("uuid", ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]),
        ("json", ['{"a": [1, null]}']),
        ("list<string>", [["a b", None, 'c"d'], [], None]),
        ("list<list<int32>>", [[[1, 2], [3, None]]]),
    ],
)
def test_typed_columns_land_as_their_postgres_text_would(logical: str, values: list[Any]) -> None:
    """An arrow block's column cast for Iceberg gives what the text path gives for its
    PostgreSQL text: the same values, the same rows that do not fit (+-infinity)."""
    parsed = LogicalType.parse(logical)
    typed = pa.array(values, value_type(parsed))
    target = cols.arrow_type(cols.iceberg_type(parsed))
    direct, direct_bad = cols.cast_typed(typed, target)
    via_text, text_bad = cols.cast_text(column_text(typed), target)
    assert direct.type == target
    assert direct.to_pylist() == via_text.to_pylist()
    no_misfits = [False] * len(values)
    assert (direct_bad.to_pylist() if direct_bad is not None else no_misfits) == (
        text_bad.to_pylist() if text_bad is not None else no_misfits
    )


def test_a_typed_value_too_wide_for_a_narrower_stored_column_is_marked() -> None:
    typed, bad = cols.cast_typed(pa.array([1, 2**40], pa.int64()), pa.int32())
    assert typed.to_pylist() == [1, None]
    assert bad is not None and bad.to_pylist() == [False, True]


def test_evolution_adds_widens_and_refuses_by_column_name() -> None:
    existing = {"id": LongType(), "qty": IntegerType(), "price": DecimalType(10, 2)}
    plan = cols.plan_evolution(
        "cdc.t",
        existing,
        [
            Column("id", 23, "integer"),  # narrower: fits, kept
            Column("qty", 20, "bigint"),
            Column("price", 1700, "numeric(14,2)"),
            Column("note", 25, "text"),
        ],
    )
    assert plan.add == [("note", StringType())]
    assert plan.widen == [("qty", LongType()), ("price", DecimalType(14, 2))]
    with pytest.raises(
        cols.UnsafeSchemaChangeError, match="column 'qty' changed from int to string"
    ):
        cols.plan_evolution("cdc.t", existing, [Column("qty", 25, "text")])
    with pytest.raises(cols.UnsafeSchemaChangeError, match="'price'"):
        cols.plan_evolution("cdc.t", existing, [Column("price", 1700, "numeric(12,4)")])
    assert cols.plan_evolution("cdc.t", {"x": DoubleType()}, [Column("x", 700, "real")]).widen == []


def test_partition_transforms_parse() -> None:
    assert _parse_partition("region") == ("identity", "region")
    assert _parse_partition("day(created_at)") == ("day", "created_at")
    assert _parse_partition("bucket(16, id)") == ("bucket[16]", "id")
    assert _parse_partition("truncate(4,name)") == ("truncate[4]", "name")
    with pytest.raises(PartitionSpecError, match="unknown transform 'weekly'"):
        _parse_partition("weekly(ts)")
    with pytest.raises(PartitionSpecError, match="two arguments"):
        _parse_partition("bucket(id)")


def test_table_names_and_catalog_settings() -> None:
    assert table_identifier(config(), "public", "orders") == ("cdc", "public_orders")
    assert table_identifier(config(table_name="t", table_namespace="lake"), "a", "b") == (
        "lake",
        "t",
    )
    props = catalog_properties(
        config(
            catalog_uri="postgresql://cat:pw@db/ice",
            s3_endpoint="http://127.0.0.1:8333",
            s3_access_key_id="k",
            s3_secret_access_key="s",
        )
    )
    assert props["type"] == "sql" and props["uri"] == "postgresql+psycopg://cat:pw@db/ice"
    assert props["s3.endpoint"] == "http://127.0.0.1:8333" and props["s3.region"] == "us-east-1"
    assert props["s3.path-style-access"] == "true" and props["s3.secret-access-key"] == "s"
    assert catalog_properties(config(catalog_uri="https://rest:8181"))["type"] == "rest"
    assert shown_uri("postgresql://cat:pw@db/ice") == "postgresql://cat:***@db/ice"
