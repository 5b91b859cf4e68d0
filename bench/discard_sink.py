"""A SinkService that decodes each batch and acks it as written at once.

`python -m bench.discard_sink --port P --result FILE [--latency]`: when the workload's end
marker row arrives it writes {count, first, last, latency percentiles} to FILE (epoch
seconds) and keeps serving until SIGTERM. Isolates the pipeline from the destination's cost.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pyarrow as pa
import pyarrow.compute as pc

from bench.stats import latency_summary_ms, self_usage, write_json
from cdc_proto.v2 import events_pb2, sink_pb2, sink_pb2_grpc
from domain.ports import SinkBatch
from services.grpc_health import add_health, set_status
from services.wire import WIRE_VERSION, decode_batch


def _has_end_marker(batch: SinkBatch) -> bool:
    """The end marker row (first column -1, text or typed) is among the batch's changes."""
    return any(
        len(b)
        and b.schema.columns
        and pc.any(pc.equal(pc.cast(b.column(0), pa.string()), "-1")).as_py()
        for b in batch.blocks
    )


class DiscardServicer(sink_pb2_grpc.SinkServiceServicer):
    def __init__(self, result: Path, latency: bool) -> None:
        self.result = result
        self.latency = latency
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.latencies: list[float] = []
        self.done = False

    async def Describe(self, request: object, context: object) -> sink_pb2.DescribeReply:
        return sink_pb2.DescribeReply(wire_version=WIRE_VERSION, sink_id="discard")

    async def Deliver(
        self, request_iterator: AsyncIterator[events_pb2.EventBatch], context: object
    ) -> AsyncIterator[sink_pb2.BatchAck]:
        async for message in request_iterator:
            now = time.time()
            batch = decode_batch(message)
            if not self.first:
                self.first = now
            self.last = now
            self.count += len(batch)
            if self.latency:
                for block in batch.blocks:
                    times = block.records.column("@commit_time").cast(pa.int64()).to_pylist()
                    self.latencies.extend(now - us / 1e6 for us in times)
            if not self.done and _has_end_marker(batch):
                self.done = True
                self._report()
            yield sink_pb2.BatchAck(
                batch_id=message.batch_id,
                status=sink_pb2.ACK_STATUS_WRITTEN,
                written=len(batch),
            )

    def _report(self) -> None:
        write_json(
            self.result,
            {
                "count": self.count,
                "first": self.first,
                "last": self.last,
                "latency_ms": latency_summary_ms(self.latencies) if self.latency else None,
                **self_usage(),
            },
        )


async def serve(port: int, servicer: DiscardServicer) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 256 << 20)])
    sink_pb2_grpc.add_SinkServiceServicer_to_server(servicer, server)
    health = add_health(server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await set_status(health, True, "cdc.v2.SinkService")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--latency", action="store_true")
    args = parser.parse_args()
    asyncio.run(serve(args.port, DiscardServicer(args.result, args.latency)))


if __name__ == "__main__":
    main()
