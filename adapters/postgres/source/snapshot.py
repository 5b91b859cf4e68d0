"""Chunked table reads for snapshots and backfills, and the progress they checkpoint.

A table is read in primary-key order, `chunk_size` rows at a time, with keyset
pagination (`WHERE (k1, k2) > (last) ORDER BY k1, k2 LIMIT n`), so every chunk is an
index range scan and the last key of a chunk is all it takes to resume. Rows come back
in PostgreSQL's text format through COPY, the same representation pgoutput sends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import psycopg
from psycopg import sql

from adapters.postgres.source.catalog import split_table
from domain.events import TableSchema, TextRow

SNAPSHOT = "snapshot"
BACKFILL = "backfill"


@dataclass(frozen=True, slots=True)
class TableProgress:
    """How far the snapshot (or a backfill) of one table got.

    `last_key` is the primary key of the last row read, in text form; None before the
    first chunk. `job_id` is the signal that asked for a backfill (0 for the snapshot).
    """

    table: str
    kind: str = SNAPSHOT
    last_key: tuple[str | None, ...] | None = None
    rows: int = 0
    done: bool = False
    job_id: int = 0

    def advanced(
        self, rows: Sequence[TextRow], key_idx: tuple[int, ...], chunk_size: int
    ) -> TableProgress:
        """The progress after reading `rows` as the next chunk."""
        if not rows:
            return replace(self, done=True)
        last = rows[-1]
        return replace(
            self,
            last_key=tuple(last[i] for i in key_idx),
            rows=self.rows + len(rows),
            done=len(rows) < chunk_size or not key_idx,
        )


def key_indexes(schema: TableSchema) -> tuple[int, ...]:
    return tuple(i for i, c in enumerate(schema.columns) if c.is_key)


def chunk_query(
    schema: TableSchema, after_key: Sequence[str | None] | None, limit: int | None
) -> sql.Composed:
    """COPY of the next chunk. A table without a primary key is read whole (limit None)."""
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in schema.column_names)
    keys = [c for c in schema.columns if c.is_key]
    table = sql.Identifier(*split_table(schema.qualified_name))
    if not keys:
        return sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT").format(columns, table)
    key_list = sql.SQL(", ").join(sql.Identifier(c.name) for c in keys)
    where: sql.Composable = sql.SQL("")
    if after_key is not None:
        bounds = sql.SQL(", ").join(
            sql.SQL("CAST({} AS {})").format(sql.Literal(value), sql.SQL(c.type_name))
            for value, c in zip(after_key, keys, strict=True)
        )
        where = sql.SQL(" WHERE ({}) > ({})").format(key_list, bounds)
    limit_sql: sql.Composable = (
        sql.SQL(" LIMIT {}").format(sql.Literal(limit)) if limit else sql.SQL("")
    )
    return sql.SQL("COPY (SELECT {} FROM {}{} ORDER BY {}{}) TO STDOUT").format(
        columns, table, where, key_list, limit_sql
    )


async def read_chunk(
    conn: psycopg.AsyncConnection[Any],
    schema: TableSchema,
    after_key: Sequence[str | None] | None,
    chunk_size: int,
) -> list[TextRow]:
    query = chunk_query(schema, after_key, chunk_size if schema.key_columns else None)
    rows: list[TextRow] = []
    async with conn.cursor().copy(query) as copy:
        async for row in copy.rows():
            rows.append(row)
    return rows


# -- progress -------------------------------------------------------------------------


async def load_progress(
    conn: psycopg.AsyncConnection[Any], slot: str
) -> dict[tuple[str, str], TableProgress]:
    rows = await (
        await conn.execute(
            "SELECT table_name, kind, last_key, rows_read, done, job_id"
            " FROM cdc_platform.snapshot_progress WHERE slot_name = %s",
            (slot,),
        )
    ).fetchall()
    return {
        (r[1], r[0]): TableProgress(
            r[0], r[1], tuple(r[2]) if r[2] is not None else None, r[3], r[4], r[5]
        )
        for r in rows
    }


async def save_progress(
    conn: psycopg.AsyncConnection[Any], slot: str, entries: Iterable[TableProgress]
) -> None:
    params = [
        (
            slot,
            e.table,
            e.kind,
            list(e.last_key) if e.last_key is not None else None,
            e.rows,
            e.done,
            e.job_id,
        )
        for e in entries
    ]
    if not params:
        return
    async with conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO cdc_platform.snapshot_progress"
            " (slot_name, table_name, kind, last_key, rows_read, done, job_id)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (slot_name, kind, table_name) DO UPDATE SET"
            " last_key = EXCLUDED.last_key, rows_read = EXCLUDED.rows_read,"
            " done = EXCLUDED.done, job_id = EXCLUDED.job_id, updated_at = now()",
            params,
        )


async def clear_progress(conn: psycopg.AsyncConnection[Any], slot: str) -> None:
    await conn.execute("DELETE FROM cdc_platform.snapshot_progress WHERE slot_name = %s", (slot,))


# -- the initial snapshot from the slot's exported snapshot -----------------------------


@dataclass(slots=True)
class ChunkRead:
    schema: TableSchema
    rows: list[TextRow]
    progress: TableProgress


async def read_exported_snapshot(
    conninfo: str,
    snapshot_name: str,
    schemas: Sequence[TableSchema],
    chunk_size: int,
    parallelism: int,
) -> AsyncIterator[ChunkRead]:
    """Read every table as of the slot's exported snapshot, `parallelism` tables at a time.

    Each worker imports the snapshot into its own REPEATABLE READ transaction, so all of
    them see exactly the data as of the slot's consistent point. Chunks come out in the
    order they finish; within a table they are in key order.
    """
    queue: asyncio.Queue[ChunkRead | BaseException | None] = asyncio.Queue(maxsize=parallelism)
    pending = list(schemas)

    async def worker() -> None:
        try:
            conn = await psycopg.AsyncConnection.connect(conninfo, connect_timeout=10)
            async with conn, conn.transaction():
                await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                await conn.execute(
                    sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_name))
                )
                while pending:
                    schema = pending.pop(0)
                    await _read_table(conn, schema, chunk_size, queue)
            await queue.put(None)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            await queue.put(exc)

    workers = [asyncio.create_task(worker()) for _ in range(min(parallelism, len(schemas)))]
    running = len(workers)
    try:
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in workers:
            task.cancel()
        for task in workers:
            with contextlib.suppress(BaseException):
                await task


async def _read_table(
    conn: psycopg.AsyncConnection[Any],
    schema: TableSchema,
    chunk_size: int,
    queue: asyncio.Queue[ChunkRead | BaseException | None],
) -> None:
    key_idx = key_indexes(schema)
    progress = TableProgress(schema.qualified_name)
    if not key_idx:
        # No key to resume from: one pass, handed on in pieces; done only at the end.
        piece: list[TextRow] = []
        async with conn.cursor().copy(chunk_query(schema, None, None)) as copy:
            async for row in copy.rows():
                piece.append(row)
                if len(piece) >= chunk_size:
                    progress = replace(progress, rows=progress.rows + len(piece))
                    await queue.put(ChunkRead(schema, piece, progress))
                    piece = []
        progress = replace(progress, rows=progress.rows + len(piece), done=True)
        await queue.put(ChunkRead(schema, piece, progress))
        return
    while not progress.done:
        rows = await read_chunk(conn, schema, progress.last_key, chunk_size)
        progress = progress.advanced(rows, key_idx, chunk_size)
        await queue.put(ChunkRead(schema, rows, progress))
