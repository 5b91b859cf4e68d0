"""What the source can do to a captured table, end to end: TOASTed values, TRUNCATE, columns
added / dropped / retyped, a million-row transaction, a source restart, undeploy and redeploy.

Real PostgreSQL, real `cdc` stages (ingest + sink processes talking gRPC). Every test ends
comparing source and sink row by row.
"""

from __future__ import annotations

import contextlib
import json
import random
import string
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
import yaml

from adapters.postgres.source.pgoutput import PgOutputDecoder
from domain.events import UNCHANGED, Operation, SourceEvent
from tests.support.pipeline import (
    REPO,
    Background,
    PipelineFiles,
    Stage,
    assert_tables_equal,
    http_status,
    pipeline_with_ddl,
    running_stages,
    stage_logs,
    table_rows,
    tables_equal,
    wait_until,
    write_configs,
)


def _add_sink(files: PipelineFiles, sink_id: str, **postgres: Any) -> None:
    """Another PostgreSQL sink in the pipeline, the same database as the first one."""
    pipeline = yaml.safe_load(files.pipeline.read_text())
    first = pipeline["sinks"][0]
    pipeline["sinks"].append(
        {"sink_id": sink_id, "sink_type": "postgres", "postgres": {**first["postgres"], **postgres}}
    )
    files.pipeline.write_text(yaml.safe_dump(pipeline, sort_keys=False))


def _wait_equal(
    source_dsn: str, replica_dsn: str, tables: Sequence[str], timeout: float, *stages: Stage
) -> None:
    wait_until(
        lambda: tables_equal(source_dsn, replica_dsn, tables),
        timeout,
        "sink = source\n" + stage_logs(*stages),
        interval=0.5,
    )
    assert_tables_equal(source_dsn, replica_dsn, tables)


def _random_text(rng: random.Random, size: int) -> str:
    """Incompressible text: pglz cannot shrink it, so it is stored out of line (TOASTed)."""
    alphabet = string.ascii_letters + string.digits + string.punctuation
    return "".join(rng.choices(alphabet, k=size))


# --------------------------------------------------------------------------- TOAST


TOAST_DDL = """
CREATE TABLE public.docs (id integer PRIMARY KEY, title text, body text, n integer);
ALTER TABLE public.docs REPLICA IDENTITY DEFAULT;
"""


def test_unchanged_toasted_value_survives_updates_and_a_sink_kill_9(pg, tmp_path: Path) -> None:
    tables = ["public.docs"]
    source_dsn, replica_dsn, files = pipeline_with_ddl(pg, tmp_path, TOAST_DDL, tables)
    rng = random.Random(11)
    with psycopg.connect(source_dsn, autocommit=True) as src:
        # Rows of the initial snapshot, with big values.
        for i in range(1, 6):
            src.execute(
                "INSERT INTO public.docs VALUES (%s, %s, %s, 0)",
                (i, f"snap {i}", _random_text(rng, 9_000 + 500 * i)),
            )
        stored = src.execute("SELECT min(pg_column_size(body)) FROM public.docs").fetchone()
        assert stored is not None and stored[0] > 8_000, "the body must stay uncompressed"
        with running_stages(files, tmp_path) as (ingest, sinks):
            sink = sinks["replica"]
            # A second slot on the pipeline's publication shows what pgoutput really sent.
            src.execute("SELECT pg_create_logical_replication_slot('toast_audit', 'pgoutput')")
            for i in range(6, 21):
                src.execute(
                    "INSERT INTO public.docs VALUES (%s, %s, %s, 0)",
                    (i, f"doc {i}", _random_text(rng, 8_500 + 300 * i)),
                )
            # UPDATEs of other columns: pgoutput sends the body as "unchanged TOAST".
            for round_ in range(1, 4):
                src.execute(
                    "UPDATE public.docs SET n = n + 1, title = title || %s", (f"/{round_}",)
                )
            _wait_equal(source_dsn, replica_dsn, tables, 60, ingest, sink)

            # kill -9 of the sink while updates stream: the ingest replays what was not
            # acknowledged, and the replayed "unchanged" values still resolve to the stored one.
            def updater(stop: threading.Event) -> None:
                with psycopg.connect(source_dsn, autocommit=True) as conn:
                    k = 0
                    while not stop.is_set():
                        k += 1
                        conn.execute(
                            "UPDATE public.docs SET n = n + 1 WHERE id = %s", (1 + k % 20,)
                        )
                        if k % 7 == 0:  # the key changes too: the row moves with its body
                            conn.execute(
                                "UPDATE public.docs SET id = id + 1000, n = n + 1 WHERE id = %s",
                                (1 + k % 20,),
                            )
                            conn.execute(
                                "UPDATE public.docs SET id = id - 1000 WHERE id = %s",
                                (1001 + k % 20,),
                            )
                        time.sleep(0.003)

            stop = threading.Event()
            thread = threading.Thread(target=updater, args=(stop,), daemon=True)
            thread.start()
            try:
                time.sleep(1.5)
                sink.kill9()
                time.sleep(1.0)
                sink.start()
                time.sleep(1.5)
            finally:
                stop.set()
                thread.join(30)
            _wait_equal(source_dsn, replica_dsn, tables, 90, ingest, sink)
        sent = src.execute(
            "SELECT data FROM pg_logical_slot_get_binary_changes('toast_audit', NULL, NULL,"
            " 'proto_version', '1', 'publication_names', %s)",
            (files.publication,),
        ).fetchall()
        src.execute("SELECT pg_drop_replication_slot('toast_audit')")
    decoder = PgOutputDecoder("src")
    events: list[SourceEvent] = []
    for (data,) in sent:
        decoder.decode(bytes(data), events)
    unchanged = [
        e for e in events if e.operation is Operation.UPDATE and e.after and UNCHANGED in e.after
    ]
    assert len(unchanged) > 100, "the updates must carry the body as unchanged TOAST"
    with psycopg.connect(replica_dsn) as dst:
        nulls = dst.execute("SELECT count(*) FROM public.docs WHERE body IS NULL").fetchone()
        sizes = dst.execute("SELECT min(length(body)) FROM public.docs").fetchone()
    assert nulls == (0,) and sizes is not None and sizes[0] > 8_000
    assert_tables_equal(source_dsn, replica_dsn, tables)


