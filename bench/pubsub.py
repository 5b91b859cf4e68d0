"""`python -m bench.pubsub`: transport_mode pubsub through Google's Pub/Sub emulator next to
direct, in one run on one embedded PostgreSQL, plus the emulator's own ceiling.

- throughput: the same backlog (made before the pipeline starts) drained by
  direct (`cdc ingest` -> `cdc sink`) and by pubsub (`cdc capture` -> emulator ->
  `cdc ingest` -> `cdc sink`); rows/s from the first to the last sink commit;
- latency: a steady rate while the pipeline runs; per row, source commit -> sink commit;
- ceiling: publish N messages with the publisher client and pull them back with our
  source, no pipeline: messages/s for one-change messages and for 500-change messages
  (the capture's payload, bytes of the same size).

Prints a markdown table (docs/benchmarks.md, "Pub/Sub transport").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from bench import runners, workload
from services.stack import pubsub_emulator
from services.stack.postgres import PostgresServer


def ceiling(messages: int, payload_bytes: int, lanes: int = 8) -> tuple[float, float]:
    """(published messages/s, pulled-and-acked messages/s) through the emulator alone."""
    import uuid

    from google.cloud import pubsub_v1

    from adapters.pubsub.naming import PipelineNames
    from adapters.pubsub.provisioner import PubSubProvisioner, SubscriptionSettings
    from adapters.pubsub.source import PubSubEventSource, SourceSettings

    names = PipelineNames.of("bench", "ceiling", uuid.uuid4().hex[:8], "dlq")
    provisioner = PubSubProvisioner(names, SubscriptionSettings(ordered=True))
    asyncio.run(provisioner.provision())
    publisher = pubsub_v1.PublisherClient(
        publisher_options=pubsub_v1.types.PublisherOptions(enable_message_ordering=True)
    )
    data = os.urandom(payload_bytes)
    t0 = time.monotonic()
    futures = [
        publisher.publish(names.topic_path, data, ordering_key=f"k{i % lanes}")
        for i in range(messages)
    ]
    for f in futures:
        f.result(120)
    published = messages / (time.monotonic() - t0)
    publisher.stop()

    class Raw:  # the payload is not decoded: the pipeline's decoding is not the emulator's
        def decode(self, data: bytes) -> list[object]:
            return [None]

        def encode(self, *args: object) -> bytes:
            return b""

    async def pull() -> float:
        source = PubSubEventSource(
            SourceSettings(names.subscription_path, None, max_outstanding_messages=5000),
            Raw(),  # type: ignore[arg-type]
        )
        await source.start()
        got = 0
        chunks = source.chunks()
        start = time.monotonic()
        while got < messages:
            chunk = await asyncio.wait_for(anext(chunks), 60)
            got += len(chunk.ack)
            await source.ack(chunk.lane, [chunk.ack])
        seconds = time.monotonic() - start
        await source.stop()
        return got / seconds

    pulled = asyncio.run(pull())
    provisioner.teardown_report()
    return published, pulled


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.pubsub", description=__doc__)
    p.add_argument("--bulk-rows", type=int, default=30_000)
    p.add_argument("--rate", type=int, default=2000, help="steady changes/s")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    spec = workload.BacklogSpec(bulk_rows=args.bulk_rows, clients=4, ops_per_client=500)
    steady = workload.SteadySpec(rate=args.rate, seconds=args.seconds)
    workdir = Path(tempfile.mkdtemp(prefix="bench-pubsub-"))
    emulator = pubsub_emulator.start(workdir / "emulator")
    os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host_port
    server = PostgresServer(settings={"track_commit_timestamp": "on", "max_wal_size": "4GB"})
    server.start()
    rows: list[str] = []
    try:
        ws = runners.Workspace(server, workdir, args.timeout)
        for transport, lanes in (("direct", 0), ("pubsub", 8), ("pubsub", 1)):
            if lanes:
                os.environ["BENCH_PUBSUB_LANES"] = str(lanes)
            tp = runners.ours(ws, spec, None, discard=False, transport=transport)
            lat = runners.ours(ws, None, steady, discard=False, transport=transport)
            assert lat.latency_ms is not None
            label = f"{transport}, {lanes} lane{'s' if lanes > 1 else ''}" if lanes else transport
            rows.append(
                f"| {label} | {tp.changes:,} | {tp.rows_per_s:,.0f} |"
                f" {lat.offered_rate:,.0f} | {lat.latency_ms['p50']:.0f} |"
                f" {lat.latency_ms['p99']:.0f} |"
            )
            print(rows[-1], flush=True)
        for count, size in ((5000, 200), (500, 100_000)):
            published, pulled = ceiling(count, size)
            rows.append(
                f"| emulator alone, {count:,} x {size:,}-byte messages | | publish"
                f" {published:,.0f} msg/s | pull+ack {pulled:,.0f} msg/s | | |"
            )
            print(rows[-1], flush=True)
    finally:
        server.stop()
        emulator.stop()
    print("| transport | changes | rows/s (backlog) | steady changes/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"work dir: {workdir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
