"""The Kafka transport's Provisioner: the pipeline's topics, then its Debezium connector.

``provision()`` (run by `cdc run` and `cdc deploy`):

1. checks that Kafka Connect answers and has the connector plugin of the source type;
2. creates the missing topics: one per table (``<topic_prefix>.<schema>.<table>``), its
   dead-letter topic when ``dlq.enabled``, and the schema history topic of MySQL / SQL
   Server (one partition, kept forever) with ``kafka.topic_num_partitions`` /
   ``topic_replication_factor``; a topic that exists is left exactly as it is;
3. registers or updates the connector with one idempotent ``PUT /connectors/<name>/config``
   (a connector left FAILED by an earlier run is restarted once); for a PostgreSQL source
   it first reads the captured tables' replica identities: it logs the tables whose
   updates and deletes PostgreSQL refuses (as the direct reader does) and keys the
   messages of `REPLICA IDENTITY USING INDEX` tables on the index's columns;
4. waits until the connector and its tasks are RUNNING; a FAILED one raises
   :class:`ProvisionError` with Connect's trace.

Nothing is ever deleted on a failure: topics created before the failure stay (they are
empty or hold data the next run needs). ``teardown()`` deletes the connector, and the
topics only when asked (`cdc undeploy --delete-topics`).
"""

from __future__ import annotations

import asyncio
import time

import structlog

from adapters.config import PipelineConfig, PlatformConfig
from adapters.debezium import connectors
from adapters.debezium.connect_client import ConnectClient, ConnectError, ConnectorStatus
from adapters.kafka import topics
from adapters.kafka.admin import TopicAdmin, TopicAdminError, TopicSpec
from domain.errors import TeardownRefusedError

log = structlog.get_logger(__name__)

# Kept forever, never compacted: the connector replays it to know every table's shape.
# How long a slot must stay unused after the connector is deleted before it is dropped.
SLOT_QUIET_SECONDS = 2.0

SCHEMA_HISTORY_TOPIC_CONFIG = {
    "cleanup.policy": "delete",
    "retention.ms": "-1",
    "retention.bytes": "-1",
}
HEARTBEAT_TABLE_DDL = (
    "CREATE SCHEMA IF NOT EXISTS cdc_platform;"
    " CREATE TABLE IF NOT EXISTS cdc_platform.heartbeat ("
    "slot_name text PRIMARY KEY, beat_at timestamptz NOT NULL DEFAULT now())"
)


class ProvisionError(Exception):
    """Provisioning stopped; the message says at which step and why (Connect's own text)."""


