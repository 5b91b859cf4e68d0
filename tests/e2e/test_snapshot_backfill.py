"""Chunked, resumable initial snapshots; backfills while streaming; heartbeats on idle slots.

Real PostgreSQL and real `cdc` stages. Every test ends comparing source and sink row by row.
"""

from __future__ import annotations

import random
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.support.pipeline import (
    Background,
    PipelineFiles,
    assert_tables_equal,
    free_port,
    http_json,
    http_status,
    ingest_stage,
    pipeline_with_ddl,
    running_stages,
    sink_stage,
    stage_logs,
    table_rows,
    tables_equal,
    wait_until,
)
from tests.support.postgres import PgTestContext

TABLES = ("public.items", "public.events", "public.accounts")

DDL = """
CREATE TABLE public.items (id integer PRIMARY KEY, sku text NOT NULL, qty integer, note text);
CREATE TABLE public.events (id bigint PRIMARY KEY, kind text, payload jsonb);
CREATE TABLE public.accounts (
    tenant integer, id integer, balance numeric(14, 2), PRIMARY KEY (tenant, id));
"""

SEED = """
INSERT INTO public.items SELECT g, 'sku-' || g, g % 97, repeat('n', g % 40)
    FROM generate_series(1, 20000) g;
INSERT INTO public.events SELECT g, 'k' || (g % 7), jsonb_build_object('g', g)
    FROM generate_series(1, 20000) g;
INSERT INTO public.accounts SELECT t, i, (t * i) / 100.0
    FROM generate_series(1, 10) t, generate_series(1, 1000) i;
"""


def _setup(pg: Any, tmp_path: Path, **source: Any) -> tuple[str, str, PipelineFiles]:
    return pipeline_with_ddl(pg, tmp_path, DDL + SEED, TABLES, extra_source=source)


class Storm(Background):
    """Small transactions of inserts, updates and deletes on all three tables."""

    interval = 0.002

    def __init__(self, dsn: str, seed: int = 3) -> None:
        super().__init__()
        self.conn = psycopg.connect(dsn)
        self.rng = random.Random(seed)
        self.changes = 0
        self.next_id = 100_000

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.conn.close()

    def step(self) -> None:
        rng, conn = self.rng, self.conn
        with conn.transaction():
            for _ in range(rng.randint(1, 10)):
                r = rng.random()
                if r < 0.35:
                    conn.execute(
                        "UPDATE public.items SET qty = qty + 1, note = %s WHERE id = %s",
                        (f"n{self.changes}", rng.randint(1, 20000)),
                    )
                elif r < 0.55:
                    conn.execute(
                        "UPDATE public.accounts SET balance = balance + 1"
                        " WHERE tenant = %s AND id = %s",
                        (rng.randint(1, 10), rng.randint(1, 1000)),
                    )
                elif r < 0.7:
                    self.next_id += 1
                    conn.execute(
                        "INSERT INTO public.events VALUES (%s, 'new', '{}')", (self.next_id,)
                    )
                elif r < 0.85:
                    conn.execute("DELETE FROM public.items WHERE id = %s", (rng.randint(1, 20000),))
                else:
                    conn.execute(
                        "DELETE FROM public.events WHERE id = %s", (rng.randint(1, 20000),)
                    )
                self.changes += 1


def _snapshot_state(dsn: str, slot: str) -> tuple[str, str] | None:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT status, consistent_lsn::text FROM cdc_platform.snapshot_state"
            " WHERE slot_name = %s",
            (slot,),
        ).fetchone()
    return (row[0], row[1]) if row else None


def _progress(dsn: str, slot: str, kind: str = "snapshot") -> dict[str, tuple[int, bool]]:
    with psycopg.connect(dsn) as conn:
        try:
            rows = conn.execute(
                "SELECT table_name, rows_read, done FROM cdc_platform.snapshot_progress"
                " WHERE slot_name = %s AND kind = %s",
                (slot, kind),
            ).fetchall()
        except psycopg.errors.UndefinedTable:
            return {}
    return {r[0]: (r[1], r[2]) for r in rows}


def _wait_equal(source_dsn: str, replica_dsn: str, *stages: Any) -> None:
    """Wait for sink = source; on timeout show which rows differ, and the logs."""
    try:
        wait_until(lambda: tables_equal(source_dsn, replica_dsn, TABLES), 120, "sink = source")
    except AssertionError:
        lines = []
        for table in TABLES:
            src = {repr(r) for r in table_rows(source_dsn, table)}
            dst = {repr(r) for r in table_rows(replica_dsn, table)}
            lines.append(
                f"{table}: only in source {sorted(src - dst)[:5]},"
                f" only in sink {sorted(dst - src)[:5]}"
            )
        raise AssertionError("\n".join(lines) + "\n" + stage_logs(*stages)) from None


