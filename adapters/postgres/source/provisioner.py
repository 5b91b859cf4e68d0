"""The WAL's transport resources: publication, replication slot, the reader's bookkeeping.

`PostgresProvisioner` is the `domain.ports.Provisioner` of every transport that reads the
WAL (the `direct` ingest, the capture stage of Pub/Sub and Kinesis). It owns the lifecycle
of what a pipeline creates on its source database and nothing else: it never touches
table data, in the source or in a sink.

* `provision()` / `reconcile(conn)`: the publication lists exactly the captured tables,
  and the `cdc_platform` bookkeeping tables exist (idempotent).
* `create_slot(replication_conn, export_snapshot)`: the slot is created by the reader on
  its replication connection, because the initial snapshot must be read in the snapshot
  the slot exports, which lives only as long as that connection does nothing else.
* `teardown(force)`: drop the slot and the publication and forget the bookkeeping of the
  slot. A slot in use (a pipeline streams from it) is refused unless `force`, which
  terminates its walsender; a slot that reappears right after the drop means a pipeline
  is still running, and is refused too.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from adapters.postgres.source.catalog import (
    ensure_publication,
    ensure_state_table,
    forget_slot_state,
    parse_lsn,
    published_tables,
)
from domain.errors import TeardownRefusedError


@dataclass(frozen=True, slots=True)
class SlotState:
    confirmed_flush_lsn: int
    active_pid: int | None  # the walsender streaming from it, if any
    lost: bool  # its WAL was removed (wal_status 'lost'): changes were missed


@dataclass(frozen=True, slots=True)
class CreatedSlot:
    consistent_lsn: int
    snapshot_name: str | None  # the exported snapshot (None when none was asked for)


@dataclass(frozen=True, slots=True)
class PostgresProvisioner:
    conninfo: str = field(repr=False)  # holds the password
    slot_name: str
    publication_name: str
    tables: tuple[str, ...]
    # teardown: how long a forced drop keeps retrying while the client reconnects, and how
    # long the slot must stay gone (a running pipeline re-creates it within about 2 s).
    retry_seconds: float = 10.0
    settle_seconds: float = 6.0

    # -- provisioning --------------------------------------------------------------------

    async def provision(self) -> None:
        async with await self._connect() as conn:
            await self.reconcile(conn)

    async def reconcile(self, conn: psycopg.AsyncConnection[Any]) -> set[str]:
        """Make the publication list exactly the captured tables and create the bookkeeping
        tables; return the tables published before (empty: the publication is new)."""
        before = await published_tables(conn, self.publication_name) or set()
        await ensure_publication(conn, self.publication_name, self.tables)
        await ensure_state_table(conn)
        return before

    async def slot(self, conn: psycopg.AsyncConnection[Any]) -> SlotState | None:
        row = await (
            await conn.execute(
                "SELECT confirmed_flush_lsn::text, active_pid, wal_status"
                " FROM pg_replication_slots WHERE slot_name = %s",
                (self.slot_name,),
            )
        ).fetchone()
        if row is None:
            return None
        lsn = parse_lsn(row[0]) if row[0] else 0
        return SlotState(lsn, row[1] or None, row[2] == "lost")

    async def create_slot(
        self, replication: psycopg.AsyncConnection[Any], *, export_snapshot: bool
    ) -> CreatedSlot:
        """CREATE_REPLICATION_SLOT on a replication connection (`replication.py`). With
        `export_snapshot` the snapshot stays usable while that connection stays open and
        runs nothing else."""
        row = await (
            await replication.execute(
                sql.SQL("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput ({})").format(
                    sql.Identifier(self.slot_name),
                    sql.SQL("SNAPSHOT 'export'" if export_snapshot else "SNAPSHOT 'nothing'"),
                )
            )
        ).fetchone()
        assert row is not None  # slot_name, consistent_point, snapshot_name, output_plugin
        return CreatedSlot(parse_lsn(row[1]), row[2] if export_snapshot else None)

    async def drop_slot(self, conn: psycopg.AsyncConnection[Any], active_pid: int | None) -> None:
        """Drop the slot to start over (lost, or a snapshot that cannot resume), ending the
        walsender still holding it (our own previous connection)."""
        if active_pid:
            await conn.execute("SELECT pg_terminate_backend(%s)", (active_pid,))
            await asyncio.sleep(0.2)
        await conn.execute("SELECT pg_drop_replication_slot(%s)", (self.slot_name,))

    # -- teardown ------------------------------------------------------------------------

    async def teardown(self, force: bool = False) -> list[str]:
        """Drop the slot and the publication; returns what was done, one line each. Raises
        TeardownRefusedError (with what was done before) when the slot is in use and not
        `force`, or when a running pipeline re-creates it."""
        done: list[str] = []
        async with await self._connect() as conn:
            existed = await self._drop_slot_unless_used(conn, force, done)
            done.append(
                f"dropped replication slot {self.slot_name}"
                if existed
                else f"replication slot {self.slot_name} did not exist"
            )
            exists = await (
                await conn.execute(
                    "SELECT 1 FROM pg_publication WHERE pubname = %s", (self.publication_name,)
                )
            ).fetchone()
            if exists:
                await conn.execute(
                    sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(self.publication_name))
                )
                done.append(f"dropped publication {self.publication_name}")
            else:
                done.append(f"publication {self.publication_name} did not exist")
            await forget_slot_state(conn, self.slot_name)
            await self._check_settled(conn, done)
        return done

    async def _drop_slot_unless_used(
        self, conn: psycopg.AsyncConnection[Any], force: bool, done: list[str]
    ) -> bool:
        """Drop the slot; whether it existed."""
        deadline = time.monotonic() + self.retry_seconds
        existed = False
        while (user := await self._slot_user(conn)) is not None:
            existed = True
            pid, who = user
            if pid is not None:
                if not force:
                    raise self._in_use(who, force, done)
                await conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            try:
                await conn.execute("SELECT pg_drop_replication_slot(%s)", (self.slot_name,))
                break
            except psycopg.errors.ObjectInUse:
                # A client (re)connected between the check and the drop.
                if time.monotonic() > deadline:
                    raise self._in_use(who, force, done) from None
                await asyncio.sleep(0.2)
            except psycopg.errors.UndefinedObject:
                break  # dropped meanwhile by someone else
        return existed

    async def _check_settled(self, conn: psycopg.AsyncConnection[Any], done: list[str]) -> None:
        """A pipeline still running somewhere re-creates its slot within seconds (measured:
        about 2 s when its ingest is restarted by `cdc run`)."""
        settled = time.monotonic() + self.settle_seconds
        while True:
            user = await self._slot_user(conn)
            if user is not None:
                raise TeardownRefusedError(
                    f"replication slot {self.slot_name} was re-created right after the drop"
                    f" ({user[1]}): the pipeline is still running; stop it, then undeploy again",
                    done,
                )
            if time.monotonic() >= settled:
                return
            await asyncio.sleep(0.25)

    def _in_use(self, who: str, force: bool, done: list[str]) -> TeardownRefusedError:
        return TeardownRefusedError(
            f"replication slot {self.slot_name} is in use ({who}): stop the pipeline first"
            + ("" if force else " (or pass --force to terminate the walsender)"),
            done,
        )

    async def _slot_user(self, conn: psycopg.AsyncConnection[Any]) -> tuple[int | None, str] | None:
        """None when the slot does not exist, else (walsender pid or None, who that is)."""
        row = await (
            await conn.execute(
                "SELECT s.active_pid, a.client_addr::text, a.application_name"
                " FROM pg_replication_slots s"
                " LEFT JOIN pg_stat_activity a ON a.pid = s.active_pid"
                " WHERE s.slot_name = %s",
                (self.slot_name,),
            )
        ).fetchone()
        if row is None:
            return None
        pid, addr, app = row
        who = f"walsender pid {pid}, client {addr or 'local socket'}"
        if app:
            who += f", application_name {app!r}"
        return (pid or None), who

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(
            self.conninfo, connect_timeout=10, autocommit=True
        )
