"""The WAL reader alone: PostgresWalSource draining a slot, committing every checkpoint.

No ingest service, no gRPC, no sink: what it costs to read and decode pgoutput into
events, to compare with pg_recvlogical reading the same slot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from adapters.postgres.source.reader import PostgresWalSource, WalReaderSettings


async def drain(args: argparse.Namespace) -> dict[str, float]:
    source = PostgresWalSource(
        WalReaderSettings(
            conninfo=args.dsn,
            database=args.db,
            tables=(args.table,),
            slot_name=args.slot,
            publication_name=args.publication,
            snapshot_mode="never",
            heartbeat_mode="none",
            max_chunk_events=2000,
        )
    )
    started = time.time()
    await source.start()
    count = 0
    first = 0.0
    async for chunk in source.chunks():
        if chunk.events and not first:
            first = time.time()
        count += len(chunk.events)
        if chunk.ack is not None:
            await source.ack(chunk.lane, [chunk.ack])
        if count >= args.expect:
            break
    last = time.time()
    await source.stop()
    return {"started": started, "first": first, "last": last, "count": count}


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("dsn", "db", "slot", "publication", "table", "result"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--expect", type=int, required=True)
    args = parser.parse_args()
    result = asyncio.run(drain(args))
    Path(args.result).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