# --------------------------------------------------------------------------- TRUNCATE


TRUNCATE_DDL = """
CREATE TABLE public.tasks (id integer PRIMARY KEY, label text);
CREATE TABLE public.tags (id integer PRIMARY KEY, task_id integer, tag text);
INSERT INTO public.tasks SELECT g, 'seed ' || g FROM generate_series(1, 200) g;
INSERT INTO public.tags SELECT g, g, 't' || g FROM generate_series(1, 100) g;
"""


def test_truncate_mid_stream(pg, tmp_path: Path) -> None:
    tables = ["public.tasks", "public.tags"]
    source_dsn, replica_dsn, files = pipeline_with_ddl(pg, tmp_path, TRUNCATE_DDL, tables)
    # A second sink writes a change log (append mode): it shows the truncates as operation 't'.
    _add_sink(files, "log", target_schema="changelog", write_mode="append")
    with (
        psycopg.connect(source_dsn, autocommit=True) as src,
        running_stages(files, tmp_path, ("replica", "log")) as (ingest, sinks),
    ):
        stages = (ingest, *sinks.values())
        src.execute("INSERT INTO public.tasks SELECT g, 'before' FROM generate_series(201, 400) g")
        src.execute("UPDATE public.tasks SET label = 'updated' WHERE id % 3 = 0")
        _wait_equal(source_dsn, replica_dsn, tables, 60, *stages)
        src.execute("TRUNCATE public.tasks")
        src.execute("INSERT INTO public.tasks SELECT g, 'after' FROM generate_series(1, 50) g")
        # Rows before and after a TRUNCATE of both tables inside one transaction.
        with src.transaction():
            src.execute("INSERT INTO public.tags VALUES (500, 1, 'doomed')")
            src.execute("UPDATE public.tasks SET label = 'doomed' WHERE id <= 10")
            src.execute("TRUNCATE public.tasks, public.tags")
            src.execute(
                "INSERT INTO public.tasks SELECT g, 'survivor' FROM generate_series(7, 30) g"
            )
            src.execute("INSERT INTO public.tags VALUES (1, 7, 'kept')")
            src.execute("UPDATE public.tasks SET label = 'survivor, updated' WHERE id = 8")
        src.execute("INSERT INTO public.tasks SELECT g, 'later' FROM generate_series(31, 60) g")
        src.execute("DELETE FROM public.tasks WHERE id = 9")
        _wait_equal(source_dsn, replica_dsn, tables, 60, *stages)
        with psycopg.connect(replica_dsn) as dst:
            truncates = dst.execute(
                "SELECT 'tasks', count(*) FROM changelog.tasks_changes WHERE _op = 't'"
                " UNION ALL SELECT 'tags', count(*) FROM changelog.tags_changes WHERE _op = 't'"
            ).fetchall()
        assert dict(truncates) == {"tasks": 2, "tags": 1}
    assert table_rows(replica_dsn, "public.tasks")[:2] == [
        (7, "survivor"),
        (8, "survivor, updated"),
    ]
    assert_tables_equal(source_dsn, replica_dsn, tables)


