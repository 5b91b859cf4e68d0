"""The sink process's composition root: the SinkWriter of `sink_type`, built from the adapter
registry (services/registry.py)."""

from __future__ import annotations

from typing import Any

from dependency_injector import containers, providers

from adapters.config import PipelineConfig, PlatformConfig
from adapters.config.pipeline import SinkConfig
from services import registry


class SinkNotAvailableError(RuntimeError):
    """The sink type is valid configuration but this release has no writer for it
    (`cdc validate` refuses an enabled one first: registry.check)."""


def _not_available(sink_type: str) -> Any:
    raise SinkNotAvailableError(
        f"sink_type '{sink_type}' has no writer in this release; available: "
        f"{', '.join(registry.available_sink_types())}"
    )


# Derived from the registry (services/sink/server.py reads it).
AVAILABLE_SINK_TYPES = registry.available_sink_types()


def _writers(pipeline: Any, sink: Any, platform: Any) -> dict[str, Any]:
    """One provider per registered sink type: its SinkWriter, or the refusal."""
    return {
        name: providers.Callable(_not_available, name)
        if adapter.writer is None
        else providers.Singleton(adapter.writer, pipeline, sink, platform)
        for name, adapter in registry.SINKS.items()
    }


class SinkContainer(containers.DeclarativeContainer):
    pipeline = providers.Dependency(instance_of=PipelineConfig)
    sink = providers.Dependency(instance_of=SinkConfig)
    platform = providers.Dependency(instance_of=PlatformConfig)

    writer = providers.Selector(
        providers.Callable(lambda s: s.sink_type, sink), **_writers(pipeline, sink, platform)
    )
