"""kinesis-local (npm `kinesis-local`, the Scala.js build of kinesis-mock): a Kinesis emulator
whose resharding is faithful (moto's is not), for the resharding test. Installed on first use
with npm into a cache directory; `KinesisLocalUnavailable` says what is missing."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from services.net import find_free_port

VERSION = "0.6.2"


class KinesisLocalUnavailable(RuntimeError):
    pass


def _package() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cdc-platform"
    root = cache / f"kinesis-local-{VERSION}"
    main = root / "node_modules" / "kinesis-local" / "main.js"
    if main.exists():
        return main.parent
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise KinesisLocalUnavailable("node and npm are not installed (apt-get install nodejs npm)")
    root.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [
            npm,
            "install",
            "--no-audit",
            "--no-fund",
            "--prefix",
            str(root),
            f"kinesis-local@{VERSION}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0 or not main.exists():
        raise KinesisLocalUnavailable(
            f"npm install kinesis-local@{VERSION} failed: {done.stderr[-500:]}"
        )
    return main.parent


@dataclass
class KinesisLocal:
    endpoint_url: str
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start(log_dir: Path) -> KinesisLocal:
    package = _package()
    port, tls_port = find_free_port(), find_free_port()
    env = dict(
        os.environ,
        KINESIS_MOCK_PLAIN_PORT=str(port),
        KINESIS_MOCK_TLS_PORT=str(tls_port),
        CREATE_STREAM_DURATION="100ms",
        DELETE_STREAM_DURATION="100ms",
        UPDATE_SHARD_COUNT_DURATION="100ms",
        SPLIT_SHARD_DURATION="100ms",
        MERGE_SHARDS_DURATION="100ms",
        LOG_LEVEL="WARN",
    )
    log = (log_dir / "kinesis-local.log").open("wb")
    # It reads its TLS certificate (server.json) from the working directory.
    process = subprocess.Popen(
        ["node", "main.js"], cwd=package, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            return KinesisLocal(url, process)
        except urllib.error.HTTPError:
            return KinesisLocal(url, process)  # it answers: up
        except Exception:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise KinesisLocalUnavailable(
                    f"kinesis-local did not start; see {log.name}"
                ) from None
            time.sleep(0.2)