# --------------------------------------------------------------------------- columns


COLUMNS_DDL = """
CREATE TABLE public.parts (
    id integer PRIMARY KEY, qty integer, code varchar(10), obsolete text, price numeric(8,2));
INSERT INTO public.parts SELECT g, g, 'c' || g, 'old ' || g, g / 4.0 FROM generate_series(1, 300) g;
"""


def _columns(dsn: str, table: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0"
            " AND NOT attisdropped ORDER BY attnum",
            (table,),
        ).fetchall()
    return [r[0] for r in rows]


def _types(dsn: str, table: str) -> dict[str, str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
            " WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
            (table,),
        ).fetchall()
    return dict(rows)


def _rows_of(dsn: str, table: str, columns: Sequence[str]) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY id").fetchall()


def _source_columns_equal(source_dsn: str, replica_dsn: str, table: str) -> bool:
    columns = _columns(source_dsn, table)
    try:
        return _rows_of(source_dsn, table, columns) == _rows_of(replica_dsn, table, columns)
    except psycopg.errors.UndefinedColumn:
        return False


def test_columns_added_dropped_and_retyped_mid_stream(pg, tmp_path: Path) -> None:
    table = "public.parts"
    source_dsn, replica_dsn, files = pipeline_with_ddl(pg, tmp_path, COLUMNS_DDL, [table])
    with (
        psycopg.connect(source_dsn, autocommit=True) as src,
        running_stages(files, tmp_path) as (ingest, sinks),
    ):
        stages = (ingest, sinks["replica"])

        def settle(what: str) -> None:
            wait_until(
                lambda: _source_columns_equal(source_dsn, replica_dsn, table),
                60,
                what + "\n" + stage_logs(*stages),
                interval=0.5,
            )

        settle("snapshot")
        src.execute("UPDATE public.parts SET qty = qty + 1 WHERE id <= 50")
        # ADD COLUMN without a default, with changes right before and after it.
        with src.transaction():
            src.execute("INSERT INTO public.parts (id, qty, code) VALUES (301, 1, 'a301')")
            src.execute("ALTER TABLE public.parts ADD COLUMN color text")
            src.execute("INSERT INTO public.parts (id, qty, color) VALUES (302, 2, 'red')")
        src.execute("UPDATE public.parts SET color = 'blue' WHERE id BETWEEN 10 AND 20")
        # ADD COLUMN with a default: PostgreSQL does not rewrite (or send) the existing rows.
        src.execute("ALTER TABLE public.parts ADD COLUMN status text NOT NULL DEFAULT 'new'")
        src.execute("INSERT INTO public.parts (id, qty) VALUES (303, 3)")
        src.execute("UPDATE public.parts SET qty = qty + 1 WHERE id BETWEEN 1 AND 5")
        # DROP COLUMN, then a retype of two columns (int -> bigint, varchar(10) -> text) and
        # a wider numeric.
        src.execute("ALTER TABLE public.parts DROP COLUMN obsolete")
        src.execute("INSERT INTO public.parts (id, qty, code) VALUES (304, 4, 'after drop')")
        src.execute(
            "ALTER TABLE public.parts ALTER COLUMN qty TYPE bigint,"
            " ALTER COLUMN code TYPE text, ALTER COLUMN price TYPE numeric(12,3)"
        )
        src.execute(
            "INSERT INTO public.parts (id, qty, code, price) VALUES"
            " (305, 5000000000, 'a code much longer than ten characters', 123456.789)"
        )
        src.execute(
            "UPDATE public.parts SET qty = qty * 10000000, code = code || '-retyped'"
            " WHERE id BETWEEN 100 AND 120"
        )
        src.execute("DELETE FROM public.parts WHERE id BETWEEN 200 AND 210")

        def summary(dsn: str) -> tuple[Any, ...] | None:
            with psycopg.connect(dsn) as conn:
                return conn.execute("SELECT count(*), max(qty) FROM public.parts").fetchone()

        wait_until(
            lambda: summary(replica_dsn) == summary(source_dsn) == (294, 5_000_000_000),
            60,
            "all changes applied\n" + stage_logs(*stages),
            interval=0.5,
        )
        # The rows that existed before ADD COLUMN ... DEFAULT and did not change afterwards
        # were never sent with the default; the reader re-reads the table on its own.
        settle("after the automatic backfill")
        ingest_log = ingest.log_path.read_text()
    assert _columns(replica_dsn, table) == [
        "id",
        "qty",
        "code",
        "obsolete",
        "price",
        "color",
        "status",
    ]
    # The dropped column is kept: old values stay, rows inserted after the drop have NULL.
    assert _rows_of(replica_dsn, table, ["id", "obsolete"])[:1] == [(1, "old 1")]
    with psycopg.connect(replica_dsn) as dst:
        after_drop = dst.execute(
            "SELECT obsolete FROM public.parts WHERE id IN (304, 305)"
        ).fetchall()
    assert after_drop == [(None,), (None,)]
    assert _types(replica_dsn, table) == {
        **{k: v for k, v in _types(source_dsn, table).items()},
        "obsolete": "text",
    }
    # The ingest reported each shape change once (schema.version_changed); a new modifier
    # (price numeric(8,2) -> numeric(12,3)) is a retype too.
    changes = [
        (e["added"], e["dropped"], e["retyped"])
        for e in (json.loads(line) for line in ingest_log.splitlines() if line.startswith("{"))
        if e.get("event") == "schema.version_changed"
    ]
    assert changes == [
        (["color"], [], []),
        (["status"], [], []),
        ([], ["obsolete"], []),
        ([], [], ["qty", "code", "price"]),
    ]
    assert '"schema.default_backfill"' in ingest_log and '"status"' in ingest_log
    assert _source_columns_equal(source_dsn, replica_dsn, table)


