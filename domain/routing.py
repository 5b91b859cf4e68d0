"""Which sinks receive which events."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from operator import attrgetter

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
        return not self.tables or any(fnmatchcase(table, p) for p in self.tables)


class Router:
    """Resolves the target sinks of an event; caches per (table, operation) since both are few."""

    def __init__(self, rules: Iterable[RoutingRule]) -> None:
        self._rules = tuple(rules)
        ids = [r.sink_id for r in self._rules]
        if len(ids) != len(set(ids)):
            raise ValueError(f"duplicate sink ids in routing rules: {ids}")
        self._cache: dict[tuple[str, Operation], tuple[str, ...]] = {}
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
            if len(distinct) == 1 or len(
                {self.targets(t.qualified_name, Operation.CREATE) for t in distinct.values()}
            ) == 1:
                table = next(iter(distinct.values()))
                for sink_id in self.targets(table.qualified_name, Operation.CREATE):
                    out[sink_id] = list(events)
                return out
        for event in events:
            for sink_id in self.targets(event.table.qualified_name, event.operation):
                out[sink_id].append(event)
        return out