def test_snapshot_is_chunked_parallel_and_resumes_after_kill_9(pg, tmp_path: Path) -> None:
    source_dsn, replica_dsn, files = _setup(
        pg, tmp_path, snapshot_chunk_size=500, snapshot_parallelism=2
    )
    sink_port = free_port()
    sink = sink_stage(files, tmp_path, sink_port).start()
    ingest = ingest_stage(files, tmp_path, {"replica": sink_port}).start()
    try:
        with Storm(source_dsn) as storm:
            # Kill the ingest once some chunks are committed but the snapshot is not done.
            def partly_done() -> bool:
                progress = _progress(source_dsn, files.slot)
                return any(rows > 0 for rows, _ in progress.values())

            wait_until(partly_done, 60, "first snapshot chunks committed\n" + stage_logs(ingest))
            ingest.kill9()
            at_kill = _progress(source_dsn, files.slot)
            state_at_kill = _snapshot_state(source_dsn, files.slot)
            assert state_at_kill is not None and state_at_kill[0] == "running", (
                state_at_kill,
                at_kill,
            )
            assert not all(done for _, done in at_kill.values()), at_kill
            ingest.start()
            wait_until(
                lambda: (_snapshot_state(source_dsn, files.slot) or ("",))[0] == "done",
                120,
                "snapshot done after restart\n" + stage_logs(ingest, sink),
            )
            time.sleep(0.5)
        assert storm.changes > 0
        _wait_equal(source_dsn, replica_dsn, ingest, sink)
        assert_tables_equal(source_dsn, replica_dsn, TABLES)
    finally:
        for stage in (ingest, sink):
            if stage.alive():
                stage.terminate()
    # It resumed rather than starting over: same slot (same consistent point), the log
    # says so, and every table's row count continued from where it was at the kill.
    assert _snapshot_state(source_dsn, files.slot) == ("done", state_at_kill[1])
    assert "snapshot.resuming" in ingest.log_path.read_text()
    final = _progress(source_dsn, files.slot)
    assert set(final) == set(TABLES) and all(done for _, done in final.values()), final
    for table, (rows, _) in at_kill.items():
        assert final[table][0] >= rows


def test_backfill_during_update_storm_repairs_the_sink(pg, tmp_path: Path) -> None:
    source_dsn, replica_dsn, files = _setup(pg, tmp_path, snapshot_chunk_size=1000)
    with running_stages(files, tmp_path) as (ingest, sinks):
        sink = sinks["replica"]
        wait_until(
            lambda: tables_equal(source_dsn, replica_dsn, TABLES),
            120,
            "snapshot replicated\n" + stage_logs(ingest, sink),
        )
        # Damage the sink behind the pipeline's back: the backfill must repair it.
        with psycopg.connect(replica_dsn, autocommit=True) as conn:
            conn.execute("DELETE FROM public.items WHERE id % 10 = 0")
            conn.execute("UPDATE public.accounts SET balance = -1 WHERE id % 7 = 0")
        with Storm(source_dsn, seed=11) as storm:
            time.sleep(0.5)
            result = subprocess.run(
                files.argv(
                    "backfill",
                    *("--table", "public.items", "--table", "public.accounts"),
                    *("--timeout", "120"),
                ),
                capture_output=True,
                text=True,
                timeout=180,
            )
            assert result.returncode == 0, result.stdout + result.stderr + stage_logs(ingest)
            assert "done" in result.stdout, result.stdout
        assert storm.changes > 100
        _wait_equal(source_dsn, replica_dsn, ingest, sink)
        assert_tables_equal(source_dsn, replica_dsn, TABLES)
    backfilled = _progress(source_dsn, files.slot, kind="backfill")
    assert set(backfilled) == {"public.items", "public.accounts"}
    assert all(done for _, done in backfilled.values()), backfilled
    with psycopg.connect(source_dsn) as conn:
        row = conn.execute(
            "SELECT finished_at IS NOT NULL, rows_read, error FROM cdc_platform.signals"
        ).fetchone()
    assert row is not None and row[0] and row[2] is None, row
    assert row[1] > 20_000  # both tables re-read (minus what the storm deleted)


