"""Backfills while the stream keeps flowing: chunk reads bracketed by watermarks.

The scheme is DBLog's (Netflix, 2019). For each chunk:

1. write a low watermark into the WAL (`pg_logical_emit_message`, not transactional);
2. read the chunk (`SELECT ... ORDER BY pk LIMIT n`) with a fresh snapshot;
3. write a high watermark.

The stream reader sees both watermarks in WAL order. Every key changed by a transaction
that commits between them is dropped from the chunk: the stream carries a value at least
as new. What is left is emitted at the high watermark's place in the stream, so each row
of the chunk lands after every change older than the chunk and before every newer one;
an old snapshot copy never overwrites a newer change.

One subtlety: a transaction whose commit record precedes the low watermark may not yet be
visible to a snapshot taken right after it: a backend writes its commit record, waits for
the WAL flush, and only then leaves the ProcArray (its changes become visible), and only
after that releases the lock on its own transaction id. Its changes come before the low
watermark in the stream, so the chunk must see them. Before reading, we therefore wait
until every transaction that held its transaction id lock when the low watermark had been
written has released it; the chunk's snapshot, taken afterwards, sees all of them.

The set of those transactions comes from `pg_locks`, not from a snapshot's in-progress list
(`pg_snapshot_xip`): that list leaves out transaction ids at or above the snapshot's xmax
(the newest completed id + 1), so the newest transaction, committing at that very moment,
was missed; the chunk was read without its changes, and a row it deleted came back at the
high watermark (a flaky `test_backfill_during_update_storm_repairs_the_sink`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import structlog

from adapters.postgres.source.snapshot import TableProgress, key_indexes, read_chunk
from domain.events import SourceEvent, TableSchema, TextRow

log = structlog.get_logger(__name__)

WATERMARK_PREFIX = "cdc_platform.watermark"
_VISIBILITY_WAIT_SECONDS = 5.0


@dataclass(slots=True)
class Window:
    """One chunk between its watermarks."""

    id: str
    schema: TableSchema
    progress: TableProgress  # before this chunk
    key_idx: tuple[int, ...]
    opened: bool = False
    changed: set[tuple[str | None, ...]] = field(default_factory=set)
    rows: list[TextRow] | None = None
    result: TableProgress | None = None  # progress after the chunk, set when it closes
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def observe(self, events: Iterable[SourceEvent]) -> None:
        """Note the keys of stream events that fall inside the window."""
        name = self.schema.qualified_name
        idx = self.key_idx
        for event in events:
            if event.table.qualified_name != name:
                continue
            for row in (event.before, event.after):
                if row is not None:
                    self.changed.add(tuple(row[i] for i in idx))

    def surviving_rows(self) -> list[TextRow]:
        assert self.rows is not None
        if not self.changed:
            return self.rows
        idx = self.key_idx
        changed = self.changed
        return [r for r in self.rows if tuple(r[i] for i in idx) not in changed]


class WatermarkChunker:
    """Reads chunks for the stream reader to splice in at their high watermark."""

    def __init__(self, conninfo: str, slot: str, chunk_size: int, flush_arg: bool) -> None:
        self.conninfo = conninfo
        self.slot = slot
        self.chunk_size = chunk_size
        # PostgreSQL 17+ can flush a non-transactional message right away.
        self._emit = (
            "SELECT pg_logical_emit_message(false, %s, %s, true)"
            if flush_arg
            else "SELECT pg_logical_emit_message(false, %s, %s)"
        )
        self.window: Window | None = None

    def content(self, window: Window, edge: str) -> str:
        return f"{self.slot}:{window.id}:{edge}"

    def on_message(self, content: str) -> tuple[Window, str] | None:
        """The window and edge ('low'/'high') a watermark message belongs to, if ours."""
        window = self.window
        if window is None:
            return None
        parts = content.split(":")
        if len(parts) != 3 or parts[0] != self.slot or parts[1] != window.id:
            return None
        return window, parts[2]

    async def read(
        self, conn: psycopg.AsyncConnection[Any], schema: TableSchema, progress: TableProgress
    ) -> Window:
        """Write the low watermark, read the chunk, write the high watermark. The caller
        waits for `window.closed`, set once the stream has passed the high watermark."""
        window = Window(uuid.uuid4().hex[:12], schema, progress, key_indexes(schema))
        self.window = window
        await conn.execute(self._emit, (WATERMARK_PREFIX, self.content(window, "low")))
        await wait_for_running(conn, schema.qualified_name)
        async with conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            window.rows = await read_chunk(conn, schema, progress.last_key, self.chunk_size)
        await conn.execute(self._emit, (WATERMARK_PREFIX, self.content(window, "high")))
        return window


# Every transaction with a transaction id holds an exclusive lock on it until after it has
# become visible (or aborted): whatever its id, unlike a snapshot's in-progress list.
_RUNNING_XIDS = (
    "SELECT transactionid::text FROM pg_locks"
    " WHERE locktype = 'transactionid' AND mode = 'ExclusiveLock' AND granted"
)


async def running_xids(conn: psycopg.AsyncConnection[Any]) -> set[str]:
    """The ids of the transactions that have not ended yet (committed ones included until
    they are visible)."""
    return {r[0] for r in await (await conn.execute(_RUNNING_XIDS)).fetchall()}


async def wait_for_running(
    conn: psycopg.AsyncConnection[Any], table: str, limit: float = _VISIBILITY_WAIT_SECONDS
) -> None:
    """Wait (outside a transaction, at most `limit` seconds) until the transactions running
    now have ended, so that a snapshot taken afterwards sees every one of them."""
    running = await running_xids(conn)
    deadline = time.monotonic() + limit
    while running:
        running &= await running_xids(conn)
        if not running:
            return
        if time.monotonic() > deadline:
            # Long open transactions, which almost surely have not committed yet (a commit
            # takes moments to become visible; not so behind a synchronous standby that
            # does not answer): what they change then comes after the low watermark.
            log.warning("backfill.visibility_wait_expired", table=table, xids=sorted(running)[:10])
            return
        await asyncio.sleep(0.005)
