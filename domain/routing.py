"""Which sinks receive which changes: events one by one (cached per table and operation), or
change blocks whole (per table; by an `@op` filter when a rule lists operations)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from operator import attrgetter

import pyarrow as pa
import pyarrow.compute as pc

from domain.blocks import OP, ChangeBlock
from domain.events import Operation, SourceEvent

_TABLE = attrgetter("table")


@dataclass(frozen=True, slots=True)
class RoutingRule:
    """A sink receives an event when its table matches one pattern and its operation is listed.

    An empty `tables` means every table; an empty `operations` means every operation.
    """

    sink_id: str
    tables: tuple[str, ...] = ()
    operations: frozenset[Operation] = frozenset()

    def matches(self, table: str, operation: Operation) -> bool:
        if self.operations and operation not in self.operations:
            return False
        return self.takes_table(table)

    def takes_table(self, table: str) -> bool:
        return not self.tables or any(fnmatchcase(table, p) for p in self.tables)


class Router:
    """Resolves the target sinks of an event; caches per (table, operation) since both are few."""

    def __init__(self, rules: Iterable[RoutingRule]) -> None:
        self._rules = tuple(rules)
        ids = [r.sink_id for r in self._rules]
        if len(ids) != len(set(ids)):
            raise ValueError(f"duplicate sink ids in routing rules: {ids}")
        self._cache: dict[tuple[str, Operation], tuple[str, ...]] = {}
        self._table_rules: dict[str, tuple[RoutingRule, ...]] = {}
        self._by_table_only = all(not r.operations for r in self._rules)

    @property
    def sink_ids(self) -> tuple[str, ...]:
        return tuple(r.sink_id for r in self._rules)

    def targets(self, table: str, operation: Operation) -> tuple[str, ...]:
        cache_key = (table, operation)
        found = self._cache.get(cache_key)
        if found is None:
            found = tuple(r.sink_id for r in self._rules if r.matches(table, operation))
            self._cache[cache_key] = found
        return found

    def split(self, events: Sequence[SourceEvent]) -> dict[str, list[SourceEvent]]:
        """Group events by target sink, keeping their order within each sink."""
        out: dict[str, list[SourceEvent]] = {sink_id: [] for sink_id in self.sink_ids}
        if events and self._by_table_only:
            # Targets depend on the table alone: when every event's table goes to the same
            # sinks (the usual batch), each gets the whole list, with no per-event work.
            tables = list(map(_TABLE, events))
            distinct = dict(zip(map(id, tables), tables, strict=True))
            if (
                len(distinct) == 1
                or len(
                    {self.targets(t.qualified_name, Operation.CREATE) for t in distinct.values()}
                )
                == 1
            ):
                table = next(iter(distinct.values()))
                for sink_id in self.targets(table.qualified_name, Operation.CREATE):
                    out[sink_id] = list(events)
                return out
        for event in events:
            for sink_id in self.targets(event.table.qualified_name, event.operation):
                out[sink_id].append(event)
        return out

    def split_blocks(self, blocks: Sequence[ChangeBlock]) -> dict[str, list[ChangeBlock]]:
        """Group change blocks by target sink, in their order: a sink gets a block whole when
        its rule takes the block's table and every operation, else the block's changes of the
        rule's operations (a filter on `@op`); blocks left empty are dropped."""
        out: dict[str, list[ChangeBlock]] = {sink_id: [] for sink_id in self.sink_ids}
        for block in blocks:
            if not len(block):
                continue
            for rule in self._rules_of_table(block.schema.qualified_name):
                picked = block if not rule.operations else _with_operations(block, rule.operations)
                if picked is not None:
                    out[rule.sink_id].append(picked)
        return out

    def _rules_of_table(self, table: str) -> tuple[RoutingRule, ...]:
        found = self._table_rules.get(table)
        if found is None:
            found = tuple(r for r in self._rules if r.takes_table(table))
            self._table_rules[table] = found
        return found


def _with_operations(block: ChangeBlock, operations: frozenset[Operation]) -> ChangeBlock | None:
    """The changes of `block` whose operation is one of `operations` (None: none is)."""
    ops = block.records.column(OP)
    keep = pc.is_in(ops, value_set=pa.array(sorted(op.value for op in operations), pa.string()))
    kept = pc.sum(keep).as_py() or 0
    if kept == len(block):
        return block
    if not kept:
        return None
    return ChangeBlock(block.schema, block.records.filter(keep), block.encoding)
