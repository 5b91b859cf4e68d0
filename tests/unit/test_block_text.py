"""domain.block_text and domain.blocks.to_postgres_text: typed (arrow) columns as the exact
PostgreSQL text, and arrow blocks read back as the events of their text form. The round trip
through a real PostgreSQL server is tests/integration/test_block_text_postgres.py."""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pytest

from domain.arrow_types import TIMESTAMP_US_MAX, TIMESTAMP_US_MIN, value_type
from domain.block_text import TextFormError, column_text
from domain.blocks import (
    ENCODING_ARROW,
    ENCODING_POSTGRES_TEXT,
    BlockError,
    ChangeBlock,
    build_blocks,
    events_of,
    events_of_blocks,
    to_postgres_text,
)
from domain.events import UNCHANGED, Operation, Position, TableSchema
from domain.types import LogicalType
from tests.support.arrow_blocks import TypedChange, arrow_block, kafka_column

DAY = timedelta(days=1)


@pytest.mark.parametrize(
    ("arrow_type", "values", "want"),
    [
        (pa.bool_(), [True, False, None], ["t", "f", None]),
        (pa.int16(), [-32768, 0, 32767], ["-32768", "0", "32767"]),
        (pa.uint64(), [2**64 - 1], ["18446744073709551615"]),
        (
            pa.float64(),
            [1.5, 1e20, 1e-7, 0.1 + 0.2, -0.0, math.nan, math.inf, -math.inf],
            ["1.5", "1e+20", "1e-7", "0.30000000000000004", "-0", "NaN", "Infinity", "-Infinity"],
        ),
        (pa.float32(), [0.1, math.nan], ["0.1", "NaN"]),
        (
            pa.decimal128(12, 2),
            [Decimal("12.50"), Decimal("-0.01"), Decimal("0")],
            ["12.50", "-0.01", "0.00"],
        ),
        (pa.decimal256(60, 3), [Decimal("1" * 57 + ".250")], ["1" * 57 + ".250"]),
        (pa.string(), ["a\tb", "", None], ["a\tb", "", None]),
        (pa.binary(), [b"\x00\xff\x10", b"", None], ["\\x00ff10", "\\x", None]),
        (
            pa.date32(),
            [date(2024, 2, 29), date(1, 1, 1), date(9999, 12, 31)],
            ["2024-02-29", "0001-01-01", "9999-12-31"],
        ),
        (pa.date32(), [-800_000, 3_000_000], ["-infinity", "infinity"]),
        (
            pa.time64("us"),
            [time(13, 45, 7, 250000), time(0, 0), time(23, 59, 59, 999999), time(1, 0, 30)],
            ["13:45:07.25", "00:00:00", "23:59:59.999999", "01:00:30"],
        ),
        (pa.time64("us"), [86_400_000_000], ["24:00:00"]),  # Debezium's MicroTime of 24:00
        (
            pa.timestamp("us"),
            [datetime(2024, 2, 29, 13, 45, 7, 500000), datetime(2000, 1, 1), TIMESTAMP_US_MAX],
            ["2024-02-29 13:45:07.5", "2000-01-01 00:00:00", "9999-12-31 23:59:59.999999"],
        ),
        (
            pa.timestamp("us"),
            [2**63 - 1, TIMESTAMP_US_MAX + 1, TIMESTAMP_US_MIN - 1, -(2**63)],
            ["infinity", "infinity", "-infinity", "-infinity"],
        ),
        (
            pa.timestamp("us", tz="UTC"),
            [datetime(2024, 2, 29, 13, 45, 7, 500000, tzinfo=UTC), 2**63 - 1],
            ["2024-02-29 13:45:07.5+00", "infinity"],
        ),
        (
            pa.duration("us"),
            [
                timedelta(0),
                timedelta(microseconds=1),
                timedelta(microseconds=-1),
                DAY,
                -DAY,
                2 * DAY,
                timedelta(days=3, hours=4, minutes=5, seconds=6, microseconds=789000),
                -(DAY + timedelta(hours=2)),
                timedelta(seconds=1.5),
                timedelta(days=40, hours=25),
            ],
            [
                "00:00:00",
                "00:00:00.000001",
                "-00:00:00.000001",
                "1 day",
                "-1 days",
                "2 days",
                "3 days 04:05:06.789",
                "-1 days -02:00:00",
                "00:00:01.5",
                "41 days 01:00:00",
            ],
        ),
        (
            pa.list_(pa.string()),
            [["a b", None, 'c"d', "", "NULL", "null", "x", "back\\slash", "{", "a,b"], [], None],
            ['{"a b",NULL,"c\\"d","","NULL","null",x,"back\\\\slash","{","a,b"}', "{}", None],
        ),
        (pa.list_(pa.int32()), [[1, None, 3]], ["{1,NULL,3}"]),
        (
            pa.list_(pa.list_(pa.int64())),
            [[[1, 2], [3, 4]], [[None]]],
            ["{{1,2},{3,4}}", "{{NULL}}"],
        ),
        (
            pa.list_(pa.timestamp("us", tz="UTC")),
            [[datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), 2**63 - 1]],
            ['{"2024-01-02 03:04:05+00",infinity}'],
        ),
        (pa.list_(pa.float64()), [[math.nan, -math.inf, 2.5]], ["{NaN,-Infinity,2.5}"]),
        (pa.list_(pa.bool_()), [[True, False]], ["{t,f}"]),
        (pa.list_(pa.duration("us")), [[DAY, timedelta(seconds=1)]], ['{"1 day",00:00:01}']),
    ],
)
def test_each_arrow_type_becomes_postgres_text(
    arrow_type: pa.DataType, values: list[Any], want: list[str | None]
) -> None:
    assert column_text(pa.array(values, arrow_type)).to_pylist() == want


