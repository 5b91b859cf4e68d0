"""domain.types, domain.blocks and domain.collapse: logical types, the columnar form of a
batch and back, and collapse-by-key in both forms agreeing."""

from __future__ import annotations

import random

import pytest

from domain.blocks import (
    BlockError,
    after_position,
    build_blocks,
    events_of_blocks,
    last_position,
)
from domain.collapse import DELETED, KeyCollapse, collapse_block
from domain.events import UNCHANGED, Column, Operation, Position, SourceEvent, TableSchema
from domain.rows import encode_row
from domain.types import LogicalType, LogicalTypeError, from_debezium, from_postgres

T = TableSchema("public", "t", (Column("id", 20, "bigint", True), Column("v", 25, "text")))
U = TableSchema("app", "u", (Column("a", 25, "text", True), Column("b", 23, "integer", True)))


@pytest.mark.parametrize(
    ("oid", "name", "want"),
    [
        (20, "bigint", "int64"),
        (21, "smallint", "int16"),
        (26, "oid", "uint32"),
        (1700, "numeric(12,2)", "decimal(12,2)"),
        (1700, "numeric", "decimal"),
        (790, "money", "decimal(19,2)"),
        (1184, "timestamp with time zone", "timestamptz"),
        (1114, "timestamp(3) without time zone", "timestamp"),
        (1007, "integer[]", "list<int32>"),
        (0, "text[][]", "list<list<string>>"),
        (3802, "jsonb", "json"),
        (2950, "uuid", "uuid"),
        (17, "bytea", "bytes"),
        (70000, "mood", "string"),  # an enum: its text is the value
    ],
)
def test_postgres_types_map_to_logical_types(oid: int, name: str, want: str) -> None:
    assert str(from_postgres(oid, name)) == want
    assert LogicalType.parse(want) == from_postgres(oid, name)


def test_debezium_types_map_to_logical_types() -> None:
    assert str(from_debezium("int64", "io.debezium.time.MicroTimestamp")) == "timestamp"
    assert str(from_debezium("string", "io.debezium.time.ZonedTimestamp")) == "timestamptz"
    decimal = from_debezium(
        "bytes",
        "org.apache.kafka.connect.data.Decimal",
        {"scale": "2", "connect.decimal.precision": "12"},
    )
    assert str(decimal) == "decimal(12,2)"
    assert str(from_debezium("int16")) == "int16"
    assert str(from_debezium("array", element=LogicalType("int", 32))) == "list<int32>"
    with pytest.raises(LogicalTypeError):
        from_debezium("map")
    with pytest.raises(LogicalTypeError):
        LogicalType.parse("int7")


def test_a_column_keeps_its_source_type_and_may_carry_its_own_logical_type() -> None:
    mysql = Column("at", 0, "DATETIME(6)", logical_type="timestamp")
    assert (mysql.source_type, str(mysql.logical)) == ("DATETIME(6)", "timestamp")
    assert str(Column("n", 1700, "numeric(12,2)").logical) == "decimal(12,2)"


def _mixed() -> list[SourceEvent]:
    return [
        SourceEvent(Operation.READ, T, Position(1, 0), after=("0", "snap")),
        SourceEvent(Operation.CREATE, T, Position(5, 0), after_wire=encode_row(("1", "a"))),
        SourceEvent(Operation.UPDATE, T, Position(5, 1), before=("1", "x"), after=("1", UNCHANGED)),
        SourceEvent(Operation.CREATE, U, Position(5, 2), after=("k", None)),
        SourceEvent(Operation.UPDATE, U, Position(5, 3), before=("k", UNCHANGED), after=("k", "2")),
        SourceEvent(Operation.DELETE, T, Position(6, 0), before=("1", None)),
        SourceEvent(Operation.DELETE, T, Position(6, 1), after=("9", None)),  # odd, kept as is
        SourceEvent(Operation.TRUNCATE, T, Position(7, 0)),
    ]


def test_events_round_trip_through_blocks() -> None:
    events = _mixed()
    for ev in events:
        ev.commit_time_us, ev.transaction_id, ev.source_database = 1_700_000_000_000_001, 9, "db"
    blocks = build_blocks(events)
    assert [b.schema for b in blocks] == [T, U]
    assert [len(b) for b in blocks] == [6, 2]
    assert events_of_blocks(blocks, ["0"], "db") == events


def test_a_row_that_does_not_fit_its_table_is_refused() -> None:
    with pytest.raises(BlockError):
        build_blocks([SourceEvent(Operation.CREATE, T, Position(1), after=("1",))])


def test_positions_filter_and_last_position() -> None:
    (block,) = build_blocks([ev for ev in _mixed() if ev.table is T])
    assert last_position(block) == Position(7, 0)
    later = after_position(block, Position(5, 1))
    assert [ev.position for ev in events_of_blocks([later])] == [
        Position(6, 0),
        Position(6, 1),
        Position(7, 0),
    ]
    assert after_position(block, None) is block


def _collapse_rows(events: list[SourceEvent], key_idx: tuple[int, ...]) -> dict:
    collapse = KeyCollapse(key_idx)
    for ev in events:
        collapse.add(ev)
    return collapse.state


