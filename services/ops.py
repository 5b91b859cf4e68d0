"""Operator commands behind `cdc health` and `cdc undeploy`."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
from psycopg import sql

from adapters.config import PipelineConfig, PlatformConfig
from adapters.postgres.catalog import (
    forget_slot_state,
    identity_problems,
    missing_generated_columns,
)
from adapters.postgres.slot_monitor import check_slot
from domain.health import ComponentHealth, Status, overall
from services.ingest.container import source_conninfo
from services.sink.container import SinkContainer


async def slot_health(pipeline: PipelineConfig, platform: PlatformConfig) -> ComponentHealth:
    """The slot as `cdc health` shows it: the same query and threshold as the ingest's
    monitor; a missing slot is DEGRADED here (the pipeline may not have run yet)."""
    return await check_slot(
        source_conninfo(pipeline),
        pipeline.effective_slot_name(platform),
        lag_degraded_bytes=platform.wal_reader.slot_lag_degraded_bytes,
        missing=Status.DEGRADED,
        name="source",
    )


async def pipeline_health(
    pipeline: PipelineConfig | None, platform: PlatformConfig
) -> dict[str, Any]:
    components: list[ComponentHealth] = []
    if pipeline is not None and platform.transport_mode == "direct":
        components.append(await slot_health(pipeline, platform))
    if platform.transport_mode == "kafka":
        from services import kafka_ops

        components += await kafka_ops.platform_health(platform)
        if pipeline is not None:
            components += await kafka_ops.pipeline_components(pipeline, platform)
    if pipeline is not None:
        for sink in pipeline.enabled_sinks:
            try:
                writer = SinkContainer(pipeline=pipeline, sink=sink, platform=platform).writer()
            except RuntimeError as exc:
                components.append(
                    ComponentHealth(f"sink:{sink.sink_id}", Status.ERROR, {"error": str(exc)})
                )
                continue
            await writer.start()
            try:
                components.append(await writer.health())
            finally:
                await writer.stop()
    return {
        "status": overall(components).value,
        "transport_mode": platform.transport_mode,
        "components": {c.name: c.as_dict() for c in components},
    }


class UndeployError(Exception):
    """Undeploy refused or failed; `done` lists what it did before."""

    def __init__(self, message: str, done: list[str]) -> None:
        super().__init__(message)
        self.done = done


async def _slot_user(
    conn: psycopg.AsyncConnection[Any], slot: str
) -> tuple[int | None, str] | None:
    """None when the slot does not exist, else (walsender pid or None, who that is)."""
    row = await (
        await conn.execute(
            "SELECT s.active_pid, a.client_addr::text, a.application_name"
            " FROM pg_replication_slots s LEFT JOIN pg_stat_activity a ON a.pid = s.active_pid"
            " WHERE s.slot_name = %s",
            (slot,),
        )
    ).fetchone()
    if row is None:
        return None
    pid, addr, app = row
    who = f"walsender pid {pid}, client {addr or 'local socket'}"
    if app:
        who += f", application_name {app!r}"
    return (pid or None), who


async def undeploy(
    pipeline: PipelineConfig,
    platform: PlatformConfig,
    *,
    force: bool = False,
    retry_seconds: float = 10.0,
    settle_seconds: float = 6.0,
    delete_topics: bool = False,
) -> list[str]:
    """Drop the pipeline's slot and publication; sink data is never touched.

    An active slot (a pipeline streams from it) is refused unless `force`, which terminates
    its walsender and retries the drop while the client reconnects. The end is checked: the
    slot must still be gone `settle_seconds` later, else a running pipeline re-created it
    and this raises UndeployError, as for any refusal."""
    done: list[str] = []
    if platform.transport_mode == "kafka":
        # The Debezium connector first (it holds the slot); topics only with --delete-topics.
        from services import kafka_ops

        done += await kafka_ops.remove_connector(pipeline, platform, delete_topics=delete_topics)
        if pipeline.source.source_type != "postgres":
            return done
    slot = pipeline.effective_slot_name(platform)
    publication = pipeline.effective_publication_name(platform)

    def in_use(who: str) -> UndeployError:
        return UndeployError(
            f"replication slot {slot} is in use ({who}): stop the pipeline first"
            + ("" if force else " (or pass --force to terminate the walsender)"),
            done,
        )

    async with await psycopg.AsyncConnection.connect(
        source_conninfo(pipeline), connect_timeout=10, autocommit=True
    ) as conn:
        deadline = time.monotonic() + retry_seconds
        existed = False
        while (state := await _slot_user(conn, slot)) is not None:
            existed = True
            pid, who = state
            if pid is not None:
                if not force:
                    raise in_use(who)
                await conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            try:
                await conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                break
            except psycopg.errors.ObjectInUse:
                # A client (re)connected between the check and the drop.
                if time.monotonic() > deadline:
                    raise in_use(who) from None
                await asyncio.sleep(0.2)
            except psycopg.errors.UndefinedObject:
                break  # dropped meanwhile by someone else
        done.append(
            f"dropped replication slot {slot}"
            if existed
            else f"replication slot {slot} did not exist"
        )
        exists = await (
            await conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (publication,))
        ).fetchone()
        if exists:
            await conn.execute(sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(publication)))
            done.append(f"dropped publication {publication}")
        else:
            done.append(f"publication {publication} did not exist")
        await forget_slot_state(conn, slot)
        # A pipeline still running somewhere re-creates its slot within seconds (measured:
        # about 2 s when its ingest is restarted by `cdc run`).
        settled = time.monotonic() + settle_seconds
        while True:
            state = await _slot_user(conn, slot)
            if state is not None:
                raise UndeployError(
                    f"replication slot {slot} was re-created right after the drop ({state[1]}):"
                    " the pipeline is still running; stop it, then undeploy again",
                    done,
                )
            if time.monotonic() >= settled:
                break
            await asyncio.sleep(0.25)
    return done


class SourceChecksSkipped(Exception):
    """The source database could not be asked (unreachable, refused); says why."""


async def source_warnings(
    pipeline: PipelineConfig, platform: PlatformConfig, *, connect_timeout: int = 5
) -> list[str]:
    """What `cdc validate` warns about on a reachable PostgreSQL source: captured tables
    that do not exist, tables whose UPDATEs and DELETEs cannot be captured (no replica
    identity), generated columns pgoutput will not send. Raises SourceChecksSkipped when
    the source cannot be asked; other source types get no checks."""
    if pipeline.source.source_type != "postgres":
        return []
    tables = pipeline.source.tables
    try:
        conn = await psycopg.AsyncConnection.connect(
            source_conninfo(pipeline), connect_timeout=connect_timeout, autocommit=True
        )
    except (psycopg.Error, OSError) as exc:
        raise SourceChecksSkipped(" ".join(str(exc).split()) or type(exc).__name__) from exc
    warnings: list[str] = []
    async with conn:
        for table in tables:
            schema, _, name = table.partition(".")
            row = await (
                await conn.execute(
                    "SELECT to_regclass(quote_ident(%s) || '.' || quote_ident(%s))",
                    (schema, name),
                )
            ).fetchone()
            if row is None or row[0] is None:
                warnings.append(f"table {table} does not exist in database {conn.info.dbname}")
        warnings += [p.describe() for p in await identity_problems(conn, tables)]
        for table, columns in (await missing_generated_columns(conn, tables)).items():
            warnings.append(
                f"table {table}: generated column(s) {', '.join(columns)} will be missing in"
                " the sinks (pgoutput sends stored generated columns only from PostgreSQL 18,"
                " virtual ones never)"
            )
    return warnings
