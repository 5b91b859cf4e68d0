"""The `cdc` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

EXIT_CONFIG = 2


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from adapters.config import load_pipeline, load_platform

    platform = load_platform(args.platform_config)
    pipeline = load_pipeline(args.pipeline, platform=platform)
    return pipeline, platform


def _adapter_errors(args: argparse.Namespace, pipeline: Any, platform: Any) -> list[Any]:
    """What services/registry.py refuses (a transport or enabled sink type without an adapter,
    a setting nothing would read), as ConfigErrors with file and line."""
    from adapters.config import config_error
    from services import registry

    found = registry.check(pipeline, platform)
    errors = []
    if found.platform:
        errors.append(config_error(args.platform_config, found.platform))
    if found.pipeline:
        errors.append(config_error(args.pipeline, found.pipeline))
    return errors


def _refuse_unsupported(args: argparse.Namespace, pipeline: Any, platform: Any) -> None:
    """For the commands that start stages: one StartupError (exit 2, one line) naming every
    refused setting."""
    from services.lifecycle import StartupError

    errors = _adapter_errors(args, pipeline, platform)
    if errors:
        raise StartupError("; ".join(str(e).replace("\n", "; ") for e in errors))


def _parse_endpoints(values: Sequence[str], env_var: str = "CDC_SINK_ENDPOINTS") -> dict[str, str]:
    items = list(values)
    env = os.environ.get(env_var, "")
    items += [v for v in env.split(",") if v.strip()]
    endpoints: dict[str, str] = {}
    for item in items:
        sink_id, sep, target = item.strip().partition("=")
        if not sep or not sink_id or ":" not in target:
            raise SystemExit(f"error: bad sink endpoint {item!r}, expected SINK_ID=HOST:PORT")
        endpoints.setdefault(sink_id, target)
    return endpoints


def cmd_validate(args: argparse.Namespace) -> int:
    from services.ops import SourceChecksSkipped, source_warnings

    pipeline, platform = _load(args)
    errors = _adapter_errors(args, pipeline, platform)
    if errors:
        for error in errors:
            print(f"error: not supported by this release\n{error}", file=sys.stderr)
        return EXIT_CONFIG
    print(
        f"ok: pipeline '{pipeline.pipeline_id}' ({len(pipeline.enabled_sinks)} enabled sink(s)),"
        f" transport_mode {platform.transport_mode}"
    )
    # Checks against the source database: warnings only, never a failure.
    try:
        for warning in asyncio.run(source_warnings(pipeline, platform)):
            print(f"warning: {warning}", file=sys.stderr)
    except SourceChecksSkipped as exc:
        print(f"note: source checks skipped, the source is not reachable: {exc}", file=sys.stderr)
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from services.ingest.main import run_ingest
    from services.logging import setup_logging

    pipeline, platform = _load(args)
    setup_logging(f"ingest:{pipeline.pipeline_id}")
    _refuse_unsupported(args, pipeline, platform)
    endpoints = _parse_endpoints(args.sink_endpoint or [])
    http = _parse_endpoints(args.sink_http_endpoint or [], "CDC_SINK_HTTP_ENDPOINTS")
    return asyncio.run(run_ingest(pipeline, platform, endpoints, args.grpc_port, http))


def cmd_sink(args: argparse.Namespace) -> int:
    from services.logging import setup_logging
    from services.sink.server import run_sink

    pipeline, platform = _load(args)
    try:
        pipeline.sink(args.sink_id)
    except (KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(f"sink:{args.sink_id}")
    _refuse_unsupported(args, pipeline, platform)
    return asyncio.run(run_sink(pipeline, platform, args.sink_id, args.port, args.http_port))


def cmd_run(args: argparse.Namespace) -> int:
    from services import security
    from services.lifecycle import PipelineLock
    from services.logging import setup_logging
    from services.supervisor import Supervisor

    pipeline, platform = _load(args)
    # A bad listen host or TLS file fails here once, not in every restarted stage.
    security.check_startup(platform)
    # So does a transport, sink type or setting this release has no adapter for.
    _refuse_unsupported(args, pipeline, platform)
    # One `cdc run` per pipeline on this machine (PipelineRunningError: exit 2, in main()).
    lock = PipelineLock(pipeline.pipeline_id).acquire()
    setup_logging(f"run:{pipeline.pipeline_id}")
    sinks = [s.sink_id for s in pipeline.enabled_sinks]
    sink_host = security.connect_host(security.listen_host(platform))
    # The transport's resources (Kafka: topics and the Debezium connector) before the stages.
    from services import registry
    from services.cli.deploy import provision_or_report

    if provision_or_report(pipeline, platform) != 0:
        lock.release()
        return 1
    capture = registry.TRANSPORTS[platform.transport_mode].has_capture
    supervisor = Supervisor(args.pipeline, args.platform_config, sinks, sink_host, capture)
    supervisor.configure_lifecycle(platform.shutdown_timeout_seconds, lock.fd)
    try:
        return supervisor.run()
    finally:
        lock.release()


def cmd_health(args: argparse.Namespace) -> int:
    from adapters.config import load_pipeline, load_platform
    from services.ops import pipeline_health

    platform = load_platform(args.platform_config)
    pipeline = load_pipeline(args.pipeline, platform=platform) if args.pipeline else None
    report = asyncio.run(pipeline_health(pipeline, platform))
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        from services.kafka_ops import health_table

        print(health_table(report))
    return 0 if report["status"] != "error" else 1


def cmd_undeploy(args: argparse.Namespace) -> int:
    from services.lifecycle import describe_holder, running_here
    from services.ops import UndeployError, undeploy

    pipeline, platform = _load(args)
    pid = running_here(pipeline.pipeline_id)
    if pid is not None:
        who = describe_holder(pid)
        print(
            f"error: pipeline '{pipeline.pipeline_id}' is running on this machine ({who}):"
            " stop it first (SIGTERM), then undeploy",
            file=sys.stderr,
        )
        return 1
    if args.delete_topics and platform.transport_mode != "kafka":
        print("error: --delete-topics is for transport_mode kafka", file=sys.stderr)
        return EXIT_CONFIG
    if not args.yes:
        what = "replication slot and publication"
        if platform.transport_mode == "kafka":
            what = "Debezium connector, " + what
            what += " and topics" if args.delete_topics else " (topics are kept)"
        answer = input(
            f"Drop the {what} of pipeline '{pipeline.pipeline_id}'?"
            " Data in sinks is not touched. [y/N] "
        )
        if answer.strip().lower() not in ("y", "yes"):
            print("aborted")
            return 1
    try:
        lines = asyncio.run(
            undeploy(pipeline, platform, force=args.force, delete_topics=args.delete_topics)
        )
    except UndeployError as exc:
        for line in exc.done:
            print(line)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for line in lines:
        print(line)
    return 0


def cmd_backfill(args: argparse.Namespace) -> int:
    from services.backfill import BackfillRequestError, backfill

    pipeline, platform = _load(args)
    try:
        return asyncio.run(backfill(pipeline, platform, args.table, not args.no_wait, args.timeout))
    except BackfillRequestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def cmd_status(args: argparse.Namespace) -> int:
    from services.status import run_status

    return run_status(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdc", description="Change data capture pipelines.")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_configs(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("pipeline", help="pipeline.yaml")
        p.add_argument("--platform-config", default=None, help="platform.yaml (default: built-in)")
        return p

    with_configs(sub.add_parser("validate", help="check both config files")).set_defaults(
        func=cmd_validate
    )
    run = with_configs(sub.add_parser("run", help="run all stages of a pipeline on this machine"))
    run.set_defaults(func=cmd_run)
    ingest = with_configs(sub.add_parser("ingest", help="run the ingest stage"))
    ingest.add_argument("--sink-endpoint", action="append", metavar="SINK_ID=HOST:PORT")
    ingest.add_argument("--grpc-port", type=int, default=None)
    ingest.add_argument(
        "--sink-http-endpoint",
        action="append",
        metavar="SINK_ID=HOST:PORT",
        help="where a sink serves /metrics and /readyz; shown on /readyz for `cdc status`",
    )
    ingest.set_defaults(func=cmd_ingest)
    sink = with_configs(sub.add_parser("sink", help="run one sink stage"))
    sink.add_argument("--sink-id", required=True)
    sink.add_argument("--port", type=int, default=50051)
    sink.add_argument(
        "--http-port", type=int, default=None, help="serve /healthz, /readyz, /metrics here"
    )
    sink.set_defaults(func=cmd_sink)
    health = sub.add_parser("health", help="check the platform, or a pipeline's source and sinks")
    health.add_argument("pipeline", nargs="?", default=None, help="pipeline.yaml (optional)")
    health.add_argument("--platform-config", default=None)
    health.add_argument("--json", action="store_true", help="JSON instead of a table")
    health.set_defaults(func=cmd_health)
    undeploy = with_configs(sub.add_parser("undeploy", help="drop the slot and publication"))
    undeploy.add_argument("--yes", action="store_true", help="do not ask")
    undeploy.add_argument(
        "--force",
        action="store_true",
        help="terminate the walsender of an active slot (the pipeline must be stopped: a "
        "running one re-creates the slot, and undeploy then fails)",
    )
    undeploy.add_argument(
        "--delete-topics",
        action="store_true",
        help="kafka: also delete the pipeline's topics (data, dead letters, schema history)",
    )
    undeploy.set_defaults(func=cmd_undeploy)
    from services.cli import deploy

    deploy.add_parser(sub)
    backfill = with_configs(
        sub.add_parser("backfill", help="re-read tables in chunks while changes keep flowing")
    )
    backfill.add_argument(
        "--table", action="append", required=True, metavar="SCHEMA.TABLE", help="repeatable"
    )
    backfill.add_argument("--no-wait", action="store_true", help="queue it and return")
    backfill.add_argument("--timeout", type=float, default=3600.0, help="seconds to follow it")
    backfill.set_defaults(func=cmd_backfill)
    from services.cli import capture

    capture.add_parser(sub, with_configs, _load, _refuse_unsupported)
    status = with_configs(sub.add_parser("status", help="live view of a running pipeline"))
    status.add_argument("--once", action="store_true", help="print one view and exit")
    status.add_argument("--json", action="store_true", help="JSON instead of tables")
    status.add_argument("--interval", type=float, default=2.0, help="seconds between scrapes")
    status.add_argument(
        "--ingest-url", default=None, help="the ingest's HTTP base URL (default: health_port)"
    )
    status.add_argument(
        "--sink-url",
        action="append",
        metavar="SINK_ID=URL",
        help="a sink's HTTP base URL, instead of the one the ingest lists (port-forwards)",
    )
    status.set_defaults(func=cmd_status)
    from services.cli import consume, dlq, lakehouse
    from services.cli import stack as stack_cli

    consume.add_parser(sub)
    lakehouse.add_parser(sub, with_configs)
    stack_cli.register(sub)
    dlq.register(sub, with_configs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from adapters.config import ConfigError
    from services.lifecycle import PipelineRunningError, StartupError
    from services.logging import report_error
    from services.security import StartupSecurityError

    args = build_parser().parse_args(argv)
    if not sys.stderr.isatty():
        # gRPC's C core writes plain-text lines to stderr; every line there is JSON (see
        # services/logging.py), and our own events report bind and stream errors. Set
        # GRPC_VERBOSITY=ERROR (or DEBUG) to see the core's lines anyway.
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"error: invalid configuration\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    except StartupSecurityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (StartupError, PipelineRunningError) as exc:
        report_error("startup.failed", str(exc))  # one line: JSON once logging is set up
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
