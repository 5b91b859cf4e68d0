"""IngestService with fake ports: schema-change reporting, the source monitor's lifecycle and
its place in health() and /readyz."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

from structlog.testing import capture_logs

from domain.events import Column, Operation, Position, SchemaChange, SourceEvent, TableSchema
from domain.health import Status
from domain.ports import SourceChunk
from domain.routing import Router
from services.health_http import HealthState, serve_health
from services.ingest.service import IngestService
from services.net import find_free_port
from tests.support.fakes import FakeEventSource, FakeSourceMonitor

V1 = TableSchema(
    "shop",
    "orders",
    (Column("id", 20, "bigint", is_key=True), Column("amount", 1700, "numeric")),
)
V2 = TableSchema(
    "shop",
    "orders",
    (
        Column("id", 20, "bigint", is_key=True),
        Column("amount", 25, "text"),
        Column("n", 25, "text"),
    ),
)
V3 = TableSchema("shop", "orders", (Column("id", 20, "bigint", is_key=True),))
ITEMS = TableSchema("shop", "items", (Column("id", 23, "integer", is_key=True),))


def _service(source: FakeEventSource, monitor: FakeSourceMonitor | None = None) -> IngestService:
    return IngestService("p1", source, Router([]), {}, 100, monitor=monitor)


def _counter(service: IngestService, metric: str, table: str) -> float:
    value = service.metrics.registry.get_sample_value(metric, {"pipeline": "p1", "table": table})
    return value or 0.0


def test_schema_changes_are_logged_and_counted_and_first_sightings_are_not() -> None:
    event = SourceEvent(Operation.CREATE, V2, Position(10), after=("1", "x", "y"))
    chunks = [
        # first sighting of both tables: not a change
        SourceChunk("0", [], 5, [SchemaChange(None, V1), SchemaChange(None, ITEMS)]),
        SourceChunk("0", [event], 10, [SchemaChange(V1, V2)]),
        SourceChunk("0", [], 11, [SchemaChange(V2, V3), SchemaChange(ITEMS, ITEMS)]),
    ]
    source = FakeEventSource(chunks)
    service = _service(source)
    with capture_logs() as logs:
        asyncio.run(service.run())
    changed = [e for e in logs if e["event"] == "schema.version_changed"]
    assert [(e["table"], e["added"], e["dropped"], e["retyped"]) for e in changed] == [
        ("shop.orders", ["n"], [], ["amount"]),
        ("shop.orders", [], ["amount", "n"], []),
    ]
    assert changed[0]["pipeline_id"] == "p1"
    assert _counter(service, "cdc_schema_changes_total", "shop.orders") == 2
    assert _counter(service, "cdc_schema_changes_total", "shop.items") == 0
    # the orders' shape: version 1 from its first change read, then two changes
    assert _counter(service, "cdc_ingest_schema_version", "shop.orders") == 3
    # the chunks' events and checkpoints were handled as usual
    assert source.commits == [("0", 5), ("0", 10), ("0", 11)]


def test_monitor_starts_after_the_source_and_stops_before_it() -> None:
    calls: list[str] = []
    asyncio.run(_service(FakeEventSource(journal=calls), FakeSourceMonitor(calls)).run())
    assert calls == ["source.start", "monitor.start", "monitor.stop", "source.stop"]


def test_monitor_is_stopped_when_the_read_loop_crashes() -> None:
    calls: list[str] = []

    class Broken(FakeEventSource):
        async def chunks(self) -> AsyncIterator[SourceChunk]:
            raise RuntimeError("boom")
            yield  # pragma: no cover

    try:
        asyncio.run(_service(Broken(journal=calls), FakeSourceMonitor(calls)).run())
    except RuntimeError as exc:
        assert str(exc) == "boom"
    else:  # pragma: no cover
        raise AssertionError("the crash should propagate")
    assert calls[-1] == "monitor.stop"


def _health(monitor_status: Status, source_status: Status = Status.OK) -> dict[str, Any]:
    source = FakeEventSource()
    source.status = source_status
    return asyncio.run(_service(source, FakeSourceMonitor(status=monitor_status)).health())


def test_health_includes_the_monitor_and_degraded_is_still_ready() -> None:
    ok = _health(Status.OK)
    assert ok["status"] == "ok" and ok["ready"] is True
    assert ok["components"]["slot"] == {"status": "ok", "slot": "s", "lag_bytes": 42}
    degraded = _health(Status.DEGRADED)
    assert degraded["status"] == "degraded" and degraded["ready"] is True
    error = _health(Status.ERROR)
    assert error["status"] == "error" and error["ready"] is False


def test_health_without_a_monitor_has_no_slot_component() -> None:
    report = asyncio.run(_service(FakeEventSource()).health())
    assert set(report["components"]) == {"source"}


def _get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return int(resp.status), dict(json.loads(resp.read()))
    except urllib.error.HTTPError as exc:
        return int(exc.code), dict(json.loads(exc.read()))


def test_readyz_is_200_when_degraded_and_503_on_error() -> None:
    state = HealthState()
    port = find_free_port()
    server = serve_health(state, port, host="127.0.0.1")
    try:
        state.update(_health(Status.DEGRADED))
        code, body = _get(port, "/readyz")
        assert code == 200 and body["status"] == "degraded"
        assert body["components"]["slot"]["status"] == "degraded"
        state.update(_health(Status.OK, source_status=Status.ERROR))
        code, body = _get(port, "/readyz")
        assert code == 503 and body["status"] == "error"
    finally:
        server.shutdown()
        server.server_close()
