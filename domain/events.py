"""The change event every stage agrees on."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar

from domain.types import LogicalType, from_postgres


class Operation(enum.Enum):
    """Debezium's operation letters, which every sink and tool already knows."""

    CREATE = "c"
    UPDATE = "u"
    DELETE = "d"
    READ = "r"  # snapshot row
    TRUNCATE = "t"


class _Unchanged:
    """Marks a column whose value the source did not send (an unchanged TOASTed value).

    It is not NULL: a sink must keep the value it already stores.
    """

    _instance: _Unchanged | None = None

    def __new__(cls) -> _Unchanged:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED"

    def __reduce__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Any = _Unchanged()

# A row in PostgreSQL's text representation: one entry per column, None for NULL,
# UNCHANGED for an unchanged TOASTed value. This is the shape that crosses the wire.
TextRow = tuple[str | None, ...]


@dataclass(frozen=True, slots=True)
class Column:
    """One column of a source table.

    `type_name` is the source's own type text (`source_type`: ``numeric(12,2)``,
    ``DATETIME(6)``), used for same-engine DDL; `type_oid` the PostgreSQL type OID (0 for
    other engines). `logical_type` is the neutral type (domain.types) in its text form;
    empty means "derive it from the PostgreSQL type", which is what PostgreSQL sources do.
    """

    name: str
    type_oid: int
    type_name: str
    is_key: bool = False
    logical_type: str = ""

    @property
    def source_type(self) -> str:
        return self.type_name

    @property
    def logical(self) -> LogicalType:
        if self.logical_type:
            return LogicalType.parse(self.logical_type)
        return from_postgres(self.type_oid, self.type_name)


@dataclass(frozen=True, slots=True)
class TableSchema:
    """The shape of one source table as the source last described it."""

    schema: str
    table: str
    columns: tuple[Column, ...]

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.table}"

    @property
    def key_columns(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns if c.is_key)

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)


def _type_differs(old: Column, new: Column) -> bool:
    """Another type, or the same type with another modifier (varchar(10) -> varchar(20))
    when both names are known."""
    if old.type_oid != new.type_oid:
        return True
    return bool(old.type_name and new.type_name and old.type_name != new.type_name)


@dataclass(frozen=True, slots=True)
class SchemaChange:
    """A table's shape differs from the one last seen: columns added, dropped or retyped.

    `previous` is None the first time a table is seen in this process; that is not a
    change and `is_change` is False for it.
    """

    previous: TableSchema | None
    current: TableSchema

    @property
    def added(self) -> tuple[str, ...]:
        if self.previous is None:
            return ()
        old = set(self.previous.column_names)
        return tuple(c.name for c in self.current.columns if c.name not in old)

    @property
    def dropped(self) -> tuple[str, ...]:
        if self.previous is None:
            return ()
        new = set(self.current.column_names)
        return tuple(c.name for c in self.previous.columns if c.name not in new)

    @property
    def retyped(self) -> tuple[str, ...]:
        if self.previous is None:
            return ()
        old = {c.name: c for c in self.previous.columns}
        return tuple(
            c.name for c in self.current.columns if c.name in old and _type_differs(old[c.name], c)
        )

    @property
    def is_change(self) -> bool:
        return bool(self.added or self.dropped or self.retyped)


@dataclass(frozen=True, slots=True, order=True)
class Position:
    """A totally ordered, replay-stable place in one transport partition.

    `major` is the transport's own position (the commit LSN of the transaction for the
    WAL reader, the offset for Kafka); `minor` orders events sharing it (the index of the
    change inside its transaction). Replaying the transport yields the same positions,
    which is what lets sinks skip what they already applied.
    """

    major: int
    minor: int = 0

    def __str__(self) -> str:
        return f"{self.major}:{self.minor}"


class SourceEvent:
    """One row change.

    `before` and `after` hold the row in PostgreSQL text form (see TextRow);
    `domain.pgtypes.row_to_python` converts them to Python values by type. Keeping the
    text form lets the hot path avoid per-value conversion when the destination accepts
    text (COPY into PostgreSQL).

    A row may instead be given in its wire encoding (`before_wire` / `after_wire`: the
    TupleData bytes of `domain.rows`, as the WAL reader receives them); it is then decoded
    on first access of `before` / `after` only, so a stage that just passes the row on
    never decodes it (`before_wire` / `after_wire` stay available for that). Assigning
    `before` / `after` drops the wire form. Equality, repr and pickling see the decoded
    rows, as for any other event.
    """

    __slots__ = (
        "_after",
        "_after_wire",
        "_before",
        "_before_wire",
        "commit_time_us",
        "extra",
        "operation",
        "position",
        "source_database",
        "table",
        "transaction_id",
    )

    _FIELDS: ClassVar[tuple[str, ...]] = (
        "operation",
        "table",
        "position",
        "before",
        "after",
        "commit_time_us",
        "transaction_id",
        "source_database",
        "extra",
    )

    def __init__(
        self,
        operation: Operation,
        table: TableSchema,
        position: Position,
        before: TextRow | None = None,
        after: TextRow | None = None,
        commit_time_us: int = 0,
        transaction_id: int = 0,
        source_database: str = "",
        extra: dict[str, Any] | None = None,
        *,
        before_wire: bytes | None = None,
        after_wire: bytes | None = None,
    ) -> None:
        if (before is not None and before_wire is not None) or (
            after is not None and after_wire is not None
        ):
            raise ValueError("give a row either decoded or in its wire form, not both")
        self.operation = operation
        self.table = table
        self.position = position
        self._before = before
        self._after = after
        self._before_wire = before_wire
        self._after_wire = after_wire
        self.commit_time_us = commit_time_us
        self.transaction_id = transaction_id
        self.source_database = source_database
        self.extra: dict[str, Any] = {} if extra is None else extra

    @property
    def before(self) -> TextRow | None:
        row = self._before
        if row is None and self._before_wire is not None:
            row = self._before = _decode_wire(self._before_wire)
        return row

    @before.setter
    def before(self, row: TextRow | None) -> None:
        self._before = row
        self._before_wire = None

    @property
    def after(self) -> TextRow | None:
        row = self._after
        if row is None and self._after_wire is not None:
            row = self._after = _decode_wire(self._after_wire)
        return row

    @after.setter
    def after(self, row: TextRow | None) -> None:
        self._after = row
        self._after_wire = None

    @property
    def before_wire(self) -> bytes | None:
        """The `before` row's wire encoding if the event was made from it, else None."""
        return self._before_wire

    @property
    def after_wire(self) -> bytes | None:
        """The `after` row's wire encoding if the event was made from it, else None."""
        return self._after_wire

    @property
    def has_before(self) -> bool:
        return self._before is not None or self._before_wire is not None

    @property
    def has_after(self) -> bool:
        return self._after is not None or self._after_wire is not None

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._FIELDS)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, SourceEvent)
        return self._values() == other._values()

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it replaced

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={v!r}" for n, v in zip(self._FIELDS, self._values(), strict=True))
        return f"SourceEvent({fields})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (SourceEvent, self._values())

    @property
    def key(self) -> dict[str, str | None]:
        """The key columns of the row (from `after`, or `before` for deletes)."""
        row = self.after if self.has_after else self.before
        if row is None:
            return {}
        return {
            c.name: row[i] for i, c in enumerate(self.table.columns) if c.is_key and i < len(row)
        }


def _decode_wire(data: bytes) -> TextRow:
    from domain.rows import decode_row  # rows.py imports this module

    return decode_row(data)[0]
