"""MongoDB and SQL Server -> Debezium on Kafka Connect -> Tansu -> `cdc run` -> PostgreSQL, live:
each server in a container (testcontainers), its rows seeded, the pipeline run as
tests/e2e/test_kafka_pipeline.py runs it (the provisioner registers the generated connector
config, the ingest consumes, the PostgreSQL sink writes), then inserts, updates and deletes;
the sink must equal the source row by row.

The Connect worker runs on this machine, so each container publishes its port on 127.0.0.1
and the connector config points there. Without a Docker engine every test here is skipped,
with the reason; the generated configs stay covered by tests/unit/test_debezium_connectors.py
and tests/integration/test_kafka_connector_validation.py.
"""

from __future__ import annotations

import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from tests.support.pipeline import REPO, cdc_argv, free_port, http_status, wait_until, write_configs

NO_DOCKER = (
    "no Docker engine here (testcontainers needs one): the live MongoDB / SQL Server pipeline"
    " tests did not run; their generated connector configs are covered by"
    " test_debezium_connectors and test_kafka_connector_validation"
)


def _docker_engine_answers() -> bool:
    try:
        from testcontainers.core.docker_client import DockerClient

        return bool(DockerClient(timeout=5).client.ping())
    except Exception:  # no socket, refused, a timeout, no permission: all mean "no engine"
        return False


pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(not _docker_engine_answers(), reason=NO_DOCKER),
]

MONGO_IMAGE = "mongo:7"
MSSQL_IMAGE = "mcr.microsoft.com/mssql/server:2022-latest"
MSSQL_PASSWORD = "Cdc-Live-Passw0rd"


def _loopback_port(container: Any, container_port: int | str, host_port: int) -> None:
    # docker-py takes (host ip, port): published on 127.0.0.1 only, where the Connect
    # worker (on this machine) reaches it.
    container.ports[str(container_port)] = ("127.0.0.1", host_port)


# ----------------------------------------------------------------------------- the run


class CdcRun:
    """`cdc run` on a pipeline.yaml whose source is `source` and whose sink is a fresh
    PostgreSQL database, on the Kafka transport of the session's broker, registry and
    Connect worker."""

    def __init__(
        self,
        tmp_path: Path,
        pg: Any,
        broker: Any,
        registry: Any,
        connect_url: str,
        source: dict[str, Any],
    ) -> None:
        suffix = uuid.uuid4().hex[:8]
        replica_db = pg.new_database("replica")
        self.replica_dsn = pg.dsn(replica_db)
        self.files = write_configs(
            tmp_path,
            host=pg.host,
            port=pg.port,
            source_db=source["database"],
            replica_db=replica_db,
            tables=source["tables"],
            pipeline_id=f"live-{suffix}",
        )
        pipeline = yaml.safe_load(self.files.pipeline.read_text())
        pipeline["topic_prefix"] = f"live{suffix}"
        pipeline["source"] = {**source, "heartbeat_mode": "none"}
        self.files.pipeline.write_text(yaml.safe_dump(pipeline, sort_keys=False))
        platform = yaml.safe_load(self.files.platform.read_text())
        platform.pop("wal_reader")
        platform["transport_mode"] = "kafka"
        platform["kafka"] = {
            "bootstrap_servers": broker.bootstrap_servers,
            "schema_registry_url": registry.url,
            "group_id": f"live-{suffix}",
            "poll_batch_size": 500,
            "topic_num_partitions": 1,
        }
        # A first snapshot of either server takes longer than PostgreSQL's.
        platform["connector"] = {"connect_url": connect_url, "timeout_seconds": 120}
        platform["retry"] = {"initial_wait_seconds": 0.2, "max_wait_seconds": 2}
        self.files.platform.write_text(yaml.safe_dump(platform, sort_keys=False))
        self.log_path = tmp_path / "run.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> CdcRun:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                cdc_argv(
                    "run", str(self.files.pipeline), "--platform-config", str(self.files.platform)
                ),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        return self

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(90)

    def sink_rows(self, query: str) -> list[tuple[Any, ...]]:
        """The rows of `query` on the replica; none while the sink has not created the table."""
        with psycopg.connect(self.replica_dsn) as conn:
            try:
                return conn.execute(query).fetchall()
            except psycopg.errors.UndefinedTable:
                return []


def _converges(
    run: CdcRun,
    source: Callable[[], list[tuple[Any, ...]]],
    sink: Callable[[], list[tuple[Any, ...]]],
    what: str,
) -> None:
    """Waits until the sink holds the source's rows, then compares them row by row."""
    wait_until(lambda: sink() == source(), 180, f"{what} in the sink\n" + run.log_tail())
    expected, actual = source(), sink()
    assert len(actual) == len(expected)
    for want, got in zip(expected, actual, strict=True):
        assert got == want


