"""What the two PostgreSQL dead-letter tables share as a `DeadLetterStore`: the direct
transport's (adapters/postgres/source/dead_letters.py) and the PostgreSQL sink's own
(adapters/postgres/sink/dead_letter_store.py). Both keep one row per change with a bigserial
``id``, ``pipeline_id`` and ``sink_id``; they differ in what a row holds and in how they
connect, so each says how to select and delete and this base turns `list / fetch / remove`
into those queries. Neutral ground: neither side of the adapter imports the other.
"""

from __future__ import annotations

import builtins
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from psycopg import sql

from domain.ports import StoredDeadLetter


def select_query(
    columns: str, table: sql.Identifier, where: sql.Composable, limit: int | None
) -> sql.Composed:
    """``SELECT <columns> FROM <table> WHERE <where> ORDER BY id [LIMIT n]``."""
    query = sql.SQL("SELECT " + columns + " FROM {} WHERE {} ORDER BY id").format(table, where)
    if limit is not None:
        query = sql.SQL("{} LIMIT {}").format(query, sql.Literal(int(limit)))
    return query


def delete_query(table: sql.Identifier) -> sql.Composed:
    """Deletes a pipeline's rows by id; parameters ``(pipeline_id, [ids])``."""
    return sql.SQL("DELETE FROM {} WHERE pipeline_id = %s AND id = ANY(%s)").format(table)


class PipelineDeadLetterRows(ABC):
    """`list / fetch / remove` of a pipeline's rows; subclasses run the queries."""

    pipeline_id: str

    async def list(
        self, sink_id: str | None = None, limit: int | None = None
    ) -> Sequence[StoredDeadLetter]:
        where: sql.Composable = sql.SQL("pipeline_id = %s")
        params: builtins.list[Any] = [self.pipeline_id]
        if sink_id is not None:
            where = sql.SQL("{} AND sink_id = %s").format(where)
            params.append(sink_id)
        return await self._select(where, params, limit)

    async def fetch(self, ids: Sequence[str]) -> Sequence[StoredDeadLetter]:
        numbers = _row_ids(ids)
        if not numbers:
            return []
        where = sql.SQL("pipeline_id = %s AND id = ANY(%s)")
        return await self._select(where, [self.pipeline_id, numbers], None)

    async def remove(self, ids: Sequence[str]) -> int:
        numbers = _row_ids(ids)
        if not numbers:
            return 0
        return await self._delete(numbers)

    @abstractmethod
    async def _select(
        self, where: sql.Composable, params: builtins.list[Any], limit: int | None
    ) -> builtins.list[StoredDeadLetter]:
        """The rows matching `where` (over `params`), oldest first, at most `limit`."""

    @abstractmethod
    async def _delete(self, numbers: builtins.list[int]) -> int:
        """Deletes this pipeline's rows with these ids (`delete_query`); how many went."""


def _row_ids(ids: Sequence[str]) -> list[int]:
    # Row ids are bigserials: anything else names no row.
    return [int(i) for i in ids if i.isdigit()]
