"""The adapter registry (services/registry.py): names, sections, availability, refusals.

Every setting of the configuration either works or is refused: a setting that only some
adapters read is refused by `cdc validate` when neither the transport nor an enabled sink
reads it, and a transport or enabled sink type without an adapter is refused by name.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from adapters.config import PipelineConfig, PlatformConfig, SinkConfig, load_pipeline, load_platform
from adapters.config.platform import TRANSPORT_SECTIONS
from services import registry
from services.cli.main import main
from services.ingest.container import IngestContainer
from services.sink.container import AVAILABLE_SINK_TYPES, SinkContainer

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT.parent / "shared" / "seed" / "deployment-guide.md"


def pipeline(**top: Any) -> PipelineConfig:
    sinks = top.pop(
        "sinks",
        [{"sink_id": "replica", "sink_type": "postgres", "postgres": {"database": "replica"}}],
    )
    return PipelineConfig.model_validate(
        {
            "pipeline_id": "orders",
            "source": {"database": "shop", "tables": ["public.orders"]},
            "sinks": sinks,
            **top,
        }
    )


WEBHOOK = {"sink_id": "hook", "sink_type": "webhook", "webhook": {"url": "http://h/x"}}
ICEBERG = {
    "sink_id": "lake",
    "sink_type": "iceberg",
    "iceberg": {"catalog_uri": "sqlite:///c.db", "warehouse": "file:///w", "table_name": "t"},
}


def messages(found: registry.Problems) -> dict[str, str]:
    from adapters.config import format_path

    return {format_path(loc): msg for loc, msg in (*found.platform, *found.pipeline)}


# ----------------------------------------------------------------------- the registry


def test_registry_names_every_configurable_transport_and_sink_type() -> None:
    assert sorted(registry.TRANSPORTS) == sorted(typing.get_args(registry.TransportMode))
    assert sorted(registry.SINKS) == sorted(typing.get_args(registry.SinkType))
    for name, adapter in registry.TRANSPORTS.items():
        assert adapter.name == name
    for name, sink in registry.SINKS.items():
        assert sink.name == name
        # the section sinks[].<name> holds that adapter's config model
        annotation = SinkConfig.model_fields[name].annotation
        assert sink.config_model in typing.get_args(annotation), name


def test_transport_sections_of_the_loader_are_the_registrys() -> None:
    """The loader refuses another transport's section (with its line); which section
    belongs to which transport is the registry's."""
    owners: dict[str, set[str]] = {}
    for adapter in registry.TRANSPORTS.values():
        for section, model in adapter.sections.items():
            owners.setdefault(section, set()).add(adapter.name)
            assert PlatformConfig.model_fields[section].annotation is model, section
    assert {k: set(v) for k, v in TRANSPORT_SECTIONS.items()} == owners


def test_available_adapters() -> None:
    assert registry.available_transports() == ("direct", "kafka", "pubsub", "kinesis")
    assert registry.available_sink_types() == ("postgres", "webhook", "iceberg")
    assert AVAILABLE_SINK_TYPES == ("postgres", "webhook", "iceberg")
    direct = registry.TRANSPORTS["direct"]
    assert direct.event_source is not None and direct.source_monitor is not None
    assert direct.error_router is not None and direct.dead_letter_store is not None


def test_adapter_settings_exist_in_the_models() -> None:
    for path in registry.ADAPTER_SETTINGS:
        model: Any = PipelineConfig if path == "topic_prefix" else PlatformConfig
        for part in path.split("."):
            info = model.model_fields[part]
            model = info.annotation
    for adapter in [*registry.TRANSPORTS.values(), *registry.SINKS.values()]:
        for read in adapter.reads:  # a setting, or a section covering its settings ("dlq")
            assert read in registry.ADAPTER_SETTINGS or any(
                path.startswith(read + ".") for path in registry.ADAPTER_SETTINGS
            ), (adapter.name, read)


# ---------------------------------------------------------------------------- check


def test_defaults_need_nothing() -> None:
    assert not registry.check(pipeline(), PlatformConfig())


