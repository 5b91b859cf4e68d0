"""The PostgreSQL sink's own dead letters (``<target_schema>._cdc_dead_letters``, written in
the same transaction as its rows: adapters/postgres/sink/dead_letter.py) as a
`DeadLetterStore`.

That table keeps rows as ``{column: text}`` without types; the change is rebuilt against the
table's shape in the source database now (a column the source no longer has is dropped; a
column left out of the stored row was an unchanged TOASTed value and stays unchanged).
"""

from __future__ import annotations

import builtins
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg import sql

from adapters.postgres.dead_letter_rows import PipelineDeadLetterRows, delete_query, select_query
from adapters.postgres.sink.dead_letter import DEAD_LETTER_TABLE
from domain.events import UNCHANGED, Column, Operation, Position, SourceEvent, TableSchema
from domain.ports import StoredDeadLetter

_TEXT_OID = 25


class PostgresSinkDeadLetters(PipelineDeadLetterRows):
    def __init__(
        self,
        sink_conninfo: str,
        schema: str,
        pipeline_id: str,
        describe: Callable[[str], Awaitable[TableSchema]],
    ) -> None:
        """`describe("schema.table")`: the table's shape at the source now (raises when it
        is gone)."""
        self._conninfo = sink_conninfo
        self.schema = schema
        self.pipeline_id = pipeline_id
        self._describe = describe
        self._shapes: dict[str, TableSchema] = {}

    @property
    def location(self) -> str:
        return f"postgres sink table {self.schema}.{DEAD_LETTER_TABLE}"

    def _table(self) -> sql.Identifier:
        return sql.Identifier(self.schema, DEAD_LETTER_TABLE)

    async def _delete(self, numbers: builtins.list[int]) -> int:
        async with await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True) as c:
            cur = await c.execute(delete_query(self._table()), (self.pipeline_id, numbers))
            return cur.rowcount

    async def close(self) -> None:
        return None

    async def _select(
        self, where: sql.Composable, params: builtins.list[Any], limit: int | None
    ) -> builtins.list[StoredDeadLetter]:
        query = select_query(
            "id, sink_id, partition, major, minor, table_name, operation, row, before, error,"
            " created_at",
            self._table(),
            where,
            limit,
        )
        async with await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True) as c:
            try:
                rows = await (await c.execute(query, params)).fetchall()
            except psycopg.errors.UndefinedTable:
                return []
        out = []
        for r in rows:
            shape = await self._shape(r[5], r[7], r[8])
            op = Operation(r[6])
            main = _row(shape, r[7])
            before = _row(shape, r[8])
            event = SourceEvent(
                op,
                shape,
                Position(int(r[3]), int(r[4])),
                before=main if op is Operation.DELETE else before,
                after=None if op is Operation.DELETE else main,
            )
            out.append(
                StoredDeadLetter(
                    id=str(r[0]),
                    pipeline_id=self.pipeline_id,
                    sink_id=r[1],
                    lane=r[2],
                    event=event,
                    error_class="postgres sink",
                    error=r[9],
                    attempts=1,
                    created_at=r[10],
                    location=self.location,
                )
            )
        return out

    async def _shape(self, qualified: str, *rows: dict[str, Any] | None) -> TableSchema:
        shape = self._shapes.get(qualified)
        if shape is None:
            try:
                shape = await self._describe(qualified)
            except (psycopg.Error, ValueError):
                # Gone from the source: text columns named as stored, no key known.
                schema, _, table = qualified.partition(".")
                names = list(dict.fromkeys(n for row in rows if row for n in row))
                shape = TableSchema(
                    schema, table, tuple(Column(n, _TEXT_OID, "text") for n in names)
                )
            self._shapes[qualified] = shape
        return shape


def _row(shape: TableSchema, values: dict[str, Any] | None) -> tuple[Any, ...] | None:
    if values is None:
        return None
    return tuple(values.get(c.name, UNCHANGED) for c in shape.columns)
