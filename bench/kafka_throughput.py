"""Kafka topic -> `cdc ingest` (transport_mode kafka, Avro through the schema registry) ->
`cdc sink` -> PostgreSQL: how fast a backlog of Debezium-shaped changes becomes durable in
the sink and committed in Kafka, in one run (docs/benchmarks.md, "Kafka transport").

`python -m bench.kafka_throughput [--messages N] [--partitions P]`. It starts Tansu, the
schema registry and a PostgreSQL server of its own (services/stack), writes the backlog
before the stages start, and measures from the first row in the sink to the moment the
consumer group's committed offsets reach the end of every partition (everything durable
and committed). Everything it started is stopped at the end.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

import psutil
import psycopg
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from adapters.kafka.avro import SchemaRegistry
from bench.kafka_decode import KEY, VALUE
from bench.kafka_run import log_tail, postgres_sink, start_cdc, stop_all, write_configs
from services.net import find_free_port
from services.stack import schema_registry, tansu
from services.stack.postgres import PostgresServer
from tests.support.debezium_avro import Writer, change


def produce(bootstrap: str, topic: str, registry_url: str, n: int, partitions: int) -> None:
    registry = SchemaRegistry(registry_url)
    key = Writer(KEY, registry.register(f"{topic}-key", KEY))
    value = Writer(VALUE, registry.register(f"{topic}-value", VALUE))
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.size": 1 << 20})
    keys = max(1, n // 3)
    for i in range(n):
        k = i % keys
        row = {
            "id": k,
            "customer_id": k % 977,
            "status": "shipped" if i >= keys else "new",
            "amount": Decimal(i % 10_000) / 100,
            "note": "x" * 120,
            "created": "2026-01-01T00:00:00Z",
            "updated": 1_700_000_000_000_000 + i,
        }
        op = "c" if i < keys else "u"
        while True:
            try:
                producer.produce(
                    topic,
                    key=key({"id": k}),
                    value=value(change(op, None, row, table="orders")),
                    partition=k % partitions,
                )
                break
            except BufferError:
                producer.poll(0.1)
        if i % 5000 == 0:
            producer.poll(0)
    assert producer.flush(120) == 0


def committed_total(bootstrap: str, group: str, topic: str, partitions: int) -> int:
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        got = probe.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
    finally:
        probe.close()
    return sum(max(0, tp.offset) for tp in got)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--poll-batch-size", type=int, default=500)
    parser.add_argument("--batch-max-events", type=int, default=2000)
    parser.add_argument("--commit-interval", type=float, default=0.0)
    parser.add_argument("--max-buffered", type=int, default=1000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-kafka-"))
    broker = tansu.start(work / "tansu")
    registry = schema_registry.start(work / "registry")
    server = PostgresServer().start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE replica")
        topic = "bench.public.orders"
        admin = AdminClient({"bootstrap.servers": broker.bootstrap_servers})
        for f in admin.create_topics([NewTopic(topic, args.partitions, 1)]).values():
            f.result(15)
        t = time.perf_counter()
        produce(broker.bootstrap_servers, topic, registry.url, args.messages, args.partitions)
        print(f"backlog: {args.messages:,} messages in {time.perf_counter() - t:.1f} s", flush=True)
        pipeline = {
            "pipeline_id": "bench",
            "topic_prefix": "bench",
            "source": {"database": "shop", "tables": ["public.orders"]},
            "sinks": [postgres_sink(server, "replica")],
        }
        platform = {
            "transport_mode": "kafka",
            "max_buffered_messages": args.max_buffered,
            "health_port": find_free_port(),
            "ingest": {"batch_max_events": args.batch_max_events, "grpc_port": find_free_port()},
            "kafka": {
                "bootstrap_servers": broker.bootstrap_servers,
                "schema_registry_url": registry.url,
                "group_id": "bench",
                "poll_batch_size": args.poll_batch_size,
                "commit_interval_seconds": args.commit_interval,
            },
        }
        configs = write_configs(work, pipeline, platform)
        sink_port = find_free_port()
        sink_args = ["sink", *configs, "--sink-id", "replica", "--port", str(sink_port)]
        procs.append(start_cdc(work, "sink", sink_args))
        ingest_args = ["ingest", *configs, "--sink-endpoint", f"replica=127.0.0.1:{sink_port}"]
        procs.append(start_cdc(work, "ingest", ingest_args))
        replica = server.dsn("replica")
        first = None
        deadline = time.monotonic() + 600
        while first is None and time.monotonic() < deadline:
            try:
                with psycopg.connect(replica) as conn:
                    row = conn.execute("SELECT count(*) FROM public.orders").fetchone()
                if row and row[0]:
                    first = time.perf_counter()
            except psycopg.Error:
                pass
            time.sleep(0.05)
        assert first is not None, log_tail(work, "ingest")
        postmaster = server.pid
        assert postmaster is not None
        cpu = [psutil.Process(p.pid) for p in procs]
        backends = psutil.Process(postmaster)
        pg_start = sum(c.cpu_times().user + c.cpu_times().system for c in backends.children())
        start_cpu = [p.cpu_times() for p in cpu]
        group = "bench"
        while committed_total(broker.bootstrap_servers, group, topic, args.partitions) < (
            args.messages
        ):
            if time.monotonic() > deadline:
                raise SystemExit("timed out: " + log_tail(work, "ingest"))
            time.sleep(0.1)
        seconds = time.perf_counter() - first
        used = [
            (c.user + c.system) - (s.user + s.system)
            for c, s in zip([p.cpu_times() for p in cpu], start_cpu, strict=True)
        ]
        pg_used = (
            sum(c.cpu_times().user + c.cpu_times().system for c in backends.children()) - pg_start
        )
        with psycopg.connect(replica) as conn:
            row = conn.execute("SELECT count(*) FROM public.orders").fetchone()
        keys = max(1, args.messages // 3)
        assert row is not None and row[0] == keys, row
        print(
            f"topic -> durable PostgreSQL sink, Avro, {args.partitions} partition(s),"
            f" poll_batch_size {args.poll_batch_size}, commit_interval_seconds"
            f" {args.commit_interval}, max_buffered_messages {args.max_buffered}:"
            f" {args.messages:,} changes in {seconds:.2f} s ="
            f" {args.messages / seconds:,.0f} changes/s (CPU s: ingest {used[1]:.1f},"
            f" sink {used[0]:.1f}, postgres {pg_used:.1f})",
            flush=True,
        )
    finally:
        stop_all(work, procs, [server, registry, broker], wait=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
