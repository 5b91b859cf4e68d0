"""Debezium connector configs for Kafka Connect, one builder per ``source_type``.

Every config carries the pipeline's tables as exact include lists (regexes with the dots
escaped: Debezium matches the lists as regular expressions), ``topic.prefix``, the snapshot
mode, heartbeats, the Avro converters with the Schema Registry URL (and basic auth), and
topic-creation defaults so a topic Connect creates (heartbeats) gets the configured
partitions and replication factor. See docs/kafka.md#connectors for every key and why.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from urllib.parse import quote

from adapters.config import PipelineConfig, PlatformConfig
from adapters.kafka import security, topics

CONNECTOR_CLASSES = {
    "postgres": "io.debezium.connector.postgresql.PostgresConnector",
    "mysql": "io.debezium.connector.mysql.MySqlConnector",
    "mongodb": "io.debezium.connector.mongodb.MongoDbConnector",
    "sqlserver": "io.debezium.connector.sqlserver.SqlServerConnector",
}

# Our snapshot_mode -> Debezium's snapshot.mode (the same for all four connectors in
# Debezium 3). `never` means "no rows copied, stream from now": Debezium's own `never` is
# deprecated and, for MySQL, reads the binlog from its start without the schema, which fails
# on any server that purged binlogs; `no_data` captures the table structure only and then
# streams, which is what `never` promises here.
SNAPSHOT_MODES = {
    "initial": "initial",
    "when_needed": "when_needed",
    "no_data": "no_data",
    "never": "no_data",
}


def connector_name(pipeline: PipelineConfig) -> str:
    """One connector per pipeline, named after it (pipeline ids are unique per platform)."""
    return f"cdc-{pipeline.pipeline_id}"


def include_list(names: Iterable[str]) -> str:
    """Exact names as a Debezium include list (anchored regexes, comma separated)."""
    return ",".join(re.escape(n) for n in names)


def _common(pipeline: PipelineConfig, platform: PlatformConfig) -> dict[str, str]:
    source = pipeline.source
    kafka = platform.kafka
    conf = {
        "connector.class": CONNECTOR_CLASSES[source.source_type],
        "tasks.max": "1",
        "topic.prefix": pipeline.topic_prefix,
        "snapshot.mode": SNAPSHOT_MODES[source.snapshot_mode],
        "heartbeat.interval.ms": (
            "0"
            if source.heartbeat_mode == "none"
            else str(round(source.heartbeat_interval_seconds * 1000))
        ),
        # A delete is followed by a tombstone so compacted topics drop the key; the consumer
        # skips tombstones.
        "tombstones.on.delete": "true",
        # Retriable errors (connection lost or refused) restart the task a bounded number
        # of times; then the connector is FAILED and the health checks say why. Unbounded
        # (-1), a wrong password would look RUNNING for ever.
        "errors.max.retries": str(platform.connector.errors_max_retries),
        "retriable.restart.connector.wait.ms": str(
            round(platform.connector.errors_retry_wait_seconds * 1000)
        ),
        # Debezium waits this long for more changes before passing a batch on (its 500 ms
        # default was most of the end-to-end latency, docs/benchmarks.md).
        "poll.interval.ms": str(max(1, round(platform.connector.poll_interval_seconds * 1000))),
        "topic.creation.default.partitions": str(kafka.topic_num_partitions),
        "topic.creation.default.replication.factor": str(kafka.topic_replication_factor),
        **security.converter_settings(kafka),
    }
    return conf


def _database_login(pipeline: PipelineConfig) -> dict[str, str]:
    s = pipeline.source
    return {
        "database.hostname": s.host,
        "database.port": str(s.port),
        "database.user": s.username,
        "database.password": s.password,
    }


def postgres_config(pipeline: PipelineConfig, platform: PlatformConfig) -> dict[str, str]:
    s = pipeline.source
    slot = pipeline.effective_slot_name(platform)
    conf = {
        **_common(pipeline, platform),
        **_database_login(pipeline),
        "database.dbname": s.database,
        "plugin.name": "pgoutput",
        "slot.name": slot,
        "publication.name": pipeline.effective_publication_name(platform),
        # Debezium creates the publication for exactly the included tables (and adds new
        # ones on a config update); `all_tables` would need superuser and publish everything.
        "publication.autocreate.mode": "filtered",
        "table.include.list": include_list(s.tables),
        "slot.drop.on.stop": "false",
        # Truncates reach the sinks as on the direct transport (Debezium skips them by
        # default): a change log gets its `t` row, an upsert target is truncated.
        "skipped.operations": "none",
    }
    if s.heartbeat_mode == "table":
        # The same heartbeat table as the direct transport (adapters/postgres/catalog.py):
        # a write on an idle database lets the slot's confirmed position move.
        conf["heartbeat.action.query"] = (
            "INSERT INTO cdc_platform.heartbeat (slot_name) VALUES ('"
            + slot.replace("'", "''")
            + "') ON CONFLICT (slot_name) DO UPDATE SET beat_at = now()"
        )
    return conf


def mysql_config(pipeline: PipelineConfig, platform: PlatformConfig) -> dict[str, str]:
    s = pipeline.source
    assert s.mysql_server_id is not None  # required for mysql by SourceConfig
    databases = sorted({t.split(".", 1)[0] for t in s.tables})
    return {
        **_common(pipeline, platform),
        **_database_login(pipeline),
        "database.server.id": str(s.mysql_server_id),
        "database.include.list": include_list(databases),
        "table.include.list": include_list(s.tables),
        # DDL of other tables is not needed to decode ours, and keeps the history small.
        "schema.history.internal.store.only.captured.tables.ddl": "true",
        **security.schema_history_settings(platform.kafka, topics.schema_history_topic(pipeline)),
    }


def mongodb_connection_string(pipeline: PipelineConfig) -> str:
    """``mongodb://user:password@host:port/?replicaSet=..&authSource=..`` with the
    credentials percent-encoded (a ``@``, ``:`` or ``/`` in a password would break the URI).
    No user unless ``username`` is given: its default, ``postgres``, is PostgreSQL's, and a
    MongoDB server (with or without access control) refuses a login as a user it lacks."""
    s = pipeline.source
    userinfo = ""
    if s.username and s.explicitly_set("username"):
        userinfo = quote(s.username, safe="")
        if s.password:
            userinfo += ":" + quote(s.password, safe="")
        userinfo += "@"
    options = []
    if s.replica_set_name:
        options.append(f"replicaSet={quote(s.replica_set_name, safe='')}")
    if s.auth_source:
        options.append(f"authSource={quote(s.auth_source, safe='')}")
    query = "?" + "&".join(options) if options else ""
    return f"mongodb://{userinfo}{s.host}:{s.port}/{query}"


def mongodb_config(pipeline: PipelineConfig, platform: PlatformConfig) -> dict[str, str]:
    s = pipeline.source
    databases = sorted({t.split(".", 1)[0] for t in s.tables})
    return {
        **_common(pipeline, platform),
        "mongodb.connection.string": mongodb_connection_string(pipeline),
        "database.include.list": include_list(databases),
        "collection.include.list": include_list(s.tables),
        # Updates carry the whole document (the sinks upsert rows, not patches).
        "capture.mode": "change_streams_update_full",
    }


def sqlserver_config(pipeline: PipelineConfig, platform: PlatformConfig) -> dict[str, str]:
    s = pipeline.source
    prefix = re.escape(pipeline.topic_prefix)
    database = re.escape(s.database)
    conf = {
        **_common(pipeline, platform),
        **_database_login(pipeline),
        "database.names": s.database,
        "table.include.list": include_list(s.tables),
        "schema.history.internal.store.only.captured.tables.ddl": "true",
        **security.schema_history_settings(platform.kafka, topics.schema_history_topic(pipeline)),
        # SQL Server topics are <prefix>.<database>.<schema>.<table>; route them to the
        # <prefix>.<schema>.<table> every other source type uses.
        "transforms": "route",
        "transforms.route.type": "org.apache.kafka.connect.transforms.RegexRouter",
        "transforms.route.regex": rf"{prefix}\.{database}\.([^.]+)\.([^.]+)",
        "transforms.route.replacement": f"{pipeline.topic_prefix}.$1.$2",
    }
    if s.trust_server_certificate:
        # Passed through to the JDBC driver: encrypted, the certificate not checked.
        conf["database.trustServerCertificate"] = "true"
    return conf


_BUILDERS = {
    "postgres": postgres_config,
    "mysql": mysql_config,
    "mongodb": mongodb_config,
    "sqlserver": sqlserver_config,
}


def message_key_settings(keys: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """``message.key.columns`` keying each table of `keys` on the given columns (PostgreSQL's
    `REPLICA IDENTITY USING INDEX` columns, the key the direct transport uses; Debezium
    would key on the primary key, which pgoutput does not send in an old row)."""
    if not keys:
        return {}
    return {
        "message.key.columns": ";".join(
            f"{table}:{','.join(columns)}" for table, columns in sorted(keys.items())
        )
    }


def connector_config(pipeline: PipelineConfig, platform: PlatformConfig) -> dict[str, str]:
    """The full connector config for ``PUT /connectors/<name>/config``."""
    return _BUILDERS[pipeline.source.source_type](pipeline, platform)
