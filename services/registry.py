"""The one registry of adapters: every transport and sink type, its config, its constructors.

Each entry says which name it answers to in the configuration (``transport_mode``,
``sinks[].sink_type``), which config model (section) holds its own settings, which shared
platform.yaml settings it reads, and how to build it. An entry without constructors is an
adapter this release does not have: its settings are still parsed (the deployment guide
documents them), but choosing it is refused by :func:`check` (``cdc validate``, ``cdc run``
and the stages exit 2 naming ``transport_mode`` or ``sinks[i].sink_type``).

Readers: :func:`check` (configuration validation), the dependency-injector containers
(services/ingest/container.py, services/sink/container.py build their selectors from
:data:`TRANSPORTS` and :data:`SINKS`) and the CLI.

The constructors are typed with the ports of domain/ports.py, so mypy checks that each
adapter satisfies its port (a ``PostgresWalSource`` returned where an ``EventSource`` is
expected). See docs/adding-adapters.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from adapters.config import (
    ConnectorConfig,
    IcebergSinkConfig,
    KafkaConfig,
    KinesisConfig,
    PipelineConfig,
    PlatformConfig,
    PostgresSinkConfig,
    PubSubConfig,
    SinkConfig,
    SinkType,
    TransportMode,
    WalReaderConfig,
    WebhookSinkConfig,
)
from adapters.config.errors import Loc
from adapters.postgres.sink.dead_letter_store import PostgresSinkDeadLetters
from adapters.postgres.sink.writer import PostgresSinkWriter
from adapters.postgres.source.dead_letters import PostgresErrorRouter
from adapters.postgres.source.provisioner import PostgresProvisioner
from adapters.postgres.source.reader import PostgresWalSource, WalReaderSettings
from adapters.postgres.source.slot_monitor import PostgresSlotMonitor
from domain.ports import (
    AckCallback,
    DeadLetterStore,
    ErrorRouter,
    EventSource,
    Outlet,
    Provisioner,
    SinkWriter,
    SourceMonitor,
)
from services import pubsub_transport
from services.capture.payload import ArrowBatchCodec

if TYPE_CHECKING:  # httpx is the `webhook` extra: imported when a webhook sink is built
    from adapters.webhook.sink import WebhookSinkWriter
    from domain.events import TableSchema

if TYPE_CHECKING:  # the kafka extra is imported only when the kafka transport is built
    from adapters.debezium.monitor import ConnectorMonitor
    from adapters.kafka.consumer import KafkaEventSource
    from adapters.kinesis.dead_letters import KinesisDeadLetters  # boto3: the kinesis extra

SourceFactory = Callable[[PipelineConfig, PlatformConfig], EventSource]
MonitorFactory = Callable[[PipelineConfig, PlatformConfig], SourceMonitor]
# The capture stage of a transport fed by our WAL reader (services/capture): its publisher,
# called with the callback that receives each batch's DeliveryAck.
OutletFactory = Callable[[PipelineConfig, PlatformConfig, AckCallback], Outlet]
ProvisionerFactory = Callable[[PipelineConfig, PlatformConfig], Provisioner]
WriterFactory = Callable[[PipelineConfig, SinkConfig, PlatformConfig], SinkWriter]
# Values of an adapter's own settings it does not support, as (loc, message) per file.
ValueCheck = Callable[[PipelineConfig, PlatformConfig], "Problems"]
# The transport's dead letters: where sinks without their own put the changes they cannot
# deliver (ErrorRouter), and where `cdc dlq` lists and replays them (DeadLetterStore).
# One object may be both.
RouterFactory = Callable[[PipelineConfig, PlatformConfig], ErrorRouter]
StoreFactory = Callable[[PipelineConfig, PlatformConfig], DeadLetterStore]
# A sink that keeps dead letters beside its data (transactionally).
SinkStoreFactory = Callable[[PipelineConfig, SinkConfig, PlatformConfig], DeadLetterStore]

# Shared settings that only some adapters read (dotted paths; ``topic_prefix`` is in
# pipeline.yaml, the others in platform.yaml). Each one set in a file must be read by the
# chosen transport or one of the enabled sinks; otherwise it is refused, never ignored.
# Every other shared setting (listen_host, health_*, ingest.*, tracing.*, grpc_tls.*, the
# rest of wal_reader.*, ...) is read whatever the adapters are.
ADAPTER_SETTINGS: Mapping[str, str] = {
    "topic_prefix": "the names of the transport's topics / streams",
    "dlq.enabled": "dead-lettering the changes a sink cannot deliver (false: the sink stops)",
    "dlq.max_retries": "the attempts at storing a dead letter before the batch is held back",
    "dlq.topic_suffix": "the names of the transport's dead-letter topics / streams",
    "dlq.include_headers": "error details as headers of dead-letter messages",
    "dlq.flush_interval_seconds": "how often dead-letter messages are flushed",
    "dlq.postgres_dsn": "the PostgreSQL that keeps transport_mode direct's dead letters",
    "retry": "the backoff of retried writes",
    "max_buffered_messages": "how many events the transport's consumer buffers",
    "schema_monitor_interval_seconds": "polling the Schema Registry for schema changes",
    "stop_on_incompatible_schema": "stopping on an incompatible schema change",
    "wal_reader.batch_size": "the changes per message the WAL capture publishes",
    "wal_reader.batch_timeout_seconds": "how long the WAL capture waits to fill a message",
}

# What the available adapters do instead, for the refusal message.
_INSTEAD: Mapping[str, str] = {
    "dlq": "the postgres sink writes events it cannot apply to <target_schema>._cdc_dead_letters",
    "dlq.postgres_dsn": "only transport_mode direct keeps dead letters in PostgreSQL",
    "max_buffered_messages": "the ingest holds at most ingest.max_in_flight_batches batches of"
    " ingest.batch_max_events events per sink: tune those",
    "schema_monitor_interval_seconds": "transport_mode direct sees schema changes in the WAL"
    " as they happen",
    "stop_on_incompatible_schema": "a column change the postgres sink cannot follow is logged"
    " as postgres_sink.retype_failed and the values that do not fit are dead-lettered",
    "wal_reader.batch_size": "with transport_mode direct, batches are ingest.batch_max_events",
    "wal_reader.batch_timeout_seconds": "with transport_mode direct, a partial batch waits"
    " ingest.batch_max_delay_ms",
    "topic_prefix": "transport_mode direct has no topics",
}


@dataclass(frozen=True)
class TransportAdapter:
    """One ``transport_mode``: where the ingest reads changes from."""

    name: TransportMode
    description: str
    # platform.yaml sections of this transport (name -> model); another transport's
    # section is refused by the loader (adapters/config/platform.py TRANSPORT_SECTIONS,
    # kept equal to this by tests/unit/test_registry.py).
    sections: Mapping[str, type[BaseModel]]
    # ADAPTER_SETTINGS this transport reads.
    reads: frozenset[str] = frozenset()
    # ADAPTER_SETTINGS it honours with one value only: the behaviour it has.
    fixed: Mapping[str, object] = field(default_factory=dict)
    event_source: SourceFactory | None = None
    source_monitor: MonitorFactory | None = None  # None: nothing to watch
    # Transports fed by `cdc capture` (the WAL reader publishing to the broker).
    capture_outlet: OutletFactory | None = None
    # What `cdc undeploy` tears down (and a deploy step creates); None: nothing to remove.
    # For kafka, `cdc run` / `cdc deploy` also run its provision() before the stages start.
    provisioner: ProvisionerFactory | None = None
    # Refuses values of its settings it does not support (run by check()).
    check_values: ValueCheck | None = None
    # Its dead letters (docs/operations.md "Dead letters"); None: not implemented yet, and a
    # sink that needs them (SinkAdapter.uses_error_router) is refused with this transport.
    error_router: RouterFactory | None = None
    dead_letter_store: StoreFactory | None = None

    @property
    def available(self) -> bool:
        return self.event_source is not None

    @property
    def has_capture(self) -> bool:
        return self.capture_outlet is not None


@dataclass(frozen=True)
class SinkAdapter:
    """One ``sink_type``: a SinkWriter and its ``sinks[].<sink_type>`` section."""

    name: SinkType
    description: str
    config_model: type[BaseModel]
    reads: frozenset[str] = frozenset()
    writer: WriterFactory | None = None
    # Checks of a sink's settings against the pipeline (locs relative to sinks[i]).
    validate: Callable[[PipelineConfig, SinkConfig], list[tuple[Loc, str]]] | None = None
    # Dead letters kept beside the sink's data; otherwise, with uses_error_router, the
    # transport's error router keeps them.
    dead_letter_store: SinkStoreFactory | None = None
    uses_error_router: bool = False

    @property
    def available(self) -> bool:
        return self.writer is not None


# ------------------------------------------------------------------------ constructors


def source_conninfo(pipeline: PipelineConfig) -> str:
    from psycopg.conninfo import make_conninfo

    s = pipeline.source
    return make_conninfo(
        host=s.host, port=s.port, dbname=s.database, user=s.username, password=s.password or None
    )


def build_wal_source(
    pipeline: PipelineConfig, platform: PlatformConfig, *, capture: bool = False
) -> PostgresWalSource:
    """The direct transport: the ingest reads the slot itself. Its chunks are the ingest's
    batches (``ingest.batch_max_events`` / ``batch_max_delay_ms``). For the capture stage of
    pubsub / kinesis (``capture``) a partly filled chunk waits at most
    ``wal_reader.batch_timeout_seconds`` for more changes."""
    s = pipeline.source
    wal = platform.wal_reader
    delay = wal.batch_timeout_seconds if capture else platform.ingest.batch_max_delay_ms / 1000
    return PostgresWalSource(
        WalReaderSettings(
            conninfo=source_conninfo(pipeline),
            database=s.database,
            tables=tuple(s.tables),
            slot_name=pipeline.effective_slot_name(platform),
            publication_name=pipeline.effective_publication_name(platform),
            snapshot_mode=s.snapshot_mode,
            status_interval_seconds=wal.status_interval_seconds,
            max_chunk_events=platform.ingest.batch_max_events,
            max_chunk_delay_seconds=delay,
            heartbeat_mode=s.heartbeat_mode,
            heartbeat_interval_seconds=s.heartbeat_interval_seconds,
            snapshot_chunk_size=s.snapshot_chunk_size,
            snapshot_parallelism=s.snapshot_parallelism,
            reconnect_initial_seconds=wal.reconnect_initial_seconds,
            reconnect_max_seconds=wal.reconnect_max_seconds,
        )
    )


def build_slot_monitor(pipeline: PipelineConfig, platform: PlatformConfig) -> PostgresSlotMonitor:
    return PostgresSlotMonitor(
        source_conninfo(pipeline),
        pipeline.effective_slot_name(platform),
        interval_seconds=platform.lag_monitor_interval_seconds,
        lag_degraded_bytes=platform.wal_reader.slot_lag_degraded_bytes,
    )


def build_iceberg_writer(
    pipeline: PipelineConfig, sink: SinkConfig, platform: PlatformConfig
) -> SinkWriter:
    from adapters.iceberg.writer import IcebergSinkWriter

    assert sink.iceberg is not None  # guaranteed by SinkConfig validation
    return IcebergSinkWriter(sink.iceberg, pipeline.pipeline_id, sink.sink_id)


def check_iceberg_sink(pipeline: PipelineConfig, sink: SinkConfig) -> list[tuple[Loc, str]]:
    """A literal table_name (no {schema} / {table}) only for a sink that receives exactly
    one table (source tables are exact names)."""
    from adapters.iceberg.catalog import has_placeholders, table_identifier

    assert sink.iceberg is not None
    tables = [t for t in pipeline.source.tables if sink.accepts_table(t)]
    if has_placeholders(sink.iceberg.table_name):
        seen: dict[tuple[str, str], str] = {}
        for t in tables:
            ident = table_identifier(sink.iceberg, *t.split(".", 1))
            if ident in seen:
                return [
                    (
                        ("iceberg", "table_name"),
                        f"{sink.iceberg.table_name!r} maps {seen[ident]} and {t} to the same"
                        f" Iceberg table {'.'.join(ident)}; use both {{schema}} and {{table}}",
                    )
                ]
            seen[ident] = t
        return []
    if len(tables) == 1:
        return []
    return [
        (
            ("iceberg", "table_name"),
            f"{sink.iceberg.table_name!r} names one table but sink '{sink.sink_id}' receives"
            f" {len(tables)} tables ({', '.join(tables) or 'none'}); use the"
            " {schema} and {table} placeholders (e.g. '{schema}_{table}') or limit the sink"
            " to one table with 'tables'",
        )
    ]


def build_postgres_provisioner(
    pipeline: PipelineConfig, platform: PlatformConfig
) -> PostgresProvisioner:
    """The publication, the replication slot and the reader's bookkeeping on the source:
    what every transport that reads the WAL creates there."""
    return PostgresProvisioner(
        source_conninfo(pipeline),
        pipeline.effective_slot_name(platform),
        pipeline.effective_publication_name(platform),
        tuple(pipeline.source.tables),
    )


def build_postgres_writer(
    pipeline: PipelineConfig, sink: SinkConfig, platform: PlatformConfig
) -> PostgresSinkWriter:
    assert sink.postgres is not None  # guaranteed by SinkConfig validation
    return PostgresSinkWriter(
        sink.postgres, pipeline.pipeline_id, sink.sink_id, retry=platform.retry
    )


def _kafka_source(pipeline: PipelineConfig, platform: PlatformConfig) -> KafkaEventSource:
    """The pipeline's one consumer (the source monitor reads its lag)."""
    found = _KAFKA_SOURCES.get(id(pipeline))
    if found is not None:
        return found
    from functools import partial

    from adapters.kafka import clients
    from adapters.kafka.consumer import KafkaEventSource, KafkaSourceSettings
    from adapters.kafka.dead_letters import DeadLetterProducer
    from adapters.kafka.security import registry_auth

    kafka, dlq, retry = platform.kafka, platform.dlq, platform.retry
    consumer = clients.consumer_settings(kafka, pipeline.effective_group_id(platform))
    # The prefetch per partition librdkafka keeps: the consumer's buffer.
    consumer["queued.min.messages"] = platform.max_buffered_messages
    source = KafkaEventSource(
        KafkaSourceSettings(
            consumer=consumer,
            topics=clients.data_topics(pipeline),
            registry_url=str(kafka.schema_registry_url),
            registry_auth=registry_auth(kafka),
            source_database=pipeline.source.database,
            poll_batch_size=kafka.poll_batch_size,
            commit_interval_seconds=kafka.commit_interval_seconds,
            stop_on_incompatible_schema=platform.stop_on_incompatible_schema,
            dead_letters=partial(
                DeadLetterProducer,
                clients.producer_settings(kafka),
                dlq.topic_suffix,
                dlq.include_headers,
                retry.initial_wait_seconds,
                retry.max_wait_seconds,
                error_after=dlq.max_retries,
            )
            if dlq.enabled
            else None,
            retry_initial_seconds=retry.initial_wait_seconds,
            retry_max_seconds=retry.max_wait_seconds,
        )
    )
    _KAFKA_SOURCES[id(pipeline)] = source
    return source


