"""The ingest process's composition root: the EventSource (and the SourceMonitor that watches
it) of `transport_mode`, built from the adapter registry (services/registry.py)."""

from __future__ import annotations

from typing import Any

from dependency_injector import containers, providers

from adapters.config import PipelineConfig, PlatformConfig
from domain.events import Operation
from domain.routing import Router, RoutingRule
from services import registry
from services.registry import source_conninfo

__all__ = ["IngestContainer", "TransportNotAvailableError", "build_router", "source_conninfo"]


class TransportNotAvailableError(RuntimeError):
    """The transport is valid configuration but this release has no EventSource for it
    (`cdc validate` refuses it first: registry.check)."""


def _not_available(transport: str) -> Any:
    raise TransportNotAvailableError(
        f"transport_mode: '{transport}' has no adapter in this release; available: "
        f"{', '.join(registry.available_transports())}"
    )


def build_router(pipeline: PipelineConfig) -> Router:
    return Router(
        RoutingRule(
            sink_id=sink.sink_id,
            tables=tuple(sink.tables or ()),
            operations=frozenset(Operation(op) for op in (sink.operations or ())),
        )
        for sink in pipeline.enabled_sinks
    )


def _sources(pipeline: Any, platform: Any) -> dict[str, Any]:
    """One provider per registered transport: its EventSource, or the refusal."""
    return {
        name: providers.Callable(_not_available, name)
        if adapter.event_source is None
        else providers.Singleton(adapter.event_source, pipeline, platform)
        for name, adapter in registry.TRANSPORTS.items()
    }


def _monitors(pipeline: Any, platform: Any) -> dict[str, Any]:
    """One provider per registered transport: its SourceMonitor, or None."""
    return {
        name: providers.Object(None)
        if adapter.source_monitor is None
        else providers.Singleton(adapter.source_monitor, pipeline, platform)
        for name, adapter in registry.TRANSPORTS.items()
    }


class IngestContainer(containers.DeclarativeContainer):
    pipeline = providers.Dependency(instance_of=PipelineConfig)
    platform = providers.Dependency(instance_of=PlatformConfig)

    _transport = providers.Callable(lambda p: p.transport_mode, platform)
    event_source = providers.Selector(_transport, **_sources(pipeline, platform))
    # Watches what the event source reads from; None where the transport has no monitor.
    source_monitor = providers.Selector(_transport, **_monitors(pipeline, platform))
    router = providers.Singleton(build_router, pipeline)