def _run_pipeline(
    run: CdcRun,
    source: Callable[[], list[tuple[Any, ...]]],
    sink: Callable[[], list[tuple[Any, ...]]],
    changes: Callable[[], None],
) -> None:
    run.start()
    try:
        wait_until(
            lambda: http_status(run.files.health_port, "/readyz") == 200,
            240,
            "ready\n" + run.log_tail(),
        )
        _converges(run, source, sink, "the snapshot")
        changes()
        _converges(run, source, sink, "the inserts, updates and deletes")
    finally:
        code = run.stop()
    assert code == 0, run.log_tail()


# ----------------------------------------------------------------------------- MongoDB


@pytest.fixture
def mongodb() -> Iterator[int]:
    """A single-node replica set (Debezium reads change streams, which a standalone server
    does not have); yields its port on 127.0.0.1. mongod listens inside the container on the
    port it is published on, so the member address the replica set announces,
    127.0.0.1:<port>, is right both inside the container and here."""
    from pymongo import MongoClient
    from testcontainers.core.container import DockerContainer

    port = free_port()
    container = DockerContainer(MONGO_IMAGE).with_command(
        f"mongod --replSet rs0 --bind_ip_all --port {port}"
    )
    _loopback_port(container, port, port)
    with container:
        direct: MongoClient[dict[str, Any]] = MongoClient(
            f"mongodb://127.0.0.1:{port}/?directConnection=true", serverSelectionTimeoutMS=2000
        )
        try:
            wait_until(lambda: direct.admin.command("ping")["ok"] == 1, 120, "mongod answers")
            direct.admin.command(
                "replSetInitiate",
                {"_id": "rs0", "members": [{"_id": 0, "host": f"127.0.0.1:{port}"}]},
            )
            wait_until(
                lambda: bool(direct.admin.command("hello").get("isWritablePrimary")),
                120,
                "the replica set has a primary",
            )
        finally:
            direct.close()
        yield port


def _mongo_rows(documents: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return sorted(((d["_id"], d) for d in documents), key=lambda row: row[0])


@pytest.mark.timeout(900)  # a first pull of the image counts too
def test_mongodb_replica_set_snapshot_then_changes_reach_the_postgres_sink(
    mongodb: int,
    pg: Any,
    tansu_broker: Any,
    schema_registry: Any,
    kafka_connect: Any,
    tmp_path: Path,
) -> None:
    """Debezium's MongoDB connector (change streams, full documents on update) as the
    generated config sets it up: the sink's items hold one row per document, `_id` (the
    key's JSON) and `document` (the document's extended JSON), equal to the collection."""
    from bson import json_util
    from pymongo import MongoClient

    client: MongoClient[dict[str, Any]] = MongoClient(
        f"mongodb://127.0.0.1:{mongodb}/?replicaSet=rs0", serverSelectionTimeoutMS=10_000
    )
    items = client["shop"]["items"]
    items.insert_many(
        [{"_id": i, "name": f"seed {i}", "qty": i * 3, "tags": ["a", str(i)]} for i in range(1, 51)]
    )
    run = CdcRun(
        tmp_path,
        pg,
        tansu_broker,
        schema_registry,
        kafka_connect.url,
        {
            "source_type": "mongodb",
            "host": "127.0.0.1",
            "port": mongodb,
            "database": "shop",
            "tables": ["shop.items"],
            "replica_set_name": "rs0",
        },
    )

    def source() -> list[tuple[Any, ...]]:
        return _mongo_rows(list(items.find()))

    def sink() -> list[tuple[Any, ...]]:
        rows = run.sink_rows("SELECT _id, document::text FROM items")
        for key, document in rows:
            parsed = json_util.loads(document)
            assert json_util.loads(key) == parsed["_id"], (key, document)
        return _mongo_rows([json_util.loads(document) for _, document in rows])

    def changes() -> None:
        items.insert_many([{"_id": i, "name": f"new {i}", "qty": 0} for i in range(100, 110)])
        items.update_many({"_id": {"$lte": 10}}, {"$set": {"qty": -1, "color": "red"}})
        items.update_one({"_id": 100}, {"$unset": {"qty": ""}, "$push": {"tags": "late"}})
        items.delete_many({"_id": {"$in": [2, 4, 101]}})

    try:
        _run_pipeline(run, source, sink, changes)
    finally:
        client.close()


# ----------------------------------------------------------------------------- SQL Server


@pytest.fixture
def sqlserver() -> Iterator[int]:
    """SQL Server 2022 (Developer edition) with SQL Server Agent, which runs the CDC capture
    job; yields its port on 127.0.0.1."""
    from testcontainers.community.mssql import SqlServerContainer

    port = free_port()
    container = (
        SqlServerContainer(MSSQL_IMAGE, password=MSSQL_PASSWORD)
        .with_env("MSSQL_SA_PASSWORD", MSSQL_PASSWORD)
        .with_env("MSSQL_PID", "Developer")
        .with_env("MSSQL_AGENT_ENABLED", "true")
    )
    _loopback_port(container, 1433, port)
    with container:
        yield port


def _mssql(port: int, database: str = "master") -> Any:
    import pymssql

    return pymssql.connect(
        server="127.0.0.1",
        port=str(port),
        user="sa",
        password=MSSQL_PASSWORD,
        database=database,
        autocommit=True,
    )


def _mssql_execute(port: int, database: str, *statements: str) -> None:
    with _mssql(port, database) as conn, conn.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement)


