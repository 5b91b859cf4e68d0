"""The images' entry points, run locally with the images' own command lines.

ENTRYPOINT + CMD are parsed from Dockerfile.ingest and Dockerfile.sink (so this test follows
any change to them); only what differs on a shared machine is substituted: the config paths
(/config/... -> a temporary directory), the ports (free ones instead of 50050/50051/8080) and
the sink id. The sink serves a PostgreSQL sink writing into a second database; the
ingest stage reads a real PostgreSQL (the suite's `pg` fixture, wal_level=logical) over the
`direct` transport. Both must answer grpc.health.v1 Check with SERVING, the ingest stage's
/healthz and /readyz must answer 200, the images' HEALTHCHECK commands must pass against
the live processes and fail once they are gone, and SIGTERM must end both cleanly.

DEPENDS ON THE SERVICES (services.cli.main, `cdc ingest` / `cdc sink`): until that module
exists this test is skipped with that reason; it needs no Docker engine.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .support import REPO_ROOT, healthcheck_command, image_command, parse_dockerfile, pyproject

SINK_ID = "hook"
START_TIMEOUT = 45.0
CLI_TARGET = str(pyproject()["project"]["scripts"]["cdc"])


def cli_exists() -> bool:
    try:
        return importlib.util.find_spec(CLI_TARGET.partition(":")[0]) is not None
    except ModuleNotFoundError:
        return False


pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not cli_exists(),
        reason=f"the cdc CLI ({CLI_TARGET}) does not exist yet: the services are not written",
    ),
]


def cdc_executable() -> list[str]:
    """How the image's `cdc` runs here: the venv's console script, or its target directly."""
    module, _, func = CLI_TARGET.partition(":")
    script = Path(sys.executable).with_name("cdc")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", f"import sys; from {module} import {func}; sys.exit({func}())"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def image_env(dockerfile: str) -> dict[str, str]:
    """ENV of the image's final stage (PATH excepted: the venv is already ours)."""
    env: dict[str, str] = {}
    for instruction in parse_dockerfile(REPO_ROOT / dockerfile)[-1].find("ENV"):
        for item in instruction.args.split():
            key, _, value = item.partition("=")
            if key != "PATH":
                env[key] = value.strip('"')
    return env


def localise(command: list[str], config_dir: Path, **flags: str) -> list[str]:
    """The image's command with local config paths and the given flag values."""
    out = [arg.replace("/config/", f"{config_dir}/") for arg in command]
    for flag, value in flags.items():
        name = "--" + flag.replace("_", "-")
        assert name in out, f"the image's command has no {name}: {command}"
        out[out.index(name) + 1] = value
    return out


def grpc_status(port: int) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=2
            )
        except grpc.RpcError as exc:
            return f"rpc error {exc.code().name}"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


