"""Prometheus metrics, one registry per process and one metric set per stage.

Each stage builds its own set (`IngestMetrics`, `SinkMetrics`) with a `CollectorRegistry`
of its own, served by that process's `/metrics` (services/health_http.py); nothing is
registered in prometheus_client's global default registry, so a process exposes exactly
its stage's metrics (plus `process_*`), and tests can build as many sets as they like.

Labels are only `pipeline`, `sink`, `table` (and `outcome` / `result` with a fixed set of
values). Table names are capped per process (`TableLabels`): past `max_tables` distinct
tables, the rest are counted under `other`. The names and labels are documented in
docs/metrics.md; the Grafana dashboard (helm/cdc-platform/dashboards/cdc-pipeline.json) and
`cdc status` (services/status.py) use them.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter as Tally
from collections.abc import Iterable, Iterator, Mapping, Sequence
from operator import attrgetter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from domain.block_ops import change_count, changes_per_table
from domain.blocks import COMMIT_TIME, ChangeBlock
from domain.ports import SinkBatch

# Source commit -> durable at the sink (and the other latencies): 1 ms .. 60 s, 20 buckets,
# about x1.8 apart, so an interpolated p99 is within one bucket's width.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.4,
    0.6,
    1.0,
    1.5,
    2.5,
    4.0,
    6.0,
    10.0,
    25.0,
    60.0,
)
BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 5, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000)

DEFAULT_MAX_TABLES = 50
OTHER_TABLE = "other"


class TableLabels:
    """The `table` label value of a table: its name for the first `max_tables` distinct
    tables this process sees, `other` after that (bounded cardinality)."""

    def __init__(self, max_tables: int = DEFAULT_MAX_TABLES) -> None:
        self.max_tables = max_tables
        self._known: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, table: str) -> str:
        if table in self._known:
            return table
        with self._lock:
            if table in self._known:
                return table
            if len(self._known) < self.max_tables:
                self._known.add(table)
                return table
        return OTHER_TABLE


class WeightedHistogram(Collector):
    """A labelled histogram whose `observe` takes a count: one call records a value for
    many events (all changes of one source transaction share its commit time), which keeps
    per-event latency accounting off the per-event hot path."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.bounds = tuple(float(b) for b in buckets)
        self._children: dict[tuple[str, ...], _HistogramChild] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def labels(self, *values: str) -> _HistogramChild:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
        child = self._children.get(values)
        if child is None:
            with self._lock:
                child = self._children.setdefault(values, _HistogramChild(self.bounds))
        return child

    def describe(self) -> Iterable[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            children = list(self._children.items())
        for values, child in children:
            counts, total = child.snapshot()
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for bound, count in zip(self.bounds, counts, strict=False):
                cumulative += count
                buckets.append((_go_float(bound), float(cumulative)))
            buckets.append(("+Inf", float(cumulative + counts[-1])))
            family.add_metric(list(values), buckets, total)
        return [family]


class _HistogramChild:
    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # the last one: above every bound
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float, count: int = 1) -> None:
        if count <= 0:
            return
        index = bisect.bisect_left(self._bounds, value)
        with self._lock:
            self._counts[index] += count
            self._sum += value * count

    def snapshot(self) -> tuple[list[int], float]:
        with self._lock:
            return list(self._counts), self._sum


def _go_float(value: float) -> str:
    """A bucket bound as Prometheus writes it (`0.005`, `1.0`, `60.0`)."""
    return repr(float(value))


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)  # process_cpu_seconds_total, memory, open fds
    return registry


