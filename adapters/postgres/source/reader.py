"""The `direct` transport's EventSource: PostgreSQL logical replication with pgoutput.

psycopg 3 has no replication API, but libpq's copy-both protocol works through
`conn.pgconn`: we send START_REPLICATION, read XLogData/keepalive frames with
`get_copy_data`, and answer with standby status updates carrying the flush LSN that the
ingest service confirmed (everything up to it is durable in every sink).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from struct import Struct
from typing import Any

import psycopg
import structlog
from psycopg import sql

from adapters.postgres.source.catalog import (
    describe_relation,
    ensure_publication,
    ensure_state_table,
    format_lsn,
    identity_problems,
    missing_generated_columns,
    parse_lsn,
    published_tables,
    reader_conninfo,
    snapshot_schema,
)
from adapters.postgres.source.pgoutput import (
    PG_EPOCH_OFFSET_US,
    CommitMarker,
    LogicalMessage,
    PgOutputDecoder,
)
from adapters.postgres.source.signals import mark_finished, mark_started, new_backfills
from adapters.postgres.source.snapshot import (
    BACKFILL,
    SNAPSHOT,
    TableProgress,
    clear_progress,
    load_progress,
    read_exported_snapshot,
    save_progress,
)
from adapters.postgres.source.watermark import WATERMARK_PREFIX, WatermarkChunker
from domain.events import (
    Operation,
    Position,
    SchemaChange,
    SourceEvent,
    TableSchema,
    TextRow,
)
from domain.health import ComponentHealth, Status
from domain.ports import SourceChunk

log = structlog.get_logger(__name__)

_XLOG_HEADER = Struct("!QQq")  # wal start, wal end, send time
_KEEPALIVE = Struct("!QqB")
_STATUS = Struct("!cQQQqB")
HEARTBEAT_PREFIX = "cdc_platform.heartbeat"
SIGNAL_POLL_SECONDS = 1.0


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


class PostgresWalSource:
    """EventSource over one replication slot. The slot name is the lane (one lane: the
    slot's changes are in commit order); ack handles are LSNs (or ReaderCheckpoints
    carrying snapshot progress), so only the newest of those released matters.

    Besides the stream it runs two background tasks while streaming: `_maintain`
    (heartbeats, polling the signal table for backfills) and `_run_jobs` (watermarked
    chunk reads of backfills and of a resumed snapshot).
    """

    def __init__(self, settings: WalReaderSettings) -> None:
        self.settings = settings
        self._conninfo = reader_conninfo(settings.conninfo)
        self.partition = settings.slot_name
        self._repl: psycopg.AsyncConnection[Any] | None = None
        self._admin: psycopg.AsyncConnection[Any] | None = None
        self._decoder = PgOutputDecoder(settings.database, describe=self._describe_cached)
        self._described: dict[int, list[tuple[str, bool]]] = {}
        self._confirmed_lsn = 0
        self._received_lsn = 0
        self._last_status_sent = 0.0
        self._snapshot: tuple[str, int] | None = None  # (exported snapshot name, consistent lsn)
        self._stopping = asyncio.Event()
        self._last_error: str | None = None
        self._streaming = False
        # For confirming on keepalives: the newest checkpoint handed out, and whether a
        # snapshot is still in flight. Nothing may be confirmed past unhandled events.
        self._highest_yielded_checkpoint = 0
        self._snapshot_in_flight = False
        self._snapshot_lsn = 0
        # Snapshot/backfill progress: as handed out with events, and as committed.
        self._progress: dict[tuple[str, str], TableProgress] = {}
        self._committed_progress: dict[tuple[str, str], TableProgress] = {}
        self._snapshot_running = False
        self._jobs: deque[TableProgress] = deque()
        self._jobs_added = asyncio.Event()
        self._chunker: WatermarkChunker | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._added_columns: list[SchemaChange] = []
        self._source_checked = False

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, reconcile the publication and slot; plan the snapshot. Retries with
        backoff while the database is unreachable."""
        await self._with_retry(self._prepare, "prepare")

    async def stop(self) -> None:
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks = []
        if self._repl is not None:
            with contextlib.suppress(Exception):
                self._send_status(force=True)
        for conn in (self._repl, self._admin):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
        self._repl = self._admin = None

    async def health(self) -> ComponentHealth:
        detail: dict[str, Any] = {
            "slot": self.settings.slot_name,
            "confirmed_flush_lsn": format_lsn(self._confirmed_lsn),
            "received_lsn": format_lsn(self._received_lsn),
            "streaming": self._streaming,
        }
        running = [p for p in self._progress.values() if not p.done]
        if running:
            detail["chunked_reads"] = {
                f"{p.kind}:{p.table}": {"rows": p.rows, "last_key": p.last_key} for p in running
            }
        if self._last_error is not None:
            detail["error"] = self._last_error
            return ComponentHealth("source", Status.ERROR, detail)
        return ComponentHealth("source", Status.OK, detail)

    async def ack(self, lane: str, handles: Sequence[Any]) -> None:
        """Every handle released for the lane, oldest first: positions and progress are
        cumulative, so the newest covers the others."""
        if handles:
            await self.commit(lane, handles[-1])

    async def commit(self, partition: str, checkpoint: Any) -> None:
        lsn: int | None
        if isinstance(checkpoint, ReaderCheckpoint):
            await self._commit_progress(checkpoint.progress)
            lsn = checkpoint.lsn
        else:
            lsn = int(checkpoint)
        if lsn is None:
            return
        if lsn > self._confirmed_lsn:
            self._confirmed_lsn = lsn
            if self._repl is not None and self._streaming:
                self._send_status(force=True)

    async def _commit_progress(self, progress: Sequence[TableProgress]) -> None:
        changed = [p for p in progress if self._committed_progress.get((p.kind, p.table)) != p]
        if not changed:
            return
        admin = await self._admin_conn()
        await save_progress(admin, self.settings.slot_name, changed)
        for p in changed:
            self._committed_progress[(p.kind, p.table)] = p
        for p in changed:
            if p.done:
                log.info(f"{p.kind}.table_done", table=p.table, rows=p.rows)
            if p.done and p.kind == BACKFILL and p.job_id:
                await self._finish_signal(admin, p.job_id)
        if self._snapshot_running and all(
            self._committed_progress.get((SNAPSHOT, t), TableProgress(t)).done
            for t in self.settings.tables
        ):
            await self._mark_snapshot("done", self._snapshot_lsn, conn=admin)
            self._snapshot_running = False
            self._snapshot_in_flight = False
            log.info("snapshot.done", slot=self.settings.slot_name)

    async def _finish_signal(self, admin: psycopg.AsyncConnection[Any], job_id: int) -> None:
        entries = [p for p in self._committed_progress.values() if p.job_id == job_id]
        if all(p.done for p in entries):
            rows = sum(p.rows for p in entries)
            await mark_finished(admin, job_id, rows)
            log.info("backfill.done", signal=job_id, rows=rows)

    def _checkpoint(self, lsn: int) -> Any:
        """The plain LSN, or the LSN with progress when progress awaits committing."""
        if self._progress != self._committed_progress:
            return ReaderCheckpoint(lsn, tuple(self._progress.values()))
        return lsn

    # -- reading -----------------------------------------------------------------------

    async def chunks(self) -> AsyncIterator[SourceChunk]:
        if self._snapshot is not None:
            async for chunk in self._exported_snapshot_chunks(*self._snapshot):
                yield chunk
            self._snapshot = None
        self._start_background()
        backoff = self.settings.reconnect_initial_seconds
        while not self._stopping.is_set():
            try:
                await self._start_replication()
                backoff = self.settings.reconnect_initial_seconds
                async for chunk in self._stream():
                    yield chunk
            except (psycopg.OperationalError, ConnectionError, OSError) as exc:
                self._streaming = False
                self._last_error = f"replication connection lost: {exc}".strip()
                log.warning("source.disconnected", error=str(exc), retry_in=backoff)
                await self._close_repl()
                await self._sleep_or_stop(backoff)
                backoff = min(backoff * 2, self.settings.reconnect_max_seconds)

    async def _stream(self) -> AsyncIterator[SourceChunk]:
        assert self._repl is not None
        pgconn = self._repl.pgconn
        decoder = self._decoder
        max_events = self.settings.max_chunk_events
        interval = self.settings.status_interval_seconds
        max_delay = self.settings.max_chunk_delay_seconds
        while not self._stopping.is_set():
            events: list[SourceEvent] = []
            checkpoint: Any = None
            first_at = 0.0
            while len(events) < max_events:
                nbytes, frame = pgconn.get_copy_data(1)
                if nbytes == 0:
                    if not events:
                        break
                    if not first_at:
                        first_at = time.monotonic()
                    remaining = max_delay - (time.monotonic() - first_at)
                    if remaining <= 0:
                        break
                    await self._wait_readable(pgconn, timeout=remaining)
                    continue
                if nbytes < 0:
                    raise psycopg.OperationalError(
                        pgconn.error_message.decode(errors="replace") or "replication stream ended"
                    )
                data = bytes(frame)
                if data[0] == 119:  # 'w' XLogData
                    _wal_start, wal_end, _ = _XLOG_HEADER.unpack_from(data, 1)
                    payload = data[25:]
                    if payload[0] == 82:  # 'R': look the columns up before decoding
                        await self._prefetch_relation(payload)
                    window = self._chunker.window if self._chunker is not None else None
                    seen = len(events)
                    marker = decoder.decode(payload, events)
                    if isinstance(marker, CommitMarker):
                        checkpoint = self._checkpoint(marker.end_lsn)
                    elif isinstance(marker, LogicalMessage) and not marker.transactional:
                        at = self._on_message(marker, events)
                        if at is not None:
                            checkpoint = at
                    if window is not None and window.opened and len(events) > seen:
                        window.observe(events[seen:])
                    if wal_end > self._received_lsn:
                        self._received_lsn = wal_end
                elif data[0] == 107:  # 'k' keepalive
                    wal_end, _, reply = _KEEPALIVE.unpack_from(data, 1)
                    self._on_keepalive(wal_end, events, checkpoint)
                    if reply:
                        self._send_status(force=True)
            changes = decoder.schema_changes
            if changes:
                decoder.schema_changes = []
                self._added_columns += [c for c in changes if c.added]
            if events or checkpoint is not None or changes:
                if checkpoint is not None:
                    lsn = checkpoint.lsn if isinstance(checkpoint, ReaderCheckpoint) else checkpoint
                    self._highest_yielded_checkpoint = lsn or 0
                yield SourceChunk(self.partition, events, checkpoint, list(changes))
                continue
            if time.monotonic() - self._last_status_sent >= interval:
                self._send_status(force=True)
            await self._wait_readable(pgconn, timeout=min(interval, 1.0))

    def _on_message(self, message: LogicalMessage, events: list[SourceEvent]) -> Any:
        """Handle a non-transactional message; return a checkpoint it makes possible."""
        if self._decoder.in_transaction:
            return None
        if message.prefix == HEARTBEAT_PREFIX:
            # Everything before a message outside a transaction is complete: a heartbeat
            # is a position we may confirm, so the slot moves while our tables are idle.
            return self._checkpoint(message.lsn)
        if message.prefix != WATERMARK_PREFIX or self._chunker is None:
            return None
        found = self._chunker.on_message(message.content.decode(errors="replace"))
        if found is None:
            return None
        window, edge = found
        if edge == "low":
            window.opened = True
            return None
        self._chunker.window = None
        progress = window.progress
        if window.opened and window.rows is not None:
            rows = window.surviving_rows()
            schema = window.schema
            # The message's LSN is the end of its record, where the next commit record
            # may start; one less sorts the chunk after every earlier change and before
            # every later one.
            lsn = message.lsn - 1
            database = self.settings.database
            events.extend(
                SourceEvent(
                    operation=Operation.READ,
                    table=schema,
                    position=Position(lsn, i),
                    after=row,
                    source_database=database,
                )
                for i, row in enumerate(rows)
            )
            progress = progress.advanced(
                window.rows, window.key_idx, self.settings.snapshot_chunk_size
            )
            self._progress[(progress.kind, progress.table)] = progress
        window.result = progress
        window.closed.set()
        return self._checkpoint(message.lsn)

    def _on_keepalive(self, wal_end: int, events: Sequence[SourceEvent], pending: Any) -> None:
        """Confirm the server's position when we owe nothing: between transactions, with no
        event read but unconfirmed. This lets the slot advance while watched tables are idle
        but the database is busy, so WAL is not retained."""
        if wal_end > self._received_lsn:
            self._received_lsn = wal_end
        idle = (
            not self._decoder.in_transaction
            and not events
            and pending is None
            and not self._snapshot_in_flight
            and self._confirmed_lsn >= self._highest_yielded_checkpoint
            and self._progress == self._committed_progress
        )
        if idle and wal_end > self._confirmed_lsn:
            self._confirmed_lsn = wal_end

    async def _wait_readable(self, pgconn: Any, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        fd = pgconn.socket

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(fd, wake)
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns normally when the
        # socket turns readable in the loop iteration that cancels this task (CPython
        # gh-86296), so a cancelled read loop would carry on (and block on a gone sink).
        try:
            async with asyncio.timeout(timeout):
                await ready
        except TimeoutError:
            pass
        finally:
            loop.remove_reader(fd)
        pgconn.consume_input()

    def _send_status(self, force: bool = False) -> None:
        if self._repl is None:
            return
        lsn = self._confirmed_lsn
        now_us = int(time.time() * 1_000_000) - PG_EPOCH_OFFSET_US
        received = max(self._received_lsn, lsn)
        msg = _STATUS.pack(b"r", received, lsn, lsn, now_us, 0)
        pgconn = self._repl.pgconn
        pgconn.put_copy_data(msg)
        pgconn.flush()
        self._last_status_sent = time.monotonic()

    # -- setup -------------------------------------------------------------------------

    async def _admin_conn(self) -> psycopg.AsyncConnection[Any]:
        if self._admin is None or self._admin.closed:
            self._admin = await psycopg.AsyncConnection.connect(
                self._conninfo, autocommit=True, connect_timeout=10
            )
        return self._admin

    async def _prepare(self) -> None:
        admin = await self._admin_conn()
        s = self.settings
        previously_published = await published_tables(admin, s.publication_name) or set()
        await ensure_publication(admin, s.publication_name, s.tables)
        await ensure_state_table(admin)
        if not self._source_checked:
            await self._warn_about_tables(admin)
            self._source_checked = True
        self._chunker = WatermarkChunker(
            self._conninfo, s.slot_name, s.snapshot_chunk_size, admin.info.server_version >= 170000
        )
        slot = await (
            await admin.execute(
                "SELECT confirmed_flush_lsn::text, active_pid, wal_status"
                " FROM pg_replication_slots WHERE slot_name = %s",
                (s.slot_name,),
            )
        ).fetchone()
        state = await (
            await admin.execute(
                "SELECT status, consistent_lsn::text FROM cdc_platform.snapshot_state"
                " WHERE slot_name = %s",
                (s.slot_name,),
            )
        ).fetchone()
        progress = await load_progress(admin, s.slot_name)
        self._progress = dict(progress)
        self._committed_progress = dict(progress)
        wants_snapshot = s.snapshot_mode in ("initial", "when_needed")
        if slot is not None and slot[2] == "lost":
            if s.snapshot_mode != "when_needed":
                raise SlotLostError(
                    f"replication slot {s.slot_name} is lost (its WAL was removed); changes"
                    " were missed. Use snapshot_mode when_needed to re-snapshot, or"
                    " `cdc undeploy` and run again"
                )
            log.warning("slot.lost_resnapshot", slot=s.slot_name)
            await self._drop_slot(admin, active_pid=slot[1])
            slot = None
        if slot is not None and state is not None and state[0] == "running":
            pending = [
                t for t in s.tables if not progress.get((SNAPSHOT, t), TableProgress(t)).done
            ]
            keyless = [t for t in pending if not (await snapshot_schema(admin, t)).key_columns]
            if keyless:
                # Without a key a table cannot be read in resumable chunks; the only
                # consistent restart is a new slot and a new snapshot (sinks upsert).
                log.warning("snapshot.restarting", slot=s.slot_name, keyless_tables=keyless)
                await self._drop_slot(admin, active_pid=slot[1])
                slot = None
            else:
                log.info(
                    "snapshot.resuming",
                    slot=s.slot_name,
                    tables={t: progress.get((SNAPSHOT, t), TableProgress(t)).rows for t in pending},
                )
                self._snapshot_running = True
                self._snapshot_lsn = parse_lsn(state[1]) if state[1] else 0
                for t in pending:
                    self._queue_job(progress.get((SNAPSHOT, t), TableProgress(t)))
        if slot is not None:
            self._confirmed_lsn = parse_lsn(slot[0])
            added = [t for t in s.tables if t not in previously_published]
            if wants_snapshot and added and previously_published:
                # Tables added to an existing pipeline get their own snapshot, read in
                # watermarked chunks while the others keep streaming.
                log.info("snapshot.tables_added", tables=added)
                await self._start_snapshot_jobs(admin, added)
            for p in progress.values():
                if p.kind == BACKFILL and not p.done:
                    self._queue_job(p)
            self._last_error = None
            return
        await clear_progress(admin, s.slot_name)
        self._progress.clear()
        self._committed_progress.clear()
        self._repl = await self._connect_replication()
        row = await (
            await self._repl.execute(
                sql.SQL("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput ({})").format(
                    sql.Identifier(s.slot_name),
                    sql.SQL("SNAPSHOT 'export'" if wants_snapshot else "SNAPSHOT 'nothing'"),
                )
            )
        ).fetchone()
        assert row is not None
        consistent_lsn = parse_lsn(row[1])
        self._confirmed_lsn = consistent_lsn
        log.info("slot.created", slot=s.slot_name, consistent_lsn=row[1])
        if wants_snapshot:
            await self._mark_snapshot("running", consistent_lsn, conn=admin)
            fresh = [TableProgress(t) for t in s.tables]
            await save_progress(admin, s.slot_name, fresh)
            self._progress = {(p.kind, p.table): p for p in fresh}
            self._committed_progress = dict(self._progress)
            self._snapshot = (row[2], consistent_lsn)
            self._snapshot_in_flight = True
            self._snapshot_running = True
            self._snapshot_lsn = consistent_lsn
        else:
            await self._mark_snapshot("skipped", consistent_lsn, conn=admin)
        self._last_error = None

    async def _warn_about_tables(self, admin: psycopg.AsyncConnection[Any]) -> None:
        """Log, once per start, what the captured tables will not deliver: updates and
        deletes of tables without a replica identity, generated columns pgoutput omits."""
        for problem in await identity_problems(admin, self.settings.tables):
            log.warning(
                "source.keyless_table_no_identity"
                if not problem.has_key
                else "source.table_no_identity",
                table=problem.table,
                replica_identity=problem.replica_identity,
                fix=problem.fix,
                detail=problem.describe(),
            )
        for table, columns in (
            await missing_generated_columns(admin, self.settings.tables)
        ).items():
            log.warning(
                "source.generated_columns_not_replicated",
                table=table,
                columns=columns,
                server_version=admin.info.server_version,
                detail="pgoutput does not send virtual generated columns, nor stored ones before"
                " PostgreSQL 18; sinks will not have these columns",
            )

    async def _start_snapshot_jobs(
        self, admin: psycopg.AsyncConnection[Any], tables: Sequence[str]
    ) -> None:
        fresh = [TableProgress(t) for t in tables]
        await save_progress(admin, self.settings.slot_name, fresh)
        await self._mark_snapshot("running", self._confirmed_lsn, conn=admin)
        self._snapshot_running = True
        self._snapshot_lsn = self._confirmed_lsn
        for p in fresh:
            self._progress[(p.kind, p.table)] = p
            self._committed_progress[(p.kind, p.table)] = p
            self._queue_job(p)

    def _queue_job(self, progress: TableProgress) -> None:
        self._jobs.append(progress)
        self._jobs_added.set()

    async def _drop_slot(self, admin: psycopg.AsyncConnection[Any], active_pid: Any) -> None:
        if active_pid:
            await admin.execute("SELECT pg_terminate_backend(%s)", (active_pid,))
            await asyncio.sleep(0.2)
        await admin.execute("SELECT pg_drop_replication_slot(%s)", (self.settings.slot_name,))

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

    async def _connect_replication(self) -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(
            self._conninfo, autocommit=True, replication="database", connect_timeout=10
        )

    async def _start_replication(self) -> None:
        if self._repl is None:
            await self._with_retry(self._reconnect, "reconnect")
        assert self._repl is not None
        s = self.settings
        await self._repl.execute(
            sql.SQL(
                "START_REPLICATION SLOT {} LOGICAL 0/0"
                " (proto_version '1', publication_names {}, messages 'true')"
            ).format(sql.Identifier(s.slot_name), sql.Literal(s.publication_name))
        )
        self._streaming = True
        self._last_error = None
        self._send_status(force=True)
        log.info("replication.started", slot=s.slot_name, from_lsn=format_lsn(self._confirmed_lsn))

    async def _reconnect(self) -> None:
        await self._admin_conn()
        # The server resumes at the slot's confirmed flush LSN; what we had read but not
        # confirmed is sent again and sinks skip the positions they already applied.
        self._repl = await self._connect_replication()

    async def _close_repl(self) -> None:
        if self._repl is not None:
            with contextlib.suppress(Exception):
                await self._repl.close()
        self._repl = None
        if self._admin is not None:
            with contextlib.suppress(Exception):
                await self._admin.close()
        self._admin = None

    async def _with_retry(self, action: Any, what: str) -> None:
        backoff = self.settings.reconnect_initial_seconds
        while True:
            try:
                await action()
                return
            except (psycopg.OperationalError, OSError, SlotLostError) as exc:
                # A lost slot is reported (unhealthy) and re-checked, not a crash loop:
                # the operator may undeploy, or switch to snapshot_mode when_needed.
                if self._stopping.is_set():
                    raise
                self._last_error = f"{what}: {exc}".strip()
                event = (
                    "source.slot_lost" if isinstance(exc, SlotLostError) else "source.unreachable"
                )
                log.warning(event, step=what, error=str(exc), retry_in=backoff)
                await self._close_repl()
                await self._sleep_or_stop(backoff)
                backoff = min(backoff * 2, self.settings.reconnect_max_seconds)

    async def _sleep_or_stop(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):  # not wait_for: it can swallow a cancel
                await self._stopping.wait()

    # -- background: heartbeats, signals, watermarked chunk reads ------------------------

    def _start_background(self) -> None:
        if self._tasks:
            return
        self._tasks = [
            asyncio.create_task(self._maintain(), name="wal-maintain"),
            asyncio.create_task(self._run_jobs(), name="wal-chunk-jobs"),
        ]

    async def _maintain(self) -> None:
        """Heartbeats every `heartbeat_interval_seconds`; the signal table every second."""
        s = self.settings
        next_beat = 0.0
        failing = False
        while not self._stopping.is_set():
            try:
                admin = await self._admin_conn()
                await self._poll_signals(admin)
                await self._backfill_added_defaults(admin)
                if s.heartbeat_mode != "none" and time.monotonic() >= next_beat:
                    await self._heartbeat(admin)
                    next_beat = time.monotonic() + s.heartbeat_interval_seconds
                if failing:
                    log.info("source.maintenance_recovered")
                    failing = False
            except (psycopg.Error, OSError) as exc:
                if not failing:  # once per outage, not every second
                    log.warning("source.maintenance_failed", error=str(exc).strip())
                    failing = True
                self._admin = None
            await self._sleep_or_stop(SIGNAL_POLL_SECONDS)

    async def _backfill_added_defaults(self, admin: psycopg.AsyncConnection[Any]) -> None:
        """ADD COLUMN with a default fills existing rows without sending them: re-read the
        table so the sinks get the value too (only for pipelines that snapshot at all)."""
        while self._added_columns:
            change = self._added_columns[0]
            table = change.current.qualified_name
            rows = await (
                await admin.execute(
                    "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s)"
                    " AND attname = ANY(%s) AND (atthasdef OR atthasmissing)"
                    " AND NOT attisdropped",
                    (table, list(change.added)),
                )
            ).fetchall()
            self._added_columns.pop(0)
            if not rows or self.settings.snapshot_mode not in ("initial", "when_needed"):
                continue
            running = self._progress.get((BACKFILL, table))
            if running is not None and not running.done:
                log.warning("schema.default_backfill_skipped", table=table, reason="in progress")
                continue
            progress = TableProgress(table, BACKFILL)
            await save_progress(admin, self.settings.slot_name, [progress])
            self._progress[(BACKFILL, table)] = progress
            self._committed_progress[(BACKFILL, table)] = progress
            self._queue_job(progress)
            log.info("schema.default_backfill", table=table, columns=[r[0] for r in rows])

    async def _heartbeat(self, admin: psycopg.AsyncConnection[Any]) -> None:
        if self.settings.heartbeat_mode == "table":
            await admin.execute(
                "INSERT INTO cdc_platform.heartbeat (slot_name) VALUES (%s)"
                " ON CONFLICT (slot_name) DO UPDATE SET beat_at = now()",
                (self.settings.slot_name,),
            )
        else:
            await admin.execute(
                "SELECT pg_logical_emit_message(false, %s, %s)",
                (HEARTBEAT_PREFIX, self.settings.slot_name),
            )

    async def _poll_signals(self, admin: psycopg.AsyncConnection[Any]) -> None:
        for signal in await new_backfills(admin, self.settings.slot_name):
            unknown = [t for t in signal.tables if t not in self.settings.tables]
            if unknown:
                error = f"not captured by this pipeline: {', '.join(unknown)}"
                await mark_started(admin, signal.id, error=error)
                log.warning("backfill.rejected", signal=signal.id, unknown_tables=unknown)
                continue
            fresh = [TableProgress(t, BACKFILL, job_id=signal.id) for t in signal.tables]
            await save_progress(admin, self.settings.slot_name, fresh)
            await mark_started(admin, signal.id)
            log.info("backfill.started", signal=signal.id, tables=list(signal.tables))
            for p in fresh:
                self._progress[(p.kind, p.table)] = p
                self._committed_progress[(p.kind, p.table)] = p
                self._queue_job(p)

    async def _run_jobs(self) -> None:
        """Read queued tables chunk by chunk between watermarks, one chunk at a time."""
        assert self._chunker is not None
        conn: psycopg.AsyncConnection[Any] | None = None
        schemas: dict[str, TableSchema] = {}
        backoff = self.settings.reconnect_initial_seconds
        try:
            while not self._stopping.is_set():
                if not self._jobs:
                    self._jobs_added.clear()
                    await self._jobs_added.wait()
                    continue
                job = self._jobs[0]
                try:
                    if conn is None or conn.closed:
                        conn = await psycopg.AsyncConnection.connect(
                            self._conninfo, autocommit=True, connect_timeout=10
                        )
                    schema = schemas.get(job.table) or await snapshot_schema(conn, job.table)
                    schemas[job.table] = schema
                    if not schema.key_columns:
                        log.error("backfill.needs_primary_key", table=job.table)
                        self._jobs.popleft()
                        continue
                    window = await self._chunker.read(conn, schema, job)
                    await window.closed.wait()
                    backoff = self.settings.reconnect_initial_seconds
                except (psycopg.Error, OSError) as exc:
                    self._chunker.window = None
                    log.warning("backfill.chunk_failed", table=job.table, error=str(exc).strip())
                    if conn is not None:
                        await conn.close()
                    conn = None
                    await self._sleep_or_stop(backoff)
                    backoff = min(backoff * 2, self.settings.reconnect_max_seconds)
                    continue
                result = window.result or job
                if result.done:
                    self._jobs.popleft()
                else:
                    self._jobs[0] = result
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()

    # -- relations and the initial snapshot --------------------------------------------

    def _describe_cached(
        self, oid: int, raw: list[tuple[bool, str, int, int]]
    ) -> list[tuple[str, bool]]:
        return self._described.get(oid) or [("", is_key) for is_key, *_ in raw]

    async def _prefetch_relation(self, payload: bytes) -> None:
        oid, *_, raw = PgOutputDecoder.parse_relation(payload)
        self._described[oid] = await describe_relation(await self._admin_conn(), oid, raw)

    async def _exported_snapshot_chunks(
        self, snapshot_name: str, consistent_lsn: int
    ) -> AsyncIterator[SourceChunk]:
        """The initial snapshot, read from the slot's exported snapshot: exactly the data
        as of the slot's consistent point, so streaming afterwards has no gap and no
        duplicate. Tables are read in key chunks, several at a time; each chunk's
        progress is committed once the sinks hold it."""
        s = self.settings
        admin = await self._admin_conn()
        schemas = [await snapshot_schema(admin, t) for t in s.tables]
        started = time.monotonic()
        seq = 0
        total = 0
        database = s.database
        step = s.max_chunk_events
        # A transaction whose commit record starts right at the consistent point is
        # streamed afterwards: snapshot rows must sort before its changes.
        snapshot_major = consistent_lsn - 1
        async for read in read_exported_snapshot(
            self._conninfo, snapshot_name, schemas, s.snapshot_chunk_size, s.snapshot_parallelism
        ):
            self._progress[(SNAPSHOT, read.progress.table)] = read.progress
            rows: list[TextRow] = read.rows
            for start in range(0, max(len(rows), 1), step):
                piece = rows[start : start + step]
                events = [
                    SourceEvent(
                        operation=Operation.READ,
                        table=read.schema,
                        position=Position(snapshot_major, seq + i),
                        after=row,
                        source_database=database,
                    )
                    for i, row in enumerate(piece)
                ]
                seq += len(piece)
                last = start + step >= len(rows)
                checkpoint = (
                    ReaderCheckpoint(None, tuple(self._progress.values())) if last else None
                )
                yield SourceChunk(self.partition, events, checkpoint)
            total += len(rows)
        log.info(
            "snapshot.read",
            slot=s.slot_name,
            rows=total,
            tables=len(schemas),
            seconds=round(time.monotonic() - started, 3),
        )
        yield SourceChunk(
            self.partition, [], ReaderCheckpoint(consistent_lsn, tuple(self._progress.values()))
        )


class SlotLostError(RuntimeError):
    """The slot's WAL was removed: changes were missed and streaming cannot continue."""