_KAFKA_SOURCES: dict[int, KafkaEventSource] = {}


def build_kafka_source(pipeline: PipelineConfig, platform: PlatformConfig) -> KafkaEventSource:
    return _kafka_source(pipeline, platform)


def build_kafka_monitor(pipeline: PipelineConfig, platform: PlatformConfig) -> ConnectorMonitor:
    """The connector's states (Kafka Connect) around the consumer's monitor (schema
    versions, lag)."""
    from adapters.debezium.monitor import ConnectorMonitor
    from adapters.kafka import clients
    from adapters.kafka.monitor import KafkaSourceMonitor
    from adapters.kafka.security import registry_auth

    inner = KafkaSourceMonitor(
        _kafka_source(pipeline, platform),
        clients.data_topics(pipeline),
        str(platform.kafka.schema_registry_url),
        registry_auth(platform.kafka),
        interval_seconds=platform.schema_monitor_interval_seconds,
    )
    return ConnectorMonitor(pipeline, platform, inner=inner)


def build_kafka_dead_letters(pipeline: PipelineConfig, platform: PlatformConfig) -> ErrorRouter:
    """The DLQ topics, for the changes a sink without dead letters of its own rejects."""
    from adapters.kafka import clients
    from adapters.kafka.dead_letters import KafkaErrorRouter

    return KafkaErrorRouter(
        clients.producer_settings(platform.kafka),
        platform.dlq.topic_suffix,
        pipeline.topic_prefix,
        platform.dlq.include_headers,
        codec=ArrowBatchCodec(),
        pipeline_id=pipeline.pipeline_id,
    )


