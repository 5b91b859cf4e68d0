"""Webhook sink throughput: changes/s into a local receiver, for batch sizes 1, 100, 1000 and
max_in_flight_requests 1 and 4, in one run (docs/benchmarks.md "Webhook sink").

    python -m bench.webhook [--changes 20000] [--changes-batch-1 4000]

The writer gets the batches as the sink service does (wire-encoded, then decoded: Arrow
blocks), signs every request (hmac_secret set), and the time runs from the first write to
the end of flush() (everything acknowledged by the receiver); each configuration runs
`--repeat` times and the best run is shown (the shared machine is noisy). The receiver is a separate
process (an asyncio HTTP/1.1 server with keep-alive that counts the events of each body and
answers 200 at once), so it does not share this process's GIL.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime

from adapters.config.pipeline import WebhookSinkConfig
from adapters.webhook.sink import WebhookSinkWriter
from domain.events import Column, Operation, Position, SourceEvent, TableSchema
from domain.ports import SinkBatch
from services.net import find_free_port
from services.wire import decode_batch, encode_batch

ORDERS = TableSchema(
    "public",
    "orders",
    (
        Column("id", 20, "bigint", is_key=True),
        Column("customer_id", 20, "bigint"),
        Column("amount", 1700, "numeric(12,2)"),
        Column("note", 25, "text"),
        Column("placed_at", 1184, "timestamp with time zone"),
        Column("paid", 16, "boolean"),
        Column("profile", 3802, "jsonb"),
    ),
)
INGEST_BATCH = 2000  # ingest.batch_max_events default

RECEIVER = r"""
import asyncio, sys
count = 0
LATENCY = float(sys.argv[2]) / 1000
async def handle(reader, writer):
    global count
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length) if length else b""
            if LATENCY and not head.startswith(b"GET"):
                await asyncio.sleep(LATENCY)
            if head.startswith(b"GET /count"):
                out = str(count).encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(out), out))
            else:
                count += body.count(b'"id":"evt_')
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
    print("ready", flush=True)
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""


def make_batches(changes: int) -> list[SinkBatch]:
    now_us = int(datetime.now(UTC).timestamp() * 1_000_000)
    events = []
    for i in range(changes):
        op = Operation.CREATE if i % 3 else Operation.UPDATE
        row = (
            str(i % 5000),
            str(i % 97),
            f"{i % 100000}.{i % 100:02d}",
            f"note {i} " + "x" * 40,
            "2026-01-05 10:00:00.25+00",
            "t" if i % 2 else "f",
            '{"tier": 2, "tags": ["a", "b"]}',
        )
        events.append(
            SourceEvent(op, ORDERS, Position(1000 + i // 10, i), after=row, commit_time_us=now_us)
        )
    return [
        decode_batch(encode_batch(n + 1, "bench", "slot", events[i : i + INGEST_BATCH]))
        for n, i in enumerate(range(0, changes, INGEST_BATCH))
    ]


def received(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/count", timeout=5) as resp:
        return int(resp.read())


async def measure(url: str, batches: list[SinkBatch], batch_size: int, in_flight: int) -> float:
    settings = WebhookSinkConfig.model_validate(
        {
            "url": url,
            "batch_size": batch_size,
            "max_in_flight_requests": in_flight,
            "hmac_secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "linger_ms": 20,
        }
    )
    writer = WebhookSinkWriter(settings, "bench", "hook", router=None)
    await writer.start()
    try:
        started = time.perf_counter()
        for batch in batches:
            await writer.write(batch)
        await writer.flush()
        return time.perf_counter() - started
    finally:
        await writer.stop()


def main(argv: list[str] | None = None) -> int:
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=20_000)
    parser.add_argument("--changes-batch-1", type=int, default=2_000)
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per configuration; the best is shown"
    )
    parser.add_argument(
        "--latency-ms",
        type=float,
        action="append",
        help="the receiver's answer delay per request; repeatable (default: 0 and 10)",
    )
    args = parser.parse_args(argv)
    sets = {n: make_batches(n) for n in {args.changes, args.changes_batch_1}}
    print(
        "| receiver latency | batch_size | max_in_flight_requests | changes | seconds | changes/s |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for latency in args.latency_ms or [0.0, 10.0]:
        port = find_free_port()
        receiver = subprocess.Popen(
            [sys.executable, "-c", RECEIVER, str(port), str(latency)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert receiver.stdout is not None and receiver.stdout.readline().strip() == "ready"
            url = f"http://127.0.0.1:{port}/hook"
            for batch_size in (1, 100, 1000):
                n = args.changes_batch_1 if batch_size == 1 else args.changes
                for in_flight in (1, 4):
                    times = []
                    for _ in range(args.repeat):
                        before = received(port)
                        times.append(asyncio.run(measure(url, sets[n], batch_size, in_flight)))
                        got = received(port) - before
                        if got != n:
                            print(f"receiver counted {got}, expected {n}", file=sys.stderr)
                            return 1
                    seconds = min(times)
                    print(
                        f"| {latency:g} ms | {batch_size} | {in_flight} | {n} | {seconds:.2f}"
                        f" | {n / seconds:,.0f} |"
                    )
        finally:
            receiver.terminate()
            receiver.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
