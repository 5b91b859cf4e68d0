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
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from struct import Struct
from typing import Any

import psycopg
import structlog
from psycopg import sql

from adapters.postgres.catalog import (
    describe_relation,
    ensure_publication,
    ensure_state_table,
    format_lsn,
    parse_lsn,
    snapshot_schema,
)
from adapters.postgres.pgoutput import (
    PG_EPOCH_OFFSET_US,
    CommitMarker,
    PgOutputDecoder,
)
from domain.events import Operation, Position, SourceEvent
from domain.health import ComponentHealth, Status
from domain.ports import SourceChunk

log = structlog.get_logger(__name__)

_XLOG_HEADER = Struct("!QQq")  # wal start, wal end, send time
_KEEPALIVE = Struct("!QqB")
_STATUS = Struct("!cQQQqB")


@dataclass(frozen=True, slots=True)
class WalReaderSettings:
    conninfo: str
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
class SnapshotComplete:
    """Checkpoint of the last snapshot chunk: once committed the snapshot never reruns."""

    consistent_lsn: int


class PostgresWalSource:
    """EventSource over one replication slot. The slot name is the partition."""

    def __init__(self, settings: WalReaderSettings) -> None:
        self.settings = settings
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

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, reconcile the publication and slot; plan the snapshot. Retries with
        backoff while the database is unreachable."""
        await self._with_retry(self._prepare, "prepare")

    async def stop(self) -> None:
        self._stopping.set()
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
        if self._last_error is not None:
            detail["error"] = self._last_error
            return ComponentHealth("source", Status.ERROR, detail)
        return ComponentHealth("source", Status.OK, detail)

    async def commit(self, partition: str, checkpoint: Any) -> None:
        lsn = (
            checkpoint.consistent_lsn
            if isinstance(checkpoint, SnapshotComplete)
            else int(checkpoint)
        )
        if self._snapshot_in_flight and lsn >= self._snapshot_lsn:
            # Any checkpoint at or past the snapshot implies every snapshot row is written.
            await self._mark_snapshot("done", self._snapshot_lsn, conn=await self._admin_conn())
            self._snapshot_in_flight = False
        if lsn > self._confirmed_lsn:
            self._confirmed_lsn = lsn
            if self._repl is not None and self._streaming:
                self._send_status(force=True)

    # -- reading -----------------------------------------------------------------------

    async def chunks(self) -> AsyncIterator[SourceChunk]:
        if self._snapshot is not None:
            async for chunk in self._snapshot_chunks(*self._snapshot):
                yield chunk
            self._snapshot = None
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
            checkpoint: int | None = None
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
                    marker = decoder.decode(payload, events)
                    if isinstance(marker, CommitMarker):
                        checkpoint = marker.end_lsn
                    if wal_end > self._received_lsn:
                        self._received_lsn = wal_end
                elif data[0] == 107:  # 'k' keepalive
                    wal_end, _, reply = _KEEPALIVE.unpack_from(data, 1)
                    self._on_keepalive(wal_end, events, checkpoint)
                    if reply:
                        self._send_status(force=True)
            if events or checkpoint is not None:
                if checkpoint is not None:
                    self._highest_yielded_checkpoint = checkpoint
                yield SourceChunk(self.partition, events, checkpoint)
                continue
            if time.monotonic() - self._last_status_sent >= interval:
                self._send_status(force=True)
            await self._wait_readable(pgconn, timeout=min(interval, 1.0))

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
        try:
            await asyncio.wait_for(ready, timeout)
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
                self.settings.conninfo, autocommit=True, connect_timeout=10
            )
        return self._admin

    async def _prepare(self) -> None:
        admin = await self._admin_conn()
        s = self.settings
        await ensure_publication(admin, s.publication_name, s.tables)
        await ensure_state_table(admin)
        slot = await (
            await admin.execute(
                "SELECT confirmed_flush_lsn::text, active_pid FROM pg_replication_slots"
                " WHERE slot_name = %s",
                (s.slot_name,),
            )
        ).fetchone()
        state = await (
            await admin.execute(
                "SELECT status FROM cdc_platform.snapshot_state WHERE slot_name = %s",
                (s.slot_name,),
            )
        ).fetchone()
        if slot is not None and state is not None and state[0] == "running":
            # A snapshot died half way. The exported snapshot is gone with its connection,
            # so the only consistent restart is a new slot and a new snapshot; sinks
            # upsert, so rows already written are rewritten with the same values.
            log.warning("snapshot.restarting", slot=s.slot_name)
            await self._drop_slot(admin, active_pid=slot[1])
            slot = None
        if slot is not None:
            self._confirmed_lsn = parse_lsn(slot[0])
            self._last_error = None
            return
        want_snapshot = s.snapshot_mode in ("initial", "when_needed")
        self._repl = await self._connect_replication()
        row = await (
            await self._repl.execute(
                sql.SQL("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput ({})").format(
                    sql.Identifier(s.slot_name),
                    sql.SQL("SNAPSHOT 'export'" if want_snapshot else "SNAPSHOT 'nothing'"),
                )
            )
        ).fetchone()
        assert row is not None
        consistent_lsn = parse_lsn(row[1])
        self._confirmed_lsn = consistent_lsn
        log.info("slot.created", slot=s.slot_name, consistent_lsn=row[1])
        if want_snapshot:
            await self._mark_snapshot("running", consistent_lsn, conn=admin)
            self._snapshot = (row[2], consistent_lsn)
            self._snapshot_in_flight = True
            self._snapshot_lsn = consistent_lsn
        else:
            await self._mark_snapshot("skipped", consistent_lsn, conn=admin)
        self._last_error = None

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
            self.settings.conninfo, autocommit=True, replication="database", connect_timeout=10
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
            except (psycopg.OperationalError, OSError) as exc:
                if self._stopping.is_set():
                    raise
                self._last_error = f"{what}: {exc}".strip()
                log.warning("source.unreachable", step=what, error=str(exc), retry_in=backoff)
                await self._close_repl()
                await self._sleep_or_stop(backoff)
                backoff = min(backoff * 2, self.settings.reconnect_max_seconds)

    async def _sleep_or_stop(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    # -- relations and snapshot --------------------------------------------------------

    def _describe_cached(
        self, oid: int, raw: list[tuple[bool, str, int, int]]
    ) -> list[tuple[str, bool]]:
        return self._described.get(oid) or [("", is_key) for is_key, *_ in raw]

    async def _prefetch_relation(self, payload: bytes) -> None:
        oid, *_, raw = PgOutputDecoder.parse_relation(payload)
        self._described[oid] = await describe_relation(await self._admin_conn(), oid, raw)

    async def _snapshot_chunks(
        self, snapshot_name: str, consistent_lsn: int
    ) -> AsyncIterator[SourceChunk]:
        s = self.settings
        conn = await psycopg.AsyncConnection.connect(s.conninfo, connect_timeout=10)
        started = time.monotonic()
        total = 0
        try:
            async with conn.transaction():
                await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                await conn.execute(
                    sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_name))
                )
                seq = 0
                for table in s.tables:
                    schema = await snapshot_schema(conn, table)
                    query = sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT").format(
                        sql.SQL(", ").join(sql.Identifier(c) for c in schema.column_names),
                        sql.Identifier(*table.split(".", 1)),
                    )
                    events: list[SourceEvent] = []
                    async with conn.cursor().copy(query) as copy:
                        async for row in copy.rows():
                            events.append(
                                SourceEvent(
                                    operation=Operation.READ,
                                    table=schema,
                                    position=Position(consistent_lsn, seq),
                                    after=row,
                                    source_database=s.database,
                                )
                            )
                            seq += 1
                            if len(events) >= s.max_chunk_events:
                                total += len(events)
                                yield SourceChunk(self.partition, events, None)
                                events = []
                    total += len(events)
                    if events:
                        yield SourceChunk(self.partition, events, None)
        finally:
            await conn.close()
        log.info(
            "snapshot.read",
            slot=s.slot_name,
            rows=total,
            seconds=round(time.monotonic() - started, 3),
        )
        yield SourceChunk(self.partition, [], SnapshotComplete(consistent_lsn))