# --------------------------------------------------------------------------- big transaction


BIG_DDL = """
CREATE TABLE public.bulk (
    id bigint PRIMARY KEY, batch integer, label text, amount numeric(12,2), at timestamptz);
"""
BIG_ROWS = 1_000_000


class _RssSampler(Background):
    """Peak resident set size of processes, sampled every 100 ms by a thread."""

    interval = 0.1

    def __init__(self, stages: dict[str, Stage]) -> None:
        super().__init__()
        self.stages = stages
        self.peak_mb: dict[str, float] = dict.fromkeys(stages, 0.0)

    def step(self) -> None:
        for name, stage in self.stages.items():
            assert stage.process is not None
            with contextlib.suppress(psutil.Error):
                rss = psutil.Process(stage.process.pid).memory_info().rss / 2**20
                self.peak_mb[name] = max(self.peak_mb[name], rss)


def _chunk_digests(dsn: str, table: str, chunk: int = 50_000) -> list[tuple[Any, ...]]:
    """(chunk number, rows, md5 of the rows' text in key order) per `chunk` keys: comparing
    these compares every row without moving a million rows into the test process."""
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            f"SELECT (id - 1) / {chunk}, count(*), md5(string_agg(t::text, '|' ORDER BY id))"
            f" FROM {table} t GROUP BY 1 ORDER BY 1"
        ).fetchall()


