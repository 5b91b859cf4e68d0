"""Security of a running pipeline: where its ports listen, TLS between ingest and sinks, and
no secret in any process's output."""

from __future__ import annotations

import os
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import psycopg

from tests.support.pipeline import (
    REPO,
    PipelineFiles,
    cdc_argv,
    free_port,
    ingest_stage,
    new_pipeline,
    sink_stage,
    stage_logs,
    tables_equal,
    wait_until,
)
from tests.support.workload import TABLES

EVERY_INTERFACE = {"0.0.0.0", "::"}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CDC_LISTEN_HOST"}
    env.update(PYTHONPATH=str(REPO), CDC_LOG_LEVEL="INFO", **extra)
    return env


def listening(root_pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket listening in the process and its descendants."""
    root = psutil.Process(root_pid)
    out: set[tuple[str, int]] = set()
    for proc in [root, *root.children(recursive=True)]:
        try:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    # gRPC listens on IPv6 sockets with v4-mapped addresses: same address
                    ip = conn.laddr.ip.removeprefix("::ffff:")
                    out.add((ip, conn.laddr.port))
        except psutil.NoSuchProcess:
            continue
    return out


def ready(host: str, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/readyz", timeout=2) as resp:
            return int(resp.status) == 200
    except OSError:
        return False


@contextmanager
def cdc_run(
    files: PipelineFiles, tmp_path: Path, host: str = "127.0.0.1", **env: str
) -> Iterator[subprocess.Popen[bytes]]:
    log_path = tmp_path / "run.log"
    with log_path.open("ab") as log:
        run = subprocess.Popen(
            cdc_argv("run", str(files.pipeline), "--platform-config", str(files.platform)),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=_env(**env),
        )
        try:
            wait_until(
                lambda: run.poll() is not None or ready(host, files.health_port), 90, "ready"
            )
            assert run.poll() is None, log_path.read_text()[-4000:]
            yield run
        finally:
            if run.poll() is None:
                run.send_signal(signal.SIGTERM)
            code = run.wait(90)
    assert code == 0, log_path.read_text()[-4000:]


def insert_orders(dsn: str, first: int, count: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO public.orders (id, customer_id, amount, note)"
            " SELECT g, g, g * 1.5, 'order ' || g FROM generate_series(%s::int, %s::int) g",
            (first, first + count - 1),
        )


# --------------------------------------------------------------------------- bind addresses


def test_cdc_run_listens_on_loopback_only_by_default(pg, tmp_path: Path) -> None:
    source_dsn, replica_dsn, files = new_pipeline(pg, tmp_path, seed_rows=20)
    with cdc_run(files, tmp_path) as run:
        wait_until(lambda: len(listening(run.pid)) >= 3, 30, "three listening sockets")
        sockets = listening(run.pid)
        # health HTTP, the ingest's gRPC health server, the sink's gRPC server
        assert ("127.0.0.1", files.health_port) in sockets, sockets
        assert {addr for addr, _ in sockets} == {"127.0.0.1"}, sockets
        insert_orders(source_dsn, 1, 50)
        wait_until(lambda: tables_equal(source_dsn, replica_dsn, TABLES), 60, "replicated")


def test_cdc_run_listens_where_listen_host_says(pg, tmp_path: Path) -> None:
    """127.0.0.2 is loopback too, but a different address: nothing may be on 127.0.0.1, and
    the ingest must reach its sink there."""
    source_dsn, replica_dsn, files = new_pipeline(
        pg, tmp_path, extra_platform={"listen_host": "127.0.0.2"}
    )
    with cdc_run(files, tmp_path, host="127.0.0.2") as run:
        wait_until(lambda: len(listening(run.pid)) >= 3, 30, "three listening sockets")
        sockets = listening(run.pid)
        assert {addr for addr, _ in sockets} == {"127.0.0.2"}, sockets
        assert not ready("127.0.0.1", files.health_port)
        insert_orders(source_dsn, 1, 50)
        wait_until(lambda: tables_equal(source_dsn, replica_dsn, TABLES), 60, "replicated")


def test_container_env_listens_on_every_interface_and_config_wins(pg, tmp_path: Path) -> None:
    """The images and the chart set CDC_LISTEN_HOST=0.0.0.0; listen_host in platform.yaml
    overrides it."""
    _, _, files = new_pipeline(pg, tmp_path)
    port = free_port()
    sink = sink_stage(files, tmp_path, port, env={"CDC_LISTEN_HOST": "0.0.0.0"}).start()
    ingest = ingest_stage(files, tmp_path, {"replica": port}, env={"CDC_LISTEN_HOST": "0.0.0.0"})
    ingest.start()
    try:
        wait_until(lambda: ready("127.0.0.1", files.health_port), 90, "ready")
        assert sink.process is not None and ingest.process is not None
        # gRPC listens on 0.0.0.0 through a dual-stack IPv6 socket: "::"
        assert {a for a, _ in listening(sink.process.pid)} <= EVERY_INTERFACE
        assert ("0.0.0.0", files.health_port) in listening(ingest.process.pid)
        assert {a for a, _ in listening(ingest.process.pid)} <= EVERY_INTERFACE
    finally:
        for stage in (ingest, sink):
            assert stage.terminate() == 0, stage_logs(ingest, sink)

    text = files.platform.read_text() + "listen_host: 127.0.0.1\n"
    files.platform.write_text(text)
    sink = sink_stage(files, tmp_path, port, env={"CDC_LISTEN_HOST": "0.0.0.0"}).start()
    try:
        assert sink.process is not None
        wait_until(lambda: len(listening(sink.process.pid)) >= 1, 30, "sink listening")  # type: ignore[union-attr]
        assert listening(sink.process.pid) == {("127.0.0.1", port)}
    finally:
        assert sink.terminate() == 0, stage_logs(sink)


def test_bad_listen_host_in_the_environment_is_a_startup_error(pg, tmp_path: Path) -> None:
    _, _, files = new_pipeline(pg, tmp_path)
    result = subprocess.run(
        files.argv("sink", "--sink-id", "replica", "--port", str(free_port())),
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_env(CDC_LISTEN_HOST="not a host"),
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "CDC_LISTEN_HOST" in result.stderr and "Traceback" not in result.stderr
