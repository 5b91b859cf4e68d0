"""domain.events: Position order, SourceEvent keys, TableSchema helpers, the UNCHANGED marker."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import pickle
import random

import pytest

from domain.events import (
    UNCHANGED,
    Column,
    Operation,
    Position,
    SourceEvent,
    TableSchema,
)

ORDERS = TableSchema(
    "public",
    "orders",
    (
        Column("tenant", 25, "text", is_key=True),
        Column("note", 25, "text"),
        Column("id", 20, "int8", is_key=True),
        Column("total", 1700, "numeric"),
    ),
)


# --- Position ------------------------------------------------------------------------------


def test_position_orders_by_major_then_minor() -> None:
    assert Position(1, 9) < Position(2, 0)
    assert Position(2, 0) < Position(2, 1)
    assert Position(2, 1) > Position(1, 100)
    assert Position(3, 3) <= Position(3, 3)
    assert Position(3, 3) == Position(3, 3)
    assert Position(3) == Position(3, 0)
    assert max(Position(5, 1), Position(4, 99), Position(5, 0)) == Position(5, 1)


def test_position_order_equals_tuple_order_on_random_values() -> None:
    rng = random.Random(7)
    values = [(rng.choice([0, 1, 2, 2**40, 2**64 - 1]), rng.randint(0, 5)) for _ in range(300)]
    positions = [Position(a, b) for a, b in values]
    assert [(p.major, p.minor) for p in sorted(positions)] == sorted(values)
    pairs = list(zip(values, positions, strict=True))
    for (a, pa), (b, pb) in itertools.pairwise(pairs):
        assert (pa < pb) == (a < b)
        assert (pa == pb) == (a == b)


def test_position_is_hashable_immutable_and_prints_major_minor() -> None:
    assert len({Position(1, 2), Position(1, 2), Position(1, 3)}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        Position(1, 2).major = 5  # type: ignore[misc]
    assert str(Position(123, 4)) == "123:4"


# --- TableSchema ---------------------------------------------------------------------------


def test_table_schema_helpers() -> None:
    assert ORDERS.qualified_name == "public.orders"
    assert ORDERS.column_names == ("tenant", "note", "id", "total")
    assert ORDERS.key_columns == ("tenant", "id")  # in column order


def test_table_schema_without_key() -> None:
    schema = TableSchema("s", "log", (Column("line", 25, "text"),))
    assert schema.key_columns == ()
    assert TableSchema("s", "empty", ()).column_names == ()


def test_table_schema_equality_sees_column_changes() -> None:
    same = TableSchema("public", "orders", ORDERS.columns)
    retyped = TableSchema("public", "orders", (*ORDERS.columns[:3], Column("total", 701, "float8")))
    assert same == ORDERS
    assert hash(same) == hash(ORDERS)
    assert retyped != ORDERS


# --- SourceEvent.key -----------------------------------------------------------------------


def test_key_from_after() -> None:
    event = SourceEvent(Operation.CREATE, ORDERS, Position(1), after=("acme", "hi", "7", "1.5"))
    assert event.key == {"tenant": "acme", "id": "7"}


def test_key_prefers_after_over_before() -> None:
    event = SourceEvent(
        Operation.UPDATE,
        ORDERS,
        Position(1),
        before=("acme", None, "6", None),  # key changed by the update
        after=("acme", "x", "7", "2"),
    )
    assert event.key == {"tenant": "acme", "id": "7"}


def test_key_from_before_for_delete() -> None:
    event = SourceEvent(Operation.DELETE, ORDERS, Position(1), before=("acme", None, "7", None))
    assert event.key == {"tenant": "acme", "id": "7"}


def test_key_without_rows_is_empty() -> None:
    assert SourceEvent(Operation.TRUNCATE, ORDERS, Position(1)).key == {}


def test_key_keeps_null_and_tolerates_short_row() -> None:
    event = SourceEvent(Operation.CREATE, ORDERS, Position(1), after=(None, "n"))
    assert event.key == {"tenant": None}


def test_source_event_defaults_are_not_shared() -> None:
    a = SourceEvent(Operation.CREATE, ORDERS, Position(1))
    b = SourceEvent(Operation.CREATE, ORDERS, Position(2))
    a.extra["trace"] = "x"
    assert b.extra == {}
    assert (a.commit_time_us, a.transaction_id) == (0, 0)
    assert not hasattr(a, "partition")  # the lane is the batch's, not the event's


def test_operation_letters_are_debeziums() -> None:
    assert {op.value for op in Operation} == {"c", "u", "d", "r", "t"}
    assert Operation("u") is Operation.UPDATE


# --- UNCHANGED -----------------------------------------------------------------------------


def test_unchanged_is_a_singleton_distinct_from_null_and_text() -> None:
    assert type(UNCHANGED)() is UNCHANGED
    assert UNCHANGED is not None
    assert UNCHANGED != ""
    assert repr(UNCHANGED) == "UNCHANGED"


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_unchanged_survives_pickle(protocol: int) -> None:
    assert pickle.loads(pickle.dumps(UNCHANGED, protocol=protocol)) is UNCHANGED
    row = ("1", UNCHANGED, None)
    restored = pickle.loads(pickle.dumps(row, protocol=protocol))
    assert restored[1] is UNCHANGED
    assert restored == row


def test_unchanged_survives_copy_and_deepcopy() -> None:
    assert copy.copy(UNCHANGED) is UNCHANGED
    assert copy.deepcopy(UNCHANGED) is UNCHANGED
    event = SourceEvent(Operation.UPDATE, ORDERS, Position(1), after=("acme", UNCHANGED, "7", "1"))
    assert copy.deepcopy(event).after[1] is UNCHANGED  # type: ignore[index]
    assert pickle.loads(pickle.dumps(event)).after[1] is UNCHANGED


def test_a_schema_change_names_added_dropped_and_retyped_columns() -> None:
    from domain.events import Column, SchemaChange, TableSchema

    old = TableSchema(
        "public",
        "t",
        (
            Column("id", 23, "integer", True),
            Column("code", 1043, "character varying(10)"),
            Column("gone", 25, "text"),
            Column("n", 23, "integer"),
        ),
    )
    new = TableSchema(
        "public",
        "t",
        (
            Column("id", 23, "integer", True),
            Column("code", 1043, "character varying(20)"),  # same type, new modifier
            Column("n", 20, "bigint"),
            Column("added", 25, "text"),
        ),
    )
    change = SchemaChange(old, new)
    assert (change.added, change.dropped, change.retyped) == (("added",), ("gone",), ("code", "n"))
    assert change.is_change
    assert not SchemaChange(None, new).is_change  # first sighting
    unnamed = TableSchema("public", "t", tuple(Column(c.name, c.type_oid, "") for c in old.columns))
    assert not SchemaChange(unnamed, old).is_change  # names unknown: only OIDs compare
