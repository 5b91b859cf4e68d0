"""Google's Pub/Sub emulator (a Java server from the Google Cloud SDK). Clients reach it through
``PUBSUB_EMULATOR_HOST=127.0.0.1:PORT``. Known gaps (docs/local-stack.md): subscription filters
are ignored; ordering plus a dead-letter policy stalls a key after the maximum attempts.

It is not on PyPI: it comes with the Google Cloud CLI (Debian package
``google-cloud-cli-pubsub-emulator`` from Google's apt repository, or
``gcloud components install pubsub-emulator``). Without it :func:`start` raises
:class:`EmulatorNotInstalled` saying so.
"""

from __future__ import annotations

import os
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from services.net import find_free_port
from services.stack.java import find_java
from services.stack.process import HOST, LaunchError, ManagedProcess, launch

__all__ = ["EmulatorNotInstalled", "PubSubEmulator", "find_emulator", "start"]

BIN_ENV: Final = "CDC_PUBSUB_EMULATOR"
_RELATIVE: Final = Path("platform/pubsub-emulator/bin/cloud-pubsub-emulator")
_SDK_ROOTS: Final = (
    Path("/usr/lib/google-cloud-sdk"),
    Path("/usr/share/google-cloud-sdk"),
    Path("/opt/google-cloud-sdk"),
    Path.home() / "google-cloud-sdk",
)
INSTALL_HINT: Final = (
    "the Google Pub/Sub emulator is not installed: `apt-get install"
    " google-cloud-cli-pubsub-emulator` (Google Cloud apt repository) or `gcloud components"
    f" install pubsub-emulator`, or set {BIN_ENV}=/path/to/cloud-pubsub-emulator"
)


class EmulatorNotInstalled(LaunchError):
    """The emulator's launcher script is not on this machine."""


def find_emulator() -> Path:
    configured = os.environ.get(BIN_ENV, "").strip()
    if configured:
        path = Path(configured)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise EmulatorNotInstalled(f"pubsub emulator: {BIN_ENV}={configured} is not executable")
        return path
    roots = list(_SDK_ROOTS)
    gcloud = shutil.which("gcloud")
    if gcloud:
        roots.insert(0, Path(gcloud).resolve().parent.parent)
    for root in roots:
        candidate = root / _RELATIVE
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    on_path = shutil.which("cloud-pubsub-emulator")
    if on_path:
        return Path(on_path)
    raise EmulatorNotInstalled(f"pubsub emulator: {INSTALL_HINT}")


def _answers_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@dataclass
class PubSubEmulator:
    """A running emulator; set ``PUBSUB_EMULATOR_HOST`` to ``host_port`` in its clients."""

    host: str
    port: int
    process: ManagedProcess
    project_id: str = "cdc-local"

    @property
    def host_port(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        self.process.stop()


def start(workdir: Path, *, port: int | None = None, timeout: float = 60.0) -> PubSubEmulator:
    """Start the emulator on 127.0.0.1 (a free port unless ``port``), logging to
    ``workdir/pubsub_emulator.log``."""
    script = find_emulator()
    java = find_java("pubsub emulator")
    port = port or find_free_port()
    env = dict(os.environ)
    env["JAVA_HOME"] = str(java.resolve().parent.parent)  # the launcher script runs $JAVA_HOME
    env.setdefault("JAVA_OPTS", "-Xmx256m")
    managed = launch(
        "pubsub_emulator",
        [str(script), f"--host={HOST}", f"--port={port}"],
        workdir=workdir,
        ports=[port],
        healthy=lambda: _answers_ok(f"http://{HOST}:{port}/"),
        timeout=timeout,
        env=env,
    )
    return PubSubEmulator(HOST, port, managed)
