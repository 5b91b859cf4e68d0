"""The sink process's composition root: picks the SinkWriter for `sink_type`."""

from __future__ import annotations

from typing import Any

from dependency_injector import containers, providers

from adapters.config import PipelineConfig
from adapters.config.pipeline import SinkConfig
from adapters.postgres.sink_writer import PostgresSinkWriter


class SinkNotAvailableError(RuntimeError):
    pass


def _not_available(sink_type: str) -> Any:
    raise SinkNotAvailableError(
        f"sink_type '{sink_type}' is valid configuration, but this release has no writer "
        "for it yet; use sink_type: postgres"
    )


def build_postgres(pipeline: PipelineConfig, sink: SinkConfig) -> PostgresSinkWriter:
    assert sink.postgres is not None
    return PostgresSinkWriter(sink.postgres, pipeline.pipeline_id, sink.sink_id)


class SinkContainer(containers.DeclarativeContainer):
    pipeline = providers.Dependency(instance_of=PipelineConfig)
    sink = providers.Dependency(instance_of=SinkConfig)

    writer = providers.Selector(
        providers.Callable(lambda s: s.sink_type, sink),
        postgres=providers.Singleton(build_postgres, pipeline, sink),
        webhook=providers.Callable(_not_available, "webhook"),
        iceberg=providers.Callable(_not_available, "iceberg"),
    )


# sink_types this release has a writer for; the others are valid configuration only.
AVAILABLE_SINK_TYPES = ("postgres",)


def unavailable_sinks(pipeline: PipelineConfig) -> list[str]:
    """One message per enabled sink whose sink_type has no writer in this release, naming
    `sinks[i].sink_type` (`cdc validate` and `cdc run` refuse them)."""
    problems = []
    for index, sink in enumerate(pipeline.sinks):
        if sink.enabled and sink.sink_type not in AVAILABLE_SINK_TYPES:
            problems.append(
                f"sinks[{index}].sink_type: '{sink.sink_type}' (sink '{sink.sink_id}') has no "
                f"writer in this release; available: {', '.join(AVAILABLE_SINK_TYPES)}"
            )
    return problems
