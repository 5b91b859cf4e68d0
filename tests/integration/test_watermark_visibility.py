"""The watermarked chunk read (adapters/postgres/source/watermark.py) against real PostgreSQL:
a transaction still running when the low watermark is written must be visible to the chunk
(or its changes come after the low watermark and are taken out of the chunk by the
stream), whatever its transaction id.

The newest transaction's id is at or above every snapshot's xmax, so a snapshot's
in-progress list (`pg_snapshot_xip`) does not name it: the reader used that list and read
the chunk without waiting for a transaction that had written its commit record before the
low watermark but was not visible yet, so a row it deleted came back from the chunk (the
flaky `test_backfill_during_update_storm_repairs_the_sink`). A transaction cannot be held
between its commit record and its visibility from a test, so this test holds one open
instead: the chunk read must wait for it just the same."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest

from adapters.postgres.source.catalog import snapshot_schema
from adapters.postgres.source.snapshot import BACKFILL, TableProgress
from adapters.postgres.source.watermark import WatermarkChunker, running_xids
from tests.support.postgres import PgTestContext

pytestmark = pytest.mark.integration


def _xid32(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute("SELECT (pg_current_xact_id()::text::bigint % 4294967296)::text").fetchone()
    assert row is not None
    return str(row[0])


def test_the_newest_running_transaction_is_known_whatever_its_id(pg: PgTestContext) -> None:
    db = pg.new_database("wm")
    holder = pg.connect(db, autocommit=False)
    xid = _xid32(holder)  # assigned now: the newest transaction id of the server

    async def running() -> set[str]:
        async with await psycopg.AsyncConnection.connect(pg.dsn(db), autocommit=True) as c:
            return await running_xids(c)

    assert xid in asyncio.run(running())
    holder.rollback()
    assert xid not in asyncio.run(running())


def test_a_chunk_is_read_only_once_transactions_running_at_the_low_watermark_ended(
    pg: PgTestContext,
) -> None:
    db = pg.new_database("wm")
    with psycopg.connect(pg.dsn(db), autocommit=True) as conn:
        conn.execute("CREATE TABLE public.t (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO public.t SELECT g, 'v' || g FROM generate_series(1, 10) g")
    deleting = pg.connect(db, autocommit=False)
    deleting.execute("DELETE FROM public.t WHERE id = 5")  # running, the newest xid

    async def scenario() -> tuple[list[Any], float]:
        async with await psycopg.AsyncConnection.connect(pg.dsn(db), autocommit=True) as conn:
            schema = await snapshot_schema(conn, "public.t")
            chunker = WatermarkChunker(pg.dsn(db), "slot_x", 100, False)
            started = time.monotonic()
            reading = asyncio.create_task(
                chunker.read(conn, schema, TableProgress("public.t", BACKFILL))
            )
            await asyncio.sleep(0.5)
            assert not reading.done(), "the chunk was read while a transaction was running"
            deleting.commit()
            window = await asyncio.wait_for(reading, 10)
            assert window.rows is not None
            return window.rows, time.monotonic() - started

    rows, waited = asyncio.run(scenario())
    assert waited >= 0.5
    assert [r[0] for r in rows] == [str(i) for i in range(1, 11) if i != 5]
