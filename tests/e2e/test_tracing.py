"""Traces: one span per batch in ingest and in sink, one trace id, exported over OTLP/gRPC.

No Jaeger or OTel Collector can be installed here, so the test runs a real OTLP/gRPC
receiver built from the opentelemetry-proto service definitions.
"""

from __future__ import annotations

import threading
from concurrent import futures
from pathlib import Path

import grpc
import psycopg
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)

from tests.support.pipeline import (
    free_port,
    ingest_stage,
    new_pipeline,
    sink_stage,
    tables_equal,
    wait_until,
)
from tests.support.workload import TABLES


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[tuple[str, str, bytes, bytes]] = []  # (service, name, trace, parent)
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next(
                    (
                        a.value.string_value
                        for a in resource_spans.resource.attributes
                        if a.key == "service.name"
                    ),
                    "",
                )
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        self.spans.append((service, span.name, span.trace_id, span.parent_span_id))
        return trace_service_pb2.ExportTraceServiceResponse()


def test_ingest_and_sink_spans_of_one_batch_share_a_trace(pg, tmp_path: Path) -> None:
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    otlp_port = free_port()
    server.add_insecure_port(f"127.0.0.1:{otlp_port}")
    server.start()
    source_dsn, replica_dsn, files = new_pipeline(pg, tmp_path, snapshot_mode="never")
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}"}
    sink_port = free_port()
    sink = sink_stage(files, tmp_path, sink_port, env=env).start()
    ingest = ingest_stage(files, tmp_path, {"replica": sink_port}, env=env).start()
    try:
        wait_until(
            lambda: (
                ingest.log_path.exists() and "replication.started" in ingest.log_path.read_text()
            ),
            60,
            "streaming",
        )
        with psycopg.connect(source_dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO public.orders (id, amount) VALUES (1, 9.99)")
        wait_until(lambda: tables_equal(source_dsn, replica_dsn, TABLES), 30, "replicated")

        def linked() -> bool:
            with receiver.lock:
                ingest_traces = {t for s, n, t, _ in receiver.spans if n == "ingest.batch"}
                sink_spans = [(t, p) for s, n, t, p in receiver.spans if n == "sink.write"]
            return any(t in ingest_traces and p for t, p in sink_spans)

        wait_until(linked, 30, "an ingest.batch and a sink.write span in one trace")
        services = {s for s, *_ in receiver.spans}
        assert any(s.endswith("ingest") for s in services), services
        assert any("sink" in s for s in services), services
    finally:
        for stage in (ingest, sink):
            if stage.alive():
                stage.terminate()
        server.stop(0)
