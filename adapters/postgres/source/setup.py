"""The WAL reader's start: the publication and the slot (through the provisioner), and the
plan for the snapshot: a new slot exports one, a snapshot interrupted by a crash resumes in
watermarked chunks (or starts over for tables without a key), tables added to the
publication get a snapshot of their own."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
import structlog

from adapters.postgres.source.base import ReaderBase
from adapters.postgres.source.catalog import (
    format_lsn,
    identity_problems,
    missing_generated_columns,
    parse_lsn,
    snapshot_schema,
)
from adapters.postgres.source.replication import connect_replication
from adapters.postgres.source.snapshot import (
    BACKFILL,
    SNAPSHOT,
    TableProgress,
    clear_progress,
    load_progress,
    save_progress,
)
from adapters.postgres.source.watermark import WatermarkChunker

log = structlog.get_logger(__name__)


class SlotLostError(RuntimeError):
    """The slot's WAL was removed: changes were missed and streaming cannot continue."""


class SlotSetup(ReaderBase):
    async def _prepare(self) -> None:
        admin = await self._admin_conn()
        s = self.settings
        previously_published = await self.provisioner.reconcile(admin)
        if not self._source_checked:
            await self._warn_about_tables(admin)
            self._source_checked = True
        self._chunker = WatermarkChunker(
            self._conninfo, s.slot_name, s.snapshot_chunk_size, admin.info.server_version >= 170000
        )
        slot = await self.provisioner.slot(admin)
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
        if slot is not None and slot.lost:
            if s.snapshot_mode != "when_needed":
                raise SlotLostError(
                    f"replication slot {s.slot_name} is lost (its WAL was removed); changes"
                    " were missed. Use snapshot_mode when_needed to re-snapshot, or"
                    " `cdc undeploy` and run again"
                )
            log.warning("slot.lost_resnapshot", slot=s.slot_name)
            await self.provisioner.drop_slot(admin, slot.active_pid)
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
                await self.provisioner.drop_slot(admin, slot.active_pid)
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
            self._confirmed_lsn = slot.confirmed_flush_lsn
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
        await self._create_slot(admin, wants_snapshot)

    async def _create_slot(self, admin: psycopg.AsyncConnection[Any], wants_snapshot: bool) -> None:
        s = self.settings
        await clear_progress(admin, s.slot_name)
        self._progress.clear()
        self._committed_progress.clear()
        # The replication connection stays open: the exported snapshot lives as long.
        self._repl = await connect_replication(self._conninfo)
        created = await self.provisioner.create_slot(self._repl, export_snapshot=wants_snapshot)
        consistent_lsn = created.consistent_lsn
        self._confirmed_lsn = consistent_lsn
        log.info("slot.created", slot=s.slot_name, consistent_lsn=format_lsn(consistent_lsn))
        if created.snapshot_name is not None:
            await self._mark_snapshot("running", consistent_lsn, conn=admin)
            fresh = [TableProgress(t) for t in s.tables]
            await save_progress(admin, s.slot_name, fresh)
            self._progress = {(p.kind, p.table): p for p in fresh}
            self._committed_progress = dict(self._progress)
            self._snapshot = (created.snapshot_name, consistent_lsn)
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
            problem.log_warning(log)
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
