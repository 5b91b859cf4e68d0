"""The `direct` transport's EventSource: PostgreSQL logical replication with pgoutput.

The replication loop lives here: it reads XLogData and keepalive frames
(`replication.py`), decodes pgoutput into events (`pgoutput.py`), cuts them into chunks of
the slot's lane, hands watermark messages to the chunker of backfills (`watermark.py`), and
confirms the flush LSN once the ingest acks it. The start (slot, snapshot plan) is in
`setup.py`, the background work while streaming in `jobs.py`, the publication and slot
lifecycle in `provisioner.py`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import psycopg
import structlog

from adapters.postgres.source.base import ReaderCheckpoint, WalReaderSettings
from adapters.postgres.source.catalog import describe_relation, format_lsn, snapshot_schema
from adapters.postgres.source.jobs import HEARTBEAT_PREFIX, BackgroundJobs
from adapters.postgres.source.pgoutput import CommitMarker, LogicalMessage, PgOutputDecoder
from adapters.postgres.source.replication import (
    KEEPALIVE,
    KEEPALIVE_BODY,
    XLOG_DATA,
    XLOG_HEADER,
    XLOG_PAYLOAD_AT,
    connect_replication,
    send_status,
    start_replication,
    wait_readable,
)
from adapters.postgres.source.setup import SlotLostError, SlotSetup
from adapters.postgres.source.snapshot import (
    BACKFILL,
    SNAPSHOT,
    TableProgress,
    read_exported_snapshot,
    save_progress,
)
from adapters.postgres.source.watermark import WATERMARK_PREFIX
from domain.events import Operation, Position, SourceEvent, TextRow
from domain.health import ComponentHealth, Status
from domain.ports import SourceChunk

__all__ = ["PostgresWalSource", "ReaderCheckpoint", "SlotLostError", "WalReaderSettings"]

log = structlog.get_logger(__name__)


class PostgresWalSource(SlotSetup, BackgroundJobs):
    """EventSource over one replication slot. The slot name is the lane (one lane: the
    slot's changes are in commit order); ack handles are LSNs (or ReaderCheckpoints
    carrying snapshot progress), so only the newest of those released matters.

    Besides the stream it runs two background tasks while streaming (`jobs.py`):
    heartbeats and the signal table, and watermarked chunk reads of backfills and of a
    resumed snapshot.
    """

    def __init__(self, settings: WalReaderSettings) -> None:
        super().__init__(settings)
        self.partition = settings.slot_name
        self._decoder = PgOutputDecoder(settings.database, describe=self._describe_cached)
        self._described: dict[int, list[tuple[str, bool]]] = {}
        self._last_status_sent = 0.0
        # The newest checkpoint handed out: keepalives confirm nothing past it before the
        # ingest acks it.
        self._highest_yielded_checkpoint = 0

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, reconcile the publication and slot; plan the snapshot. Retries with
        backoff while the database is unreachable."""
        await self._with_retry(self._prepare, "prepare")

    async def stop(self) -> None:
        self._stopping.set()
        await self._stop_background()
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
                    await wait_readable(pgconn, timeout=remaining)
                    continue
                if nbytes < 0:
                    raise psycopg.OperationalError(
                        pgconn.error_message.decode(errors="replace") or "replication stream ended"
                    )
                data = bytes(frame)
                if data[0] == XLOG_DATA:
                    _wal_start, wal_end, _ = XLOG_HEADER.unpack_from(data, 1)
                    payload = data[XLOG_PAYLOAD_AT:]
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
                elif data[0] == KEEPALIVE:
                    wal_end, _, reply = KEEPALIVE_BODY.unpack_from(data, 1)
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
            await wait_readable(pgconn, timeout=min(interval, 1.0))

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

    def _send_status(self, force: bool = False) -> None:
        if self._repl is None:
            return
        send_status(self._repl.pgconn, self._received_lsn, self._confirmed_lsn)
        self._last_status_sent = time.monotonic()

    # -- connecting -------------------------------------------------------------------------

    async def _start_replication(self) -> None:
        if self._repl is None:
            await self._with_retry(self._reconnect, "reconnect")
        assert self._repl is not None
        s = self.settings
        await start_replication(self._repl, s.slot_name, s.publication_name)
        self._streaming = True
        self._last_error = None
        self._send_status(force=True)
        log.info("replication.started", slot=s.slot_name, from_lsn=format_lsn(self._confirmed_lsn))

    async def _reconnect(self) -> None:
        await self._admin_conn()
        # The server resumes at the slot's confirmed flush LSN; what we had read but not
        # confirmed is sent again and sinks skip the positions they already applied.
        self._repl = await connect_replication(self._conninfo)

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

    # -- background: heartbeats, signals, watermarked chunk reads ------------------------

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
