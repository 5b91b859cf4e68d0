"""The applied position per lane, stored in the target database with the rows it covers.

`<target_schema>._cdc_offsets` holds one row per (pipeline, sink, lane) (the column is
still called `partition`). A write locks the row of its lane, skips what is at or below
the stored position (a replay), and saves the new position in the same transaction as the
rows: the sink's exactly-once effect.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import psycopg
from psycopg import sql

from domain.events import Position

OFFSETS_TABLE: Final = "_cdc_offsets"


def create_offsets_table_sql(schema: str) -> sql.Composed:
    return sql.SQL(
        "CREATE TABLE IF NOT EXISTS {} ("
        " pipeline_id text NOT NULL,"
        " sink_id text NOT NULL,"
        " partition text NOT NULL,"
        " major numeric(20,0),"
        " minor bigint,"
        " updated_at timestamptz NOT NULL DEFAULT now(),"
        " PRIMARY KEY (pipeline_id, sink_id, partition))"
    ).format(sql.Identifier(schema, OFFSETS_TABLE))


def position_of(row: Sequence[Any] | None) -> Position | None:
    """The applied position of an offsets row (major, minor); None when nothing is applied."""
    if row is None or row[0] is None:
        return None
    return Position(int(row[0]), int(row[1] or 0))


async def rollback(conn: psycopg.AsyncConnection[Any]) -> None:
    """End a transaction the fast path left open (after an error). A connection still busy
    with a query (cancelled mid-way) is left to the pool, which discards it."""
    status = conn.info.transaction_status
    if status in (psycopg.pq.TransactionStatus.INTRANS, psycopg.pq.TransactionStatus.INERROR):
        with contextlib.suppress(Exception):
            await conn.execute("ROLLBACK", prepare=False)


class Offsets:
    """The offsets rows of one (pipeline, sink), and the applied positions this process
    wrote or read (`applied`, by lane)."""

    def __init__(self, schema: str, pipeline_id: str, sink_id: str) -> None:
        self._table = sql.Identifier(schema, OFFSETS_TABLE)
        self._pipeline_id = pipeline_id
        self._sink_id = sink_id
        self.applied: dict[str, Position] = {}

    def remember(self, lane: str, applied: Position | None) -> None:
        if applied is not None:
            self.applied[lane] = applied

    async def hint(self, conn: psycopg.AsyncConnection[Any], lane: str) -> Position | None:
        """The applied position as last seen (read once per lane, without a lock): only used
        to leave events that are certainly replays out of column type changes."""
        known = self.applied.get(lane)
        if known is not None:
            return known
        cur = await conn.execute(
            sql.SQL(
                "SELECT major, minor FROM {} WHERE pipeline_id = %s AND sink_id = %s"
                " AND partition = %s"
            ).format(self._table),
            (self._pipeline_id, self._sink_id, lane),
        )
        position = position_of(await cur.fetchone())
        self.remember(lane, position)
        return position

    async def lock(self, conn: psycopg.AsyncConnection[Any], lane: str) -> Position | None:
        """Create-or-lock this lane's offsets row (inside the caller's transaction) and
        return its applied position."""
        placeholders = (sql.Placeholder(), sql.Placeholder(), sql.Placeholder())
        cur = await conn.execute(
            self._lock_statement(*placeholders), (self._pipeline_id, self._sink_id, lane)
        )
        return position_of(await cur.fetchone())

    async def save(self, conn: psycopg.AsyncConnection[Any], lane: str, position: Position) -> None:
        await conn.execute(
            sql.SQL(
                "UPDATE {} SET major = %s, minor = %s, updated_at = now()"
                " WHERE pipeline_id = %s AND sink_id = %s AND partition = %s"
            ).format(self._table),
            (position.major, position.minor, self._pipeline_id, self._sink_id, lane),
        )

    async def positioned_transaction(
        self,
        conn: psycopg.AsyncConnection[Any],
        lane: str,
        apply: Callable[[Position | None], Awaitable[Position | None]],
    ) -> None:
        """One transaction around the offsets row of `lane`: BEGIN goes with the row's
        lock and the applied position is read; `apply(applied)` writes what is newer and
        returns the last position it wrote (None: nothing); that position is saved with the
        COMMIT (simple-query statements sent together, few round trips). Any error rolls
        the whole transaction back."""
        try:
            cur = await conn.execute(self._begin_lock_sql(lane), prepare=False)
            cur.nextset()  # the first result is BEGIN's
            applied = position_of(await cur.fetchone())
            last = await apply(applied)
            if last is not None:
                await conn.execute(self._save_commit_sql(lane, last), prepare=False)
                applied = last
            else:
                await conn.execute("COMMIT", prepare=False)
        except BaseException:
            await rollback(conn)
            raise
        self.remember(lane, applied)

    def _lock_statement(self, *values: sql.Composable) -> sql.Composed:
        return sql.SQL(
            "INSERT INTO {} AS o (pipeline_id, sink_id, partition, updated_at)"
            " VALUES ({}, {}, {}, now())"
            " ON CONFLICT (pipeline_id, sink_id, partition)"
            " DO UPDATE SET updated_at = o.updated_at"
            " RETURNING major, minor"
        ).format(self._table, *values)

    def _begin_lock_sql(self, lane: str) -> sql.Composed:
        """BEGIN, then the lock statement with its values inlined (one simple query)."""
        return sql.SQL("BEGIN; {}").format(
            self._lock_statement(
                sql.Literal(self._pipeline_id), sql.Literal(self._sink_id), sql.Literal(lane)
            )
        )

    def _save_commit_sql(self, lane: str, position: Position) -> sql.Composed:
        """`save`'s UPDATE with its values inlined, then COMMIT."""
        return sql.SQL(
            "UPDATE {} SET major = {}, minor = {}, updated_at = now()"
            " WHERE pipeline_id = {} AND sink_id = {} AND partition = {}; COMMIT"
        ).format(
            self._table,
            sql.Literal(position.major),
            sql.Literal(position.minor),
            sql.Literal(self._pipeline_id),
            sql.Literal(self._sink_id),
            sql.Literal(lane),
        )
