"""The signal table `cdc_platform.signals`: how operators ask a running reader for work.

`cdc backfill` (or anyone with INSERT on the table) adds a row; the reader polls for rows
of its slot it has not started, and stamps `started_at`, `finished_at`, `rows_read` or
`error` as the work proceeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from adapters.postgres.source.catalog import ensure_state_table


@dataclass(frozen=True, slots=True)
class Signal:
    id: int
    tables: tuple[str, ...]
    started_at: datetime | None = None
    finished_at: datetime | None = None
    rows_read: int | None = None
    error: str | None = None


async def request_backfill(
    conn: psycopg.AsyncConnection[Any], slot: str, tables: Sequence[str]
) -> int:
    await ensure_state_table(conn)
    row = await (
        await conn.execute(
            "INSERT INTO cdc_platform.signals (slot_name, kind, tables)"
            " VALUES (%s, 'backfill', %s) RETURNING id",
            (slot, list(tables)),
        )
    ).fetchone()
    assert row is not None
    return int(row[0])


async def signal_status(conn: psycopg.AsyncConnection[Any], signal_id: int) -> Signal | None:
    row = await (
        await conn.execute(
            "SELECT id, tables, started_at, finished_at, rows_read, error"
            " FROM cdc_platform.signals WHERE id = %s",
            (signal_id,),
        )
    ).fetchone()
    return Signal(row[0], tuple(row[1]), *row[2:]) if row is not None else None


async def new_backfills(conn: psycopg.AsyncConnection[Any], slot: str) -> list[Signal]:
    rows = await (
        await conn.execute(
            "SELECT id, tables FROM cdc_platform.signals WHERE slot_name = %s"
            " AND kind = 'backfill' AND started_at IS NULL ORDER BY id",
            (slot,),
        )
    ).fetchall()
    return [Signal(r[0], tuple(r[1])) for r in rows]


async def mark_started(
    conn: psycopg.AsyncConnection[Any], signal_id: int, error: str | None = None
) -> None:
    """Stamp a signal as taken; with `error` it is also finished (refused)."""
    await conn.execute(
        "UPDATE cdc_platform.signals SET started_at = now(),"
        " finished_at = CASE WHEN %s::text IS NULL THEN NULL ELSE now() END, error = %s"
        " WHERE id = %s",
        (error, error, signal_id),
    )


async def mark_finished(conn: psycopg.AsyncConnection[Any], signal_id: int, rows: int) -> None:
    await conn.execute(
        "UPDATE cdc_platform.signals SET finished_at = now(), rows_read = %s"
        " WHERE id = %s AND finished_at IS NULL",
        (rows, signal_id),
    )