class KafkaProvisioner:
    def __init__(
        self,
        pipeline: PipelineConfig,
        platform: PlatformConfig,
        *,
        running_timeout_seconds: float = 120.0,
        poll_seconds: float = 1.0,
        delete_topics: bool = False,
        slot_release_seconds: float = 30.0,
    ) -> None:
        self.delete_topics = delete_topics
        self.slot_release_seconds = slot_release_seconds
        self.pipeline = pipeline
        self.platform = platform
        self.connect = ConnectClient(platform.connector)
        self.name = connectors.connector_name(pipeline)
        self.running_timeout = running_timeout_seconds
        self.poll_seconds = poll_seconds
        self.created_topics: list[str] = []
        self._admin: TopicAdmin | None = None

    @property
    def admin(self) -> TopicAdmin:
        if self._admin is None:
            self._admin = TopicAdmin(self.platform.kafka)
        return self._admin

    def topic_specs(self) -> list[TopicSpec]:
        kafka = self.platform.kafka
        data = topics.data_topics(self.pipeline) + topics.dlq_topics(self.pipeline, self.platform)
        specs = [
            TopicSpec(name, kafka.topic_num_partitions, kafka.topic_replication_factor)
            for name in data
        ]
        if topics.needs_schema_history(self.pipeline):
            specs.append(
                TopicSpec(
                    topics.schema_history_topic(self.pipeline),
                    1,
                    kafka.topic_replication_factor,
                    SCHEMA_HISTORY_TOPIC_CONFIG,
                )
            )
        return specs

    # -- provision -------------------------------------------------------------------------

    async def provision(self) -> None:
        await self._check_connect()
        await self._ensure_topics()
        if (
            self.pipeline.source.source_type == "postgres"
            and self.pipeline.source.heartbeat_mode == "table"
        ):
            await self._ensure_heartbeat_table()
        config = connectors.connector_config(self.pipeline, self.platform)
        if self.pipeline.source.source_type == "postgres":
            config.update(connectors.message_key_settings(await self._inspect_postgres_tables()))
        try:
            created = await self.connect.put_config(self.name, config)
        except ConnectError as exc:
            raise ProvisionError(f"connector {self.name} not registered: {exc}") from exc
        log.info("provision.connector_registered", connector=self.name, created=created)
        status = await self.connect.status(self.name)
        if status is not None and status.failed:
            # Left FAILED by an earlier run (an outage, an old password): one restart with
            # the config just written; if it fails again, the wait below reports why.
            log.warning("provision.connector_restart", connector=self.name, was=status.summary())
            await self.connect.restart(self.name)
        await self.wait_running()

    async def _check_connect(self) -> None:
        try:
            plugins = await self.connect.plugins()
        except ConnectError as exc:
            raise ProvisionError(str(exc)) from exc
        wanted = connectors.CONNECTOR_CLASSES[self.pipeline.source.source_type]
        if wanted not in plugins:
            raise ProvisionError(
                f"Kafka Connect at {self.connect.base} has no {wanted} plugin (it has:"
                f" {', '.join(sorted(plugins)) or 'none'}); use the image of Dockerfile.connect"
            )

    async def _ensure_topics(self) -> None:
        specs = self.topic_specs()
        try:
            result = await asyncio.to_thread(self.admin.ensure_topics, specs)
        except TopicAdminError as exc:
            raise ProvisionError(str(exc)) from exc
        self.created_topics = result.created
        log.info("provision.topics", created=result.created, existing=result.existing)

    async def _ensure_heartbeat_table(self) -> None:
        import psycopg

        conninfo = self._source_conninfo()
        try:
            async with await psycopg.AsyncConnection.connect(
                conninfo, connect_timeout=10, autocommit=True
            ) as conn:
                await conn.execute(HEARTBEAT_TABLE_DDL)
        except psycopg.Error as exc:
            raise ProvisionError(
                f"heartbeat_mode table: cannot create cdc_platform.heartbeat: {exc}"
            ) from exc

    async def _inspect_postgres_tables(self) -> dict[str, list[str]]:
        """Warn, as the direct transport's reader does at start, about captured tables whose
        updates and deletes PostgreSQL refuses; return the tables keyed on a replica
        identity index (Debezium's message key must be those columns, see
        docs/capture.md#the-key-of-a-table). An unreachable source is left to the connector
        to report."""
        import psycopg

        from adapters.postgres.source.catalog import identity_index_keys, identity_problems

        tables = self.pipeline.source.tables
        try:
            async with await psycopg.AsyncConnection.connect(
                self._source_conninfo(), connect_timeout=10, autocommit=True
            ) as conn:
                problems = await identity_problems(conn, tables)
                keys = await identity_index_keys(conn, tables)
        except psycopg.Error as exc:
            log.warning("provision.source_checks_skipped", error=" ".join(str(exc).split()))
            return {}
        for problem in problems:
            problem.log_warning(log)
        return keys

    async def wait_running(self) -> ConnectorStatus:
        deadline = time.monotonic() + self.running_timeout
        status: ConnectorStatus | None = None
        while True:
            status = await self.connect.status(self.name)
            if status is not None and status.failed:
                raise ProvisionError(f"connector {self.name} failed:\n{status.error()}")
            if status is not None and status.running:
                log.info("provision.connector_running", connector=self.name)
                return status
            if time.monotonic() >= deadline:
                state = "not registered" if status is None else _describe(status)
                raise ProvisionError(
                    f"connector {self.name} not RUNNING after {self.running_timeout:g} s ({state})"
                )
            await asyncio.sleep(self.poll_seconds)

    # -- teardown --------------------------------------------------------------------------

    async def teardown(self, force: bool = False) -> list[str]:
        """`cdc undeploy`: the connector, the topics when constructed with
        ``delete_topics``, then (PostgreSQL sources) the slot and the publication Debezium
        made, once the deleted connector's task has let go of the slot."""
        done = await self.remove_connector(delete_topics=self.delete_topics)
        if self.pipeline.source.source_type != "postgres":
            return done
        from adapters.postgres.source.provisioner import PostgresProvisioner

        postgres = PostgresProvisioner(
            self._source_conninfo(),
            self.pipeline.effective_slot_name(self.platform),
            self.pipeline.effective_publication_name(self.platform),
            tuple(self.pipeline.source.tables),
        )
        await self._wait_slot_released(postgres.slot_name)
        return done + list(await postgres.teardown(force=force))

    def _source_conninfo(self) -> str:
        from psycopg.conninfo import make_conninfo

        s = self.pipeline.source
        return make_conninfo(
            host=s.host,
            port=s.port,
            dbname=s.database,
            user=s.username,
            password=s.password or None,
        )

    async def _wait_slot_released(self, slot: str) -> None:
        import psycopg

        deadline = time.monotonic() + self.slot_release_seconds
        quiet_since: float | None = None
        async with await psycopg.AsyncConnection.connect(
            self._source_conninfo(), connect_timeout=10, autocommit=True
        ) as conn:
            while time.monotonic() < deadline:
                row = await (
                    await conn.execute(
                        "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,)
                    )
                ).fetchone()
                # A deleted connector's task can still be between two connection attempts
                # (a failing task retries): only a slot left alone for a while is released.
                if row is not None and row[0]:
                    quiet_since = None
                elif quiet_since is None:
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since >= SLOT_QUIET_SECONDS:
                    return
                await asyncio.sleep(0.25)

    async def remove_connector(self, *, delete_topics: bool = False) -> list[str]:
        """Delete the connector (and the topics when asked); what was done, line by line."""
        done = []
        try:
            deleted = await self.connect.delete(self.name)
        except ConnectError as exc:
            raise TeardownRefusedError(f"connector {self.name} not deleted: {exc}", []) from exc
        done.append(
            f"deleted connector {self.name}" if deleted else f"connector {self.name} did not exist"
        )
        if delete_topics:
            names = [s.name for s in self.topic_specs()]
            try:
                gone = await asyncio.to_thread(self.admin.delete_topics, names)
            except TopicAdminError as exc:
                raise TeardownRefusedError(str(exc), done) from exc
            done += [f"deleted topic {n}" for n in gone]
            done += [f"topic {n} did not exist" for n in names if n not in gone]
        else:
            done.append("kept the topics (pass --delete-topics to delete them)")
        return done


def _describe(status: ConnectorStatus) -> str:
    tasks = ", ".join(f"task {t.id} {t.state}" for t in status.tasks) or "no tasks"
    return f"connector {status.state}, {tasks}"


def build_provisioner(pipeline: PipelineConfig, platform: PlatformConfig) -> KafkaProvisioner:
    return KafkaProvisioner(pipeline, platform)