@pytest.mark.slow
def test_one_million_row_transaction_with_bounded_memory(pg, tmp_path: Path) -> None:
    table = "public.bulk"
    source_dsn, replica_dsn, files = pipeline_with_ddl(
        pg, tmp_path, BIG_DDL, [table], snapshot_mode="never", batch_max_events=2000
    )
    started = time.monotonic()
    with running_stages(files, tmp_path) as (ingest, sinks):
        sink = sinks["replica"]
        with _RssSampler({"ingest": ingest, "sink": sink}) as rss:
            time.sleep(0.3)
            baseline = dict(rss.peak_mb)
            with psycopg.connect(source_dsn, autocommit=True) as src:
                # ~150-byte rows, one transaction.
                src.execute(
                    "INSERT INTO public.bulk SELECT g, g % 1000,"
                    " 'row ' || g || ' ' || repeat(md5(g::text), 2),"
                    " (g % 100000) / 100.0, '2024-01-01'::timestamptz + g * interval '1 second'"
                    f" FROM generate_series(1, {BIG_ROWS}) g"
                )
                inserted = time.monotonic()
                size = src.execute(
                    "SELECT pg_relation_size('public.bulk') / count(*) FROM public.bulk"
                ).fetchone()

            def count() -> int:
                with psycopg.connect(replica_dsn) as dst:
                    try:
                        row = dst.execute("SELECT count(*) FROM public.bulk").fetchone()
                    except psycopg.errors.UndefinedTable:
                        return 0
                return int(row[0]) if row else 0

            wait_until(
                lambda: count() == BIG_ROWS,
                300,
                "1M rows in the sink\n" + stage_logs(ingest, sink),
                interval=1.0,
            )
            done = time.monotonic()
    assert _chunk_digests(source_dsn, table) == _chunk_digests(replica_dsn, table)
    print(
        f"\n1M-row transaction: ~{size[0] if size else '?'} bytes/row on disk;"
        f" insert {inserted - started:.1f}s (incl. start-up), replicated"
        f" {done - inserted:.1f}s after commit ({BIG_ROWS / (done - inserted):,.0f} rows/s);"
        f" peak RSS ingest {rss.peak_mb['ingest']:.0f} MB, sink {rss.peak_mb['sink']:.0f} MB"
        f" (at start {baseline['ingest']:.0f} / {baseline['sink']:.0f} MB)"
    )
    # Bounds: see the report; memory must not grow with the transaction's size.
    assert rss.peak_mb["ingest"] < 200, rss.peak_mb
    assert rss.peak_mb["sink"] < 200, rss.peak_mb


# --------------------------------------------------------------------------- source restart


RESTART_DDL = """
CREATE TABLE public.ledger (id integer PRIMARY KEY, balance bigint NOT NULL, note text);
INSERT INTO public.ledger SELECT g, 0, 'seed' FROM generate_series(1, 100) g;
"""


class _Writer(Background):
    """Small transactions (inserts, updates, deletes) that keep going through a server
    restart: a failed transaction is retried on a new connection. Whatever committed is in
    the source; the comparison needs nothing else."""

    def __init__(self, dsn: str) -> None:
        super().__init__()
        self.dsn = dsn
        self.commits = 0
        self.failures = 0
        self._rng = random.Random(5)
        self._next_id = 1000
        self._conn: psycopg.Connection[Any] | None = None

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        if self._conn is not None:
            self._conn.close()

    def step(self) -> None:
        rng = self._rng
        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(self.dsn, connect_timeout=3)
            conn = self._conn
            with conn.transaction():
                for _ in range(rng.randint(1, 5)):
                    r = rng.random()
                    if r < 0.4:
                        self._next_id += 1
                        conn.execute(
                            "INSERT INTO public.ledger VALUES (%s, 0, 'new')"
                            " ON CONFLICT (id) DO NOTHING",
                            (self._next_id,),
                        )
                    elif r < 0.9:
                        conn.execute(
                            "UPDATE public.ledger SET balance = balance + 1, note = %s"
                            " WHERE id = %s",
                            (f"c{self.commits}", rng.randint(1, 100)),
                        )
                    else:
                        conn.execute(
                            "DELETE FROM public.ledger WHERE id = %s",
                            (rng.randint(1001, max(1001, self._next_id)),),
                        )
            self.commits += 1
            time.sleep(0.005)
        except psycopg.Error:
            self.failures += 1
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
            self._conn = None
            time.sleep(0.2)


def test_source_restart_mid_stream_reconnects_and_loses_nothing(
    fresh_pg_server, pg, tmp_path: Path
) -> None:
    """The source server restarts (fast shutdown) under a writer; the sink is on another
    server, as in production. (With the sink on the source server the shutdown waits for
    wal_sender_timeout: the walsender waits for a flush confirmation that needs the sink.)"""
    server = fresh_pg_server
    tables = ["public.ledger"]
    server.create_database("src")
    source_dsn = server.dsn("src")
    replica_db = pg.new_database("replica")
    replica_dsn = pg.dsn(replica_db)
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute(RESTART_DDL)
    files = write_configs(
        tmp_path,
        host=server.host,
        port=server.port,
        source_db="src",
        replica_db=replica_db,
        tables=tables,
    )
    pipeline = yaml.safe_load(files.pipeline.read_text())
    pipeline["sinks"][0]["postgres"].update(host=pg.host, port=pg.port)
    files.pipeline.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    with running_stages(files, tmp_path) as (ingest, sinks):
        sink = sinks["replica"]
        with _Writer(source_dsn) as writer:
            wait_until(lambda: writer.commits > 200, 60, "writer running")
            started = time.monotonic()
            server.restart()  # fast shutdown: the walsender and every session are cut off
            restart_seconds = time.monotonic() - started
            at_restart = writer.commits
            wait_until(lambda: writer.commits > at_restart + 200, 60, "writer resumed")
        assert writer.failures > 0, "the restart interrupted the writer"
        _wait_equal(source_dsn, replica_dsn, tables, 120, ingest, sink)
        log = ingest.log_path.read_text()
        assert "source.disconnected" in log or "source.unreachable" in log
        assert log.count("replication.started") >= 2
        assert ingest.alive() and sink.alive()
        # Streaming goes on after the reconnection.
        with psycopg.connect(source_dsn, autocommit=True) as conn:
            conn.execute("UPDATE public.ledger SET note = 'after restart' WHERE id <= 10")
        _wait_equal(source_dsn, replica_dsn, tables, 60, ingest, sink)
    assert restart_seconds < 30, restart_seconds


