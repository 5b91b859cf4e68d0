"""`python -m bench.kinesis`: transport_mode kinesis through moto_server next to direct, in
one run on one embedded PostgreSQL, plus moto's own ceiling (our publisher alone, our source
alone). Prints a markdown section for docs/benchmarks.md.

- direct: `cdc ingest` (WAL) -> `cdc sink` (the runners.ours measurement of `make bench`);
- kinesis: `cdc capture` (WAL -> Kinesis) -> moto -> `cdc ingest` -> `cdc sink`, default
  settings but `kinesis.shard_count` (2) and `poll_interval_seconds` (0.05: the default 1 s
  idle wait would dominate the latency figures);
- throughput: a backlog made before the pipeline starts, first -> last sink commit;
- latency: a steady rate with the pipeline running, per row source commit -> sink commit
  (pg_xact_commit_timestamp on both sides);
- moto alone: the same publisher and source code without PostgreSQL or sinks: N changes of
  ~200-byte rows published (put_records), then read back (get_records + decode + ack).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from bench import runners, workload
from services.stack.postgres import PostgresServer

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _kinesis_platform(
    path: Path, endpoint_url: str, shards: int, tag: str, wal: dict[str, Any] | None = None
) -> None:
    platform = yaml.safe_load(path.read_text())
    if wal:
        platform["wal_reader"] = dict(wal)
    platform["transport_mode"] = "kinesis"
    platform["kinesis"] = {
        "region": "us-east-1",
        "endpoint_url": endpoint_url,
        "shard_count": shards,
        "checkpoint_table_name": f"bench-{tag}",
        "poll_interval_seconds": 0.05,
    }
    path.write_text(yaml.safe_dump(platform, sort_keys=False))


def through_kinesis(
    ws: runners.Workspace,
    endpoint_url: str,
    shards: int,
    spec: workload.BacklogSpec | None,
    steady: workload.SteadySpec | None,
    wal: dict[str, Any] | None = None,
) -> runners.Measurement:
    mode = "steady" if steady is not None else "backlog"
    tag = f"kinesis_{mode}{'_tuned' if wal else ''}"
    source, sink, slot, _pub = ws.fresh(tag)
    src_dsn, dst_dsn = ws.server.dsn(source), ws.server.dsn(sink)
    changes = workload.backlog(src_dsn, spec) if spec is not None else 0
    pipeline_path, platform_path, health_port = runners._write_configs(ws, tag, source, sink, slot)
    pipeline = yaml.safe_load(pipeline_path.read_text())
    pipeline["topic_prefix"] = f"b{uuid.uuid4().hex[:6]}"
    pipeline_path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    _kinesis_platform(platform_path, endpoint_url, shards, uuid.uuid4().hex[:6], wal)
    configs = [str(pipeline_path), "--platform-config", str(platform_path)]
    cli = [sys.executable, "-m", "services.cli.main"]
    sink_port = runners.find_free_port()
    logs = {n: ws.workdir / f"{tag}-{n}.log" for n in ("sink", "ingest", "capture")}
    procs: dict[str, Any] = {}
    sampler = ws.sampler()
    try:
        procs["sink"] = runners._spawn(
            [*cli, "sink", *configs, "--sink-id", "replica", "--port", str(sink_port)],
            logs["sink"],
            ws.product_root,
        )
        procs["capture"] = runners._spawn(
            [*cli, "capture", *configs, "--http-port", str(runners.find_free_port())],
            logs["capture"],
            ws.product_root,
        )
        procs["ingest"] = runners._spawn(
            [*cli, "ingest", *configs, "--sink-endpoint", f"replica=127.0.0.1:{sink_port}"],
            logs["ingest"],
            ws.product_root,
        )
        for name, proc in procs.items():
            sampler.watch(name, proc.pid)
        watched = {n: (p, logs[n]) for n, p in procs.items()}
        made = None
        if steady is not None:
            runners._wait_for("ingest /readyz", lambda: runners._ready(health_port), 90, watched)
            time.sleep(2)  # the capture's first poll of an empty slot
            made = workload.steady(src_dsn, steady)
            changes = made.changes
        runners._wait_for(
            "the end marker in the sink database",
            lambda: runners._has_end_marker(dst_dsn),
            ws.timeout,
            watched,
            0.05,
        )
        sampler.sample_now()
    finally:
        for proc in procs.values():
            runners._stop(proc)
    stats = sampler.stop()
    tuned = "" if not wal else ", " + ", ".join(f"wal_reader.{k} {v}" for k, v in wal.items())
    m = runners.Measurement(
        f"kinesis (moto, {shards} shards{tuned}) -> PostgreSQL sink", changes, processes=stats
    )
    if runners._count(src_dsn) != runners._count(dst_dsn):
        raise runners.MeasurementError("sink and source row counts differ")
    marks = runners._commit_times(
        dst_dsn, f"id IN ({workload.START_MARKER}, {workload.END_MARKER})"
    )
    m.last = marks[workload.END_MARKER]
    m.first = marks.get(workload.START_MARKER, 0.0)
    m.note = "first sink commit -> last sink commit"
    if made is not None:
        m.offered_rate = made.rate
        m.first = min(runners._commit_times(dst_dsn, "true").values())
        m.latency_ms = runners._row_latencies(src_dsn, dst_dsn)
    ws.drop(source, sink)
    return m


def moto_alone(endpoint_url: str, shards: int, changes: int) -> dict[str, float]:
    """changes/s of our publisher alone and our source alone against moto."""
    from adapters.kinesis.provisioner import KinesisProvisioner
    from adapters.kinesis.publisher import KinesisPublisher
    from adapters.kinesis.settings import KinesisSettings
    from adapters.kinesis.source import KinesisEventSource
    from domain.events import Column, Operation, Position, SourceEvent, TableSchema
    from domain.ports import DeliveryAck, OutboundBatch
    from services.capture.payload import ArrowBatchCodec

    tag = uuid.uuid4().hex[:6]
    settings = KinesisSettings(
        pipeline_id=f"ceiling{tag}",
        streams={"public.bench_rows": f"ceiling-{tag}"},
        shard_count=shards,
        lanes_per_table=shards,
        checkpoint_table=f"ceiling-{tag}",
        endpoint_url=endpoint_url,
        poll_interval_seconds=0.05,
        max_records_per_shard=1000,
    )
    table = TableSchema(
        "public",
        "bench_rows",
        (
            Column("id", 20, "bigint", True),
            Column("account", 23, "integer"),
            Column("status", 25, "text"),
            Column("amount", 1700, "numeric(12,2)"),
            Column("note", 25, "text"),
            Column("updated_at", 1184, "timestamp with time zone"),
        ),
    )
    note = "0123456789abcdef" * 8
    batch_events = 500  # ingest.batch_max_events' default: what the capture pump hands over

    async def scenario() -> dict[str, float]:
        await KinesisProvisioner(settings).provision()
        done = asyncio.Event()
        acked = 0

        async def on_ack(_: str, ack: DeliveryAck) -> None:
            nonlocal acked
            acked += ack.written
            if acked >= changes:
                done.set()

        publisher = KinesisPublisher(settings, ArrowBatchCodec(), on_ack)
        publisher.start()
        t0 = time.monotonic()
        for b in range(0, changes, batch_events):
            events = [
                SourceEvent(
                    Operation.CREATE,
                    table,
                    Position(1000 + i),
                    after=(str(i), str(i % 1000), "new", "12.34", note, "2026-01-01 00:00:00+00"),
                )
                for i in range(b, min(changes, b + batch_events))
            ]
            await publisher.send(OutboundBatch(b, settings.pipeline_id, ("slot",), events))
        await done.wait()
        put_s = time.monotonic() - t0
        await publisher.stop()
        source = KinesisEventSource(settings, ArrowBatchCodec(), max_buffered_records=5000)
        t0 = time.monotonic()
        await source.start()
        got = 0
        async for chunk in source.chunks():
            got += len(chunk.events)
            await source.ack(chunk.lane, [chunk.ack])
            if got >= changes:
                break
        get_s = time.monotonic() - t0
        await source.stop()
        await KinesisProvisioner(settings).teardown()
        return {
            "put": changes / put_s,
            "get": changes / get_s,
            "records": publisher.stats.records_put,
        }

    return asyncio.run(scenario())


def render(
    rows: list[tuple[str, runners.Measurement]], ceiling: dict[str, float], args: Any
) -> str:
    lines = [
        f"Run of `python -m bench.kinesis` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}:"
        f" backlog {args.bulk_rows:,} bulk rows + {args.clients} x {args.ops_per_client}"
        f" single-row transactions; steady {args.rate:,} changes/s for {args.seconds:.0f} s.",
        "",
        "| pipeline | changes | throughput (changes/s) | steady: offered/s | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    by_name: dict[str, dict[str, runners.Measurement]] = {}
    for kind, m in rows:
        by_name.setdefault(m.name, {})[kind] = m
    for name, kinds in by_name.items():
        tp = kinds.get("throughput")
        lat = kinds.get("latency")
        lines.append(
            f"| {name} | {tp.changes if tp else 0:,} | {tp.rows_per_s if tp else 0:,.0f} |"
            f" {lat.offered_rate if lat else 0:,.0f} |"
            f" {lat.latency_ms.get('p50', 0) if lat and lat.latency_ms else 0:,.0f} |"
            f" {lat.latency_ms.get('p99', 0) if lat and lat.latency_ms else 0:,.0f} |"
        )
    if ceiling:
        lines += [
            "",
            f"moto alone ({args.shards} shards, {args.ceiling_changes:,} changes of ~200-byte"
            f" rows, {ceiling.get('records', 0):,.0f} records): publish"
            f" {ceiling['put']:,.0f} changes/s, read back {ceiling['get']:,.0f} changes/s.",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kinesis", description=__doc__)
    p.add_argument("--bulk-rows", type=int, default=30_000)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--ops-per-client", type=int, default=500)
    p.add_argument("--rate", type=int, default=2000)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--ceiling-changes", type=int, default=50_000)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument(
        "--tuned",
        action="store_true",
        help="kinesis again with wal_reader.batch_size 500, batch_timeout_seconds 0.05",
    )
    args = p.parse_args(argv)
    for k, v in AWS_ENV.items():
        os.environ.setdefault(k, v)
    from services.stack import moto

    workdir = Path(tempfile.mkdtemp(prefix="bench-kinesis-"))
    print(f"bench.kinesis: work dir {workdir}", flush=True)
    spec = workload.BacklogSpec(args.bulk_rows, args.clients, args.ops_per_client)
    steady = workload.SteadySpec(rate=args.rate, seconds=args.seconds)
    server = PostgresServer(
        settings={"track_commit_timestamp": "on", "max_wal_size": "4GB"}
    ).start()
    emulator = moto.start(workdir / "moto")
    rows: list[tuple[str, runners.Measurement]] = []
    ceiling: dict[str, float] = {}
    failed = False
    try:
        ws = runners.Workspace(server, workdir, args.timeout)
        url = emulator.endpoint_url
        runs: list[tuple[str, Callable[[], runners.Measurement]]] = [
            ("throughput", lambda: runners.ours(ws, spec, None, discard=False)),
            ("throughput", lambda: through_kinesis(ws, url, args.shards, spec, None)),
            ("latency", lambda: runners.ours(ws, None, steady, discard=False)),
            ("latency", lambda: through_kinesis(ws, url, args.shards, None, steady)),
        ]
        tuned = {"batch_size": 500, "batch_timeout_seconds": 0.05}
        if args.tuned:
            runs += [
                ("throughput", lambda: through_kinesis(ws, url, args.shards, spec, None, tuned)),
                ("latency", lambda: through_kinesis(ws, url, args.shards, None, steady, tuned)),
            ]
        for kind, run in runs:
            try:
                m = run()
                rows.append((kind, m))
                print(
                    f"bench.kinesis: {kind} {m.name}: {m.rows_per_s:,.0f}/s {m.latency_ms or ''}",
                    flush=True,
                )
            except Exception:
                traceback.print_exc()
                failed = True
        try:
            ceiling = moto_alone(url, args.shards, args.ceiling_changes)
        except Exception:
            traceback.print_exc()
            failed = True
    finally:
        emulator.stop()
        server.stop()
    print(render(rows, ceiling, args))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