def build_kafka_dead_letter_store(
    pipeline: PipelineConfig, platform: PlatformConfig
) -> DeadLetterStore:
    """`cdc dlq` over the DLQ topics; replayed letters are marked on a compacted topic."""
    from adapters.kafka import clients, topics
    from adapters.kafka.admin import TopicAdmin
    from adapters.kafka.dead_letter_store import KafkaDeadLetters

    suffix = platform.dlq.topic_suffix
    return KafkaDeadLetters(
        pipeline.pipeline_id,
        pipeline.topic_prefix,
        suffix,
        [topics.dlq_topic(t, suffix) for t in topics.data_topics(pipeline)],
        clients.consumer_settings(platform.kafka, f"cdc-dlq-reader.{pipeline.pipeline_id}"),
        clients.producer_settings(platform.kafka),
        lambda: TopicAdmin(platform.kafka),
        ArrowBatchCodec(),
        platform.kafka.topic_replication_factor,
    )


def check_kafka_values(pipeline: PipelineConfig, platform: PlatformConfig) -> Problems:
    found = Problems()
    if platform.kafka.deser_pool_size > 1:
        found.platform.append(
            (
                ("kafka", "deser_pool_size"),
                "only 1 is supported: Avro is decoded on the consumer's thread (a thread pool"
                " gains nothing under the GIL, measured in docs/benchmarks.md); remove it",
            )
        )
    if platform.dlq.flush_interval_seconds > 0:
        found.platform.append(
            (
                ("dlq", "flush_interval_seconds"),
                "only 0 is supported: a dead-letter write is confirmed by the broker before"
                " the offset can move past the message; remove it",
            )
        )
    return found


