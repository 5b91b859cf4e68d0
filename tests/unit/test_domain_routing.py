"""domain.routing: which sinks receive which events."""

from __future__ import annotations

import pytest

from domain.blocks import ChangeBlock
from domain.events import Column, Operation, Position, SourceEvent, TableSchema
from domain.routing import Router, RoutingRule
from tests.support.arrow_chunks import Change, blocks_of

ALL_OPS = tuple(Operation)


def table(qualified: str) -> TableSchema:
    schema, name = qualified.split(".", 1)
    return TableSchema(schema, name, (Column("id", 23, "int4", True),))


def event(qualified: str, op: Operation, n: int) -> SourceEvent:
    return SourceEvent(op, table(qualified), Position(n), after=(str(n),))


# --- RoutingRule ---------------------------------------------------------------------------


def test_empty_rule_matches_every_table_and_operation() -> None:
    rule = RoutingRule("all")
    for name in ("public.orders", "sales.items", "x.y"):
        for op in ALL_OPS:
            assert rule.matches(name, op)


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("public.orders", "public.orders", True),
        ("public.orders", "public.orders_archive", False),
        ("public.*", "public.orders", True),
        ("public.*", "sales.orders", False),
        ("*.orders", "sales.orders", True),
        ("*.orders", "sales.orders2", False),
        ("public.order?", "public.orders", True),
        ("public.order?", "public.order", False),
        ("public.[ab]*", "public.accounts", True),
        ("public.[ab]*", "public.customers", False),
        ("public.[!a]*", "public.accounts", False),
        # case-sensitive, unlike fnmatch.fnmatch on Windows: table names are exact identifiers
        ("public.Orders", "public.orders", False),
    ],
)
def test_table_patterns_use_fnmatch(pattern: str, name: str, expected: bool) -> None:
    assert RoutingRule("s", tables=(pattern,)).matches(name, Operation.CREATE) is expected


def test_any_of_several_patterns_matches() -> None:
    rule = RoutingRule("s", tables=("public.orders", "sales.*"))
    assert rule.matches("public.orders", Operation.CREATE)
    assert rule.matches("sales.items", Operation.CREATE)
    assert not rule.matches("public.items", Operation.CREATE)


def test_operations_filter() -> None:
    rule = RoutingRule("s", operations=frozenset({Operation.CREATE, Operation.UPDATE}))
    assert rule.matches("public.orders", Operation.CREATE)
    assert rule.matches("public.orders", Operation.UPDATE)
    assert not rule.matches("public.orders", Operation.DELETE)
    assert not rule.matches("public.orders", Operation.READ)
    assert not rule.matches("public.orders", Operation.TRUNCATE)


def test_table_and_operation_must_both_match() -> None:
    rule = RoutingRule("s", tables=("public.*",), operations=frozenset({Operation.DELETE}))
    assert rule.matches("public.orders", Operation.DELETE)
    assert not rule.matches("public.orders", Operation.CREATE)
    assert not rule.matches("sales.orders", Operation.DELETE)


# --- Router --------------------------------------------------------------------------------


def make_router() -> Router:
    return Router(
        [
            RoutingRule("warehouse"),  # everything
            RoutingRule("orders-hook", tables=("public.orders",)),
            RoutingRule(
                "audit",
                tables=("public.*", "sales.*"),
                operations=frozenset({Operation.DELETE, Operation.TRUNCATE}),
            ),
        ]
    )


def test_targets_in_rule_order() -> None:
    router = make_router()
    assert router.sink_ids == ("warehouse", "orders-hook", "audit")
    assert router.targets("public.orders", Operation.CREATE) == ("warehouse", "orders-hook")
    assert router.targets("public.orders", Operation.DELETE) == (
        "warehouse",
        "orders-hook",
        "audit",
    )
    assert router.targets("sales.items", Operation.DELETE) == ("warehouse", "audit")
    assert router.targets("other.t", Operation.UPDATE) == ("warehouse",)


def test_no_rule_matches_gives_no_targets() -> None:
    router = Router([RoutingRule("a", tables=("public.a",))])
    assert router.targets("public.b", Operation.CREATE) == ()


def test_router_without_rules() -> None:
    router = Router([])
    assert router.sink_ids == ()
    assert router.targets("public.a", Operation.CREATE) == ()
    assert router.split([event("public.a", Operation.CREATE, 1)]) == {}


def test_duplicate_sink_ids_rejected() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        Router([RoutingRule("pg"), RoutingRule("hook"), RoutingRule("pg", tables=("x.*",))])


def test_rules_may_be_a_one_shot_iterable() -> None:
    router = Router(r for r in [RoutingRule("a"), RoutingRule("b", tables=("public.b",))])
    assert router.sink_ids == ("a", "b")
    assert router.targets("public.b", Operation.CREATE) == ("a", "b")