class IngestMetrics:
    """The ingest stage's metrics (`cdc ingest`)."""

    def __init__(self, pipeline: str, max_tables: int = DEFAULT_MAX_TABLES) -> None:
        self.pipeline = pipeline
        self.registry = _registry()
        self.table = TableLabels(max_tables)
        self._versions: dict[str, int] = {}
        r = self.registry
        self.events_read = Counter(
            "cdc_ingest_events_read_total",
            "Change events read from the transport, per source table",
            ["pipeline", "table"],
            registry=r,
        )
        self.events_sent = Counter(
            "cdc_ingest_events_sent_total",
            "Change events streamed to a sink, per source table (first sends, not resends)",
            ["pipeline", "sink", "table"],
            registry=r,
        )
        self.batches_sent = Counter(
            "cdc_ingest_batches_sent_total",
            "Batches streamed to a sink (first sends)",
            ["pipeline", "sink"],
            registry=r,
        )
        self.batch_events = WeightedHistogram(
            "cdc_ingest_batch_events",
            "Events per batch sent to a sink",
            ["pipeline", "sink"],
            BATCH_SIZE_BUCKETS,
            r,
        )
        self.events_acked = Counter(
            "cdc_ingest_events_acked_total",
            "Events a sink acknowledged, by outcome: written, skipped (a replay), dead_lettered",
            ["pipeline", "sink", "outcome"],
            registry=r,
        )
        self.unacked = Gauge(
            "cdc_ingest_unacked_batches",
            "Batches in flight to a sink: sent, not yet acknowledged",
            ["pipeline", "sink"],
            registry=r,
        )
        self.ack_latency = WeightedHistogram(
            "cdc_ingest_ack_latency_seconds",
            "First send of a batch to its acknowledgement by a sink",
            ["pipeline", "sink"],
            LATENCY_BUCKETS,
            r,
        )
        self.commit_to_ack = WeightedHistogram(
            "cdc_ingest_commit_to_ack_seconds",
            "Source commit time of a batch's newest change to its acknowledgement by a sink",
            ["pipeline", "sink"],
            LATENCY_BUCKETS,
            r,
        )
        self.commits = Counter(
            "cdc_ingest_commits_total",
            "Transport positions committed (slot flush LSN advances requested)",
            ["pipeline"],
            registry=r,
        )
        self.schema_changes = Counter(
            "cdc_schema_changes_total",
            "Source table shapes that changed (columns added, dropped or retyped)",
            ["pipeline", "table"],
            registry=r,
        )
        self.schema_version = Gauge(
            "cdc_ingest_schema_version",
            "Shape version of a source table in this process: 1 when first seen, +1 per change",
            ["pipeline", "table"],
            registry=r,
        )
        self.slot_lag = Gauge(
            "cdc_source_slot_lag_bytes",
            "WAL bytes between the server's current position and the slot's confirmed flush LSN",
            ["pipeline"],
            registry=r,
        )
        self.millis_behind = Gauge(
            "cdc_source_millis_behind_latest",
            "transport_mode kinesis: MillisBehindLatest of each shard as its reader last saw it",
            ["pipeline", "shard"],
            registry=r,
        )
        self.slot_retained = Gauge(
            "cdc_source_slot_retained_wal_bytes",
            "WAL bytes the slot keeps on the server (current position minus restart_lsn)",
            ["pipeline"],
            registry=r,
        )
        self.slot_active = Gauge(
            "cdc_source_slot_active",
            "1 while a walsender streams from the slot, else 0",
            ["pipeline"],
            registry=r,
        )
        self.source_ready = Gauge(
            "cdc_ingest_ready",
            "1 while /readyz is 200 (no component in error), else 0",
            ["pipeline"],
            registry=r,
        )

    def count_read(self, events: Sequence[Any]) -> None:
        self._count_read(self._per_table_name(events))

    def count_read_blocks(self, blocks: Sequence[ChangeBlock]) -> None:
        """`count_read` for changes read as blocks: per table from the blocks' lengths."""
        self._count_read(changes_per_table(blocks))

    def _count_read(self, names: Mapping[str, int]) -> None:
        for name in names:
            if name not in self._versions:  # first sighting in this process: version 1
                self._versions[name] = 1
                self.schema_version.labels(self.pipeline, self.table(name)).set(1)
        for table, n in self._labelled(names).items():
            self.events_read.labels(self.pipeline, table).inc(n)

    def schema_changed(self, table: str) -> None:
        """A source table's columns changed: its version goes up by one."""
        version = self._versions.get(table, 1) + 1
        self._versions[table] = version
        label = self.table(table)
        self.schema_version.labels(self.pipeline, label).set(version)
        self.schema_changes.labels(self.pipeline, label).inc()

    def count_sent(self, sink: str, events: Sequence[Any]) -> None:
        self._count_sent(sink, self._per_table_name(events), len(events))

    def count_sent_blocks(self, sink: str, blocks: Sequence[ChangeBlock]) -> None:
        """`count_sent` for a batch of blocks: per table from the blocks' lengths."""
        self._count_sent(sink, changes_per_table(blocks), change_count(blocks))

    def _count_sent(self, sink: str, per_name: Mapping[str, int], total: int) -> None:
        for table, n in self._labelled(per_name).items():
            self.events_sent.labels(self.pipeline, sink, table).inc(n)
        self.batches_sent.labels(self.pipeline, sink).inc()
        self.batch_events.labels(self.pipeline, sink).observe(total)

    def slot_reading(self, detail: Mapping[str, Any]) -> None:
        """Slot gauges from the source monitor's latest reading (its health detail)."""
        if detail.get("exists") is False:
            self.slot_active.labels(self.pipeline).set(0)
            return
        if "active" in detail:
            self.slot_active.labels(self.pipeline).set(1 if detail["active"] else 0)
        if isinstance(detail.get("lag_bytes"), int):
            self.slot_lag.labels(self.pipeline).set(detail["lag_bytes"])
        if isinstance(detail.get("retained_wal_bytes"), int):
            self.slot_retained.labels(self.pipeline).set(detail["retained_wal_bytes"])
        shards = detail.get("shards")
        if isinstance(shards, Mapping):  # the Kinesis monitor's reading
            for shard, reading in shards.items():
                if not isinstance(reading, Mapping):
                    continue
                behind = reading.get("millis_behind_latest")
                if isinstance(behind, int):
                    self.millis_behind.labels(self.pipeline, shard).set(behind)

    def _labelled(self, per_name: Mapping[str, int]) -> dict[str, int]:
        out: dict[str, int] = {}
        for name, n in per_name.items():
            label = self.table(name)
            out[label] = out.get(label, 0) + n
        return out

    @staticmethod
    def _per_table_name(events: Sequence[Any]) -> dict[str, int]:
        return per_table(events)


