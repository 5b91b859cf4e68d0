"""platform.yaml: transport, shared infrastructure endpoints and tuning, shared by pipelines."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Self

from pydantic import Field, field_validator, model_validator

from .base import (
    ConfigModel,
    HostPortList,
    HttpUrl,
    ListenHost,
    NonEmptyStr,
    NonNegativeFloat,
    NonNegativeInt,
    PgIdentifier,
    Port,
    PositiveFloat,
    PositiveInt,
    SlotName,
    TopicPart,
    check_listen_host,
)
from .errors import Loc, raise_if

# Where the processes listen when neither `listen_host` nor CDC_LISTEN_HOST says otherwise:
# this machine only. Containers set CDC_LISTEN_HOST=0.0.0.0 (the images and the Helm chart).
DEFAULT_LISTEN_HOST = "127.0.0.1"
LISTEN_HOST_ENV = "CDC_LISTEN_HOST"

TransportMode = Literal["direct", "kafka", "pubsub", "kinesis"]
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
AuthMechanism = Literal[
    "none", "sasl_plain", "sasl_scram_256", "sasl_scram_512", "sasl_iam", "sasl_oauthbearer"
]
AutoOffsetReset = Literal["earliest", "latest"]
Acks = Literal["all", "-1", "0", "1"]

# Other spellings accepted for auth_mechanism (the Helm chart writes the SHA spellings).
AUTH_MECHANISM_ALIASES = {
    "sasl_scram_sha_256": "sasl_scram_256",
    "sasl_scram_sha_512": "sasl_scram_512",
}
SASL_PASSWORD_MECHANISMS = ("sasl_plain", "sasl_scram_256", "sasl_scram_512")

# Which transport reads which section; a section given for another transport is an error
# (it would be silently ignored otherwise).
TRANSPORT_SECTIONS: dict[str, tuple[TransportMode, ...]] = {
    "kafka": ("kafka",),
    "connector": ("kafka",),
    "pubsub": ("pubsub",),
    "kinesis": ("kinesis",),
    "wal_reader": ("direct", "pubsub", "kinesis"),
}


class KafkaConfig(ConfigModel):
    """Kafka transport: brokers, Schema Registry, consumer/producer tuning, managed-Kafka auth."""

    bootstrap_servers: HostPortList = "localhost:9092"
    schema_registry_url: HttpUrl = "http://localhost:8081"
    group_id: NonEmptyStr = "cdc-platform"
    auto_offset_reset: AutoOffsetReset = "earliest"
    enable_idempotence: bool = True
    acks: Acks = "all"
    topic_num_partitions: PositiveInt = 1
    topic_replication_factor: PositiveInt = 1
    poll_batch_size: PositiveInt = 1
    deser_pool_size: PositiveInt = 1
    commit_interval_seconds: NonNegativeFloat = 0.0
    security_protocol: SecurityProtocol = "PLAINTEXT"
    auth_mechanism: AuthMechanism = "none"
    sasl_username: str | None = None
    sasl_password: str | None = Field(default=None, repr=False)
    aws_region: str | None = None
    gcp_project_id: str | None = None
    # TLS to the brokers (SSL / SASL_SSL): PEM files on this machine. The connector gets
    # their contents (Connect may run elsewhere), see adapters/kafka/security.py.
    ssl_ca_file: NonEmptyStr | None = None
    ssl_cert_file: NonEmptyStr | None = None
    ssl_key_file: NonEmptyStr | None = None
    ssl_key_password: str | None = Field(default=None, repr=False)
    schema_registry_username: NonEmptyStr | None = None
    schema_registry_password: str | None = Field(default=None, repr=False)

    @field_validator("auth_mechanism", mode="before")
    @classmethod
    def _alias_mechanism(cls, value: Any) -> Any:
        if isinstance(value, str):
            return AUTH_MECHANISM_ALIASES.get(value, value)
        return value

    @model_validator(mode="after")
    def _check_auth(self) -> Self:
        problems: list[tuple[Loc, str]] = []
        mech = self.auth_mechanism
        proto = self.security_protocol
        if mech == "none":
            if proto.startswith("SASL_"):
                problems.append(
                    (
                        ("auth_mechanism",),
                        f"security_protocol {proto} needs an auth_mechanism other than 'none'",
                    )
                )
        elif not proto.startswith("SASL_"):
            problems.append(
                (
                    ("security_protocol",),
                    f"auth_mechanism {mech} needs security_protocol SASL_SSL "
                    f"(or SASL_PLAINTEXT), not {proto}",
                )
            )
        elif mech in ("sasl_iam", "sasl_oauthbearer") and proto != "SASL_SSL":
            problems.append(
                (("security_protocol",), f"auth_mechanism {mech} needs security_protocol SASL_SSL")
            )
        if mech == "sasl_iam" and not self.aws_region:
            problems.append((("aws_region",), "auth_mechanism sasl_iam requires aws_region"))
        if mech == "sasl_oauthbearer" and not self.gcp_project_id:
            problems.append(
                (("gcp_project_id",), "auth_mechanism sasl_oauthbearer requires gcp_project_id")
            )
        if mech in SASL_PASSWORD_MECHANISMS:
            for name in ("sasl_username", "sasl_password"):
                if not getattr(self, name):
                    problems.append(((name,), f"auth_mechanism {mech} requires {name}"))
        else:
            for name in self.explicitly_set("sasl_username", "sasl_password"):
                if getattr(self, name) is not None:
                    problems.append(
                        (
                            (name,),
                            f"{name} is used only with auth_mechanism sasl_plain or sasl_scram_*",
                        )
                    )
        if mech != "sasl_iam" and self.aws_region is not None:
            problems.append(
                (("aws_region",), "aws_region is used only with auth_mechanism sasl_iam")
            )
        if mech != "sasl_oauthbearer" and self.gcp_project_id is not None:
            problems.append(
                (
                    ("gcp_project_id",),
                    "gcp_project_id is used only with auth_mechanism sasl_oauthbearer",
                )
            )
        problems += self._tls_and_registry_problems()
        raise_if(problems)
        return self

    def _tls_and_registry_problems(self) -> list[tuple[Loc, str]]:
        problems: list[tuple[Loc, str]] = []
        tls = ("ssl_ca_file", "ssl_cert_file", "ssl_key_file", "ssl_key_password")
        if self.security_protocol not in ("SSL", "SASL_SSL"):
            for name in tls:
                if getattr(self, name) is not None:
                    problems.append(
                        (
                            (name,),
                            f"{name} is used only with security_protocol SSL or SASL_SSL,"
                            f" not {self.security_protocol}",
                        )
                    )
        if (self.ssl_cert_file is None) != (self.ssl_key_file is None):
            missing = "ssl_key_file" if self.ssl_key_file is None else "ssl_cert_file"
            problems.append(
                ((missing,), "a client certificate needs both ssl_cert_file and ssl_key_file")
            )
        if self.ssl_key_password is not None and self.ssl_key_file is None:
            problems.append((("ssl_key_password",), "ssl_key_password needs ssl_key_file"))
        if (self.schema_registry_username is None) != (self.schema_registry_password is None):
            missing = (
                "schema_registry_password"
                if self.schema_registry_password is None
                else "schema_registry_username"
            )
            problems.append(
                (
                    (missing,),
                    "Schema Registry basic auth needs both schema_registry_username and"
                    " schema_registry_password",
                )
            )
        return problems


class ConnectorConfig(ConfigModel):
    """Kafka Connect REST API (Debezium connectors); kafka transport only."""

    connect_url: HttpUrl = "http://localhost:8083"
    timeout_seconds: PositiveFloat = 30.0
    retry_max_attempts: PositiveInt = 5
    retry_wait_seconds: NonNegativeFloat = 2.0
    # Debezium restarts its task after a retriable error (a lost or refused database
    # connection) this many times before the connector becomes FAILED, which /readyz and
    # `cdc health` report; -1 retries for ever while Connect keeps saying RUNNING.
    errors_max_retries: int = Field(default=30, ge=-1)
    errors_retry_wait_seconds: PositiveFloat = 10.0
    # Debezium's poll.interval.ms: how long its task waits for new changes before handing a
    # batch to Connect. Debezium's 500 ms default dominated the Kafka path's latency
    # (docs/benchmarks.md: p99 1.27 s at 500 ms, 0.55 s at 50 ms).
    poll_interval_seconds: PositiveFloat = 0.1


class DlqConfig(ConfigModel):
    """Dead-letter routing of events a sink cannot take."""

    enabled: bool = True
    topic_suffix: TopicPart = "dlq"
    max_retries: NonNegativeInt = 3
    include_headers: bool = True
    flush_interval_seconds: NonNegativeFloat = 0.0
    # transport_mode direct: the PostgreSQL holding the dead-letter table (default: the
    # source database, schema cdc_platform).
    postgres_dsn: str | None = Field(default=None, repr=False)


class RetryConfig(ConfigModel):
    """Exponential backoff for retried operations."""

    max_attempts: PositiveInt = 5
    initial_wait_seconds: PositiveFloat = 1.0
    max_wait_seconds: PositiveFloat = 60.0
    multiplier: float = Field(default=2.0, ge=1.0)
    jitter: bool = True

    @model_validator(mode="after")
    def _check_waits(self) -> Self:
        if self.max_wait_seconds < self.initial_wait_seconds:
            raise_if(
                [
                    (
                        ("max_wait_seconds",),
                        f"max_wait_seconds ({self.max_wait_seconds}) is below "
                        f"initial_wait_seconds ({self.initial_wait_seconds})",
                    )
                ]
            )
        return self


class PubSubConfig(ConfigModel):
    """Google Pub/Sub transport."""

    project_id: str | None = None
    ordering_enabled: bool = True
    ack_deadline_seconds: int = Field(default=60, ge=10, le=600)
    max_outstanding_messages: PositiveInt = 1000
    # Ordering keys the capture stage spreads changes over (by key hash): the parallelism.
    lanes: int = Field(default=8, ge=1, le=1024)
    # The publisher client's batching (google.cloud.pubsub_v1.types.BatchSettings).
    publish_max_messages: int = Field(default=100, ge=1, le=1000)
    publish_max_bytes: int = Field(default=1_000_000, ge=1000, le=10_000_000)
    publish_max_latency_seconds: NonNegativeFloat = 0.01


class KinesisConfig(ConfigModel):
    """Amazon Kinesis transport (checkpoints in DynamoDB)."""

    region: str | None = None
    shard_count: PositiveInt = 1
    checkpoint_table_name: str = Field(
        default="cdc-kinesis-checkpoints",
        min_length=3,
        max_length=255,
        pattern=r"^[A-Za-z0-9_.-]+$",
    )
    poll_interval_seconds: PositiveFloat = 1.0
    max_records_per_shard: int = Field(default=100, ge=1, le=10000)
    endpoint_url: HttpUrl | None = None


class WalReaderConfig(ConfigModel):
    """The PostgreSQL WAL reader (direct, pubsub and kinesis transports).

    ``slot_name`` and ``publication_name`` here are *prefixes*: each pipeline's own name is
    ``<prefix>_<pipeline_id>`` so pipelines sharing this file never share a slot.
    """

    publication_name: PgIdentifier | None = None
    slot_name: SlotName | None = None
    batch_size: PositiveInt = 100
    batch_timeout_seconds: PositiveFloat = 1.0
    status_interval_seconds: PositiveFloat = 10.0
    slot_lag_degraded_bytes: PositiveInt = 1_073_741_824
    reconnect_initial_seconds: PositiveFloat = 0.5
    reconnect_max_seconds: PositiveFloat = 30.0

    @model_validator(mode="after")
    def _check_backoff(self) -> Self:
        if self.reconnect_max_seconds < self.reconnect_initial_seconds:
            raise_if(
                [
                    (
                        ("reconnect_max_seconds",),
                        f"reconnect_max_seconds {self.reconnect_max_seconds:g} is below"
                        f" reconnect_initial_seconds {self.reconnect_initial_seconds:g}",
                    )
                ]
            )
        return self


class IngestConfig(ConfigModel):
    """The ingest stage: batching towards the sinks and its gRPC port."""

    batch_max_events: PositiveInt = 2000
    batch_max_delay_ms: NonNegativeInt = 20
    max_in_flight_batches: PositiveInt = 8
    grpc_port: Port = 50050
    # How long the oldest unacked batch of a sink stream may wait, while the sink does not
    # answer its health check either, before the stream and its connection are dropped and
    # reopened (unacked batches resent in order). See docs/configuration.md.
    ack_timeout_seconds: float = Field(default=20.0, ge=2.0, le=3600.0)


class GrpcTlsConfig(ConfigModel):
    """TLS (optionally mutual) on the gRPC streams from the ingest stage to the sinks.

    One section serves both ends: a sink serves ``cert_file``/``key_file`` and, with
    ``require_client_cert``, accepts only clients whose certificate ``ca_file`` signed; the
    ingest checks each sink's certificate against ``ca_file`` (the system roots when unset)
    and presents ``cert_file``/``key_file`` as its client certificate. The files are read at
    process start, not when the configuration is loaded.
    """

    enabled: bool = False
    cert_file: NonEmptyStr | None = None
    key_file: NonEmptyStr | None = None
    ca_file: NonEmptyStr | None = None
    require_client_cert: bool = False
    server_name: NonEmptyStr | None = None

    @model_validator(mode="after")
    def _check_files(self) -> Self:
        problems: list[tuple[Loc, str]] = []
        if self.enabled:
            for name in ("cert_file", "key_file"):
                if getattr(self, name) is None:
                    problems.append(((name,), f"grpc_tls.enabled requires {name}"))
            if self.require_client_cert and self.ca_file is None:
                problems.append(
                    (("ca_file",), "require_client_cert requires ca_file (the clients' CA)")
                )
        elif self.require_client_cert:
            problems.append(
                (("require_client_cert",), "require_client_cert needs grpc_tls.enabled: true")
            )
        raise_if(problems)
        return self


class TracingConfig(ConfigModel):
    """OpenTelemetry tracing. ``otlp_endpoint`` None: the caller falls back to the
    OTEL_EXPORTER_OTLP_ENDPOINT environment variable (or no export)."""

    otlp_endpoint: str | None = None
    service_name_prefix: NonEmptyStr = "cdc"


class PlatformConfig(ConfigModel):
    """platform.yaml. Every field has a default; ``PlatformConfig()`` is the single-machine
    setup (direct transport)."""

    transport_mode: TransportMode = "direct"
    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    connector: ConnectorConfig = Field(default_factory=ConnectorConfig)
    dlq: DlqConfig = Field(default_factory=DlqConfig)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    pubsub: PubSubConfig = Field(default_factory=PubSubConfig)
    kinesis: KinesisConfig = Field(default_factory=KinesisConfig)
    wal_reader: WalReaderConfig = Field(default_factory=WalReaderConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)
    grpc_tls: GrpcTlsConfig = Field(default_factory=GrpcTlsConfig)
    listen_host: ListenHost | None = None
    max_buffered_messages: PositiveInt = 1000
    schema_monitor_interval_seconds: PositiveFloat = 30.0
    lag_monitor_interval_seconds: PositiveFloat = 15.0
    stop_on_incompatible_schema: bool = False
    health_port: Port = 8080
    health_enabled: bool = True
    # Fits Kubernetes' default 30 s grace period and the Helm chart's 60 s.
    shutdown_timeout_seconds: float = Field(default=25.0, ge=2.0, le=3600.0)

    @model_validator(mode="after")
    def _check_transport(self) -> Self:
        problems: list[tuple[Loc, str]] = []
        mode = self.transport_mode
        for section, modes in TRANSPORT_SECTIONS.items():
            if section in self.model_fields_set and mode not in modes:
                used = " or ".join(modes)
                problems.append(
                    (
                        (section,),
                        f"section '{section}' is used only with transport_mode {used}, "
                        f"but transport_mode is {mode}; remove it",
                    )
                )
        if mode == "pubsub" and not self.pubsub.project_id:
            problems.append(
                (("pubsub", "project_id"), "transport_mode pubsub requires pubsub.project_id")
            )
        if mode == "kinesis" and not self.kinesis.region:
            problems.append(
                (("kinesis", "region"), "transport_mode kinesis requires kinesis.region")
            )
        if self.health_enabled and self.health_port == self.ingest.grpc_port:
            problems.append(
                (
                    ("ingest", "grpc_port"),
                    f"ingest.grpc_port {self.ingest.grpc_port} is also the health_port",
                )
            )
        raise_if(problems)
        return self

    def effective_listen_host(self, env: Mapping[str, str]) -> str:
        """The address the health HTTP and gRPC servers bind to: ``listen_host``, else the
        CDC_LISTEN_HOST variable of ``env``, else 127.0.0.1."""
        if self.listen_host is not None:
            return self.listen_host
        value = env.get(LISTEN_HOST_ENV, "").strip()
        return check_listen_host(value) if value else DEFAULT_LISTEN_HOST

    @property
    def reads_wal(self) -> bool:
        """True when the platform's own WAL reader captures changes (not Debezium)."""
        return self.transport_mode != "kafka"
