"""`cdc stack up | status | down [--dir DIR] [--with s3,pubsub,kinesis]`: the local platform
without Docker (services/stack/local_stack.py; docs/local-stack.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EXIT_DOWN = 1


def register(sub: Any) -> None:
    """Add the `stack` command to the `cdc` sub-command parsers."""
    stack = sub.add_parser(
        "stack",
        help="start, check or stop the local platform (PostgreSQL, Kafka, registry, Connect)",
    )
    actions = stack.add_subparsers(dest="stack_command", required=True)

    def with_dir(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument(
            "--dir", type=Path, default=Path(".cdc-stack"), help="state directory (.cdc-stack)"
        )
        return parser

    up = with_dir(actions.add_parser("up", help="start the stack in the background"))
    up.add_argument(
        "--with",
        dest="extras",
        default="",
        metavar="PARTS",
        help="also start: s3 (SeaweedFS), pubsub (Pub/Sub emulator), kinesis (moto)",
    )
    up.add_argument(
        "--kafka-storage",
        choices=("memory", "s3"),
        default="memory",
        help="where Tansu keeps topics: memory (lost on down) or s3 (SeaweedFS; adds s3)",
    )
    up.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for health")
    up.set_defaults(func=cmd_up)
    status = with_dir(actions.add_parser("status", help="is every part up? (exit 1 if not)"))
    status.add_argument("--json", action="store_true", help="JSON instead of a table")
    status.set_defaults(func=cmd_status)
    with_dir(actions.add_parser("down", help="stop everything `up` started")).set_defaults(
        func=cmd_down
    )


def _print_endpoints(directory: Path, stack_json: dict[str, Any]) -> None:
    pg = stack_json.get("postgres", {})
    print("endpoints:")
    if pg:
        print(
            f"  postgres         {pg['host']}:{pg['port']}  user {pg['username']}"
            f"  database {pg['database']}  (password in {directory / 'stack.json'})"
        )
    simple = {
        "kafka": ("bootstrap_servers", "kafka"),
        "schema_registry": ("url", "schema registry"),
        "connect": ("url", "kafka connect"),
        "s3": ("endpoint_url", "s3"),
        "pubsub": ("emulator_host", "pubsub"),
        "kinesis": ("endpoint_url", "kinesis"),
    }
    for key, (field, label) in simple.items():
        if key in stack_json:
            print(f"  {label:<16} {stack_json[key][field]}")
    print(f"files: {directory / 'platform.yaml'}, {directory / 'pipeline.yaml'} (sample),")
    print(f"       {directory / 'stack.json'}")
    print("next:")
    print(
        f"  cdc validate {directory / 'pipeline.yaml'} --platform-config"
        f" {directory / 'platform.yaml'}"
    )
    print(
        f"  cdc run {directory / 'pipeline.yaml'} --platform-config {directory / 'platform.yaml'}"
    )
    print(f"  cdc stack down --dir {directory}")


def cmd_up(args: argparse.Namespace) -> int:
    from services.stack import local_stack

    directory = args.dir.absolute()
    try:
        extras = local_stack.parse_extras(args.extras, args.kafka_storage)
        print(f"starting the local stack in {directory} ...", flush=True)
        result = local_stack.up(
            directory,
            extras,
            timeout=args.timeout,
            progress=lambda line: print(f"  {line}", flush=True),
            kafka_storage=args.kafka_storage,
        )
    except local_stack.StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if result.already_running:
        print(f"the stack in {directory} is already running (`cdc stack status --dir {directory}`)")
    else:
        print("the stack is up (it keeps running in the background)")
    _print_endpoints(directory, result.stack_json)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from services.stack import local_stack

    directory = args.dir.absolute()
    try:
        state, rows = local_stack.status(directory)
    except local_stack.StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DOWN
    if state is None:
        if args.json:
            print(json.dumps({"status": "not running", "parts": []}))
        else:
            print(f"no stack runs in {directory} (start one with `cdc stack up --dir {directory}`)")
        return EXIT_DOWN
    daemon_up = state.daemon_alive()
    all_up = daemon_up and state.status == "running" and all(row.up for row in rows)
    if args.json:
        print(
            json.dumps(
                {
                    "status": state.status if daemon_up else "daemon gone",
                    "up": all_up,
                    "parts": [vars(row) for row in rows],
                },
                indent=2,
            )
        )
        return 0 if all_up else EXIT_DOWN
    print(f"stack in {directory}: {state.status}" + ("" if daemon_up else " (its daemon is gone)"))
    for row in rows:
        mark = "up  " if row.up else "DOWN"
        print(f"  {mark} {row.name:<16} {row.endpoint:<28} {row.what} ({row.detail})")
    if state.error:
        print(f"  error: {state.error}")
    return 0 if all_up else EXIT_DOWN


def cmd_down(args: argparse.Namespace) -> int:
    from services.stack import local_stack

    directory = args.dir.absolute()
    try:
        state = local_stack.down(directory)
    except local_stack.StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if state is None:
        print(f"no stack runs in {directory}; nothing to stop")
        return 0
    names = ", ".join(part.name for part in state.parts) or "nothing"
    print(f"stopped: {names} (data kept in {directory}; remove it for a clean slate)")
    return 0
