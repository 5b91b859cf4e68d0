"""Configuration of cdc-platform: pipeline.yaml and platform.yaml.

    from adapters.config import load_pipeline, load_platform, ConfigError

    platform = load_platform("platform.yaml")          # None: built-in defaults
    pipeline = load_pipeline("pipeline.yaml", platform=platform)
    slot = pipeline.effective_slot_name(platform)

Every model forbids unknown keys and is immutable. ``ConfigError`` lists every problem of a
file with its path and line; ``str(err)`` prints one line per problem.
"""

from .errors import ConfigError, ConfigProblem, format_path
from .loader import config_error, load_pipeline, load_platform, loads_pipeline, loads_platform
from .naming import derive_publication_name, derive_slot_name, pg_safe_name
from .pipeline import (
    ALL_OPERATIONS,
    DEFAULT_SOURCE_PORTS,
    IcebergMaintenanceConfig,
    IcebergSinkConfig,
    IcebergWriteMode,
    Operation,
    PipelineConfig,
    PostgresSinkConfig,
    PostgresWriteMode,
    SinkConfig,
    SinkSettings,
    SinkType,
    SnapshotMode,
    SourceConfig,
    SourceType,
    WebhookSinkConfig,
    compatibility_problems,
)
from .platform import (
    AuthMechanism,
    ConnectorConfig,
    DlqConfig,
    GrpcTlsConfig,
    IngestConfig,
    KafkaConfig,
    KinesisConfig,
    PlatformConfig,
    PubSubConfig,
    RetryConfig,
    SecurityProtocol,
    TracingConfig,
    TransportMode,
    WalReaderConfig,
)

__all__ = [
    "ALL_OPERATIONS",
    "DEFAULT_SOURCE_PORTS",
    "AuthMechanism",
    "ConfigError",
    "ConfigProblem",
    "ConnectorConfig",
    "DlqConfig",
    "GrpcTlsConfig",
    "IcebergMaintenanceConfig",
    "IcebergSinkConfig",
    "IcebergWriteMode",
    "IngestConfig",
    "KafkaConfig",
    "KinesisConfig",
    "Operation",
    "PipelineConfig",
    "PlatformConfig",
    "PostgresSinkConfig",
    "PostgresWriteMode",
    "PubSubConfig",
    "RetryConfig",
    "SecurityProtocol",
    "SinkConfig",
    "SinkSettings",
    "SinkType",
    "SnapshotMode",
    "SourceConfig",
    "SourceType",
    "TracingConfig",
    "TransportMode",
    "WalReaderConfig",
    "WebhookSinkConfig",
    "compatibility_problems",
    "config_error",
    "derive_publication_name",
    "derive_slot_name",
    "format_path",
    "load_pipeline",
    "load_platform",
    "loads_pipeline",
    "loads_platform",
    "pg_safe_name",
]