def per_table(events: Sequence[Any]) -> dict[str, int]:
    """Events per source table name (`schema.table`). Counted by table object identity in
    C (Counter over map), the name looked up once per distinct table object."""
    tables = list(map(_TABLE, events))
    by_id = dict(zip(map(id, tables), tables, strict=True))
    out: dict[str, int] = {}
    for key, n in Tally(map(id, tables)).items():
        name = by_id[key].qualified_name
        out[name] = out.get(name, 0) + n
    return out


_TABLE = attrgetter("table")


class SinkMetrics:
    """One sink stage's metrics (`cdc sink --sink-id X`)."""

    def __init__(self, pipeline: str, sink: str, max_tables: int = DEFAULT_MAX_TABLES) -> None:
        self.pipeline = pipeline
        self.sink = sink
        self.registry = _registry()
        self.table = TableLabels(max_tables)
        r = self.registry
        labels = ["pipeline", "sink"]
        self.batches = Counter(
            "cdc_sink_batches_total",
            "Batches handled, by result: written (durable, acked) or rejected (to be resent)",
            [*labels, "result"],
            registry=r,
        )
        self.events = Counter(
            "cdc_sink_events_total",
            "Changes made durable (written, or dead-lettered), per source table",
            [*labels, "table"],
            registry=r,
        )
        self.skipped = Counter(
            "cdc_sink_events_skipped_total",
            "Changes skipped because they were applied before (a replayed batch)",
            labels,
            registry=r,
        )
        self.dead_letters = Counter(
            "cdc_sink_dead_letters_total",
            "Changes the destination rejected, stored in the dead-letter table",
            labels,
            registry=r,
        )
        self.retries = Counter(
            "cdc_sink_write_retries_total",
            "Write attempts retried after a transient destination error",
            labels,
            registry=r,
        )
        self.in_flight = Gauge(
            "cdc_sink_in_flight_batches",
            "Batches received and not yet acknowledged (decoded ahead or being written)",
            labels,
            registry=r,
        )
        self.batch_events = WeightedHistogram(
            "cdc_sink_batch_events", "Events per batch received", labels, BATCH_SIZE_BUCKETS, r
        )
        self.write_seconds = WeightedHistogram(
            "cdc_sink_write_seconds",
            "Time to make one batch durable at the destination, retries included",
            labels,
            LATENCY_BUCKETS,
            r,
        )
        self.end_to_end = WeightedHistogram(
            "cdc_sink_end_to_end_latency_seconds",
            "Per change: source commit time to durable at the destination (replays excluded)",
            labels,
            LATENCY_BUCKETS,
            r,
        )
        self.ready = Gauge(
            "cdc_sink_ready",
            "1 while the destination is reachable (/readyz 200), else 0",
            labels,
            registry=r,
        )
        self._retries_seen = 0
        # Children created up front: every series exists from the first scrape.
        for result in ("written", "rejected"):
            self.batches.labels(pipeline, sink, result)
        self.skipped.labels(pipeline, sink)
        self.dead_letters.labels(pipeline, sink)
        self.retries.labels(pipeline, sink)
        self.in_flight.labels(pipeline, sink)

    def written(
        self,
        events: Sequence[Any],
        skipped: int,
        dead_lettered: int,
        seconds: float,
        now_us: int,
    ) -> None:
        """One batch made durable. `events` in stream order; the first `skipped` ones were
        applied before (a replay), so they count for neither throughput nor latency."""
        p, s = self.pipeline, self.sink
        self.batches.labels(p, s, "written").inc()
        self.batch_events.labels(p, s).observe(len(events))
        self.write_seconds.labels(p, s).observe(seconds)
        if skipped:
            self.skipped.labels(p, s).inc(skipped)
        if dead_lettered:
            self.dead_letters.labels(p, s).inc(dead_lettered)
        fresh = events[skipped:] if skipped else events
        per_table: dict[int, tuple[str, int]] = {}
        latency = self.end_to_end.labels(p, s)
        run_time, run_count = -1, 0
        for ev in fresh:
            key = id(ev.table)
            seen = per_table.get(key)
            per_table[key] = (seen[0], seen[1] + 1) if seen else (ev.table.qualified_name, 1)
            # Changes of one transaction share its commit time and arrive together.
            commit_us = ev.commit_time_us
            if commit_us == run_time:
                run_count += 1
                continue
            if run_count and run_time > 0:
                latency.observe(max(0.0, (now_us - run_time) / 1e6), run_count)
            run_time, run_count = commit_us, 1
        if run_count and run_time > 0:
            latency.observe(max(0.0, (now_us - run_time) / 1e6), run_count)
        totals: dict[str, int] = {}
        for name, n in per_table.values():
            label = self.table(name)
            totals[label] = totals.get(label, 0) + n
        for table, n in totals.items():
            self.events.labels(p, s, table).inc(n)

    def written_batch(
        self,
        batch: SinkBatch,
        skipped: int,
        dead_lettered: int,
        seconds: float,
        now_us: int,
    ) -> None:
        """`written` for a batch, from its columnar blocks when it came as blocks (no row
        view is built for the metrics)."""
        if skipped or not batch.has_blocks:
            self.written(batch.events, skipped, dead_lettered, seconds, now_us)
            return
        p, s = self.pipeline, self.sink
        self.batches.labels(p, s, "written").inc()
        self.batch_events.labels(p, s).observe(len(batch))
        self.write_seconds.labels(p, s).observe(seconds)
        if dead_lettered:
            self.dead_letters.labels(p, s).inc(dead_lettered)
        latency = self.end_to_end.labels(p, s)
        totals: dict[str, int] = {}
        for block in batch.blocks:
            if not len(block):
                continue
            label = self.table(block.schema.qualified_name)
            totals[label] = totals.get(label, 0) + len(block)
            times = pc.value_counts(block.records.column(COMMIT_TIME).cast(pa.int64()))
            for commit_us, count in zip(
                times.field("values").to_pylist(), times.field("counts").to_pylist(), strict=True
            ):
                if commit_us > 0:
                    latency.observe(max(0.0, (now_us - commit_us) / 1e6), count)
        for table, n in totals.items():
            self.events.labels(p, s, table).inc(n)

    def rejected(self) -> None:
        self.batches.labels(self.pipeline, self.sink, "rejected").inc()

    def writer_retries(self, total: int) -> None:
        """The writer's own retry count so far (it counts; this process exports)."""
        if total > self._retries_seen:
            self.retries.labels(self.pipeline, self.sink).inc(total - self._retries_seen)
            self._retries_seen = total


def sample_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name a registry can expose (`x_total`, `x_bucket`, ...), whether or
    not a series of it exists yet: what a dashboard query may refer to."""
    names: set[str] = set()
    for family in registry.collect():
        names.update(_family_sample_names(family.name, family.type))
        names.update(sample.name for sample in family.samples)
    return names


def _family_sample_names(name: str, kind: str) -> Iterator[str]:
    if kind == "counter":
        yield f"{name}_total"
        yield f"{name}_created"
    elif kind == "histogram":
        for suffix in ("_bucket", "_sum", "_count", "_created"):
            yield name + suffix
    elif kind == "summary":
        for suffix in ("", "_sum", "_count", "_created"):
            yield name + suffix
    else:
        yield name
