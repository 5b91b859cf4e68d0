"""grpc.health.v1 on every service."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def add_health(server: grpc.aio.Server) -> health.aio.HealthServicer:
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return servicer


async def set_status(servicer: health.aio.HealthServicer, serving: bool, *names: str) -> None:
    for name in ("", *names):
        await servicer.set(name, SERVING if serving else NOT_SERVING)
