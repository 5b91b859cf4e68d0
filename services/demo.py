"""`make demo`: a whole pipeline on an embedded PostgreSQL, checked row by row.

Starts a throwaway PostgreSQL (pip-installed binaries, logical replication on), creates two
tables with rows, runs `cdc run` in `direct` mode into a second database, streams inserts,
updates and deletes while printing progress, then compares every table and prints
throughput and end-to-end latency. Leaves nothing running.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg
import yaml

from services.net import find_free_port
from services.stack.postgres import PostgresServer
from services.supervisor import cdc_command

TABLES = ("public.orders", "public.customers")
SEED_ROWS = 20_000
STREAM_CHANGES = int(os.environ.get("CDC_DEMO_CHANGES", "60000"))


def _say(text: str) -> None:
    print(text, flush=True)


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _replicated_rows(replica: psycopg.Connection) -> int:
    try:
        row = replica.execute(
            "SELECT (SELECT count(*) FROM public.orders) + (SELECT count(*) FROM public.customers)"
        ).fetchone()
    except psycopg.errors.UndefinedTable:
        return 0
    return int(row[0]) if row else 0


def _snapshot(conn: psycopg.Connection, table: str) -> list[tuple[object, ...]]:
    return conn.execute(f"SELECT * FROM {table} ORDER BY id").fetchall()


def main() -> int:
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="cdc-demo-"))
    _say("cdc-platform demo: PostgreSQL -> ingest -> gRPC -> sink -> PostgreSQL (direct mode)")
    server = PostgresServer().start()
    _say(f"  embedded PostgreSQL on 127.0.0.1:{server.port} ({server.bin_dir})")
    server.create_database("shop")
    server.create_database("replica")
    source = psycopg.connect(server.dsn("shop"), autocommit=True)
    replica = psycopg.connect(server.dsn("replica"), autocommit=True)
    source.execute(
        "CREATE TABLE public.customers (id bigint PRIMARY KEY, name text NOT NULL,"
        " email text, profile jsonb, created_at timestamptz DEFAULT now());"
        "CREATE TABLE public.orders (id bigint PRIMARY KEY, customer_id bigint,"
        " amount numeric(12,2) NOT NULL, status text, token uuid DEFAULT gen_random_uuid(),"
        " placed_at timestamptz DEFAULT now());"
        "INSERT INTO public.customers (id, name, email, profile) SELECT g, 'customer ' || g,"
        " 'c' || g || '@example.com', jsonb_build_object('tier', g % 3)"
        f" FROM generate_series(1, {SEED_ROWS // 4}) g;"
        "INSERT INTO public.orders (id, customer_id, amount, status) SELECT g, g % 5000 + 1,"
        f" (g * 0.37)::numeric(12,2), 'new' FROM generate_series(1, {SEED_ROWS}) g"
    )
    _say(f"  source tables created with {SEED_ROWS + SEED_ROWS // 4:,} rows")

    health_port = find_free_port()
    pipeline = {
        "pipeline_id": "demo",
        "source": {
            "host": server.host,
            "port": server.port,
            "database": "shop",
            "username": "postgres",
            "tables": list(TABLES),
            "snapshot_mode": "initial",
        },
        "sinks": [
            {
                "sink_id": "replica",
                "sink_type": "postgres",
                "postgres": {
                    "host": server.host,
                    "port": server.port,
                    "database": "replica",
                    "target_schema": "public",
                    "write_mode": "upsert",
                },
            }
        ],
    }
    platform = {
        "transport_mode": "direct",
        "health_port": health_port,
        "ingest": {"grpc_port": find_free_port()},
    }
    (workdir / "pipeline.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    (workdir / "platform.yaml").write_text(yaml.safe_dump(platform, sort_keys=False))
    log_path = workdir / "cdc-run.log"
    log = log_path.open("wb")
    run = subprocess.Popen(
        [
            *cdc_command(),
            "run",
            str(workdir / "pipeline.yaml"),
            "--platform-config",
            str(workdir / "platform.yaml"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, CDC_LOG_LEVEL=os.environ.get("CDC_LOG_LEVEL", "WARNING")),
    )
    ok = False
    try:
        deadline = time.monotonic() + 60
        while not _ready(health_port):
            if time.monotonic() > deadline or run.poll() is not None:
                raise RuntimeError("pipeline did not become ready; see " + str(log_path))
            time.sleep(0.2)
        _say(f"  `cdc run` is up: /readyz 200 on port {health_port}; snapshot streaming")
        total_seed = SEED_ROWS + SEED_ROWS // 4
        while _replicated_rows(replica) < total_seed:
            time.sleep(0.2)
        _say(f"  snapshot replicated: {total_seed:,} rows")

        rng = random.Random(42)
        stream_start = time.monotonic()
        made = 0
        next_id = SEED_ROWS + 1
        last_report = 0.0
        with psycopg.connect(server.dsn("shop")) as writer:
            while made < STREAM_CHANGES:
                with writer.transaction(), writer.cursor() as cur:
                    inserts = [
                        (next_id + i, rng.randint(1, 5000), rng.randint(100, 99999) / 100)
                        for i in range(60)
                    ]
                    next_id += 60
                    cur.executemany(
                        "INSERT INTO public.orders (id, customer_id, amount, status)"
                        " VALUES (%s, %s, %s, 'new')",
                        inserts,
                    )
                    lo = rng.randint(1, max(1, next_id - 200))
                    cur.execute(
                        "UPDATE public.orders SET status = 'paid', amount = amount + 1"
                        " WHERE id BETWEEN %s AND %s",
                        (lo, lo + 29),
                    )
                    updated = cur.rowcount
                    cur.execute(
                        "DELETE FROM public.orders WHERE id BETWEEN %s AND %s",
                        (lo + 100, lo + 109),
                    )
                    made += 60 + updated + cur.rowcount
                now = time.monotonic()
                if now - last_report > 1.0:
                    last_report = now
                    _say(
                        f"    changes made {made:>7,}   replica rows "
                        f"{_replicated_rows(replica):>7,}"
                    )
        made_at = time.monotonic()
        expected = {t: _snapshot(source, t) for t in TABLES}
        deadline = time.monotonic() + 120
        while True:
            current = {t: _snapshot(replica, t) for t in TABLES}
            if current == expected:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("replica did not converge; see " + str(log_path))
            time.sleep(0.1)
        converged_at = time.monotonic()
        stream_seconds = converged_at - stream_start

        latencies = []
        for i in range(30):
            probe_id = 10_000_000 + i
            t0 = time.monotonic()
            source.execute(
                "INSERT INTO public.orders (id, amount, status) VALUES (%s, 1, 'probe')",
                (probe_id,),
            )
            while not replica.execute(
                "SELECT 1 FROM public.orders WHERE id = %s", (probe_id,)
            ).fetchone():
                time.sleep(0.002)
            latencies.append((time.monotonic() - t0) * 1000)
            if os.environ.get("CDC_DEMO_DEBUG"):
                _say(f"    probe {i}: {latencies[-1]:.0f} ms")
        expected = {t: _snapshot(source, t) for t in TABLES}
        deadline = time.monotonic() + 30
        while {t: _snapshot(replica, t) for t in TABLES} != expected:
            if time.monotonic() > deadline:
                raise RuntimeError("replica differs after latency probes")
            time.sleep(0.1)
        rows = sum(len(v) for v in expected.values())
        _say("")
        _say(
            "  result: every sink table equals its source table, row by row "
            f"({rows:,} rows in {len(TABLES)} tables)"
        )
        _say(
            f"  streamed changes:   {made:,} (inserts, updates, deletes) "
            f"+ {total_seed:,} snapshot rows"
        )
        _say(
            f"  throughput:         {made / stream_seconds:,.0f} changes/s end to end "
            f"(made in {made_at - stream_start:.1f}s, replicated by {stream_seconds:.1f}s)"
        )
        _say(
            f"  latency (commit -> visible in replica, 30 probes): "
            f"p50 {statistics.median(latencies):.0f} ms, max {max(latencies):.0f} ms"
        )
        ok = True
    finally:
        run.send_signal(signal.SIGTERM)
        try:
            code = run.wait(60)
        except subprocess.TimeoutExpired:
            run.kill()
            code = -9
        log.close()
        source.close()
        replica.close()
        server.cleanup()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        if not ok:
            sys.stderr.write(log_path.read_text(errors="replace")[-3000:])
    _say(f"  clean shutdown: cdc run exited {code}; demo took {time.monotonic() - started:.0f}s")
    return 0 if ok and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
