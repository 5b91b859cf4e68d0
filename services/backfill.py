"""`cdc backfill`: ask the running WAL reader to re-read tables while it keeps streaming."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import psycopg

from adapters.config import PipelineConfig, PlatformConfig
from adapters.postgres.source.signals import request_backfill, signal_status
from services.ingest.container import source_conninfo


class BackfillRequestError(ValueError):
    """The request names something the pipeline cannot backfill."""


def check_request(
    pipeline: PipelineConfig, platform: PlatformConfig, tables: Sequence[str]
) -> None:
    if not platform.reads_wal:
        raise BackfillRequestError(
            f"transport_mode {platform.transport_mode} captures through Debezium; use its"
            " incremental snapshot signal instead of `cdc backfill`"
        )
    unknown = [t for t in tables if t not in pipeline.source.tables]
    if unknown:
        raise BackfillRequestError(
            f"not in source.tables of pipeline '{pipeline.pipeline_id}': {', '.join(unknown)}"
            f" (captured: {', '.join(pipeline.source.tables)})"
        )


async def backfill(
    pipeline: PipelineConfig,
    platform: PlatformConfig,
    tables: Sequence[str],
    wait: bool,
    timeout_seconds: float,
    say: Callable[[str], None] = print,
) -> int:
    """Queue a backfill signal; with `wait`, follow it to the end. Exit code: 0 done,
    1 refused by the reader or not finished within the timeout."""
    check_request(pipeline, platform, tables)
    slot = pipeline.effective_slot_name(platform)
    async with await psycopg.AsyncConnection.connect(
        source_conninfo(pipeline), autocommit=True, connect_timeout=10
    ) as conn:
        signal_id = await request_backfill(conn, slot, tables)
        say(f"backfill {signal_id} queued for {', '.join(tables)} (slot {slot})")
        if not wait:
            return 0
        deadline = time.monotonic() + timeout_seconds
        announced = False
        while time.monotonic() < deadline:
            status = await signal_status(conn, signal_id)
            if status is None:
                say(f"backfill {signal_id} vanished from cdc_platform.signals")
                return 1
            if status.error:
                say(f"backfill {signal_id} refused: {status.error}")
                return 1
            if status.started_at and not announced:
                say(f"backfill {signal_id} started")
                announced = True
            if status.finished_at:
                say(f"backfill {signal_id} done: {status.rows_read or 0} rows re-read")
                return 0
            await asyncio.sleep(0.5)
    say(
        f"backfill {signal_id} not finished after {timeout_seconds:g} s; it goes on in the"
        " reader (is the pipeline running?)"
    )
    return 1
