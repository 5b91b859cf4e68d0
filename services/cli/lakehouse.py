"""`cdc lakehouse snapshots | query | rollback | compact | expire`: the Iceberg tables of one
sink (docs/lakehouse.md): their snapshots with the positions each stored, time travel,
rollback, and maintenance on demand."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

EXIT_CONFIG = 2


def add_parser(
    sub: Any, with_configs: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
) -> None:
    lake = sub.add_parser("lakehouse", help="Iceberg tables of a sink: snapshots, time travel")
    actions = lake.add_subparsers(dest="action", required=True)

    def common(name: str, help_text: str) -> argparse.ArgumentParser:
        p = with_configs(actions.add_parser(name, help=help_text))
        p.add_argument("--sink-id", required=True, help="an iceberg sink of the pipeline")
        p.add_argument(
            "--table",
            default=None,
            metavar="SCHEMA.TABLE",
            help="the source table (optional when the sink has one table)",
        )
        p.set_defaults(func=run)
        return p

    snapshots = common("snapshots", "list the snapshots with their stored positions")
    snapshots.add_argument("--json", action="store_true", help="one JSON object per line")
    query = common("query", "print the rows of the table at a snapshot or a time")
    when = query.add_mutually_exclusive_group()
    when.add_argument("--snapshot-id", type=int, default=None)
    when.add_argument("--as-of", default=None, metavar="TIME", help="ISO 8601 or epoch ms")
    query.add_argument("--limit", type=int, default=100, help="rows to print (0: all)")
    query.add_argument("--json", action="store_true", help="one JSON object per row")
    rollback = common("rollback", "make an earlier snapshot the current one")
    rollback.add_argument("--snapshot-id", type=int, required=True)
    rollback.add_argument("--yes", action="store_true", help="do not ask")
    common("compact", "rewrite small data files and position delete files")
    expire = common("expire", "expire old snapshots and delete the files only they used")
    expire.add_argument("--older-than-seconds", type=float, default=None)
    expire.add_argument("--retain-last", type=int, default=None)


class LakehouseError(Exception):
    pass


def run(args: argparse.Namespace) -> int:
    from services.cli.main import _load

    pipeline, _platform = _load(args)
    try:
        sink = pipeline.sink(args.sink_id)
    except (KeyError, ValueError) as exc:
        print(f"error: --sink-id: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if sink.sink_type != "iceberg" or sink.iceberg is None:
        print(
            f"error: --sink-id {args.sink_id}: sink_type is {sink.sink_type}, not iceberg",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    try:
        table = _table(pipeline, sink, args.table)
    except LakehouseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    action: Callable[[Any, argparse.Namespace, Any], int] = {
        "snapshots": _snapshots,
        "query": _query,
        "rollback": _rollback,
        "compact": _compact,
        "expire": _expire,
    }[args.action]
    try:
        return action(table, args, sink.iceberg)
    except LakehouseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _table(pipeline: Any, sink: Any, wanted: str | None) -> Any:
    from pyiceberg.exceptions import NoSuchTableError

    from adapters.iceberg.catalog import (
        has_placeholders,
        load_catalog,
        shown_uri,
        table_identifier,
    )
    from adapters.iceberg.dead_letters import TABLE as DEAD_LETTERS

    settings = sink.iceberg
    catalog = load_catalog(settings)
    if wanted is not None:
        if "." not in wanted:
            raise LakehouseError(f"--table {wanted!r}: give it as schema.table")
        schema, name = wanted.split(".", 1)
        ident = table_identifier(settings, schema, name)
    elif not has_placeholders(settings.table_name):
        ident = (settings.table_namespace, settings.table_name)
    else:
        try:
            names = [
                t for t in catalog.list_tables(settings.table_namespace) if t[-1] != DEAD_LETTERS
            ]
        except Exception:
            names = []
        if len(names) != 1:
            shown = ", ".join(".".join(t) for t in names) or "none yet"
            raise LakehouseError(
                f"sink '{sink.sink_id}' writes several tables ({shown}): choose one with"
                " --table schema.table"
            )
        ident = (str(names[0][0]), str(names[0][-1]))
    try:
        return catalog.load_table(ident)
    except NoSuchTableError:
        raise LakehouseError(
            f"no Iceberg table {'.'.join(ident)} in catalog {shown_uri(settings.catalog_uri)}"
            " (has the sink written to it yet?)"
        ) from None


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def _snapshots(table: Any, args: argparse.Namespace, settings: Any) -> int:
    from adapters.iceberg.table_sink import positions_of

    current = table.current_snapshot()
    rows = []
    for s in sorted(table.metadata.snapshots, key=lambda s: (s.timestamp_ms, s.sequence_number)):
        summary = s.summary
        props = dict(summary.additional_properties) if summary else {}
        rows.append(
            {
                "snapshot_id": s.snapshot_id,
                "parent_id": s.parent_snapshot_id,
                "timestamp_ms": s.timestamp_ms,
                "timestamp": _iso(s.timestamp_ms),
                "operation": summary.operation.value if summary else None,
                "current": current is not None and s.snapshot_id == current.snapshot_id,
                "positions": {k: f"{v.major}/{v.minor}" for k, v in positions_of(props).items()},
                "total_records": props.get("total-records"),
                "maintenance": props.get("cdc.maintenance"),
            }
        )
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    print(f"table {'.'.join(table.name())}")
    print(
        f"{'':1} {'snapshot_id':>20}  {'timestamp':29} {'operation':10} {'records':>9}  positions"
    )
    for r in rows:
        mark = "*" if r["current"] else " "
        positions = ", ".join(f"{k}={v}" for k, v in r["positions"].items())
        print(
            f"{mark} {r['snapshot_id']:>20}  {r['timestamp']:29} {r['operation'] or '':10}"
            f" {r['total_records'] or '':>9}  {positions}"
        )
    return 0


def _parse_time(text: str) -> datetime:
    if text.isdigit():
        return datetime.fromtimestamp(int(text) / 1000, UTC)
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise LakehouseError(f"--as-of {text!r}: not ISO 8601 nor epoch milliseconds") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _query(table: Any, args: argparse.Namespace, settings: Any) -> int:
    from adapters.iceberg.maintenance import as_of

    snapshot_id = args.snapshot_id
    if args.as_of is not None:
        when = _parse_time(args.as_of)
        snapshot_id = as_of(table, when)
        if snapshot_id is None:
            raise LakehouseError(f"--as-of {args.as_of}: the table had no snapshot yet")
    if snapshot_id is not None and table.metadata.snapshot_by_id(snapshot_id) is None:
        raise LakehouseError(f"--snapshot-id {snapshot_id}: no such snapshot (expired?)")
    scan = table.scan(snapshot_id=snapshot_id, limit=args.limit or None)
    data = scan.to_arrow()
    rows = data.to_pylist()
    if args.json:
        for r in rows:
            print(json.dumps(r, default=str))
        return 0
    names = data.column_names
    text = [[("" if r[n] is None else str(r[n])) for n in names] for r in rows]
    widths = [max([len(n)] + [len(t[i]) for t in text]) for i, n in enumerate(names)]
    print("  ".join(n.ljust(w) for n, w in zip(names, widths, strict=True)))
    for t in text:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths, strict=True)))
    print(f"({len(rows)} rows, snapshot {snapshot_id or 'current'})")
    return 0


def _rollback(table: Any, args: argparse.Namespace, settings: Any) -> int:
    target = table.metadata.snapshot_by_id(args.snapshot_id)
    if target is None:
        raise LakehouseError(f"--snapshot-id {args.snapshot_id}: no such snapshot (expired?)")
    current = table.current_snapshot()
    if current is not None and current.snapshot_id == target.snapshot_id:
        print(f"snapshot {target.snapshot_id} is already current")
        return 0
    name = ".".join(table.name())
    if not args.yes:
        if not sys.stdin.isatty():
            raise LakehouseError(
                "rollback asks for confirmation: run it on a terminal or pass --yes"
            )
        answer = input(
            f"Make snapshot {target.snapshot_id} ({_iso(target.timestamp_ms)}) current for"
            f" {name}? Later changes disappear from the current table (they stay readable by"
            " snapshot id until expired) [y/N] "
        )
        if answer.strip().lower() not in ("y", "yes"):
            print("cancelled")
            return 1
    table.manage_snapshots().set_current_snapshot(snapshot_id=target.snapshot_id).commit()
    print(f"{name}: snapshot {target.snapshot_id} is current")
    return 0


def _compact(table: Any, args: argparse.Namespace, settings: Any) -> int:
    from adapters.iceberg.maintenance import compact

    result = compact(table)
    print(
        f"{'.'.join(table.name())}: files {result.files_before} -> {result.files_after},"
        f" {result.rows} rows rewritten"
    )
    return 0


def _expire(table: Any, args: argparse.Namespace, settings: Any) -> int:
    from adapters.iceberg.maintenance import expire

    m = settings.maintenance
    older = (
        m.expire_snapshots_older_than_seconds
        if args.older_than_seconds is None
        else args.older_than_seconds
    )
    retain = m.retain_last_snapshots if args.retain_last is None else args.retain_last
    result = expire(table, older, retain)
    print(
        f"{'.'.join(table.name())}: {result.expired_snapshots} snapshots expired,"
        f" {result.deleted_files} files deleted"
    )
    return 0
