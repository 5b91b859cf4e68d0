"""moto in server mode (PyPI ``moto[server]``): Kinesis, DynamoDB, S3 and the rest of the AWS
APIs moto emulates, on one port. Known gaps (docs/local-stack.md): sequence numbers are small
per-shard integers, resharding does not work, a bad shard iterator gives HTTP 500.
"""

from __future__ import annotations

import importlib.util
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from services.net import find_free_port
from services.stack.process import HOST, LaunchError, ManagedProcess, launch

__all__ = ["MotoServer", "start"]

#: Credentials and region moto accepts (any value works; these are what stack.json reports).
ACCESS_KEY: Final = "testing"
SECRET_KEY: Final = "testing"
REGION: Final = "us-east-1"


def _answers_http(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/moto-api/data.json", timeout=1) as response:
            return bool(response.status == 200)
    except urllib.error.HTTPError:
        return False
    except OSError:
        return False


@dataclass
class MotoServer:
    """A running moto server; ``endpoint_url`` is ``http://127.0.0.1:PORT``."""

    host: str
    port: int
    process: ManagedProcess
    region: str = REGION
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self.process.stop()


def start(workdir: Path, *, port: int | None = None, timeout: float = 60.0) -> MotoServer:
    """Start ``moto.server`` on 127.0.0.1 (a free port unless ``port``), logging to
    ``workdir/moto.log``."""
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
        raise LaunchError(
            "moto: the server is not installed; `pip install 'moto[server]'` (in the project's"
            " `stack` and `dev` extras)"
        )
    port = port or find_free_port()
    url = f"http://{HOST}:{port}"
    managed = launch(
        "moto",
        [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)],
        workdir=workdir,
        ports=[port],
        healthy=lambda: _answers_http(url),
        timeout=timeout,
    )
    return MotoServer(HOST, port, managed)
