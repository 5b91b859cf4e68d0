"""`cdc deploy PIPELINE`: run the transport's provisioner only (for Kafka: the topics and
the Debezium connector, waiting until it runs), e.g. as a Kubernetes Job or init container
before the stages start. `cdc run` does the same before it starts its stages."""

from __future__ import annotations

import argparse
import asyncio
import sys


def provision_or_report(pipeline: object, platform: object) -> int:
    """Provision; 0, or 1 with the provisioner's reason on stderr."""
    from services.kafka_ops import ProvisioningFailed, provision

    try:
        for line in asyncio.run(provision(pipeline, platform)):  # type: ignore[arg-type]
            print(line)
    except ProvisioningFailed as exc:
        print(f"error: provisioning failed (nothing was deleted): {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from adapters.config import load_pipeline, load_platform

    platform = load_platform(args.platform_config)
    pipeline = load_pipeline(args.pipeline, platform=platform)
    if platform.transport_mode != "kafka":
        print(
            f"transport_mode {platform.transport_mode}: nothing to provision ahead"
            " (the ingest creates its replication slot and publication when it starts)"
        )
        return 0
    return provision_or_report(pipeline, platform)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    deploy = sub.add_parser(
        "deploy", help="create the transport's resources (topics, Debezium connector)"
    )
    deploy.add_argument("pipeline", help="pipeline.yaml")
    deploy.add_argument("--platform-config", default=None, help="platform.yaml")
    deploy.set_defaults(func=cmd_deploy)