def _agent_running(port: int) -> bool:
    """SQL Server Agent is connected (its sessions are named SQLAgent - ...)."""
    with _mssql(port) as conn, conn.cursor() as cursor:
        cursor.execute(
            "SELECT COUNT(*) FROM sys.dm_exec_sessions WHERE program_name LIKE N'SQLAgent%'"
        )
        row = cursor.fetchone()
    return row is not None and row[0] > 0


@pytest.mark.timeout(900)  # a first pull of the image counts too
def test_sqlserver_cdc_snapshot_then_changes_reach_the_postgres_sink(
    sqlserver: int,
    pg: Any,
    tansu_broker: Any,
    schema_registry: Any,
    kafka_connect: Any,
    tmp_path: Path,
) -> None:
    """Debezium's SQL Server connector on CDC tables (enabled on the database and the table,
    read by the Agent's capture job) as the generated config sets it up, topics routed to
    `<prefix>.dbo.items`; the server's certificate is its own self-signed one, so the
    pipeline sets trust_server_certificate."""
    wait_until(lambda: _agent_running(sqlserver), 120, "SQL Server Agent running")
    _mssql_execute(sqlserver, "master", "CREATE DATABASE shop")
    _mssql_execute(
        sqlserver,
        "shop",
        "EXEC sys.sp_cdc_enable_db",
        "CREATE TABLE dbo.items (id int PRIMARY KEY, name nvarchar(100) NOT NULL,"
        " price decimal(10, 2), qty int, active bit NOT NULL DEFAULT 1)",
        "EXEC sys.sp_cdc_enable_table @source_schema = N'dbo', @source_name = N'items',"
        " @role_name = NULL, @supports_net_changes = 0",
        "INSERT INTO dbo.items (id, name, price, qty) SELECT TOP (200)"
        " ROW_NUMBER() OVER (ORDER BY object_id), N'seed', 1.25, 7 FROM sys.all_objects",
        "UPDATE dbo.items SET name = CONCAT(N'seed ', id), price = id * 1.25",
    )
    run = CdcRun(
        tmp_path,
        pg,
        tansu_broker,
        schema_registry,
        kafka_connect.url,
        {
            "source_type": "sqlserver",
            "host": "127.0.0.1",
            "port": sqlserver,
            "database": "shop",
            "username": "sa",
            "password": MSSQL_PASSWORD,
            "tables": ["dbo.items"],
            "trust_server_certificate": True,
        },
    )
    columns = "id, name, price, qty, active"

    def source() -> list[tuple[Any, ...]]:
        with _mssql(sqlserver, "shop") as conn, conn.cursor() as cursor:
            cursor.execute(f"SELECT {columns} FROM dbo.items ORDER BY id")
            return [tuple(row) for row in cursor.fetchall()]

    def sink() -> list[tuple[Any, ...]]:
        return run.sink_rows(f"SELECT {columns} FROM items ORDER BY id")

    def changes() -> None:
        _mssql_execute(
            sqlserver,
            "shop",
            "INSERT INTO dbo.items (id, name, price, qty, active) VALUES"
            " (1000, N'new', 9.99, NULL, 0), (1001, N'ünïcode ✓', -0.01, 0, 1)",
            "UPDATE dbo.items SET price = price * 2, qty = qty + 1 WHERE id <= 20",
            "UPDATE dbo.items SET active = 0, name = N'off' WHERE id = 1000",
            "DELETE FROM dbo.items WHERE id IN (3, 5, 1001)",
        )

    _run_pipeline(run, source, sink, changes)