def test_columnar_and_row_collapse_agree_on_simple_runs() -> None:
    rng = random.Random(7)
    for table, key_idx in ((T, (0,)), (U, (0, 1))):
        for _ in range(30):
            events = []
            for i in range(rng.randint(1, 40)):
                key = [str(rng.randint(0, 6)) for _ in key_idx]
                row = tuple([*key, f"v{i}"]) if table is T else tuple(key)
                op = rng.choice([Operation.CREATE, Operation.UPDATE, Operation.DELETE])
                if op is Operation.DELETE:
                    events.append(SourceEvent(op, table, Position(1, i), before=row))
                else:
                    events.append(SourceEvent(op, table, Position(1, i), after=row))
            (block,) = build_blocks(events)
            collapsed = collapse_block(block, key_idx)
            assert collapsed is not None
            want = _collapse_rows(events, key_idx)
            got = {}
            for ev in events_of_blocks([type(block)(table, collapsed)]):
                row = ev.after if ev.operation is not Operation.DELETE else ev.before
                key = tuple(row[i] for i in key_idx)
                got[key] = DELETED if ev.operation is Operation.DELETE else ("u", row, None)
            assert got == want


def test_columnar_collapse_leaves_the_odd_cases_to_the_row_form() -> None:
    def one(*events: SourceEvent) -> object:
        (block,) = build_blocks(list(events))
        return collapse_block(block, (0,))

    plain = SourceEvent(Operation.CREATE, T, Position(1), after=("1", "a"))
    assert one(plain) is not None
    assert one(SourceEvent(Operation.TRUNCATE, T, Position(1))) is None
    assert one(SourceEvent(Operation.UPDATE, T, Position(1), after=("1", UNCHANGED))) is None
    key_change = SourceEvent(Operation.UPDATE, T, Position(1), before=("0", "a"), after=("1", "a"))
    assert one(key_change) is None
    same_key = SourceEvent(Operation.UPDATE, T, Position(1), before=("1", "a"), after=("1", "b"))
    assert one(same_key) is not None
    assert one(SourceEvent(Operation.CREATE, T, Position(1), after=(None, "a"))) is None


def test_row_collapse_resolves_unchanged_values_and_key_changes() -> None:
    events = [
        SourceEvent(Operation.CREATE, T, Position(1, 0), after=("1", "big")),
        SourceEvent(
            Operation.UPDATE, T, Position(1, 1), before=("1", None), after=("2", UNCHANGED)
        ),
    ]
    state = _collapse_rows(events, (0,))
    assert state == {("1",): DELETED, ("2",): ("u", ("2", "big"), None)}


# ---------------------------------------------------------------- batches of several lanes


def test_a_batch_of_several_lanes_splits_back_into_its_lanes() -> None:
    from domain.blocks import lane_blocks, lanes_of_blocks
    from domain.ports import SinkBatch

    a = [SourceEvent(Operation.CREATE, T, Position(9, i), after=(str(i), "a")) for i in range(3)]
    b = [
        SourceEvent(Operation.CREATE, U, Position(2, 0), after=("x", "1")),
        SourceEvent(Operation.UPDATE, T, Position(2, 1), after=("7", "b")),
    ]
    events = a + b
    blocks = build_blocks(events, [0, 0, 0, 1, 1])
    assert lanes_of_blocks(blocks) == [0, 0, 0, 1, 1]
    assert [len(x) for x in lane_blocks(blocks, 1)] == [1, 1]  # T's and U's change of lane b
    assert all(set(x.records.column(6).to_pylist()) == {0} for x in lane_blocks(blocks, 1))
    from_blocks = SinkBatch("p", "a", 1, blocks=blocks, lanes=["a", "b"])
    from_events = SinkBatch("p", "a", 1, events, lanes=["a", "b"], lane_counts=(3, 2))
    for batch in (from_blocks, from_events):
        parts = batch.by_lane()
        assert [(p.lanes, list(p.events)) for p in parts] == [(("a",), a), (("b",), b)]
        assert batch.lane_of_events() == [0, 0, 0, 1, 1]
    assert lanes_of_blocks(from_events.blocks) == [0, 0, 0, 1, 1]
    with pytest.raises(BlockError, match="lane indices"):
        build_blocks(events, [0, 1])
    with pytest.raises(ValueError, match="lane counts"):
        SinkBatch("p", "a", 1, events, lanes=["a", "b"], lane_counts=(3, 1))


def test_last_per_key_is_the_columnar_collapse_every_upserting_sink_shares() -> None:
    import pyarrow as pa

    from domain.collapse import join_keys, last_per_key

    assert last_per_key(pa.array(["a", "b", "c"])) is None
    picked = last_per_key(pa.array(["a", "b", "a", "c", "b"]))
    assert picked is not None and picked.to_pylist() == [2, 3, 4]
    composite = join_keys([pa.array([1, 1, 2]), pa.array(["x", "x", "x"])])
    picked = last_per_key(composite)
    assert picked is not None and picked.to_pylist() == [1, 2]
