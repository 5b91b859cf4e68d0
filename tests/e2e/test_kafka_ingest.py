"""Kafka (Tansu) -> `cdc ingest` (transport_mode kafka) -> gRPC -> `cdc sink` -> PostgreSQL,
through real processes, with Debezium-shaped Avro changes written by the test (what Kafka
Connect writes; the path through real Kafka Connect and Debezium is
tests/e2e/test_kafka_pipeline.py). The expected table is the test's model of the changes it
wrote; the sink must equal it row by row."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from adapters.kafka.avro import SchemaRegistry
from tests.support.debezium_avro import Writer, change, items_schemas
from tests.support.pipeline import (
    PipelineFiles,
    Stage,
    free_port,
    http_json,
    ingest_stage,
    sink_stage,
    stage_logs,
    table_rows,
    wait_until,
    write_configs,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
PARTITIONS = 4


@dataclass
class Changes:
    """Writes inserts / updates / deletes of public.items to its topic (the partition is
    the key's, as Kafka's key hashing would keep it) and keeps the expected table."""

    topic: str
    producer: Producer
    key: Writer
    value: Writer
    rows: dict[int, str] = field(default_factory=dict)
    written: int = 0

    def one(self, rng: random.Random) -> None:
        k = rng.randrange(1, 4000)
        if k in self.rows and rng.random() < 0.3:
            op, before, after = "d", {"id": k, "name": None}, None
            del self.rows[k]
        elif k in self.rows:
            op, before, after = "u", None, {"id": k, "name": f"v{self.written}"}
            self.rows[k] = f"v{self.written}"
        else:
            op, before, after = "c", None, {"id": k, "name": f"v{self.written}"}
            self.rows[k] = f"v{self.written}"
        self.producer.produce(
            self.topic,
            key=self.key({"id": k}),
            value=self.value(change(op, before, after, table="items")),
            partition=k % PARTITIONS,
        )
        self.written += 1
        if self.written % 500 == 0:
            self.producer.poll(0)

    def flush(self) -> None:
        assert self.producer.flush(30) == 0

    def expected(self) -> list[tuple[Any, ...]]:
        return [(k, v) for k, v in sorted(self.rows.items())]


@pytest.fixture
def kafka_pipeline(
    pg: Any, tansu_broker: Any, schema_registry: Any, tmp_path: Path
) -> Iterator[tuple[PipelineFiles, Changes, str, str]]:
    suffix = uuid.uuid4().hex[:8]
    prefix = f"e2e{suffix}"
    topic = f"{prefix}.public.items"
    admin = AdminClient({"bootstrap.servers": tansu_broker.bootstrap_servers})
    for future in admin.create_topics([NewTopic(topic, PARTITIONS, 1)]).values():
        future.result(15)
    registry = SchemaRegistry(schema_registry.url)
    key, value = items_schemas(topic)
    changes = Changes(
        topic,
        Producer({"bootstrap.servers": tansu_broker.bootstrap_servers, "linger.ms": 5}),
        Writer(key, registry.register(f"{topic}-key", key)),
        Writer(value, registry.register(f"{topic}-value", value)),
    )
    replica_db = pg.new_database("replica")
    files = write_configs(
        tmp_path,
        host=pg.host,
        port=pg.port,
        source_db="shop",
        replica_db=replica_db,
        tables=["public.items"],
        pipeline_id=f"kafka-{suffix}",
    )
    pipeline = yaml.safe_load(files.pipeline.read_text())
    pipeline["topic_prefix"] = prefix
    for name in ("slot_name", "publication_name", "snapshot_mode"):
        pipeline["source"].pop(name, None)
    files.pipeline.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    platform = yaml.safe_load(files.platform.read_text())
    platform.pop("wal_reader")
    platform["transport_mode"] = "kafka"
    platform["kafka"] = {
        "bootstrap_servers": tansu_broker.bootstrap_servers,
        "schema_registry_url": schema_registry.url,
        "group_id": f"e2e-{suffix}",  # a group per test: a killed member is not waited for
        "poll_batch_size": 500,
    }
    platform["retry"] = {"initial_wait_seconds": 0.2, "max_wait_seconds": 2}
    files.platform.write_text(yaml.safe_dump(platform, sort_keys=False))
    yield files, changes, pg.dsn(replica_db), tansu_broker.bootstrap_servers


def _consuming(port: int) -> bool:
    """The ingest's consumer has partitions. (/readyz stays 503 in these tests: no Kafka
    Connect runs, so the connector's state, which the Kafka monitor reports, is an error.)"""
    source = http_json(port, "/readyz")["components"]["kafka_source"]
    return source["status"] == "ok" and bool(source["assigned"])


def _group(files: PipelineFiles) -> str:
    return str(yaml.safe_load(files.platform.read_text())["kafka"]["group_id"])