def build_direct_dead_letters(
    pipeline: PipelineConfig, platform: PlatformConfig
) -> PostgresErrorRouter:
    """transport_mode direct: a table in the source database's cdc_platform schema, or in
    the database of dlq.postgres_dsn."""
    return PostgresErrorRouter(
        platform.dlq.postgres_dsn or source_conninfo(pipeline), pipeline.pipeline_id
    )


def build_postgres_sink_dead_letters(
    pipeline: PipelineConfig, sink: SinkConfig, platform: PlatformConfig
) -> PostgresSinkDeadLetters:
    assert sink.postgres is not None
    conninfo = source_conninfo(pipeline)

    async def describe(qualified: str) -> TableSchema:
        import psycopg

        from adapters.postgres.source.catalog import snapshot_schema

        async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
            return await snapshot_schema(conn, qualified)

    return PostgresSinkDeadLetters(
        sink.postgres.conninfo(), sink.postgres.target_schema, pipeline.pipeline_id, describe
    )


def build_webhook_writer(
    pipeline: PipelineConfig, sink: SinkConfig, platform: PlatformConfig
) -> WebhookSinkWriter:
    assert sink.webhook is not None
    from services.lifecycle import StartupError

    try:
        from adapters.webhook.sink import WebhookSinkWriter
    except ModuleNotFoundError as exc:
        raise StartupError(
            f"sink '{sink.sink_id}': the webhook sink needs {exc.name}: pip install"
            " 'cdc-platform[webhook]'"
        ) from None
    transport = TRANSPORTS[platform.transport_mode]
    router = None if transport.error_router is None else transport.error_router(pipeline, platform)
    return WebhookSinkWriter(
        sink.webhook,
        pipeline.pipeline_id,
        sink.sink_id,
        router=router,
        retry=platform.retry,
        dlq_enabled=platform.dlq.enabled,
        dlq_max_retries=platform.dlq.max_retries,
    )


