"""The applied position per lane, stored in the target database with the rows it covers.

`<target_schema>._cdc_offsets` holds one row per (pipeline, sink, lane) (the column is
still called `partition`). A write locks the rows of its lanes, skips what is at or below
each lane's stored position (a replay), and saves the new positions in the same
transaction as the rows: the sink's exactly-once effect.
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
        row = await cur.fetchone()
        return position_of(row[1:] if row is not None else None)

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
        lanes: Sequence[str],
        apply: Callable[[dict[str, Position | None]], Awaitable[dict[str, Position]]],
    ) -> None:
        """One transaction around the offsets rows of `lanes`: BEGIN goes with the rows'
        locks (taken in lane order, so writers of overlapping lanes cannot deadlock) and the
        applied positions are read; `apply(applied)` writes what is newer and returns the
        last position it wrote per lane (empty: nothing); those are saved with the COMMIT
        (simple-query statements sent together, few round trips). Any error rolls the whole
        transaction back."""
        ordered = sorted(set(lanes))
        try:
            cur = await conn.execute(self._begin_lock_sql(ordered), prepare=False)
            cur.nextset()  # the first result is BEGIN's
            applied: dict[str, Position | None] = {
                str(row[0]): position_of(row[1:]) for row in await cur.fetchall()
            }
            last = await apply(applied)
            if last:
                await conn.execute(self._save_commit_sql(last), prepare=False)
                applied.update(last)
            else:
                await conn.execute("COMMIT", prepare=False)
        except BaseException:
            await rollback(conn)
            raise
        for lane, position in applied.items():
            self.remember(lane, position)

    def _lock_statement(self, *values: sql.Composable) -> sql.Composed:
        return self._lock_rows([sql.SQL("({}, {}, {}, now())").format(*values)])

    def _lock_rows(self, rows: Sequence[sql.Composable]) -> sql.Composed:
        return sql.SQL(
            "INSERT INTO {} AS o (pipeline_id, sink_id, partition, updated_at)"
            " VALUES {}"
            " ON CONFLICT (pipeline_id, sink_id, partition)"
            " DO UPDATE SET updated_at = o.updated_at"
            " RETURNING partition, major, minor"
        ).format(self._table, sql.SQL(", ").join(rows))

    def _begin_lock_sql(self, lanes: Sequence[str]) -> sql.Composed:
        """BEGIN, then the lock statement with its values inlined (one simple query)."""
        pipeline, sink = sql.Literal(self._pipeline_id), sql.Literal(self._sink_id)
        rows = [
            sql.SQL("({}, {}, {}, now())").format(pipeline, sink, sql.Literal(lane))
            for lane in lanes
        ]
        return sql.SQL("BEGIN; {}").format(self._lock_rows(rows))

    def _save_commit_sql(self, positions: dict[str, Position]) -> sql.Composed:
        """`save`'s UPDATE per lane with its values inlined, then COMMIT."""
        updates = [
            sql.SQL(
                "UPDATE {} SET major = {}, minor = {}, updated_at = now()"
                " WHERE pipeline_id = {} AND sink_id = {} AND partition = {}"
            ).format(
                self._table,
                sql.Literal(position.major),
                sql.Literal(position.minor),
                sql.Literal(self._pipeline_id),
                sql.Literal(self._sink_id),
                sql.Literal(lane),
            )
            for lane, position in sorted(positions.items())
        ]
        return sql.SQL("{}; COMMIT").format(sql.SQL("; ").join(updates))
