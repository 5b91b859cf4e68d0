"""The replication slot's health (adapters/postgres/source/slot_monitor.py) against real PostgreSQL:
the shared query behind `cdc health`, and the ingest's periodic monitor."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from structlog.testing import capture_logs

from adapters.config import load_pipeline, load_platform
from adapters.postgres.source.slot_monitor import (
    PostgresSlotMonitor,
    SlotState,
    check_slot,
    judge_slot,
)
from domain.health import Status
from services.metrics import IngestMetrics
from services.net import find_free_port
from services.ops import slot_health
from tests.support.pipeline import (
    free_port,
    http_json,
    http_status,
    ingest_stage,
    new_pipeline,
    sink_stage,
    tables_equal,
    wait_until,
    write_configs,
)
from tests.support.postgres import PgTestContext
from tests.support.workload import TABLES

pytestmark = pytest.mark.integration


def _new_slot(pg: PgTestContext) -> tuple[str, str]:
    """A database with a logical slot of its own (dropped with the database): (dsn, slot)."""
    dsn = pg.dsn(pg.new_database("slot"))
    slot = f"mon_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
        conn.execute("CREATE TABLE filler (id bigint PRIMARY KEY, pad text)")
    return dsn, slot


def _write_wal(dsn: str, rows: int = 2_000) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        start = conn.execute("SELECT coalesce(max(id), 0) FROM filler").fetchone()
        first = int(start[0]) + 1 if start else 1
        conn.execute(
            "INSERT INTO filler SELECT g, repeat('x', 100)"
            " FROM generate_series(%s::bigint, %s::bigint) g",
            (first, first + rows - 1),
        )


async def _until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


def test_lag_grows_with_wal_and_the_threshold_decides_degraded(pg: PgTestContext) -> None:
    dsn, slot = _new_slot(pg)
    big = 1 << 40

    first = asyncio.run(check_slot(dsn, slot, lag_degraded_bytes=big))
    assert first.status is Status.OK, first
    assert first.detail["exists"] is True
    assert first.detail["active"] is False and first.detail["active_pid"] is None
    assert first.detail["wal_status"] == "reserved"
    lag0 = first.detail["lag_bytes"]
    retained0 = first.detail["retained_wal_bytes"]
    assert lag0 >= 0 and retained0 >= lag0

    _write_wal(dsn)
    after = asyncio.run(check_slot(dsn, slot, lag_degraded_bytes=big))
    lag1 = after.detail["lag_bytes"]
    assert lag1 > lag0 + 100_000, (lag0, lag1)  # 2000 rows of ~130 bytes, plus WAL overhead
    assert after.detail["retained_wal_bytes"] > retained0
    assert after.status is Status.OK

    over = asyncio.run(check_slot(dsn, slot, lag_degraded_bytes=100_000))
    assert over.status is Status.DEGRADED
    assert "lag" in over.detail["reason"] and over.detail["lag_degraded_bytes"] == 100_000
    under = asyncio.run(check_slot(dsn, slot, lag_degraded_bytes=lag1 * 10))
    assert under.status is Status.OK and "reason" not in under.detail


def test_missing_slot_and_unreachable_database(pg: PgTestContext) -> None:
    dsn = pg.dsn(pg.new_database("slot"))
    # `cdc health`: a pipeline that has not run yet has no slot; that is not an outage
    missing = asyncio.run(check_slot(dsn, "no_such_slot", lag_degraded_bytes=1))
    assert missing.status is Status.DEGRADED
    assert missing.detail == {
        "slot": "no_such_slot",
        "exists": False,
        "lag_degraded_bytes": 1,
        "reason": "replication slot does not exist",
    }
    nowhere = f"host=127.0.0.1 port={find_free_port()} dbname=x user=postgres"
    down = asyncio.run(check_slot(nowhere, "s", lag_degraded_bytes=1, connect_timeout=2))
    assert down.status is Status.ERROR
    assert down.detail["error"].startswith("database unreachable: OperationalError")


def test_cdc_health_uses_the_platform_threshold(pg: PgTestContext, tmp_path: Path) -> None:
    source_db = pg.new_database("src")
    files = write_configs(
        tmp_path,
        host=pg.host,
        port=pg.port,
        source_db=source_db,
        replica_db="unused",
        tables=["public.filler"],
        extra_platform={"wal_reader": {"slot_lag_degraded_bytes": 50_000}},
    )
    platform = load_platform(files.platform)
    pipeline = load_pipeline(files.pipeline, platform=platform)
    dsn = pg.dsn(source_db)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (files.slot,))
        conn.execute("CREATE TABLE filler (id bigint PRIMARY KEY, pad text)")
    _write_wal(dsn)
    health = asyncio.run(slot_health(pipeline, platform))
    assert health.name == "source"
    assert health.status is Status.DEGRADED, health
    assert health.detail["slot"] == files.slot and health.detail["lag_degraded_bytes"] == 50_000


def test_monitor_polls_exports_logs_and_reports_a_dropped_slot_as_error(
    pg: PgTestContext,
) -> None:
    dsn, slot = _new_slot(pg)
    reading: dict[str, Any] = {}

    def gauge(name: str) -> float | None:
        # The ingest exports the monitor's reading (services/metrics.py): do the same.
        metrics = IngestMetrics("p")
        metrics.slot_reading(reading)
        return metrics.registry.get_sample_value(name, {"pipeline": "p"})

    async def scenario() -> None:
        monitor = PostgresSlotMonitor(dsn, slot, interval_seconds=0.1, lag_degraded_bytes=1 << 40)
        assert (await monitor.health()).detail == {"slot": slot, "checked": False}
        await monitor.start()
        try:
            await _until(lambda: monitor.polls >= 1, 15, "a first poll")
            health = await monitor.health()
            assert health.name == "slot" and health.status is Status.OK, health
            assert (await monitor.lag())["lag_bytes"] == health.detail["lag_bytes"]
            reading.update(health.detail)
            assert gauge("cdc_source_slot_active") == 0
            lag0 = gauge("cdc_source_slot_lag_bytes")
            assert lag0 is not None
            assert gauge("cdc_source_slot_retained_wal_bytes") is not None

            await asyncio.to_thread(_write_wal, dsn)

            async def lag_grew() -> bool:
                reading.update((await monitor.health()).detail)
                return (gauge("cdc_source_slot_lag_bytes") or 0) > lag0 + 100_000

            for _ in range(150):
                if await lag_grew():
                    break
                await asyncio.sleep(0.1)
            assert await lag_grew(), "the lag gauge to grow"
            monitor.lag_degraded_bytes = 100_000
            polls = monitor.polls
            await _until(lambda: monitor.polls > polls + 1, 15, "more polls")
            assert (await monitor.health()).status is Status.DEGRADED

            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            polls = monitor.polls
            await _until(lambda: monitor.polls > polls + 1, 15, "polls after the drop")
            gone = await monitor.health()
            assert gone.status is Status.ERROR and gone.detail["exists"] is False
            reading.clear()
            reading.update(gone.detail)
            assert gauge("cdc_source_slot_active") == 0
        finally:
            await monitor.stop()

    with capture_logs() as logs:
        asyncio.run(scenario())
    lines = [e for e in logs if e["event"] == "slot.health"]
    assert lines and lines[0]["slot"] == slot and "lag_bytes" in lines[0]
    assert {"wal_status", "active", "retained_wal_bytes"} <= set(lines[0])
    changes = [e for e in logs if e["event"] == "slot.status_changed"]
    assert [(e["previous"], e["status"]) for e in changes] == [
        ("ok", "degraded"),
        ("degraded", "error"),
    ]


def test_monitor_survives_an_unreachable_database_and_recovers(pg: PgTestContext) -> None:
    """The database does not exist at first (every poll fails as an unreachable one would),
    then it is created with the slot: the monitor retries with backoff and turns OK."""
    name = f"later_{uuid.uuid4().hex[:12]}"
    slot = f"mon_{uuid.uuid4().hex[:12]}"
    dsn = pg.dsn(name)

    async def scenario() -> None:
        monitor = PostgresSlotMonitor(dsn, slot, interval_seconds=0.1, lag_degraded_bytes=1 << 40)
        await monitor.start()
        try:
            await _until(lambda: monitor.polls >= 2, 15, "retries")
            down = await monitor.health()
            assert down.status is Status.ERROR
            assert "database unreachable" in down.detail["error"]
            await asyncio.to_thread(pg.server.create_database, name)
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
            # backoff is at most a few seconds by now
            await _until(
                lambda: monitor._health.status is Status.OK, 30, "recovery after the database"
            )
        finally:
            await monitor.stop()

    try:
        asyncio.run(scenario())
    finally:
        pg.server.drop_database(name)


def _state(**changes: object) -> SlotState:
    base: dict[str, object] = {
        "slot": "s",
        "active": True,
        "active_pid": 7,
        "wal_status": "reserved",
        "safe_wal_size": None,
        "lag_bytes": 10,
        "retained_wal_bytes": 20,
        "confirmed_flush_lsn": "0/10",
        "restart_lsn": "0/8",
        "current_lsn": "0/1A",
    }
    base.update(changes)
    return SlotState(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "status"),
    [
        ({}, Status.OK),
        ({"wal_status": "extended"}, Status.OK),
        ({"wal_status": "unreserved", "safe_wal_size": -5}, Status.DEGRADED),
        ({"wal_status": "lost"}, Status.ERROR),
        ({"wal_status": "lost", "lag_bytes": 500}, Status.ERROR),
        ({"lag_bytes": 101}, Status.DEGRADED),
        ({"lag_bytes": 100}, Status.OK),
        ({"lag_bytes": None, "confirmed_flush_lsn": None}, Status.OK),
    ],
)
def test_judgement_of_wal_status_and_lag(changes: dict[str, object], status: Status) -> None:
    health = judge_slot(
        _state(**changes), slot="s", lag_degraded_bytes=100, missing=Status.ERROR, name="slot"
    )
    assert health.status is status
    assert ("reason" in health.detail) is (status is not Status.OK)


@pytest.mark.e2e
def test_readyz_shows_the_slot_and_a_stalled_sink_degrades_it(
    pg: PgTestContext, tmp_path: Path
) -> None:
    """Real `cdc ingest` and `cdc sink` processes with `slot_lag_degraded_bytes: 1`.

    The sink is stalled rather than stopped: a stopped sink is an ERROR component of its
    own (503), which would hide what the slot reports. Holding a lock on the sink's
    offsets table keeps its write waiting while its gRPC health stays SERVING, so nothing
    is acked, the slot cannot advance, and its lag is what makes /readyz 'degraded'."""
    source_dsn, replica_dsn, files = new_pipeline(
        pg,
        tmp_path,
        seed_rows=20,
        extra_platform={
            "lag_monitor_interval_seconds": 0.5,
            "wal_reader": {"status_interval_seconds": 1.0, "slot_lag_degraded_bytes": 1},
        },
    )
    sink_port = free_port()
    sink = sink_stage(files, tmp_path, sink_port).start()
    ingest = ingest_stage(files, tmp_path, {"replica": sink_port}).start()

    def logs() -> str:
        return "\n".join(f"--- {s.name} ---\n{s.log_tail()}" for s in (sink, ingest))

    def slot() -> dict[str, object]:
        return dict(http_json(files.health_port, "/readyz")["components"]["slot"])

    try:
        wait_until(lambda: http_status(files.health_port, "/readyz") == 200, 60, "ready")
        wait_until(lambda: tables_equal(source_dsn, replica_dsn, TABLES), 60, "snapshot")
        wait_until(lambda: "lag_bytes" in slot(), 30, "a slot reading\n" + logs())
        seen = slot()
        assert seen["slot"] == files.slot and seen["exists"] is True
        assert seen["active"] is True and isinstance(seen["active_pid"], int)
        assert seen["wal_status"] == "reserved"
        assert isinstance(seen["lag_bytes"], int) and isinstance(seen["retained_wal_bytes"], int)
        assert seen["lag_degraded_bytes"] == 1
        with psycopg.connect(replica_dsn) as stall:  # a transaction until rollback()
            stall.execute("LOCK TABLE public._cdc_offsets IN ACCESS EXCLUSIVE MODE")
            with psycopg.connect(source_dsn, autocommit=True) as conn:
                conn.execute(
                    "INSERT INTO public.orders (id, amount)"
                    " SELECT g, g FROM generate_series(1, 200) g"
                )
            wait_until(
                lambda: slot()["status"] == "degraded" and "lag" in str(slot().get("reason")),
                30,
                "slot degraded\n" + logs(),
            )
            assert http_status(files.health_port, "/readyz") == 200
            body = http_json(files.health_port, "/readyz")
            assert body["status"] == "degraded", body
            assert body["components"]["source"]["status"] == "ok", body
            assert body["components"]["sink:replica"]["status"] != "error", body
            stall.rollback()
        wait_until(lambda: tables_equal(source_dsn, replica_dsn, TABLES), 60, "caught up")
        metrics = urllib.request.urlopen(
            f"http://127.0.0.1:{files.health_port}/metrics", timeout=5
        ).read()
        assert b'cdc_source_slot_lag_bytes{pipeline="e2e"}' in metrics
        assert b'cdc_source_slot_active{pipeline="e2e"} 1.0' in metrics
        assert "slot.health" in ingest.log_path.read_text()
        # A column added at the source reaches the ingest as a schema change.
        with psycopg.connect(source_dsn, autocommit=True) as conn:
            conn.execute("ALTER TABLE public.orders ADD COLUMN extra text")
            conn.execute("INSERT INTO public.orders (id, amount, extra) VALUES (999, 1, 'x')")
        wait_until(
            lambda: "schema.version_changed" in ingest.log_path.read_text(),
            30,
            "schema.version_changed\n" + logs(),
        )
        [line] = [
            json.loads(x)
            for x in ingest.log_path.read_text().splitlines()
            if "schema.version_changed" in x
        ]
        assert (line["table"], line["added"], line["dropped"]) == ("public.orders", ["extra"], [])
        metrics = urllib.request.urlopen(
            f"http://127.0.0.1:{files.health_port}/metrics", timeout=5
        ).read()
        assert b'cdc_schema_changes_total{pipeline="e2e",table="public.orders"} 1.0' in metrics
    finally:
        for stage in (ingest, sink):
            if stage.alive():
                assert stage.terminate() == 0, stage.log_tail()