def dead_letter_stores(
    pipeline: PipelineConfig, platform: PlatformConfig, sink_id: str | None = None
) -> list[tuple[list[str], DeadLetterStore]]:
    """Where the dead letters of the pipeline's sinks are kept: (sink ids, store) per store.
    A sink keeping its own comes with its store; the others share the transport's."""
    transport = TRANSPORTS[platform.transport_mode]
    own: list[tuple[list[str], DeadLetterStore]] = []
    shared: list[str] = []
    for sink in pipeline.sinks:
        if sink_id is not None and sink.sink_id != sink_id:
            continue
        adapter = SINKS[sink.sink_type]
        if adapter.dead_letter_store is not None:
            own.append(([sink.sink_id], adapter.dead_letter_store(pipeline, sink, platform)))
        elif adapter.uses_error_router:
            shared.append(sink.sink_id)
    if shared and transport.dead_letter_store is not None:
        own.append((shared, transport.dead_letter_store(pipeline, platform)))
    return own


def build_kafka_provisioner(pipeline: PipelineConfig, platform: PlatformConfig) -> Provisioner:
    from adapters.kafka.provisioner import KafkaProvisioner

    return KafkaProvisioner(pipeline, platform)


# ------------------------------------------------------------------------- the registry

# What the Pub/Sub adapters (services/pubsub_transport.py) read.
_PUBSUB_READS = frozenset(
    {
        "topic_prefix",
        "dlq.enabled",
        "dlq.max_retries",
        "dlq.topic_suffix",
        "dlq.include_headers",
        "retry",
        "wal_reader.batch_size",
        "wal_reader.batch_timeout_seconds",
    }
)

