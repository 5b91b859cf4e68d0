"""What the parts of the WAL reader share: its settings, its state and its connections.

The reader (`reader.py`: the replication loop, acks) is assembled from rooms that work on
this one state: `setup.py` (the slot and the snapshot plan, at start) and `jobs.py` (the
background work while streaming: heartbeats, signals, watermarked chunk reads).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import psycopg

from adapters.postgres.source.catalog import format_lsn, reader_conninfo
from adapters.postgres.source.provisioner import PostgresProvisioner
from adapters.postgres.source.snapshot import TableProgress
from adapters.postgres.source.watermark import WatermarkChunker
from domain.events import SchemaChange


@dataclass(frozen=True, slots=True)
class WalReaderSettings:
    conninfo: str = field(repr=False)  # holds the password
    database: str
    tables: tuple[str, ...]
    slot_name: str
    publication_name: str
    snapshot_mode: str = "initial"
    status_interval_seconds: float = 10.0
    max_chunk_events: int = 2000
    # How long a partly filled chunk waits for more changes before it is handed on.
    max_chunk_delay_seconds: float = 0.02
    reconnect_initial_seconds: float = 0.5
    reconnect_max_seconds: float = 30.0
    heartbeat_mode: str = "message"  # message | table | none
    heartbeat_interval_seconds: float = 10.0
    snapshot_chunk_size: int = 10000
    snapshot_parallelism: int = 2


@dataclass(frozen=True, slots=True)
class ReaderCheckpoint:
    """A position plus the snapshot/backfill progress reached with it.

    `lsn` None: nothing to confirm on the slot yet (a chunk of the initial snapshot).
    `progress` is cumulative (every table's state), so committing only the newest of
    several checkpoints loses nothing.
    """

    lsn: int | None
    progress: tuple[TableProgress, ...]


class ReaderBase:
    def __init__(self, settings: WalReaderSettings) -> None:
        self.settings = settings
        self._conninfo = reader_conninfo(settings.conninfo)
        self.provisioner = PostgresProvisioner(
            self._conninfo, settings.slot_name, settings.publication_name, settings.tables
        )
        self._repl: psycopg.AsyncConnection[Any] | None = None
        self._admin: psycopg.AsyncConnection[Any] | None = None
        self._confirmed_lsn = 0
        self._received_lsn = 0
        self._snapshot: tuple[str, int] | None = None  # (exported snapshot name, consistent lsn)
        self._stopping = asyncio.Event()
        self._last_error: str | None = None
        self._streaming = False
        # For confirming on keepalives: whether a snapshot is still in flight. Nothing may
        # be confirmed past unhandled events.
        self._snapshot_in_flight = False
        self._snapshot_lsn = 0
        # Snapshot/backfill progress: as handed out with events, and as committed.
        self._progress: dict[tuple[str, str], TableProgress] = {}
        self._committed_progress: dict[tuple[str, str], TableProgress] = {}
        self._snapshot_running = False
        self._jobs: deque[TableProgress] = deque()
        self._jobs_added = asyncio.Event()
        self._chunker: WatermarkChunker | None = None
        self._added_columns: list[SchemaChange] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._source_checked = False

    def _checkpoint(self, lsn: int) -> Any:
        """The plain LSN, or the LSN with progress when progress awaits committing."""
        if self._progress != self._committed_progress:
            return ReaderCheckpoint(lsn, tuple(self._progress.values()))
        return lsn

    def _queue_job(self, progress: TableProgress) -> None:
        self._jobs.append(progress)
        self._jobs_added.set()

    async def _mark_snapshot(
        self, status: str, lsn: int, conn: psycopg.AsyncConnection[Any]
    ) -> None:
        await conn.execute(
            "INSERT INTO cdc_platform.snapshot_state (slot_name, status, consistent_lsn)"
            " VALUES (%s, %s, %s::pg_lsn) ON CONFLICT (slot_name) DO UPDATE"
            " SET status = EXCLUDED.status, consistent_lsn = EXCLUDED.consistent_lsn,"
            " updated_at = now()",
            (self.settings.slot_name, status, format_lsn(lsn)),
        )

    async def _admin_conn(self) -> psycopg.AsyncConnection[Any]:
        if self._admin is None or self._admin.closed:
            self._admin = await psycopg.AsyncConnection.connect(
                self._conninfo, autocommit=True, connect_timeout=10
            )
        return self._admin

    async def _close_repl(self) -> None:
        if self._repl is not None:
            with contextlib.suppress(Exception):
                await self._repl.close()
        self._repl = None
        if self._admin is not None:
            with contextlib.suppress(Exception):
                await self._admin.close()
        self._admin = None

    async def _sleep_or_stop(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):  # not wait_for: it can swallow a cancel
                await self._stopping.wait()