class Process:
    def __init__(
        self, name: str, args: list[str], env: dict[str, str], cwd: Path, logs: Path
    ) -> None:
        self.name = name
        self.log = logs / f"{name}.log"
        self._handle = self.log.open("wb")
        self.proc = subprocess.Popen(
            args,
            env=env,
            cwd=cwd,
            stdout=self._handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def wait_until(
        self, what: str, check: Callable[[], bool], timeout: float = START_TIMEOUT
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"{self.name} exited ({self.proc.returncode}) before {what}:\n{self.tail()}"
                )
            if check():
                return
            time.sleep(0.25)
        pytest.fail(f"{self.name}: no {what} within {timeout}s:\n{self.tail()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._handle.close()
        return int(self.proc.returncode)


def test_image_entrypoints_start_and_answer_grpc_health(pg: Any, tmp_path: Path) -> None:
    cdc = cdc_executable()
    database = pg.new_database("deploy_entrypoints")
    replica = pg.new_database("deploy_replica")
    with pg.connect(database) as conn:
        conn.execute("CREATE TABLE public.orders (id BIGSERIAL PRIMARY KEY, item TEXT NOT NULL)")
        conn.execute("INSERT INTO public.orders (item) VALUES ('widget'), ('gadget')")

    health_port, ingest_grpc, sink_port = free_port(), free_port(), free_port()
    config = tmp_path / "config"
    config.mkdir()
    (config / "pipeline.yaml").write_text(
        f"""\
pipeline_id: deploy-entrypoints
source:
  source_type: postgres
  host: ${{CDC_SOURCE_HOST}}
  port: ${{CDC_SOURCE_PORT}}
  database: ${{CDC_SOURCE_DB}}
  username: ${{CDC_SOURCE_USER}}
  password: ${{CDC_SOURCE_PASSWORD}}
  tables: [public.orders]
  snapshot_mode: initial
  slot_name: {database}_slot
  publication_name: {database}_pub
sinks:
  - sink_id: {SINK_ID}
    sink_type: postgres
    enabled: true
    postgres:
      host: ${{CDC_SOURCE_HOST}}
      port: ${{CDC_SOURCE_PORT}}
      database: {replica}
"""
    )
    (config / "platform.yaml").write_text(
        f"transport_mode: direct\nhealth_port: {health_port}\nhealth_enabled: true\n"
    )
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("CDC_", "OTEL_"))} | {
        "PYTHONPATH": str(REPO_ROOT),
        # Secrets reach the stages as environment (envFrom a Secret in Kubernetes).
        "CDC_SOURCE_HOST": pg.host,
        "CDC_SOURCE_PORT": str(pg.port),
        "CDC_SOURCE_DB": database,
        "CDC_SOURCE_USER": "postgres",
        "CDC_SOURCE_PASSWORD": "unused-trust-auth",
    }

    sink_command = localise(
        image_command(REPO_ROOT / "Dockerfile.sink"), config, sink_id=SINK_ID, port=str(sink_port)
    )
    ingest_command = localise(
        image_command(REPO_ROOT / "Dockerfile.ingest"), config, grpc_port=str(ingest_grpc)
    )
    assert sink_command[0] == ingest_command[0] == "cdc"
    sink_env = base_env | image_env("Dockerfile.sink") | {"CDC_SINK_PORT": str(sink_port)}
    ingest_env = (
        base_env
        | image_env("Dockerfile.ingest")
        | {
            "CDC_HEALTH_PORT": str(health_port),
            "CDC_SINK_ENDPOINTS": f"{SINK_ID}=127.0.0.1:{sink_port}",
        }
    )

    sink = Process("sink", cdc + sink_command[1:], sink_env, config, tmp_path)
    ingest: Process | None = None
    try:
        sink.wait_until("SERVING on grpc.health.v1", lambda: grpc_status(sink_port) == "SERVING")
        ingest = Process("ingest", cdc + ingest_command[1:], ingest_env, config, tmp_path)
        ingest.wait_until(
            "SERVING on grpc.health.v1", lambda: grpc_status(ingest_grpc) == "SERVING"
        )
        ingest.wait_until(
            "200 on /healthz", lambda: http_status(f"http://127.0.0.1:{health_port}/healthz") == 200
        )
        ingest.wait_until(
            "200 on /readyz", lambda: http_status(f"http://127.0.0.1:{health_port}/readyz") == 200
        )

        # The images' HEALTHCHECK commands, against the live stages.
        for dockerfile, env in (("Dockerfile.sink", sink_env), ("Dockerfile.ingest", ingest_env)):
            check = healthcheck_command(parse_dockerfile(REPO_ROOT / dockerfile)[-1])
            result = subprocess.run(
                [sys.executable, *check[1:]], env=env, capture_output=True, text=True, timeout=30
            )
            assert result.returncode == 0, f"{dockerfile} HEALTHCHECK failed: {result.stderr}"
    finally:
        ingest_code = ingest.stop() if ingest else 0
        sink_code = sink.stop()
    ingest_log = ingest.tail() if ingest else ""
    assert ingest_code == 0, (
        f"ingest did not stop cleanly on SIGTERM ({ingest_code}):\n{ingest_log}"
    )
    assert sink_code == 0, (
        f"sink did not shut down cleanly on SIGTERM ({sink_code}):\n{sink.tail()}"
    )

    # Once the processes are gone the same HEALTHCHECK commands report unhealthy.
    for dockerfile, env in (("Dockerfile.sink", sink_env), ("Dockerfile.ingest", ingest_env)):
        check = healthcheck_command(parse_dockerfile(REPO_ROOT / dockerfile)[-1])
        result = subprocess.run(
            [sys.executable, *check[1:]], env=env, capture_output=True, text=True, timeout=30
        )
        assert result.returncode != 0, f"{dockerfile} HEALTHCHECK passes with nothing running"