# --------------------------------------------------------------------------- undeploy


UNDEPLOY_DDL = """
CREATE TABLE public.notes (id integer PRIMARY KEY, body text, version integer NOT NULL);
INSERT INTO public.notes SELECT g, 'seed ' || g, 1 FROM generate_series(1, 500) g;
"""


def _slot_and_publication(dsn: str, files: PipelineFiles) -> tuple[bool, bool]:
    with psycopg.connect(dsn) as conn:
        slot = conn.execute(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (files.slot,)
        ).fetchone()
        publication = conn.execute(
            "SELECT 1 FROM pg_publication WHERE pubname = %s", (files.publication,)
        ).fetchone()
    return slot is not None, publication is not None


@contextlib.contextmanager
def _cdc_run(files: PipelineFiles, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log_path.open("ab") as log:
        run = subprocess.Popen(
            files.argv("run"),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        try:
            wait_until(lambda: http_status(files.health_port, "/readyz") == 200, 90, "ready")
            yield run
        finally:
            run.terminate()
            code = run.wait(90)
    assert code == 0, log_path.read_text()[-4000:]


@pytest.mark.slow
def test_undeploy_drops_slot_and_publication_keeps_data_and_run_recreates_them(
    pg, tmp_path: Path
) -> None:
    tables = ["public.notes"]
    source_dsn, replica_dsn, files = pipeline_with_ddl(pg, tmp_path, UNDEPLOY_DDL, tables)
    log_path = tmp_path / "run.log"
    with psycopg.connect(source_dsn, autocommit=True) as src:
        with _cdc_run(files, log_path):
            src.execute("UPDATE public.notes SET body = 'first run', version = 2 WHERE id <= 100")
            src.execute(
                "INSERT INTO public.notes SELECT g, 'first run', 1 FROM generate_series(501, 600) g"
            )
            wait_until(lambda: tables_equal(source_dsn, replica_dsn, tables), 60, "first run")
        assert _slot_and_publication(source_dsn, files) == (True, True)

        undeploy = subprocess.run(
            files.argv("undeploy", "--yes"),
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
        assert undeploy.returncode == 0, undeploy.stdout + undeploy.stderr
        assert f"dropped replication slot {files.slot}" in undeploy.stdout, undeploy.stdout
        assert f"dropped publication {files.publication}" in undeploy.stdout, undeploy.stdout
        assert _slot_and_publication(source_dsn, files) == (False, False)
        # Source and sink data are untouched.
        assert len(table_rows(source_dsn, "public.notes")) == 600
        assert_tables_equal(source_dsn, replica_dsn, tables)

        # Changes while nothing captures them: the next run's snapshot brings them over.
        src.execute(
            "UPDATE public.notes SET body = 'while undeployed', version = 3"
            " WHERE id BETWEEN 50 AND 150"
        )
        src.execute(
            "INSERT INTO public.notes SELECT g, 'while undeployed', 1"
            " FROM generate_series(601, 700) g"
        )
        with _cdc_run(files, log_path):
            assert _slot_and_publication(source_dsn, files) == (True, True)
            wait_until(lambda: tables_equal(source_dsn, replica_dsn, tables), 60, "re-snapshot")
            src.execute("UPDATE public.notes SET version = version + 1 WHERE id % 10 = 0")
            src.execute("DELETE FROM public.notes WHERE id BETWEEN 690 AND 700")
            wait_until(lambda: tables_equal(source_dsn, replica_dsn, tables), 60, "streaming")
        assert_tables_equal(source_dsn, replica_dsn, tables)
    assert log_path.read_text().count("slot.created") == 2