def _committed(bootstrap: str, files: PipelineFiles, changes: Changes) -> int:
    """The pipeline group's committed offsets, summed over the partitions."""
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": _group(files)})
    try:
        committed = probe.committed(
            [TopicPartition(changes.topic, p) for p in range(PARTITIONS)], timeout=10
        )
    finally:
        probe.close()
    return sum(max(0, tp.offset) for tp in committed)


def _sink_equals(replica_dsn: str, changes: Changes) -> bool:
    return table_rows(replica_dsn, "public.items") == changes.expected()


def _stages(files: PipelineFiles, tmp_path: Path) -> tuple[Stage, Stage]:
    sink_port = free_port()
    sink = sink_stage(files, tmp_path, sink_port).start()
    ingest = ingest_stage(files, tmp_path, {"replica": sink_port}).start()
    return sink, ingest


def test_kill_9_of_the_ingest_mid_stream_loses_and_duplicates_nothing(
    kafka_pipeline: tuple[PipelineFiles, Changes, str, str], tmp_path: Path
) -> None:
    files, changes, replica_dsn, bootstrap = kafka_pipeline
    rng = random.Random(7)
    sink, ingest = _stages(files, tmp_path)
    applied: list[int] = []
    stop = threading.Event()

    def watch_positions() -> None:
        """The sink's stored offset per partition must never go backwards (a replay is
        skipped, never applied twice) while the ingest dies and restarts."""
        while not stop.is_set():
            try:
                with psycopg.connect(replica_dsn) as conn:
                    rows = conn.execute("SELECT sum(major) FROM public._cdc_offsets").fetchone()
                if rows and rows[0] is not None:
                    applied.append(int(rows[0]))
            except psycopg.Error:
                pass
            time.sleep(0.1)

    watcher = threading.Thread(target=watch_positions, daemon=True)
    try:
        wait_until(lambda: _consuming(files.health_port), 60, "consuming")
        for _ in range(5_000):
            changes.one(rng)
        changes.flush()
        watcher.start()
        wait_until(
            lambda: len(table_rows(replica_dsn, "public.items")) > 500,
            60,
            "first rows\n" + stage_logs(sink, ingest),
        )
        ingest.kill9()
        for _ in range(5_000):
            changes.one(rng)
        changes.flush()
        ingest.start()
        for _ in range(5_000):
            changes.one(rng)
        changes.flush()
        wait_until(
            lambda: _sink_equals(replica_dsn, changes),
            120,
            "sink = the changes written\n" + stage_logs(sink, ingest),
        )
    finally:
        stop.set()
        for stage in (ingest, sink):
            if stage.alive():
                stage.terminate()
    assert table_rows(replica_dsn, "public.items") == changes.expected()
    assert applied == sorted(applied), "a sink position went backwards"
    # Everything durable was committed: the group's offsets are at the partitions' ends.
    assert _committed(bootstrap, files, changes) == changes.written


def test_a_poison_message_is_dead_lettered_and_the_pipeline_goes_on(
    kafka_pipeline: tuple[PipelineFiles, Changes, str, str], tmp_path: Path
) -> None:
    files, changes, replica_dsn, bootstrap = kafka_pipeline
    rng = random.Random(11)
    sink, ingest = _stages(files, tmp_path)
    try:
        wait_until(lambda: _consuming(files.health_port), 60, "consuming")
        for _ in range(300):
            changes.one(rng)
        changes.flush()
        changes.producer.produce(changes.topic, value=b"\x00\x00\x00\x07\xffbroken", partition=1)
        changes.flush()
        for _ in range(300):
            changes.one(rng)
        changes.flush()
        wait_until(
            lambda: _sink_equals(replica_dsn, changes),
            90,
            "sink = the changes written\n" + stage_logs(sink, ingest),
        )
        dlq = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"probe-{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
            }
        )
        dlq.subscribe([f"{changes.topic}.dlq"])
        letter = None
        deadline = time.monotonic() + 30
        while letter is None and time.monotonic() < deadline:
            msg = dlq.poll(0.5)
            if msg is not None and msg.error() is None:
                letter = msg
        dlq.close()
        assert letter is not None, "no dead letter\n" + stage_logs(ingest)
        headers = {k: v.decode() for k, v in letter.headers()}
        assert headers["cdc.source.topic"] == changes.topic
        assert headers["cdc.source.partition"] == "1"
        poison_offset = int(headers["cdc.source.offset"])
        assert headers["cdc.error.class"] == "SchemaNotFoundError"
        assert letter.value() == b"\x00\x00\x00\x07\xffbroken"
        # The partition's committed offset moved past the poison message.
        probe = Consumer({"bootstrap.servers": bootstrap, "group.id": _group(files)})
        try:
            (tp,) = probe.committed([TopicPartition(changes.topic, 1)], timeout=10)
        finally:
            probe.close()
        assert tp.offset > poison_offset
        assert (
            http_json(files.health_port, "/readyz")["components"]["kafka_source"]["status"] == "ok"
        )
    finally:
        for stage in (ingest, sink):
            if stage.alive():
                stage.terminate()


