"""examples/*.yaml load, and docs/configuration.md stays true to the models."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from adapters.config import (
    ConfigError,
    ConnectorConfig,
    DlqConfig,
    GrpcTlsConfig,
    IcebergMaintenanceConfig,
    IcebergSinkConfig,
    IngestConfig,
    KafkaConfig,
    KinesisConfig,
    PipelineConfig,
    PlatformConfig,
    PostgresSinkConfig,
    PubSubConfig,
    RetryConfig,
    SinkConfig,
    SourceConfig,
    TracingConfig,
    WalReaderConfig,
    WebhookSinkConfig,
    load_pipeline,
    load_platform,
    loads_pipeline,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
DOC = ROOT / "docs" / "configuration.md"

REQUIRED_EXAMPLES = {
    "pipeline.yaml",
    "pipeline-iceberg.yaml",
    "pipeline-webhook.yaml",
    "platform.yaml",
    "platform-kafka.yaml",
    "platform-msk.yaml",
    "platform-gcp-kafka.yaml",
    "platform-pubsub.yaml",
    "platform-kinesis.yaml",
}


def example_files() -> list[Path]:
    return sorted(EXAMPLES.glob("*.yaml"))


def is_platform(path: Path) -> bool:
    return path.name.startswith("platform")


# --------------------------------------------------------------------------- examples


def test_required_examples_exist() -> None:
    assert {p.name for p in example_files()} >= REQUIRED_EXAMPLES


@pytest.mark.parametrize("path", example_files(), ids=lambda p: p.name)
def test_every_example_loads_without_environment(path: Path) -> None:
    if is_platform(path):
        load_platform(path, env={})
    else:
        load_pipeline(path, env={})


@pytest.mark.parametrize("path", example_files(), ids=lambda p: p.name)
def test_every_example_pipeline_runs_on_every_example_platform(path: Path) -> None:
    if is_platform(path):
        return
    for platform_path in filter(is_platform, example_files()):
        platform = load_platform(platform_path, env={})
        pipeline = load_pipeline(path, env={}, platform=platform)
        assert pipeline.effective_slot_name(platform)


def test_example_pipeline_matches_the_contract() -> None:
    pipeline = load_pipeline(EXAMPLES / "pipeline.yaml", env={"REPLICA_PASSWORD": "pw"})
    assert pipeline.source.source_type == "postgres"
    replica = pipeline.sink("replica")
    assert replica.sink_type == "postgres"
    pg = replica.postgres
    assert pg is not None
    assert (pg.host, pg.port, pg.database, pg.username, pg.password) == (
        "127.0.0.1",
        5432,
        "replica",
        "postgres",
        "pw",
    )
    assert (pg.target_schema, pg.write_mode, pg.batch_size) == ("public", "upsert", 1000)
    platform = load_platform(EXAMPLES / "platform.yaml", env={})
    assert (platform.transport_mode, platform.health_port) == ("direct", 8080)


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("platform.yaml", "direct"),
        ("platform-kafka.yaml", "kafka"),
        ("platform-msk.yaml", "kafka"),
        ("platform-gcp-kafka.yaml", "kafka"),
        ("platform-pubsub.yaml", "pubsub"),
        ("platform-kinesis.yaml", "kinesis"),
    ],
)
def test_example_platform_transports(name: str, mode: str) -> None:
    platform = load_platform(EXAMPLES / name, env={})
    assert platform.transport_mode == mode
    if name == "platform-msk.yaml":
        assert (platform.kafka.auth_mechanism, platform.kafka.aws_region) == (
            "sasl_iam",
            "us-east-1",
        )
        assert platform.kafka.security_protocol == "SASL_SSL"
    if name == "platform-gcp-kafka.yaml":
        assert platform.kafka.auth_mechanism == "sasl_oauthbearer"
        assert platform.kafka.gcp_project_id == "my-project"


def test_example_platform_kafka_spells_out_the_guide_defaults() -> None:
    """platform-kafka.yaml shows the guide's defaults; apart from the endpoints it must equal
    the built-in defaults (so the example documents them truthfully)."""
    platform = load_platform(EXAMPLES / "platform-kafka.yaml", env={})
    assert platform.kafka == KafkaConfig()
    assert platform.connector == ConnectorConfig()
    assert platform.dlq == DlqConfig()
    assert platform.retry == RetryConfig()


def test_example_variables_are_used(tmp_path: Path) -> None:
    pipeline = load_pipeline(
        EXAMPLES / "pipeline-iceberg.yaml",
        env={"S3_ENDPOINT": "http://minio:9000", "CDC_SOURCE_HOST": "db"},
    )
    assert pipeline.source.host == "db"
    iceberg = pipeline.sinks[0].iceberg
    assert iceberg is not None and iceberg.s3_endpoint == "http://minio:9000"
    assert iceberg.maintenance.enabled is True


# --------------------------------------------------------------------------- docs

SECTIONS: dict[str, type[BaseModel]] = {
    "pipeline.yaml: top level": PipelineConfig,
    "`source`": SourceConfig,
    "`sinks[]`": SinkConfig,
    "`sinks[].postgres`": PostgresSinkConfig,
    "`sinks[].webhook`": WebhookSinkConfig,
    "`sinks[].iceberg`": IcebergSinkConfig,
    "`sinks[].iceberg.maintenance`": IcebergMaintenanceConfig,
    "platform.yaml: top level": PlatformConfig,
    "`kafka`": KafkaConfig,
    "`connector`": ConnectorConfig,
    "`dlq`": DlqConfig,
    "`retry`": RetryConfig,
    "`pubsub`": PubSubConfig,
    "`kinesis`": KinesisConfig,
    "`wal_reader`": WalReaderConfig,
    "`ingest`": IngestConfig,
    "`tracing`": TracingConfig,
    "`grpc_tls`": GrpcTlsConfig,
}

# Documented defaults that are not a single literal.
SPECIAL_DEFAULTS = {
    (SourceConfig, "port"),  # by source_type
    (PostgresSinkConfig, "database"),  # required unless dsn
}


def doc_sections() -> dict[str, list[list[str]]]:
    """### heading -> rows (cells) of the first table under it."""
    out: dict[str, list[list[str]]] = {}
    current: str | None = None
    done = False  # the first table of the section has ended
    for line in DOC.read_text().splitlines():
        if line.startswith("### "):
            current, done = line[4:].strip(), False
            out[current] = []
        elif current and not done and line.startswith("| `"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            out[current].append(cells)
        elif current and out[current] and not line.startswith("|"):
            done = True
    return out


def test_every_model_field_is_documented_exactly_once() -> None:
    sections = doc_sections()
    for heading, model in SECTIONS.items():
        assert heading in sections, f"docs/configuration.md has no section ### {heading}"
        keys = [row[0].strip("`") for row in sections[heading]]
        assert sorted(keys) == sorted(model.model_fields), heading
        assert len(keys) == len(set(keys)), heading


def test_documented_defaults_match_the_models() -> None:
    sections = doc_sections()
    for heading, model in SECTIONS.items():
        for row in sections[heading]:
            key, default_cell = row[0].strip("`"), row[2]
            field = model.model_fields[key]
            if (model, key) in SPECIAL_DEFAULTS:
                continue
            if default_cell.startswith("**required**"):
                assert field.is_required(), (heading, key)
                continue
            assert not field.is_required(), (heading, key, "documented with a default")
            default: Any = field.get_default(call_default_factory=True)
            if default_cell == "unset":
                assert default is None, (heading, key)
            elif isinstance(default, BaseModel):
                assert default_cell in ("defaults", "all defaults"), (heading, key)
            else:
                match = re.fullmatch(r"`(.*)`", default_cell)
                assert match, (heading, key, default_cell)
                assert yaml.safe_load(match.group(1)) == default, (heading, key, default_cell)


def test_documented_error_example_is_the_real_output() -> None:
    text = DOC.read_text()
    section = text[text.index("## Errors") : text.index("## pipeline.yaml")]
    yaml_block = re.search(r"```yaml\n(.*?)```", section, re.S)
    out_block = re.search(r"```text\n(.*?)```", section, re.S)
    assert yaml_block and out_block
    with pytest.raises(ConfigError) as info:
        loads_pipeline(yaml_block.group(1), env={})
    assert str(info.value) == out_block.group(1).rstrip("\n")


def test_documented_examples_exist() -> None:
    for name in re.findall(r"\(\.\./examples/([\w.-]+)\)", DOC.read_text()):
        assert (EXAMPLES / name).exists(), name
    for name in REQUIRED_EXAMPLES:
        assert f"examples/{name}" in DOC.read_text(), name
