"""pipeline.yaml: one source database, its tables, and the sinks the changes go to."""

from __future__ import annotations

import fnmatch
import math
import re
import string
from typing import Any, Literal, Self

from pydantic import Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from .base import (
    ConfigModel,
    HttpUrl,
    NonEmptyStr,
    NonNegativeInt,
    PgIdentifier,
    Port,
    PositiveFloat,
    PositiveInt,
    ResourceName,
    SlotName,
    TopicPart,
)
from .errors import Loc, raise_if
from .naming import derive_publication_name, derive_slot_name
from .platform import PlatformConfig

SourceType = Literal["postgres", "mysql", "mongodb", "sqlserver"]
SnapshotMode = Literal["initial", "never", "when_needed", "no_data"]
HeartbeatMode = Literal["message", "table", "none"]
SinkType = Literal["webhook", "postgres", "iceberg"]
Operation = Literal["c", "u", "d", "r", "t"]
PostgresWriteMode = Literal["upsert", "append"]
IcebergWriteMode = Literal["append", "upsert"]
HttpMethod = Literal["POST", "PUT"]

DEFAULT_SOURCE_PORTS: dict[str, int] = {
    "postgres": 5432,
    "mysql": 3306,
    "mongodb": 27017,
    "sqlserver": 1433,
}
ALL_OPERATIONS: tuple[Operation, ...] = ("c", "u", "d", "r", "t")

_QUALIFIED_RE = re.compile(r"^[^.\s]+\.[^.\s]+$")  # schema.table
_MONGO_QUALIFIED_RE = re.compile(r"^[^.\s]+\.\S+$")  # db.collection (collections may hold '.')
_WILDCARD_CHARS = set("*?[],")

# A change-log table (append mode, tables without a key) is named <target table>_changes.
CHANGE_LOG_SUFFIX = "_changes"
_MAX_IDENTIFIER_BYTES = 63
_TEMPLATE_FIELDS = frozenset({"schema", "table"})


def truncate_identifier(name: str) -> str:
    """PostgreSQL cuts identifiers at 63 bytes; do it ourselves so names compare as the
    server will store them."""
    data = name.encode()
    if len(data) <= _MAX_IDENTIFIER_BYTES:
        return name
    return data[:_MAX_IDENTIFIER_BYTES].decode(errors="ignore")


# Fields that only one source type reads; given for another type they are an error.
_SOURCE_SPECIFIC: dict[str, SourceType] = {
    "slot_name": "postgres",
    "publication_name": "postgres",
    "mysql_server_id": "mysql",
    "replica_set_name": "mongodb",
    "auth_source": "mongodb",
    "trust_server_certificate": "sqlserver",
}