def test_backfill_of_a_table_the_pipeline_does_not_capture_exits_2(pg, tmp_path: Path) -> None:
    _source_dsn, _replica_dsn, files = _setup(pg, tmp_path)
    result = subprocess.run(
        files.argv("backfill", "--table", "public.nope"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "public.nope" in result.stderr and "source.tables" in result.stderr


@pytest.mark.parametrize("heartbeat_mode", ["message", "none"])
def test_idle_watched_tables_do_not_retain_wal_while_another_table_is_busy(
    pg, tmp_path: Path, heartbeat_mode: str
) -> None:
    # heartbeat_mode none reads no interval, and cdc refuses a setting nothing reads
    interval = {} if heartbeat_mode == "none" else {"heartbeat_interval_seconds": 1.0}
    source_dsn, replica_dsn, files = _setup(
        pg, tmp_path, snapshot_mode="never", heartbeat_mode=heartbeat_mode, **interval
    )
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.busy (id bigserial PRIMARY KEY, pad text)")
    sink_port = free_port()
    sink = sink_stage(files, tmp_path, sink_port).start()
    ingest = ingest_stage(files, tmp_path, {"replica": sink_port}).start()

    def retained() -> tuple[int, int]:
        with psycopg.connect(source_dsn) as conn:
            row = conn.execute(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint,"
                " pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint"
                " FROM pg_replication_slots WHERE slot_name = %s",
                (files.slot,),
            ).fetchone()
        assert row is not None
        return row[0], row[1]

    try:
        wait_until(lambda: _snapshot_state(source_dsn, files.slot) is not None, 60, "slot")
        with psycopg.connect(source_dsn, autocommit=True) as conn:
            conn.execute("UPDATE public.items SET qty = 0 WHERE id = 1")  # one watched change
            start = conn.execute("SELECT pg_current_wal_lsn()").fetchone()
            for _ in range(40):  # ~40 MB of WAL on a table nobody captures
                conn.execute(
                    "INSERT INTO public.busy (pad) SELECT repeat('x', 900)"
                    " FROM generate_series(1, 1000)"
                )
            assert start is not None
            generated = conn.execute(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)::bigint", (start[0],)
            ).fetchone()
            # restart_lsn moves at the server's next running-transactions record (every
            # 15 s, or at a checkpoint); a checkpoint keeps the test short.
            conn.execute("CHECKPOINT")
        assert generated is not None
        busy_until = time.monotonic()
        wait_until(lambda: retained()[0] < 1_000_000, 30, f"slot confirmed: {retained()}")
        wait_until(lambda: retained()[1] < 16 * 1024 * 1024, 60, f"WAL released: {retained()}")
        lag, kept = retained()
        print(
            f"heartbeat_mode={heartbeat_mode}: {generated[0] >> 20} MiB written; lag {lag} B,"
            f" retained WAL {kept} B after {time.monotonic() - busy_until:.1f} s"
        )

        def replicated() -> bool:
            with psycopg.connect(replica_dsn) as conn:
                try:
                    rows = conn.execute("SELECT id, qty FROM public.items").fetchall()
                except psycopg.errors.UndefinedTable:
                    return False
            return rows == [(1, 0)]

        wait_until(replicated, 60, "the one watched change replicated")
    finally:
        for stage in (ingest, sink):
            if stage.alive():
                stage.terminate()


def _make_slot_lost(dsn: str, slot: str) -> None:
    """Write WAL past max_slot_wal_keep_size and checkpoint until the slot is invalidated."""

    def status() -> str | None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s", (slot,)
            ).fetchone()
        return row[0] if row else None

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS public.filler (pad text)")
        for _ in range(12):
            if status() == "lost":
                return
            conn.execute(
                "INSERT INTO public.filler SELECT repeat('x', 1000) FROM generate_series(1, 8000)"
            )
            conn.execute("SELECT pg_switch_wal()")
            conn.execute("CHECKPOINT")
    assert status() == "lost", status()


@pytest.mark.parametrize("snapshot_mode", ["when_needed", "initial"])
def test_a_lost_slot_resnapshots_with_when_needed_and_is_reported_otherwise(
    pg_server_factory, tmp_path: Path, snapshot_mode: str
) -> None:
    server = pg_server_factory(settings={"max_slot_wal_keep_size": "1MB"})
    source_dsn, replica_dsn, files = _setup(
        PgTestContext(server), tmp_path, snapshot_mode=snapshot_mode
    )
    sink_port = free_port()
    sink = sink_stage(files, tmp_path, sink_port).start()
    ingest = ingest_stage(files, tmp_path, {"replica": sink_port}).start()
    try:
        _wait_equal(source_dsn, replica_dsn, ingest, sink)
        assert ingest.terminate() == 0
        with psycopg.connect(source_dsn, autocommit=True) as conn:  # changes the slot will lose
            conn.execute("UPDATE public.items SET qty = -1 WHERE id <= 100")
            conn.execute("INSERT INTO public.events VALUES (900001, 'while lost', '{}')")
        _make_slot_lost(source_dsn, files.slot)
        ingest.start()
        if snapshot_mode == "when_needed":
            # (A delete made while the slot was lost would stay in the sink: a snapshot
            # upserts what exists and cannot know what is gone. docs/capture.md says so.)
            _wait_equal(source_dsn, replica_dsn, ingest, sink)
            assert_tables_equal(source_dsn, replica_dsn, TABLES)
            assert "slot.lost_resnapshot" in ingest.log_path.read_text()
        else:

            def reported() -> bool:
                body = http_json(files.health_port, "/readyz")
                return "is lost" in str(body["components"]["source"])

            wait_until(reported, 60, stage_logs(ingest))
            assert http_status(files.health_port, "/readyz") == 503
            time.sleep(2)
            assert ingest.alive(), "a lost slot is reported, not a crash loop"
    finally:
        for stage in (ingest, sink):
            if stage.alive():
                stage.terminate()