def test_a_slice_of_a_list_column_keeps_its_own_lists() -> None:
    lists = pa.array([[1], None, [2, 3], [], [4]], pa.list_(pa.int64()))
    assert column_text(lists.slice(1, 3)).to_pylist() == [None, "{2,3}", "{}"]


def test_a_type_without_a_text_form_is_refused() -> None:
    with pytest.raises(TextFormError):
        column_text(pa.array([{"a": 1}], pa.struct([("a", pa.int8())])))


TYPED = TableSchema(
    "public",
    "typed",
    (
        kafka_column("id", "int64", "bigint", key=True),
        kafka_column("at", "timestamptz", "timestamp with time zone"),
        kafka_column("tags", "list<string>", "text[]"),
        kafka_column("doc", "json", "jsonb"),
    ),
)
_AT = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)


def _typed_block() -> ChangeBlock:
    return arrow_block(
        TYPED,
        [
            TypedChange(Operation.CREATE, Position(5, 1), (1, _AT, ["a", None], '{"k": 1}')),
            TypedChange(
                Operation.UPDATE,
                Position(5, 2),
                (1, _AT + DAY, ["b"], None),
                unchanged=(3,),
                before=(1, _AT, ["a", None], None),
            ),
            TypedChange(Operation.DELETE, Position(6, 1), (2, None, None, None)),
        ],
        first_index=3,
    )


def test_to_postgres_text_keeps_the_metadata_and_converts_before_images() -> None:
    block = _typed_block()
    text = to_postgres_text(block)
    assert text.encoding == ENCODING_POSTGRES_TEXT
    for i in range(9):  # @index .. @unchanged as they were
        assert text.records.column(i).equals(block.records.column(i))
    assert text.records.column("@before").to_pylist() == [
        None,
        {"id": "1", "at": "2024-05-01 10:00:00+00", "tags": "{a,NULL}", "doc": None},
        None,
    ]
    assert text.column(1).to_pylist() == [
        "2024-05-01 10:00:00+00",
        "2024-05-02 10:00:00+00",
        None,
    ]
    assert to_postgres_text(text) is text


def test_events_of_an_arrow_block_are_the_events_of_its_text_form() -> None:
    got = [(i, ev) for i, ev in events_of(_typed_block())]
    assert [i for i, _ in got] == [3, 4, 5]
    insert, update, delete = (ev for _, ev in got)
    assert insert.after == ("1", "2024-05-01 10:00:00+00", "{a,NULL}", '{"k": 1}')
    assert update.before == ("1", "2024-05-01 10:00:00+00", "{a,NULL}", None)
    assert update.after == ("1", "2024-05-02 10:00:00+00", "{b}", UNCHANGED)
    assert (delete.operation, delete.before, delete.after) == (
        Operation.DELETE,
        ("2", None, None, None),
        None,
    )
    # the same events as a text block made from them gives
    events = [ev for _, ev in got]
    assert events_of_blocks(build_blocks(events)) == events


def test_an_arrow_block_whose_columns_do_not_fit_its_table_is_refused() -> None:
    block = _typed_block()
    narrow = TableSchema("public", "typed", TYPED.columns[:3])
    with pytest.raises(BlockError):
        to_postgres_text(ChangeBlock(narrow, block.records, ENCODING_ARROW))


@pytest.mark.parametrize(
    "logical",
    [
        "bool",
        "int64",
        "float64",
        "decimal(5,2)",
        "bytes",
        "date",
        "time",
        "timestamp",
        "timestamptz",
        "interval",
        "list<string>",
        "list<list<int32>>",
    ],
)
def test_empty_and_all_null_columns_stay_so(logical: str) -> None:
    arrow_type = value_type(LogicalType.parse(logical))
    assert column_text(pa.array([], arrow_type)).to_pylist() == []
    assert column_text(pa.nulls(3, arrow_type)).to_pylist() == [None, None, None]
