"""Operator commands behind `cdc health` and `cdc undeploy`."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from adapters.config import PipelineConfig, PlatformConfig
from adapters.postgres.catalog import forget_slot_state
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
    if pipeline is not None:
        for sink in pipeline.enabled_sinks:
            try:
                writer = SinkContainer(pipeline=pipeline, sink=sink).writer()
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


async def undeploy(pipeline: PipelineConfig, platform: PlatformConfig) -> list[str]:
    """Drop the pipeline's slot and publication; sink data is never touched."""
    slot = pipeline.effective_slot_name(platform)
    publication = pipeline.effective_publication_name(platform)
    done: list[str] = []
    async with await psycopg.AsyncConnection.connect(
        source_conninfo(pipeline), connect_timeout=10, autocommit=True
    ) as conn:
        row = await (
            await conn.execute(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)
            )
        ).fetchone()
        if row is not None:
            if row[0]:
                await conn.execute("SELECT pg_terminate_backend(%s)", (row[0],))
            await conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            done.append(f"dropped replication slot {slot}")
        else:
            done.append(f"replication slot {slot} did not exist")
        exists = await (
            await conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (publication,))
        ).fetchone()
        if exists:
            await conn.execute(sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(publication)))
            done.append(f"dropped publication {publication}")
        else:
            done.append(f"publication {publication} did not exist")
        await forget_slot_state(conn, slot)
    return done