# What the Kinesis adapters (services/kinesis.py) read: topic_prefix (stream names), dlq
# (enabled, topic_suffix: the DLQ streams; include_headers: the source's poison records;
# max_retries: the webhook sink; not flush_interval_seconds: dead letters are put at once),
# retry (the backoff of failed puts and reads; max_attempts is not read: a put is retried
# until it succeeds), max_buffered_messages (the records the source buffers),
# wal_reader.batch_size / batch_timeout_seconds (the capture).
_KINESIS_READS = _PUBSUB_READS | {"max_buffered_messages"}


def _kinesis_source(pipeline: PipelineConfig, platform: PlatformConfig) -> EventSource:
    from services.kinesis import build_kinesis_source  # boto3 only when chosen

    return build_kinesis_source(pipeline, platform)


def _kinesis_monitor(pipeline: PipelineConfig, platform: PlatformConfig) -> SourceMonitor:
    from services.kinesis import build_kinesis_monitor

    return build_kinesis_monitor(pipeline, platform)


def _kinesis_publisher(
    pipeline: PipelineConfig, platform: PlatformConfig, on_ack: AckCallback
) -> Outlet:
    from services.kinesis import build_kinesis_publisher

    return build_kinesis_publisher(pipeline, platform, on_ack)


def _kinesis_dead_letters(pipeline: PipelineConfig, platform: PlatformConfig) -> KinesisDeadLetters:
    from services.kinesis import build_kinesis_dead_letters

    return build_kinesis_dead_letters(pipeline, platform)


def _pubsub_provisioner(pipeline: PipelineConfig, platform: PlatformConfig) -> Provisioner:
    return pubsub_transport.build_capture_provisioner(
        pipeline, platform, build_postgres_provisioner(pipeline, platform)
    )


def _kinesis_provisioner(pipeline: PipelineConfig, platform: PlatformConfig) -> Provisioner:
    from services.kinesis import build_kinesis_provisioner

    return build_kinesis_provisioner(
        pipeline, platform, build_postgres_provisioner(pipeline, platform)
    )


