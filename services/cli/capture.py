"""`cdc capture`: the capture stage of transport_mode pubsub / kinesis (services/capture)."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from typing import Any


def cmd_capture(
    args: argparse.Namespace,
    load: Callable[[argparse.Namespace], tuple[Any, Any]],
    refuse_unsupported: Callable[[argparse.Namespace, Any, Any], None],
) -> int:
    from services import registry
    from services.capture.main import run_capture
    from services.lifecycle import StartupError
    from services.logging import setup_logging

    pipeline, platform = load(args)
    setup_logging(f"capture:{pipeline.pipeline_id}")
    refuse_unsupported(args, pipeline, platform)
    if not registry.TRANSPORTS[platform.transport_mode].has_capture:
        served = ", ".join(n for n, t in registry.TRANSPORTS.items() if t.has_capture)
        raise StartupError(
            f"transport_mode {platform.transport_mode} has no capture stage (`cdc capture`"
            f" serves: {served or 'none'}); `cdc ingest` reads its source directly"
        )
    return asyncio.run(run_capture(pipeline, platform, args.http_port))


def add_parser(
    sub: Any,
    with_configs: Callable[[argparse.ArgumentParser], argparse.ArgumentParser],
    load: Callable[[argparse.Namespace], tuple[Any, Any]],
    refuse_unsupported: Callable[[argparse.Namespace, Any, Any], None],
) -> None:
    capture = with_configs(
        sub.add_parser("capture", help="read the WAL and publish it (transport pubsub / kinesis)")
    )
    capture.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="serve /healthz, /readyz, /metrics here (default: health_port)",
    )
    capture.set_defaults(func=lambda a: cmd_capture(a, load, refuse_unsupported))