def test_cache_is_keyed_by_table_and_operation() -> None:
    router = make_router()
    # Interleave lookups so a cache keyed by table only, or by operation only, would be caught.
    expected = {
        ("public.orders", Operation.CREATE): ("warehouse", "orders-hook"),
        ("public.orders", Operation.DELETE): ("warehouse", "orders-hook", "audit"),
        ("public.items", Operation.DELETE): ("warehouse", "audit"),
        ("public.items", Operation.CREATE): ("warehouse",),
        ("other.orders", Operation.DELETE): ("warehouse",),
    }
    for _ in range(3):
        for (name, op), targets in expected.items():
            assert router.targets(name, op) == targets
        for (name, op), targets in reversed(expected.items()):
            assert router.targets(name, op) == targets


def test_cached_result_equals_uncached_for_many_lookups() -> None:
    cached = make_router()
    names = ["public.orders", "public.items", "sales.x", "other.orders", "public.orders2"]
    for i in range(200):
        name = names[(i * 7) % len(names)]
        op = ALL_OPS[(i * 3) % len(ALL_OPS)]
        fresh = make_router()  # a new router has an empty cache
        assert cached.targets(name, op) == fresh.targets(name, op)


def test_split_groups_by_sink_keeping_order() -> None:
    router = make_router()
    events = [
        event("public.orders", Operation.CREATE, 1),
        event("public.items", Operation.CREATE, 2),
        event("public.orders", Operation.DELETE, 3),
        event("sales.items", Operation.TRUNCATE, 4),
        event("public.orders", Operation.UPDATE, 5),
        event("other.t", Operation.DELETE, 6),
    ]
    out = router.split(events)

    def majors(sink: str) -> list[int]:
        return [e.position.major for e in out[sink]]

    assert list(out) == ["warehouse", "orders-hook", "audit"]
    assert majors("warehouse") == [1, 2, 3, 4, 5, 6]
    assert majors("orders-hook") == [1, 3, 5]
    assert majors("audit") == [3, 4]
    # The very same event objects, not copies.
    assert out["orders-hook"][0] is events[0]
    assert out["warehouse"][2] is out["audit"][0]


def test_split_lists_every_sink_even_without_events() -> None:
    router = make_router()
    out = router.split([event("public.items", Operation.CREATE, 1)])
    assert out == {"warehouse": out["warehouse"], "orders-hook": [], "audit": []}
    assert len(out["warehouse"]) == 1
    assert router.split([]) == {"warehouse": [], "orders-hook": [], "audit": []}


# --- change blocks -------------------------------------------------------------------------


def _blocks(*changes: tuple[str, Operation, int]) -> list[ChangeBlock]:
    typed = {
        name: TableSchema(*name.split(".", 1), (Column("id", 0, "int4", True, "int32"),))
        for name, _, _ in changes
    }
    return blocks_of([Change(typed[t], op, Position(n), (n,)) for t, op, n in changes])


def test_blocks_go_whole_to_each_sink_taking_their_table() -> None:
    router = Router(
        [
            RoutingRule("all"),
            RoutingRule("orders", ("public.orders",)),
            RoutingRule("none", ("x.*",)),
        ]
    )
    orders, items = _blocks(
        ("public.orders", Operation.CREATE, 1),
        ("public.items", Operation.CREATE, 2),
        ("public.orders", Operation.DELETE, 3),
    )
    out = router.split_blocks([orders, items])
    assert out["all"][0] is orders and out["all"][1] is items
    assert len(out["orders"]) == 1 and out["orders"][0] is orders
    assert out["none"] == []


def test_a_rule_with_operations_gets_only_those_changes_of_a_block() -> None:
    router = Router(
        [
            RoutingRule("deletes", operations=frozenset({Operation.DELETE})),
            RoutingRule("writes", operations=frozenset({Operation.CREATE, Operation.UPDATE})),
            RoutingRule("truncates", operations=frozenset({Operation.TRUNCATE})),
        ]
    )
    (block,) = _blocks(
        ("public.orders", Operation.CREATE, 1),
        ("public.orders", Operation.DELETE, 2),
        ("public.orders", Operation.UPDATE, 3),
        ("public.orders", Operation.DELETE, 4),
    )
    out = router.split_blocks([block])
    (deletes,) = out["deletes"]
    assert deletes.records.column("@index").to_pylist() == [1, 3]
    assert deletes.records.column("@op").to_pylist() == ["d", "d"]
    assert deletes.encoding == block.encoding and deletes.schema is block.schema
    assert out["writes"][0].records.column("@position").to_pylist() == [1, 3]
    assert out["truncates"] == []
    (only_deletes,) = Router(
        [RoutingRule("d", operations=frozenset({Operation.DELETE}))]
    ).split_blocks([deletes])["d"]
    assert only_deletes is deletes  # nothing to filter out: the block itself