TRANSPORTS: Mapping[TransportMode, TransportAdapter] = {
    t.name: t
    for t in (
        TransportAdapter(
            "direct",
            "the ingest reads the PostgreSQL WAL and streams to the sinks over gRPC",
            sections={"wal_reader": WalReaderConfig},
            reads=frozenset({"dlq.postgres_dsn"}),
            fixed={
                "stop_on_incompatible_schema": False,
                # Dead letters are rows of a table: no topics, headers or flush timer.
                "dlq.enabled": True,
                "dlq.topic_suffix": "dlq",
                "dlq.include_headers": True,
                "dlq.flush_interval_seconds": 0.0,
            },
            event_source=build_wal_source,
            source_monitor=build_slot_monitor,
            provisioner=build_postgres_provisioner,
            error_router=build_direct_dead_letters,
            dead_letter_store=build_direct_dead_letters,
        ),
        TransportAdapter(
            "kafka",
            "Debezium on Kafka Connect, consumed from Kafka",
            sections={"kafka": KafkaConfig, "connector": ConnectorConfig},
            reads=frozenset(
                {
                    "topic_prefix",
                    "dlq",
                    "retry",
                    "max_buffered_messages",
                    "schema_monitor_interval_seconds",
                    "stop_on_incompatible_schema",
                }
            ),
            event_source=build_kafka_source,
            source_monitor=build_kafka_monitor,
            provisioner=build_kafka_provisioner,
            check_values=check_kafka_values,
            error_router=build_kafka_dead_letters,
            dead_letter_store=build_kafka_dead_letter_store,
        ),
        TransportAdapter(
            "pubsub",
            "the WAL captured to Google Pub/Sub",
            sections={"pubsub": PubSubConfig, "wal_reader": WalReaderConfig},
            # Flow control is pubsub.max_outstanding_messages, not max_buffered_messages;
            # dead letters are published one by one at once (no flush interval).
            reads=_PUBSUB_READS,
            fixed={"dlq.flush_interval_seconds": 0.0},
            event_source=pubsub_transport.build_source,
            source_monitor=pubsub_transport.build_monitor,
            capture_outlet=pubsub_transport.build_outlet,
            # the DLQ topic: the error router of a webhook sink, the store of `cdc dlq`
            error_router=pubsub_transport.build_dead_letters,
            dead_letter_store=pubsub_transport.build_dead_letters,
            # the capture's slot and publication, then the topics and subscriptions
            provisioner=_pubsub_provisioner,
        ),
        TransportAdapter(
            "kinesis",
            "the WAL captured to Amazon Kinesis",
            sections={"kinesis": KinesisConfig, "wal_reader": WalReaderConfig},
            reads=_KINESIS_READS,
            fixed={"dlq.flush_interval_seconds": 0.0},
            event_source=_kinesis_source,
            source_monitor=_kinesis_monitor,
            capture_outlet=_kinesis_publisher,
            # the DLQ streams (+ removed markers in the lease table): the error router of a
            # webhook sink, the store of `cdc dlq`
            error_router=_kinesis_dead_letters,
            dead_letter_store=_kinesis_dead_letters,
            # the capture's slot and publication, then the streams and the lease table
            provisioner=_kinesis_provisioner,
        ),
    )
}

SINKS: Mapping[SinkType, SinkAdapter] = {
    s.name: s
    for s in (
        SinkAdapter(
            "postgres",
            "rows upserted (or appended) into PostgreSQL tables",
            PostgresSinkConfig,
            reads=frozenset({"retry"}),
            writer=build_postgres_writer,
            dead_letter_store=build_postgres_sink_dead_letters,
        ),
        SinkAdapter(
            "webhook",
            "batches of events POSTed as signed JSON (Standard Webhooks)",
            WebhookSinkConfig,
            reads=frozenset({"retry", "dlq.enabled", "dlq.max_retries"}),
            writer=build_webhook_writer,
            uses_error_router=True,
        ),
        SinkAdapter(
            "iceberg",
            "Apache Iceberg tables (append, or upsert with position deletes)",
            IcebergSinkConfig,
            writer=build_iceberg_writer,
            validate=check_iceberg_sink,
        ),
    )
}


def available_transports() -> tuple[TransportMode, ...]:
    return tuple(name for name, t in TRANSPORTS.items() if t.available)


def available_sink_types() -> tuple[SinkType, ...]:
    return tuple(name for name, s in SINKS.items() if s.available)


# ------------------------------------------------------------------------------ checks


