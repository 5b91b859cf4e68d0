"""The WAL reader's background work while it streams: `_maintain` (heartbeats, the signal
table for backfills, re-reading tables after `ADD COLUMN ... DEFAULT`) and `_run_jobs`
(the queued tables read chunk by chunk between watermarks: backfills, a resumed snapshot,
tables added to the publication). The chunks themselves arrive in the replication stream
(`reader.py` hands the watermark messages to the chunker)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import psycopg
import structlog

from adapters.postgres.source.base import ReaderBase
from adapters.postgres.source.catalog import snapshot_schema
from adapters.postgres.source.signals import mark_finished, mark_started, new_backfills
from adapters.postgres.source.snapshot import BACKFILL, TableProgress, save_progress
from domain.events import TableSchema

log = structlog.get_logger(__name__)

HEARTBEAT_PREFIX = "cdc_platform.heartbeat"
SIGNAL_POLL_SECONDS = 1.0


class BackgroundJobs(ReaderBase):
    def _start_background(self) -> None:
        if self._tasks:
            return
        self._tasks = [
            asyncio.create_task(self._maintain(), name="wal-maintain"),
            asyncio.create_task(self._run_jobs(), name="wal-chunk-jobs"),
        ]

    async def _stop_background(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks = []

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

    async def _finish_signal(self, admin: psycopg.AsyncConnection[Any], job_id: int) -> None:
        entries = [p for p in self._committed_progress.values() if p.job_id == job_id]
        if all(p.done for p in entries):
            rows = sum(p.rows for p in entries)
            await mark_finished(admin, job_id, rows)
            log.info("backfill.done", signal=job_id, rows=rows)

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
