"""PostgreSQL -> Debezium on Kafka Connect -> Tansu -> `cdc run` (transport_mode kafka: the
provisioner registers the connector, the ingest consumes, the sink writes) -> PostgreSQL,
with real processes everywhere: a snapshot of existing rows, then inserts, updates and
deletes, kill -9 of the ingest and of Kafka Connect mid-stream, a column added; the sink
must equal the source row by row."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest

from tests.support.kafka_run import KafkaRun
from tests.support.kafka_run import kafka_run as new_kafka_run
from tests.support.pipeline import http_status, table_rows, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
DDL = """
CREATE TABLE items (
    id bigint PRIMARY KEY,
    name text NOT NULL,
    price numeric(10,2),
    updated timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE items REPLICA IDENTITY FULL;
"""


def _port_free(port: int) -> bool:
    import socket

    # Without SO_REUSEADDR, as the launcher checks it: the killed worker's connections
    # stay in TIME_WAIT for up to a minute.
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _equal(run: KafkaRun) -> bool:
    return table_rows(run.source_dsn, "public.items") == table_rows(run.replica_dsn, "public.items")


def _assert_equal(run: KafkaRun) -> None:
    source = table_rows(run.source_dsn, "public.items")
    sink = table_rows(run.replica_dsn, "public.items")
    assert len(source) == len(sink)
    for a, b in zip(source, sink, strict=True):
        assert a == b


@pytest.fixture
def kafka_run(
    pg: Any, tansu_broker: Any, schema_registry: Any, kafka_connect: Any, tmp_path: Path
) -> Iterator[KafkaRun]:
    yield _kafka_run(pg, tansu_broker, schema_registry, kafka_connect.url, tmp_path)


SEED = (
    "INSERT INTO items (id, name, price) SELECT g, 'seed ' || g, g * 1.25"
    " FROM generate_series(1, 500) g"
)


def _kafka_run(
    pg: Any,
    broker: Any,
    registry: Any,
    connect_url: str,
    tmp_path: Path,
    ddl: str = DDL,
    seed: str = SEED,
) -> KafkaRun:
    return new_kafka_run(pg, broker, registry, connect_url, tmp_path, ddl, seed)


class Workload:
    """Inserts, updates and deletes on items from a thread, a transaction every few ms."""

    def __init__(self, dsn: str, seed: int) -> None:
        self.dsn = dsn
        self.rng = random.Random(seed)
        self.done = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.stop.is_set():
                k = self.rng.randrange(1, 1500)
                with conn.transaction():
                    roll = self.rng.random()
                    if roll < 0.45:
                        conn.execute(
                            "INSERT INTO items (id, name, price) VALUES (%s, %s, %s)"
                            " ON CONFLICT (id) DO UPDATE SET name = excluded.name,"
                            " price = excluded.price, updated = now()",
                            (k, f"n{self.done}", self.rng.randrange(1, 10_000) / 100),
                        )
                    elif roll < 0.8:
                        conn.execute(
                            "UPDATE items SET name = %s, updated = now() WHERE id = %s",
                            (f"u{self.done}", k),
                        )
                    else:
                        conn.execute("DELETE FROM items WHERE id = %s", (k,))
                self.done += 1
                time.sleep(0.002)

    def __enter__(self) -> Workload:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def test_snapshot_then_changes_with_kill_9_of_the_ingest_then_an_added_column(
    kafka_run: KafkaRun,
) -> None:
    run = kafka_run.start()
    try:
        wait_until(
            lambda: http_status(run.files.health_port, "/readyz") == 200,
            180,
            "ready\n" + run.log_tail(),
        )
        wait_until(lambda: _equal(run), 120, "snapshot in the sink\n" + run.log_tail())
        with Workload(run.source_dsn, seed=5) as work:
            wait_until(lambda: work.done > 800, 60, "changes made")
            ingest = run.stage_pid("ingest")
            psutil.Process(ingest).kill()  # kill -9 mid-stream; cdc run restarts it
            wait_until(lambda: work.done > 2000, 120, "more changes made")
        assert run.stage_pid("ingest") != ingest
        wait_until(lambda: _equal(run), 180, "sink = source after the kill\n" + run.log_tail())
        _assert_equal(run)
        with psycopg.connect(run.source_dsn, autocommit=True) as conn:
            conn.execute("ALTER TABLE items ADD COLUMN color text")
            conn.execute("UPDATE items SET color = 'red' WHERE id % 7 = 0")
            conn.execute("INSERT INTO items (id, name, color) VALUES (100000, 'new', 'blue')")
        wait_until(lambda: _equal(run), 120, "the added column in the sink\n" + run.log_tail())
        _assert_equal(run)
    finally:
        code = run.stop()
    log = run.log_path.read_text(errors="replace")
    assert code == 0, log[-4000:]
    assert "schema.version_changed" in log
    changed = [line for line in log.splitlines() if "schema.version_changed" in line]
    assert any("color" in line or "to_version" in line for line in changed), changed


def test_kill_9_of_kafka_connect_mid_stream_loses_and_duplicates_nothing(
    pg: Any, tansu_broker: Any, schema_registry: Any, tmp_path: Path
) -> None:
    """A Connect worker of its own, killed with SIGKILL mid-stream and started again on the
    same port and internal topics: Debezium resumes from its stored offsets (it may write
    some changes twice; the sink converges on the source's rows, with no duplicate)."""
    from services.stack import connect

    group = f"connect-{uuid.uuid4().hex[:8]}"
    worker = connect.start(
        tmp_path / "connect",
        bootstrap_servers=tansu_broker.bootstrap_servers,
        registry_url=schema_registry.url,
        group_id=group,
    )
    run = _kafka_run(pg, tansu_broker, schema_registry, worker.url, tmp_path).start()
    try:
        wait_until(
            lambda: http_status(run.files.health_port, "/readyz") == 200,
            180,
            "ready\n" + run.log_tail(),
        )
        with Workload(run.source_dsn, seed=9) as work:
            wait_until(lambda: work.done > 600, 60, "changes made")
            os.killpg(worker.process.pgid, signal.SIGKILL)  # the JVM and anything it started
            worker.process.process.wait(30)
            wait_until(lambda: _port_free(worker.port), 120, "Connect's port released")
            worker = connect.start(
                tmp_path / "connect",
                bootstrap_servers=tansu_broker.bootstrap_servers,
                registry_url=schema_registry.url,
                group_id=group,
                port=worker.port,
            )
            wait_until(lambda: work.done > 1800, 60, "changes made after the restart")
        wait_until(lambda: _equal(run), 240, "sink = source after the kill\n" + run.log_tail())
        _assert_equal(run)
    finally:
        code = run.stop()
        worker.stop()
    assert code == 0, run.log_tail()


TYPES_DDL = """
CREATE TABLE items (
    id bigint PRIMARY KEY,
    small smallint, whole integer, flag boolean, r real, d double precision,
    price numeric(12,2), loose numeric,
    day date, at timestamp, at_tz timestamptz, wake time, span interval,
    uid uuid, doc jsonb, blob bytea, tags text[], nums integer[],
    big text
);
"""
TYPES_SEED = """
INSERT INTO items VALUES
    (1, -32768, 2147483647, true, 1.5, -2.5e-10, 1234567890.12, -12.345,
     '2024-02-29', '2024-02-29 13:45:07.5', '2024-02-29 13:45:07.5+02', '13:45:07.25',
     '3 days 04:05:06.789', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"a": [1, 2.5, null]}',
     '\\x00ff10', '{"a b", NULL, "c\\"d"}', '{1, NULL, -3}', 'short'),
    (2, 0, 0, false, 0, 0, -0.01, 0.000001,
     '1901-01-01', '1969-12-31 23:59:59.999999', '1900-01-01 00:00:00+00', '23:59:59.999999',
     '-1 days -02:00:00', '00000000-0000-0000-0000-000000000000', '[]', '\\x', '{}', '{}', ''),
    (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
     NULL, NULL, NULL, NULL),
    (4, 1, 1, true, 1, 1, 1, 1, '2000-01-01', 'infinity', '-infinity', '00:00', '0',
     'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{}', '\\x01', '{x}', '{1}',
     (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 5000) g))
"""


def _text_rows(dsn: str) -> list[tuple[int, str]]:
    """The rows of items as PostgreSQL prints them (psycopg cannot hold infinity in a
    datetime), in key order; none while the sink has not created the table."""
    with psycopg.connect(dsn) as conn:
        try:
            return conn.execute("SELECT id, t::text FROM items t ORDER BY id").fetchall()
        except psycopg.errors.UndefinedTable:
            return []


def test_every_postgres_type_reaches_the_sink_as_the_source_has_it(
    pg: Any, tansu_broker: Any, schema_registry: Any, kafka_connect: Any, tmp_path: Path
) -> None:
    """Debezium 3.6's Avro for each type (snapshot reads and streamed changes), decoded into
    typed Arrow blocks, written by the PostgreSQL sink: the replica equals the source,
    +-infinity timestamps, pre-1970 times and an unchanged TOASTed value (an update that does
    not touch it: Debezium sends its placeholder) included."""
    run = _kafka_run(
        pg, tansu_broker, schema_registry, kafka_connect.url, tmp_path, TYPES_DDL, TYPES_SEED
    ).start()

    def same() -> bool:
        return _text_rows(run.source_dsn) == _text_rows(run.replica_dsn)

    try:
        wait_until(lambda: len(_text_rows(run.replica_dsn)) == 4, 180, "the snapshot")
        assert _text_rows(run.replica_dsn) == _text_rows(run.source_dsn)
        with psycopg.connect(run.source_dsn, autocommit=True) as conn:
            conn.execute(  # the same rows again, streamed this time
                "INSERT INTO items SELECT id + 10, small, whole, flag, r, d, price, loose, day,"
                " at, at_tz, wake, span, uid, doc, blob, tags, nums, big FROM items"
            )
            conn.execute("UPDATE items SET small = small + 1 WHERE id IN (4, 14)")  # big unchanged
            conn.execute("UPDATE items SET price = price * -1, tags = '{y}' WHERE id = 11")
            conn.execute("DELETE FROM items WHERE id = 12")
        wait_until(same, 60, "the changes in the sink\n" + run.log_tail())
        with psycopg.connect(run.replica_dsn) as conn:
            (big,) = conn.execute("SELECT length(big) FROM items WHERE id = 14").fetchone() or (0,)
        assert big == 160_000
    finally:
        code = run.stop()
    assert code == 0, run.log_tail()