def test_cdc_consume_prints_changes_and_dead_letters_without_touching_the_pipelines_group(
    kafka_pipeline: tuple[PipelineFiles, Changes, str, str], tmp_path: Path
) -> None:
    import json
    import subprocess

    from tests.support.pipeline import REPO, cdc_argv

    files, changes, _replica_dsn, bootstrap = kafka_pipeline
    rng = random.Random(3)
    for _ in range(20):
        changes.one(rng)
    changes.producer.produce(changes.topic, value=b"not avro", partition=0)
    changes.flush()
    argv = cdc_argv(
        "consume",
        str(files.pipeline),
        "--platform-config",
        str(files.platform),
        "--table",
        "public.items",
        "--idle-exit",
        "3",
    )
    out = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(lines) == 21
    decoded = [line for line in lines if "op" in line]
    assert len(decoded) == 20 and {line["op"] for line in decoded} <= {"c", "u", "d"}
    assert all(line["key"]["id"] for line in decoded)
    (bad,) = [line for line in lines if "undecodable" in line]
    assert bad["partition"] == 0
    # Its reads committed nothing to the pipeline's group (nor to its own).
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": _group(files)})
    try:
        committed = probe.committed(
            [TopicPartition(changes.topic, p) for p in range(PARTITIONS)], timeout=10
        )
    finally:
        probe.close()
    assert all(tp.offset < 0 for tp in committed)
    wrong = subprocess.run(
        [*argv[:-4], "--table", "public.nope"], capture_output=True, text=True, cwd=REPO
    )
    assert wrong.returncode == 2 and "public.nope is not captured" in wrong.stderr


def test_two_ingest_processes_in_one_group_with_rebalances_mid_stream(
    kafka_pipeline: tuple[PipelineFiles, Changes, str, str], tmp_path: Path
) -> None:
    """Two pipeline replicas (ingest + sink each) in one consumer group: the second joins
    mid-stream (partitions move to it), then the first leaves (they all move back). Each
    partition is read by one member at a time; the new owner resumes at the committed offset
    and the sink skips what the old owner's sink applied."""
    files, changes, replica_dsn, bootstrap = kafka_pipeline
    rng = random.Random(23)
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    platform = yaml.safe_load(files.platform.read_text())
    platform["health_port"] = free_port()
    platform["ingest"]["grpc_port"] = free_port()
    second_platform = second_dir / "platform.yaml"
    second_platform.write_text(yaml.safe_dump(platform, sort_keys=False))
    second = PipelineFiles(
        files.pipeline,
        second_platform,
        files.pipeline_id,
        files.slot,
        files.publication,
        platform["health_port"],
    )
    sink_a, ingest_a = _stages(files, tmp_path)
    sink_b = ingest_b = None
    try:
        wait_until(lambda: _consuming(files.health_port), 60, "a consuming")
        for _ in range(3_000):
            changes.one(rng)
        changes.flush()
        sink_b, ingest_b = _stages(second, second_dir)
        wait_until(
            lambda: (
                len(
                    http_json(second.health_port, "/readyz")["components"]["kafka_source"][
                        "assigned"
                    ]
                )
                > 0
            ),
            60,
            "b got partitions\n" + stage_logs(ingest_a, ingest_b),
        )
        for _ in range(3_000):
            changes.one(rng)
        changes.flush()
        assert ingest_a.terminate() == 0  # leaves the group: its partitions move to b
        for _ in range(3_000):
            changes.one(rng)
        changes.flush()
        wait_until(
            lambda: _sink_equals(replica_dsn, changes),
            120,
            "sink = the changes written\n" + stage_logs(ingest_a, ingest_b),
        )
        assert table_rows(replica_dsn, "public.items") == changes.expected()
        probe = Consumer({"bootstrap.servers": bootstrap, "group.id": _group(files)})
        try:
            wait_until(
                lambda: (
                    sum(
                        tp.offset
                        for tp in probe.committed(
                            [TopicPartition(changes.topic, p) for p in range(PARTITIONS)],
                            timeout=10,
                        )
                    )
                    == changes.written
                ),
                30,
                "all committed",
            )
        finally:
            probe.close()
    finally:
        for stage in (ingest_b, ingest_a, sink_b, sink_a):
            if stage is not None and stage.alive():
                stage.terminate()
    log_a = ingest_a.log_path.read_text(errors="replace")
    assert "kafka.partitions_revoked" in log_a