class SourceConfig(ConfigModel):
    """The source database and the tables captured from it."""

    source_type: SourceType = "postgres"
    host: NonEmptyStr = "localhost"
    port: Port = 5432  # default depends on source_type, see _default_port
    database: NonEmptyStr
    username: NonEmptyStr = "postgres"
    password: str = Field(default="", repr=False)
    tables: list[str] = Field(min_length=1)
    snapshot_mode: SnapshotMode = "initial"
    slot_name: SlotName | None = None
    publication_name: PgIdentifier | None = None
    mysql_server_id: int | None = Field(default=None, ge=1, le=4294967295)
    replica_set_name: str | None = None
    auth_source: str | None = None
    # SQL Server's JDBC driver encrypts and checks the server's certificate; true accepts a
    # self-signed one (what SQL Server makes for itself when given none), still encrypted.
    trust_server_certificate: bool | None = None
    heartbeat_interval_seconds: PositiveFloat = 10.0
    heartbeat_mode: HeartbeatMode = "message"
    snapshot_chunk_size: int = Field(default=10000, ge=100, le=1_000_000)
    snapshot_parallelism: int = Field(default=2, ge=1, le=16)

    _pipeline_id: str | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _default_port(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("port") in (None, ""):
            source_type = data.get("source_type") or "postgres"
            port = (
                DEFAULT_SOURCE_PORTS.get(source_type, 5432)
                if isinstance(source_type, str)
                else 5432
            )
            data = {**data, "port": port}
        return data

    @field_validator("tables")
    @classmethod
    def _check_tables(cls, tables: list[str], info: ValidationInfo) -> list[str]:
        source_type = info.data.get("source_type")
        if source_type is None:  # invalid source_type, reported on its own
            return tables
        mongo = source_type == "mongodb"
        pattern = _MONGO_QUALIFIED_RE if mongo else _QUALIFIED_RE
        shape = (
            "db.collection (e.g. 'mydb.orders')" if mongo else "schema.table (e.g. 'public.orders')"
        )
        problems: list[tuple[Loc, str]] = []
        seen: dict[str, int] = {}
        for i, table in enumerate(tables):
            if _WILDCARD_CHARS & set(table):
                problems.append(((i,), f"{table!r}: source tables are exact names, not patterns"))
            elif not pattern.match(table):
                problems.append(((i,), f"{table!r} is not qualified; write it as {shape}"))
            elif table in seen:
                problems.append(((i,), f"{table!r} is listed twice (also tables[{seen[table]}])"))
            seen.setdefault(table, i)
        raise_if(problems)
        return tables

    @model_validator(mode="after")
    def _check_source(self) -> Self:
        problems: list[tuple[Loc, str]] = []
        for name, owner in _SOURCE_SPECIFIC.items():
            if owner != self.source_type and getattr(self, name) is not None:
                problems.append(
                    (
                        (name,),
                        f"{name} applies only to source_type {owner}, "
                        f"not {self.source_type}; remove it",
                    )
                )
        if self.heartbeat_mode == "none" and self.explicitly_set("heartbeat_interval_seconds"):
            problems.append(
                (
                    ("heartbeat_interval_seconds",),
                    "heartbeat_mode none sends no heartbeats, so nothing reads this interval;"
                    " remove it (or choose heartbeat_mode message or table)",
                )
            )
        if self.heartbeat_mode == "table" and self.source_type != "postgres":
            problems.append(
                (
                    ("heartbeat_mode",),
                    "heartbeat_mode table writes cdc_platform.heartbeat, a PostgreSQL table;"
                    f" source_type {self.source_type} sends heartbeat messages: use message",
                )
            )
        if self.source_type == "mysql" and self.mysql_server_id is None:
            problems.append(
                (
                    ("mysql_server_id",),
                    "source_type mysql requires mysql_server_id "
                    "(unique across the MySQL replication topology)",
                )
            )
        raise_if(problems)
        return self

    def _require_pipeline_id(self) -> str:
        if self._pipeline_id is None:
            raise ValueError("this SourceConfig is not part of a PipelineConfig; pass pipeline_id")
        return self._pipeline_id

    def effective_slot_name(
        self, platform: PlatformConfig | None = None, *, pipeline_id: str | None = None
    ) -> str:
        """Replication slot of this source: ``slot_name`` if set, else derived from the
        pipeline_id (with platform ``wal_reader.slot_name`` as prefix when set)."""
        pid = pipeline_id or self._require_pipeline_id()
        prefix = platform.wal_reader.slot_name if platform is not None else None
        return derive_slot_name(pid, self.slot_name, prefix)

    def effective_publication_name(
        self, platform: PlatformConfig | None = None, *, pipeline_id: str | None = None
    ) -> str:
        """Publication of this source: ``publication_name`` if set, else derived from the
        pipeline_id (with platform ``wal_reader.publication_name`` as prefix when set)."""
        pid = pipeline_id or self._require_pipeline_id()
        prefix = platform.wal_reader.publication_name if platform is not None else None
        return derive_publication_name(pid, self.publication_name, prefix)


class PostgresSinkConfig(ConfigModel):
    """PostgreSQL sink: each source table ``schema.table`` lands as
    ``<target_schema>.<table_name_template>`` (``{table}`` by default; ``{schema}`` is the
    source schema), its change log as that name plus ``_changes``.

    Connect either with host/port/database/username/password or with one ``dsn`` (libpq
    conninfo or URL); not both. Use :meth:`conninfo` for either form.
    """

    host: NonEmptyStr = "127.0.0.1"
    port: Port = 5432
    database: NonEmptyStr | None = None
    username: NonEmptyStr = "postgres"
    password: str = Field(default="", repr=False)
    dsn: str | None = Field(default=None, repr=False)
    target_schema: PgIdentifier = "public"
    table_name_template: NonEmptyStr = "{table}"
    write_mode: PostgresWriteMode = "upsert"
    batch_size: PositiveInt = 2000
    pool_max_size: PositiveInt = 4
    connect_timeout_seconds: PositiveFloat = 10.0

    @model_validator(mode="after")
    def _check_connection(self) -> Self:
        problems: list[tuple[Loc, str]] = []
        if self.dsn is None:
            if self.database is None:
                problems.append((("database",), "required field is missing (or give a dsn)"))
        else:
            for name in self.explicitly_set("host", "port", "database", "username", "password"):
                problems.append(((name,), f"{name} cannot be combined with dsn; put it in the dsn"))
        raise_if(problems)
        return self

    @field_validator("table_name_template")
    @classmethod
    def _check_template(cls, template: str) -> str:
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as exc:
            raise ValueError(f"{template!r} is not a valid template ({exc})") from None
        for _, name, spec, conversion in parsed:
            if name is None:
                continue
            if name not in _TEMPLATE_FIELDS:
                raise ValueError(
                    f"unknown placeholder {{{name}}} in {template!r}; use {{schema}} and {{table}}"
                )
            if spec or conversion:
                raise ValueError(f"placeholders take no format spec or conversion: {template!r}")
        if not template.format(schema="s", table="t").strip():
            raise ValueError(f"{template!r} gives an empty table name")
        return template

    def target_table(self, schema: str, table: str, *, change_log: bool = False) -> str:
        """The table (in ``target_schema``) that source table ``schema.table`` is written to;
        with ``change_log`` its change-log table. Cut to 63 bytes as PostgreSQL would."""
        name = self.table_name_template.format(schema=schema, table=table)
        return truncate_identifier(name + CHANGE_LOG_SUFFIX if change_log else name)

    def target_collisions(self, tables: list[str]) -> list[tuple[str, str, str]]:
        """Pairs of source tables (``schema.table``) that this sink would write to one
        target table: (first, second, target table)."""
        seen: dict[tuple[bool, str], str] = {}
        out: list[tuple[str, str, str]] = []
        for qualified in tables:
            schema, _, table = qualified.partition(".")
            for change_log in (False, True):  # names cut at 63 bytes may meet in one only
                name = self.target_table(schema, table, change_log=change_log)
                other = seen.setdefault((change_log, name), qualified)
                if other != qualified:
                    out.append((other, qualified, name))
                    break
        return out

    def conninfo(self) -> str:
        """libpq connection string: the dsn, or one built from the separate fields."""
        if self.dsn is not None:
            return self.dsn
        params: dict[str, str] = {
            "host": self.host,
            "port": str(self.port),
            "dbname": self.database or "",
            "user": self.username,
            "connect_timeout": str(max(2, math.ceil(self.connect_timeout_seconds))),
        }
        if self.password:
            params["password"] = self.password
        return " ".join(f"{key}={_libpq_quote(value)}" for key, value in params.items())


def _libpq_quote(value: str) -> str:
    if value and not re.search(r"[\s'\\]", value):
        return value
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


class WebhookSinkConfig(ConfigModel):
    """Webhook sink: batches of events as JSON to an HTTP endpoint."""

    url: HttpUrl
    method: HttpMethod = "POST"
    headers: dict[str, str] = Field(default_factory=dict, repr=False)
    timeout_seconds: PositiveFloat = 10.0
    batch_size: PositiveInt = 500
    max_retries: NonNegativeInt = 5
    hmac_secret: str | None = Field(default=None, repr=False)
    retry_on_status: list[int] = Field(default_factory=lambda: [429, 500, 502, 503, 504])
    # Requests at once; two requests never carry changes of the same key (order per key).
    max_in_flight_requests: PositiveInt = 2
    # How long a request that is not full waits for more changes while the stream is busy.
    linger_ms: NonNegativeInt = 20
    bearer_token: str | None = Field(default=None, repr=False)

    @model_validator(mode="after")
    def _check_statuses(self) -> Self:
        problems: list[tuple[Loc, str]] = [
            (("retry_on_status", i), f"{status} is not an HTTP status code (100..599)")
            for i, status in enumerate(self.retry_on_status)
            if not 100 <= status <= 599
        ]
        for i, secret in enumerate((self.hmac_secret or "").split()):
            if secret.startswith("whsec_") and not _is_base64(secret[len("whsec_") :]):
                problems.append(
                    (("hmac_secret",), f"secret {i + 1}: 'whsec_' must be followed by base64")
                )
        raise_if(problems)
        return self


def _is_base64(text: str) -> bool:
    import base64
    import binascii

    try:
        return bool(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError):
        return False


class IcebergMaintenanceConfig(ConfigModel):
    """Background table maintenance: compaction and snapshot expiry."""

    enabled: bool = False
    compaction_interval_seconds: PositiveFloat = 3600.0
    expire_snapshots_older_than_seconds: PositiveFloat = 86400.0
    retain_last_snapshots: PositiveInt = 10


class IcebergSinkConfig(ConfigModel):
    """Apache Iceberg sink."""

    catalog_uri: NonEmptyStr
    catalog_name: NonEmptyStr = "default"
    warehouse: NonEmptyStr
    table_name: NonEmptyStr
    table_namespace: NonEmptyStr = "cdc"
    write_mode: IcebergWriteMode = "append"
    batch_size: PositiveInt = 1000
    flush_interval_seconds: PositiveFloat = 5.0
    write_executor_threads: PositiveInt = 1
    s3_endpoint: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = Field(default=None, repr=False)
    s3_region: str | None = None
    # upsert: a delete keeps the row with _cdc_deleted = true instead of removing it
    soft_delete: bool = False
    # partition transforms: "column", "day(ts)", "bucket(16, id)", "truncate(4, name)", ...
    partition_by: list[NonEmptyStr] = Field(default_factory=list)
    maintenance: IcebergMaintenanceConfig = Field(default_factory=IcebergMaintenanceConfig)


SinkSettings = PostgresSinkConfig | WebhookSinkConfig | IcebergSinkConfig
_SINK_SECTIONS: tuple[SinkType, ...] = ("webhook", "postgres", "iceberg")


class SinkConfig(ConfigModel):
    """One sink. Exactly one type-specific section, the one named by ``sink_type``."""

    sink_id: ResourceName
    sink_type: SinkType
    enabled: bool = True
    tables: list[NonEmptyStr] | None = None
    operations: list[Operation] | None = None
    webhook: WebhookSinkConfig | None = None
    postgres: PostgresSinkConfig | None = None
    iceberg: IcebergSinkConfig | None = None

    @model_validator(mode="after")
    def _check_sections(self) -> Self:
        problems: list[tuple[Loc, str]] = []
        if getattr(self, self.sink_type) is None:
            problems.append(
                (
                    (self.sink_type,),
                    f"sink_type {self.sink_type} requires a '{self.sink_type}:' section",
                )
            )
        for section in _SINK_SECTIONS:
            if section != self.sink_type and getattr(self, section) is not None:
                problems.append(
                    (
                        (section,),
                        f"section '{section}' does not match sink_type {self.sink_type}; "
                        f"settings of this sink go under '{self.sink_type}:'",
                    )
                )
        if self.tables is not None and not self.tables:
            problems.append((("tables",), "empty list; omit 'tables' to receive every table"))
        if self.operations is not None:
            if not self.operations:
                problems.append(
                    (("operations",), "empty list; omit 'operations' to receive every operation")
                )
            seen: set[str] = set()
            for i, op in enumerate(self.operations):
                if op in seen:
                    problems.append((("operations", i), f"{op!r} is listed twice"))
                seen.add(op)
        raise_if(problems)
        return self

    @property
    def settings(self) -> SinkSettings:
        """The type-specific section (``postgres``, ``webhook`` or ``iceberg``)."""
        section: SinkSettings | None = getattr(self, self.sink_type)
        assert section is not None  # guaranteed by validation
        return section

    def accepts_table(self, table: str) -> bool:
        """Whether events of ``table`` (``schema.table``) go to this sink."""
        return self.tables is None or any(fnmatch.fnmatchcase(table, p) for p in self.tables)

    def accepts_operation(self, op: str) -> bool:
        """Whether events with operation ``op`` (c, u, d, r, t) go to this sink."""
        return self.operations is None or op in self.operations


class PipelineConfig(ConfigModel):
    """pipeline.yaml."""

    pipeline_id: ResourceName
    topic_prefix: TopicPart = "cdc"
    source: SourceConfig
    sinks: list[SinkConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_pipeline(self) -> Self:
        self.source._pipeline_id = self.pipeline_id
        problems: list[tuple[Loc, str]] = []
        first: dict[str, int] = {}
        for i, sink in enumerate(self.sinks):
            if sink.sink_id in first:
                problems.append(
                    (
                        ("sinks", i, "sink_id"),
                        f"duplicate sink_id {sink.sink_id!r} (also sinks[{first[sink.sink_id]}])",
                    )
                )
            first.setdefault(sink.sink_id, i)
            for j, pattern in enumerate(sink.tables or ()):
                if not any(fnmatch.fnmatchcase(t, pattern) for t in self.source.tables):
                    problems.append(
                        (
                            ("sinks", i, "tables", j),
                            f"pattern {pattern!r} matches none of the source tables "
                            f"({', '.join(self.source.tables)})",
                        )
                    )
            if sink.sink_type == "postgres" and sink.postgres is not None:
                accepted = [t for t in self.source.tables if sink.accepts_table(t)]
                for first_table, second, name in sink.postgres.target_collisions(accepted):
                    problems.append(
                        (
                            ("sinks", i, "postgres", "table_name_template"),
                            f"{first_table} and {second} would both be written to"
                            f" {sink.postgres.target_schema}.{name} (template"
                            f" {sink.postgres.table_name_template!r}); tell them apart, e.g."
                            " table_name_template: '{schema}_{table}'",
                        )
                    )
        raise_if(problems)
        return self

    @property
    def enabled_sinks(self) -> list[SinkConfig]:
        return [sink for sink in self.sinks if sink.enabled]

    def sink(self, sink_id: str) -> SinkConfig:
        """The sink with this id; KeyError naming the known ids otherwise."""
        for sink in self.sinks:
            if sink.sink_id == sink_id:
                return sink
        known = ", ".join(s.sink_id for s in self.sinks) or "none"
        raise KeyError(f"pipeline {self.pipeline_id!r} has no sink {sink_id!r} (sinks: {known})")

    def effective_slot_name(self, platform: PlatformConfig | None = None) -> str:
        """See :meth:`SourceConfig.effective_slot_name`."""
        return self.source.effective_slot_name(platform, pipeline_id=self.pipeline_id)

    def effective_publication_name(self, platform: PlatformConfig | None = None) -> str:
        """See :meth:`SourceConfig.effective_publication_name`."""
        return self.source.effective_publication_name(platform, pipeline_id=self.pipeline_id)

    def effective_group_id(self, platform: PlatformConfig) -> str:
        """Kafka consumer group: ``kafka.group_id`` when platform.yaml sets it, else
        ``<default group_id>-<pipeline_id>`` so pipelines sharing a platform file do not
        share a consumer group."""
        if "group_id" in platform.kafka.model_fields_set:
            return platform.kafka.group_id
        return f"{platform.kafka.group_id}-{self.pipeline_id}"


def compatibility_problems(
    pipeline: PipelineConfig, platform: PlatformConfig
) -> list[tuple[Loc, str]]:
    """Problems of running ``pipeline`` on ``platform`` (locs are pipeline.yaml paths)."""
    problems: list[tuple[Loc, str]] = []
    if platform.reads_wal and pipeline.source.source_type != "postgres":
        problems.append(
            (
                ("source", "source_type"),
                f"transport_mode {platform.transport_mode} reads the PostgreSQL WAL itself; "
                f"source_type {pipeline.source.source_type} needs transport_mode kafka (Debezium)",
            )
        )
    return problems
