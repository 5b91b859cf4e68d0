"""Operator commands behind `cdc health`, `cdc undeploy` and the source checks of
`cdc validate`."""

from __future__ import annotations

from typing import Any

import psycopg

from adapters.config import PipelineConfig, PlatformConfig
from adapters.postgres.source.catalog import identity_problems, missing_generated_columns
from adapters.postgres.source.slot_monitor import check_slot
from domain.errors import TeardownRefusedError
from domain.health import ComponentHealth, Status, overall
from services import registry
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


# A refused or unfinished teardown (the slot is in use, a pipeline re-created it); `done`
# lists what was removed before.
UndeployError = TeardownRefusedError


async def undeploy(
    pipeline: PipelineConfig,
    platform: PlatformConfig,
    *,
    force: bool = False,
    delete_topics: bool = False,
) -> list[str]:
    """Remove the pipeline's transport resources through its transport's `Provisioner`
    (for the WAL: the slot and the publication); sink data is never touched.

    A slot in use (a pipeline streams from it) is refused unless `force`, which terminates
    its walsender; a slot re-created right after the drop means a pipeline is still
    running, and is refused too (UndeployError)."""
    transport = registry.TRANSPORTS[platform.transport_mode]
    if transport.provisioner is None:
        raise UndeployError(
            f"transport_mode {transport.name} has no provisioner in this release:"
            " nothing to undeploy",
            [],
        )
    if delete_topics:  # kafka only (the CLI refuses it otherwise)
        from adapters.kafka.provisioner import KafkaProvisioner

        provisioner = KafkaProvisioner(pipeline, platform, delete_topics=True)
        return list(await provisioner.teardown(force=force))
    return list(await transport.provisioner(pipeline, platform).teardown(force=force))


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