@pytest.mark.parametrize("mode", ["kafka"])
def test_a_transport_without_an_adapter_is_refused(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every transport has an adapter now: take one away to check the refusal."""
    import dataclasses

    monkeypatch.setitem(
        registry.TRANSPORTS,  # type: ignore[arg-type]
        mode,
        dataclasses.replace(registry.TRANSPORTS[mode], event_source=None),  # type: ignore[index]
    )
    platform = PlatformConfig.model_validate({"transport_mode": mode})
    found = messages(registry.check(pipeline(), platform))
    assert list(found) == ["transport_mode"]
    assert f"'{mode}'" in found["transport_mode"]
    assert "available: direct, pubsub, kinesis" in found["transport_mode"]


def _without_writer(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Every sink type has a writer now: take one away to check the refusal."""
    import dataclasses

    monkeypatch.setitem(
        registry.SINKS,  # type: ignore[arg-type]
        name,
        dataclasses.replace(registry.SINKS[name], writer=None),  # type: ignore[index]
    )


def test_an_enabled_sink_without_a_writer_is_refused_a_disabled_one_is_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _without_writer(monkeypatch, "iceberg")
    base = {"sink_id": "replica", "sink_type": "postgres", "postgres": {"database": "r"}}
    found = messages(registry.check(pipeline(sinks=[base, ICEBERG]), PlatformConfig()))
    assert list(found) == ["sinks[1].sink_type"]
    assert "'iceberg' (sink 'lake') has no writer" in found["sinks[1].sink_type"]
    disabled = {**ICEBERG, "enabled": False}
    assert not registry.check(pipeline(sinks=[base, disabled]), PlatformConfig())


@pytest.mark.parametrize(
    ("platform", "path", "hint"),
    [
        ({"dlq": {"max_retries": 5}}, "dlq.max_retries", "_cdc_dead_letters"),
        ({"dlq": {"enabled": False}}, "dlq.enabled", "only true"),
        ({"dlq": {"topic_suffix": "dead"}}, "dlq.topic_suffix", "only 'dlq'"),
        ({"dlq": {"flush_interval_seconds": 1}}, "dlq.flush_interval_seconds", "only 0.0"),
        ({"max_buffered_messages": 5000}, "max_buffered_messages", "ingest.max_in_flight_batches"),
        ({"max_buffered_messages": 1000}, "max_buffered_messages", "ingest.batch_max_events"),
        ({"schema_monitor_interval_seconds": 10}, "schema_monitor_interval_seconds", "WAL"),
        ({"stop_on_incompatible_schema": True}, "stop_on_incompatible_schema", "only false"),
        ({"wal_reader": {"batch_size": 500}}, "wal_reader.batch_size", "batch_max_events"),
        (
            {"wal_reader": {"batch_timeout_seconds": 0.5}},
            "wal_reader.batch_timeout_seconds",
            "batch_max_delay_ms",
        ),
    ],
)
def test_settings_nothing_would_read_are_refused(
    platform: dict[str, Any], path: str, hint: str
) -> None:
    found = messages(registry.check(pipeline(), PlatformConfig.model_validate(platform)))
    assert list(found) == [path]
    assert hint in found[path] and found[path].endswith("remove it"), found[path]


def test_topic_prefix_is_refused_without_topics() -> None:
    found = messages(registry.check(pipeline(topic_prefix="cdc"), PlatformConfig()))
    assert list(found) == ["topic_prefix"]
    assert "no topics" in found["topic_prefix"]


def test_settings_the_chosen_adapters_read_are_accepted() -> None:
    platform = PlatformConfig.model_validate(
        {
            "retry": {"max_attempts": 2},  # the postgres sink's backoff
            "stop_on_incompatible_schema": False,  # what direct does anyway
            "wal_reader": {"status_interval_seconds": 2, "slot_name": "cdc"},
            "lag_monitor_interval_seconds": 5,
        }
    )
    assert not registry.check(pipeline(), platform)


def test_dlq_settings_are_read_by_the_webhook_sink_and_the_direct_dead_letter_table() -> None:
    platform = PlatformConfig.model_validate(
        {
            "dlq": {
                "enabled": False,
                "max_retries": 5,
                "postgres_dsn": "host=h dbname=d",
                "topic_suffix": "dlq",
                "include_headers": True,
            }
        }
    )
    assert not registry.check(pipeline(sinks=[WEBHOOK]), platform)
    found = messages(registry.check(pipeline(), platform))
    assert sorted(found) == ["dlq.enabled", "dlq.max_retries"], found


def test_retry_without_an_enabled_sink_that_reads_it_is_refused() -> None:
    disabled = {**ICEBERG, "enabled": False}
    platform = PlatformConfig.model_validate({"retry": {"max_attempts": 2}})
    found = messages(registry.check(pipeline(sinks=[disabled]), platform))
    assert list(found) == ["retry"]
    assert "sink_type postgres" in found["retry"]


def test_the_guides_platform_config_parses_and_is_accepted() -> None:
    """Every field of the deployment guide's platform.yaml (transport_mode kafka) is accepted
    configuration that the kafka transport reads."""
    if not GUIDE.exists():
        pytest.skip("the deployment guide is not next to this checkout")
    text = GUIDE.read_text()
    block = text.split("### Platform Config", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    platform = PlatformConfig.model_validate(yaml.safe_load(block))
    assert platform.transport_mode == "kafka" and platform.max_buffered_messages == 1000
    assert not registry.check(pipeline(), platform)


def test_kafka_refuses_values_it_does_not_support() -> None:
    platform = PlatformConfig.model_validate(
        {
            "transport_mode": "kafka",
            "kafka": {"deser_pool_size": 4},
            "dlq": {"flush_interval_seconds": 1.0},
        }
    )
    found = messages(registry.check(pipeline(), platform))
    assert set(found) == {"kafka.deser_pool_size", "dlq.flush_interval_seconds"}


# ----------------------------------------------------------------------- containers


def test_containers_build_what_the_registry_lists() -> None:
    p = pipeline()
    retry = PlatformConfig.model_validate({"retry": {"max_attempts": 7}})
    writer = SinkContainer(pipeline=p, sink=p.sinks[0], platform=retry).writer()
    assert type(writer).__name__ == "PostgresSinkWriter"
    assert writer._retry.max_attempts == 7
    ingest = IngestContainer(pipeline=p, platform=PlatformConfig())
    assert type(ingest.event_source()).__name__ == "PostgresWalSource"
    assert type(ingest.source_monitor()).__name__ == "PostgresSlotMonitor"


def test_containers_build_the_webhook_writer_with_the_direct_dead_letter_table() -> None:
    p = pipeline(sinks=[WEBHOOK])
    writer = SinkContainer(pipeline=p, sink=p.sinks[0], platform=PlatformConfig()).writer()
    assert type(writer).__name__ == "WebhookSinkWriter"
    assert type(writer._router).__name__ == "PostgresErrorRouter"


def test_the_kafka_container_builds_one_consumer_for_source_and_monitor() -> None:
    from adapters.debezium.monitor import ConnectorMonitor

    ingest = IngestContainer(pipeline=pipeline(), platform=PlatformConfig(transport_mode="kafka"))
    source = ingest.event_source()
    assert type(source).__name__ == "KafkaEventSource"
    monitor = ingest.source_monitor()
    # The connector's states (Connect) around the consumer's lag and schema versions.
    assert isinstance(monitor, ConnectorMonitor)
    assert monitor.inner is not None and monitor.inner.source is source  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------ CLI


def test_cdc_validate_names_each_refused_setting_with_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _without_writer(monkeypatch, "iceberg")
    pipeline_file = tmp_path / "pipeline.yaml"
    pipeline_file.write_text(
        yaml.safe_dump(
            {
                "pipeline_id": "orders",
                "source": {"database": "shop", "tables": ["public.orders"]},
                "sinks": [
                    {
                        "sink_id": "replica",
                        "sink_type": "postgres",
                        "postgres": {"database": "r"},
                    },
                    ICEBERG,
                ],
            },
            sort_keys=False,
        )
    )
    platform_file = tmp_path / "platform.yaml"
    platform_file.write_text(
        "transport_mode: direct\nhealth_port: 8080\nmax_buffered_messages: 10\n"
    )
    code = main(["validate", str(pipeline_file), "--platform-config", str(platform_file)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{platform_file}:3: max_buffered_messages: not used by transport_mode direct" in err
    assert f"{pipeline_file}:" in err and ": sinks[1].sink_type: 'iceberg'" in err


def test_cdc_validate_refuses_a_transport_without_an_adapter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every transport has an adapter now: take kafka's away to check the refusal."""
    import dataclasses

    monkeypatch.setitem(
        registry.TRANSPORTS,  # type: ignore[arg-type]
        "kafka",
        dataclasses.replace(registry.TRANSPORTS["kafka"], event_source=None),  # type: ignore[index]
    )
    pipeline_file = tmp_path / "pipeline.yaml"
    pipeline_file.write_text(
        "pipeline_id: orders\nsource:\n  database: shop\n  tables: [public.orders]\n"
    )
    platform_file = tmp_path / "platform.yaml"
    platform_file.write_text("health_port: 8080\ntransport_mode: kafka\n")
    assert load_platform(platform_file).transport_mode == "kafka"  # valid configuration
    code = main(["validate", str(pipeline_file), "--platform-config", str(platform_file)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{platform_file}:2: transport_mode: 'kafka'" in err


def test_documented_refusal_is_the_real_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapters.config import config_error

    doc = (ROOT / "docs" / "configuration.md").read_text()
    section = doc[doc.index("## What this release runs") : doc.index("## Slot, publication")]
    expected = section.split("```text\n", 1)[1].split("```", 1)[0].rstrip("\n")
    monkeypatch.chdir(tmp_path)
    Path("platform.yaml").write_text(
        "transport_mode: direct\nhealth_port: 8080\nmax_buffered_messages: 5000\n"
    )
    platform = load_platform("platform.yaml")
    found = registry.check(pipeline(), platform)
    assert not found.pipeline
    error = config_error("platform.yaml", found.platform)
    assert f"error: not supported by this release\n{error}" == expected


def test_a_heartbeat_interval_without_heartbeats_is_refused() -> None:
    from pydantic import ValidationError

    source = {"database": "shop", "tables": ["public.orders"], "heartbeat_mode": "none"}
    with pytest.raises(ValidationError, match="heartbeat_mode none sends no heartbeats"):
        PipelineConfig.model_validate(
            {"pipeline_id": "o", "source": {**source, "heartbeat_interval_seconds": 5}}
        )
    assert PipelineConfig.model_validate({"pipeline_id": "o", "source": source})


def test_cdc_run_refuses_before_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`cdc run` makes the same check as `cdc validate` (exit 2, one line), so an unsupported
    setting never reaches a child process that would crash-loop. (`cdc ingest` and `cdc sink`
    check too, after setting up their logging: tests/e2e/test_process_lifecycle.py.)"""
    pipeline_file = tmp_path / "pipeline.yaml"
    pipeline_file.write_text(
        "pipeline_id: orders\nsource:\n  database: shop\n  tables: [public.orders]\n"
        "sinks:\n  - sink_id: replica\n    sink_type: postgres\n    postgres: {database: r}\n"
    )
    platform_file = tmp_path / "platform.yaml"
    platform_file.write_text("health_port: 8080\nwal_reader:\n  batch_timeout_seconds: 0.5\n")
    code = main(["run", str(pipeline_file), "--platform-config", str(platform_file)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{platform_file}:3: wal_reader.batch_timeout_seconds:" in err
    assert len(err.strip().splitlines()) == 1, err


def _iceberg(table_name: str, **sink: Any) -> dict[str, Any]:
    return {
        "sink_id": "lake",
        "sink_type": "iceberg",
        "iceberg": {"catalog_uri": "sqlite:///c.db", "warehouse": "/w", "table_name": table_name},
        **sink,
    }


def test_an_iceberg_table_name_without_placeholders_needs_exactly_one_table() -> None:
    two = {"database": "shop", "tables": ["public.orders", "public.items"]}
    found = messages(
        registry.check(pipeline(source=two, sinks=[_iceberg("orders")]), PlatformConfig())
    )
    assert list(found) == ["sinks[0].iceberg.table_name"]
    assert "receives 2 tables" in found["sinks[0].iceberg.table_name"]
    assert "{schema}" in found["sinks[0].iceberg.table_name"]
    # Placeholders, one table, or a sink limited to one table: fine.
    assert not registry.check(
        pipeline(source=two, sinks=[_iceberg("{schema}_{table}")]), PlatformConfig()
    )
    assert not registry.check(pipeline(sinks=[_iceberg("orders")]), PlatformConfig())
    clash = {"database": "shop", "tables": ["public.orders", "sales.orders"]}
    found = messages(
        registry.check(pipeline(source=clash, sinks=[_iceberg("{table}")]), PlatformConfig())
    )
    assert "maps public.orders and sales.orders to the same" in found["sinks[0].iceberg.table_name"]
    limited = _iceberg("orders", tables=["public.orders"])
    assert not registry.check(pipeline(source=two, sinks=[limited]), PlatformConfig())


def test_cdc_validate_exits_2_for_a_literal_iceberg_table_name_with_two_tables(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "pipeline_id": "p",
                "source": {"database": "d", "tables": ["public.a", "public.b"]},
                "sinks": [_iceberg("lake_table")],
            }
        )
    )
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "sinks[0].iceberg.table_name" in err and "{table}" in err


# --------------------------------------------------------------- provisioners (undeploy)


def test_wal_transports_tear_down_through_the_postgres_provisioner() -> None:
    from adapters.postgres.source.provisioner import PostgresProvisioner

    platform = PlatformConfig.model_validate({"wal_reader": {"slot_name": "s1"}})
    for name in ("direct", "pubsub", "kinesis"):
        factory = registry.TRANSPORTS[name].provisioner
        assert factory is not None, name
    direct = registry.TRANSPORTS["direct"].provisioner
    assert direct is not None
    built = direct(pipeline(), platform)
    assert isinstance(built, PostgresProvisioner)
    assert built.slot_name == pipeline().effective_slot_name(platform)
    assert built.tables == ("public.orders",)


def test_undeploy_of_a_transport_without_provisioner_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio
    import dataclasses

    from services.ops import UndeployError, undeploy

    without = dataclasses.replace(registry.TRANSPORTS["kafka"], provisioner=None)
    monkeypatch.setitem(registry.TRANSPORTS, "kafka", without)  # type: ignore[arg-type]
    platform = PlatformConfig.model_validate({"transport_mode": "kafka"})
    with pytest.raises(UndeployError, match="transport_mode kafka has no provisioner"):
        asyncio.run(undeploy(pipeline(), platform))


def test_the_webhook_example_validates() -> None:
    platform = load_platform(ROOT / "examples" / "platform.yaml")
    p = load_pipeline(ROOT / "examples" / "pipeline-webhook.yaml", platform=platform)
    assert not registry.check(p, platform)


def test_a_webhook_sink_is_accepted_by_every_transport_that_keeps_dead_letters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sections = {"kinesis": {"region": "r"}, "pubsub": {"project_id": "p"}}
    for mode in ("direct", "pubsub", "kinesis"):
        transport = registry.TRANSPORTS[mode]
        assert transport.error_router is not None and transport.dead_letter_store is not None
        section = sections.get(mode)
        platform = PlatformConfig.model_validate(
            {"transport_mode": mode, **({mode: section} if section else {})}
        )
        assert not registry.check(pipeline(sinks=[WEBHOOK]), platform), mode
    # A transport without an error router refuses it (by name, at the sink's type).
    kinesis = registry.TRANSPORTS["kinesis"]
    monkeypatch.setitem(
        registry.TRANSPORTS,  # type: ignore[arg-type]
        "kinesis",
        dataclasses.replace(kinesis, error_router=None, dead_letter_store=None),
    )
    platform = PlatformConfig.model_validate(
        {"transport_mode": "kinesis", "kinesis": {"region": "r"}}
    )
    found = messages(registry.check(pipeline(sinks=[WEBHOOK]), platform))
    assert "needs the transport's dead letters" in found["sinks[0].sink_type"], found


def test_kinesis_dead_letters_are_its_dlq_streams() -> None:
    from adapters.kinesis.dead_letters import KinesisDeadLetters

    platform = PlatformConfig.model_validate(
        {"transport_mode": "kinesis", "kinesis": {"region": "r"}, "dlq": {"topic_suffix": "dead"}}
    )
    factory = registry.TRANSPORTS["kinesis"].dead_letter_store
    assert factory is not None
    store = factory(pipeline(topic_prefix="cdc"), platform)
    assert isinstance(store, KinesisDeadLetters)
    assert store.dlq_streams() == ["cdc-public-orders-dead"]
    assert not registry.check(pipeline(), platform)
    found = messages(
        registry.check(
            pipeline(),
            PlatformConfig.model_validate(
                {
                    "transport_mode": "kinesis",
                    "kinesis": {"region": "r"},
                    "dlq": {"flush_interval_seconds": 5},
                }
            ),
        )
    )
    assert list(found) == ["dlq.flush_interval_seconds"]


def test_pubsub_refuses_the_settings_it_does_not_read() -> None:
    def pubsub(**extra: Any) -> PlatformConfig:
        return PlatformConfig.model_validate(
            {"transport_mode": "pubsub", "pubsub": {"project_id": "p"}, **extra}
        )

    assert not registry.check(pipeline(topic_prefix="x"), pubsub(dlq={"topic_suffix": "dead"}))
    assert not registry.check(pipeline(), pubsub(dlq={"flush_interval_seconds": 0.0}))
    found = messages(registry.check(pipeline(), pubsub(dlq={"flush_interval_seconds": 5})))
    assert list(found) == ["dlq.flush_interval_seconds"]
    found = messages(registry.check(pipeline(), pubsub(max_buffered_messages=10)))
    assert list(found) == ["max_buffered_messages"]