@dataclass(frozen=True)
class Problems:
    """What :func:`check` found, per file (locs as in :class:`adapters.config.ConfigError`)."""

    platform: list[tuple[Loc, str]] = field(default_factory=list)
    pipeline: list[tuple[Loc, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.platform or self.pipeline)

    def messages(self) -> list[str]:
        """One line per problem: ``<path>: <message>``."""
        from adapters.config import format_path

        return [f"{format_path(loc)}: {msg}" for loc, msg in (*self.platform, *self.pipeline)]


_UNSET = object()


def _is_set(model: BaseModel, path: str) -> tuple[bool, Any]:
    """Whether the dotted ``path`` was written in the file, and its value."""
    head, _, rest = path.partition(".")
    if head not in model.model_fields_set:
        return False, None
    value = getattr(model, head)
    if not rest:
        return True, value
    assert isinstance(value, BaseModel)
    return _is_set(value, rest)


def _names(names: Iterable[str]) -> str:
    return ", ".join(names) or "none"


# Read only when named exactly (a section-wide read such as "dlq" does not cover them).
_EXACT_ONLY = frozenset({"dlq.postgres_dsn"})


def _reads(reads: frozenset[str], path: str) -> bool:
    """Whether an adapter reading `reads` reads `path` (a section name covers its keys)."""
    if path in reads:
        return True
    return path not in _EXACT_ONLY and path.partition(".")[0] in reads


def check(pipeline: PipelineConfig, platform: PlatformConfig) -> Problems:
    """Refuse what no adapter of this release would do: a transport or an enabled sink type
    without an adapter, and a setting that neither the transport nor an enabled sink reads
    (it would be accepted and ignored)."""
    found = Problems()
    transport = TRANSPORTS[platform.transport_mode]
    if not transport.available:
        found.platform.append(
            (
                ("transport_mode",),
                f"'{transport.name}' ({transport.description}) has no adapter in this release;"
                f" available: {_names(available_transports())} (its settings are validated"
                " only)",
            )
        )
    if transport.check_values is not None:
        values = transport.check_values(pipeline, platform)
        found.platform.extend(values.platform)
        found.pipeline.extend(values.pipeline)
    sinks = []
    for index, sink in enumerate(pipeline.sinks):
        adapter = SINKS[sink.sink_type]
        if not sink.enabled:
            continue
        sinks.append(adapter)
        if (
            adapter.available
            and adapter.uses_error_router
            and transport.available
            and transport.error_router is None
        ):
            found.pipeline.append(
                (
                    ("sinks", index, "sink_type"),
                    f"'{sink.sink_type}' (sink '{sink.sink_id}') needs the transport's dead"
                    f" letters, which transport_mode {transport.name} does not have yet",
                )
            )
        if not adapter.available:
            found.pipeline.append(
                (
                    ("sinks", index, "sink_type"),
                    f"'{sink.sink_type}' (sink '{sink.sink_id}') has no writer in this release;"
                    f" available: {_names(available_sink_types())} (or set enabled: false)",
                )
            )
        elif adapter.validate is not None:
            for where, message in adapter.validate(pipeline, sink):
                found.pipeline.append((("sinks", index, *where), message))
    # The settings: what the chosen adapters read, by what their entries declare (an adapter
    # that is not available still declares them, so its own settings are not reported twice).
    for path in ADAPTER_SETTINGS:
        doc: BaseModel = pipeline if path == "topic_prefix" else platform
        is_set, value = _is_set(doc, path)
        if not is_set:
            continue
        if _reads(transport.reads, path) or any(_reads(s.reads, path) for s in sinks):
            continue
        loc: Loc = tuple(path.split("."))
        fixed = transport.fixed.get(path, _UNSET)
        if fixed is not _UNSET and value == fixed:
            continue  # says what happens anyway
        readers = [f"transport_mode {t.name}" for t in TRANSPORTS.values() if _reads(t.reads, path)]
        readers += [f"sink_type {s.name}" for s in SINKS.values() if _reads(s.reads, path)]
        what = ADAPTER_SETTINGS[path]
        instead = _INSTEAD.get(path) or _INSTEAD.get(path.partition(".")[0])
        message = (
            f"not used by transport_mode {transport.name} with sink type(s)"
            f" {_names(sorted({s.name for s in sinks}))}: it configures {what}, read only by"
            f" {_names(readers)}"
        )
        if fixed is not _UNSET:
            shown = str(fixed).lower() if isinstance(fixed, bool) else repr(fixed)
            message = (
                f"only {shown} is supported by transport_mode {transport.name}:"
                f" {what} is not implemented"
            )
        if instead:
            message += f" ({instead})"
        message += "; remove it"
        (found.pipeline if path == "topic_prefix" else found.platform).append((loc, message))
    return found
