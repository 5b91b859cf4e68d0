"""Security of a running pipeline: where its ports listen, TLS between ingest and sinks, and
no secret in any process's output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import psutil
import psycopg
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.pipeline import (
    REPO,
    PipelineFiles,
    cdc_argv,
    free_port,
    http_json,
    ingest_stage,
    new_pipeline,
    sink_stage,
    stage_logs,
    table_rows,
    tables_equal,
    wait_until,
)
from tests.support.postgres import PgTestContext
from tests.support.tls import make_pki
from tests.support.workload import TABLES

EVERY_INTERFACE = {"0.0.0.0", "::"}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CDC_LISTEN_HOST"}
    env.update({"PYTHONPATH": str(REPO), "CDC_LOG_LEVEL": "INFO", **extra})
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
        sink_sockets = listening(sink.process.pid)
        assert port in {p for _, p in sink_sockets}, sink_sockets
        assert {a for a, _ in sink_sockets} <= EVERY_INTERFACE, sink_sockets
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
        sockets = listening(sink.process.pid)
        assert ("127.0.0.1", port) in sockets and {a for a, _ in sockets} == {"127.0.0.1"}
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


# --------------------------------------------------------------------------- secrets in logs


def _secret(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex}"


@pytest.mark.slow
def test_no_configured_secret_appears_in_any_output(pg, pg_server_factory, tmp_path: Path) -> None:
    """A full `cdc run` with every secret field the configuration has, through changes, a sink
    outage (connection errors logged) and a stop: no secret value in any process's output,
    nor in `cdc validate`, `cdc health` or /readyz."""
    secrets = {
        "source password (${VAR})": _secret("srcpw"),
        "sink password": _secret("sinkpw"),
        "webhook hmac_secret": _secret("hmac"),
        "webhook header": _secret("bearer"),
        "iceberg s3_secret_access_key": _secret("s3secret"),
        "kafka sasl_password": _secret("saslpw"),
    }
    replica = pg_server_factory()
    replica.create_database("replica")
    replica_dsn = replica.dsn("replica")
    # The source on a server of its own too, so it can be restarted mid-run.
    source = pg_server_factory()
    source_dsn, _, files = new_pipeline(PgTestContext(source), tmp_path, seed_rows=50)
    pipeline = yaml.safe_load(files.pipeline.read_text())
    pipeline["source"]["password"] = "${CDC_TEST_SOURCE_PASSWORD}"
    pipeline["sinks"][0]["postgres"].update(
        host=replica.host,
        port=replica.port,
        database="replica",
        password=secrets["sink password"],
        connect_timeout_seconds=2,
    )
    pipeline["sinks"] += [
        {
            "sink_id": "hook",
            "sink_type": "webhook",
            "enabled": False,
            "webhook": {
                "url": "https://hooks.example.com/cdc",
                "hmac_secret": secrets["webhook hmac_secret"],
                "headers": {"Authorization": f"Bearer {secrets['webhook header']}"},
            },
        },
        {
            "sink_id": "lake",
            "sink_type": "iceberg",
            "enabled": False,
            "iceberg": {
                "catalog_uri": "http://catalog:8181",
                "warehouse": "s3://lake/",
                "table_name": "orders",
                "s3_access_key_id": "AKIAEXAMPLE",
                "s3_secret_access_key": secrets["iceberg s3_secret_access_key"],
            },
        },
    ]
    files.pipeline.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    env = _env(CDC_TEST_SOURCE_PASSWORD=secrets["source password (${VAR})"], CDC_LOG_LEVEL="DEBUG")
    outputs: dict[str, str] = {}

    def cdc(name: str, *argv: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*argv], capture_output=True, text=True, cwd=REPO, env=env, timeout=120
        )
        outputs[name] = result.stdout + result.stderr
        return result

    assert cdc("validate", *files.argv("validate")).returncode == 0, outputs["validate"]
    # A refused configuration names fields, never their values.
    broken = tmp_path / "broken.yaml"
    bad = yaml.safe_load(files.pipeline.read_text())
    bad["sinks"][0]["postgres"]["dsn"] = f"postgresql://u:{secrets['sink password']}@h/db"
    bad["sinks"][1]["webhook"]["hmac_secret"] = [secrets["webhook hmac_secret"]]  # wrong type
    broken.write_text(yaml.safe_dump(bad, sort_keys=False))
    result = cdc("validate broken", *cdc_argv("validate", str(broken)))
    assert result.returncode == 2, outputs["validate broken"]
    assert "password cannot be combined with dsn" in result.stderr, result.stderr
    assert "sinks[1].webhook.hmac_secret" in result.stderr, result.stderr
    # The Kafka transport's SASL password (platform.yaml): a valid configuration, then a
    # broken one; neither output shows it.
    kafka = {
        "bootstrap_servers": "broker:9092",
        "security_protocol": "SASL_SSL",
        "auth_mechanism": "sasl_plain",
        "sasl_username": "cdc",
        "sasl_password": secrets["kafka sasl_password"],
    }
    kafka_platform = tmp_path / "platform-kafka.yaml"
    kafka_platform.write_text(yaml.safe_dump({"transport_mode": "kafka", "kafka": kafka}))
    argv = cdc_argv("validate", str(files.pipeline), "--platform-config", str(kafka_platform))
    result = cdc("validate kafka", *argv)
    assert result.returncode == 0, outputs["validate kafka"]
    assert "transport_mode kafka" in result.stdout, result.stdout
    kafka["sasl_password"] = {"nested": secrets["kafka sasl_password"]}
    kafka["acks"] = "most"
    kafka_platform.write_text(yaml.safe_dump({"transport_mode": "kafka", "kafka": kafka}))
    result = cdc("validate kafka broken", *argv)
    assert result.returncode == 2 and "kafka.sasl_password" in result.stderr, result.stderr

    log_path = tmp_path / "run.log"
    with log_path.open("wb") as log:
        run = subprocess.Popen(
            files.argv("run"), stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env
        )
        try:
            wait_until(
                lambda: run.poll() is not None or ready("127.0.0.1", files.health_port), 90, "ready"
            )
            insert_orders(source_dsn, 1, 200)
            wait_until(lambda: tables_equal(source_dsn, replica_dsn, TABLES), 60, "replicated")

            replica.stop()  # the sink's destination goes away: connection errors get logged
            insert_orders(source_dsn, 1000, 100)
            wait_until(lambda: not ready("127.0.0.1", files.health_port), 60, "sink error shown")
            outputs["/readyz during outage"] = json.dumps(http_json(files.health_port, "/readyz"))
            assert cdc("health during outage", *files.argv("health")).returncode == 1

            replica.start()
            wait_until(lambda: tables_equal(source_dsn, replica_dsn, TABLES), 90, "caught up")

            source.stop()  # and the source: the reader and the slot monitor log their errors
            wait_until(lambda: not ready("127.0.0.1", files.health_port), 60, "source error shown")
            cdc("cdc health, source down", *files.argv("health"))
            source.start()
            insert_orders(source_dsn, 2000, 100)
            wait_until(lambda: tables_equal(source_dsn, replica_dsn, TABLES), 90, "resumed")
            outputs["/readyz"] = json.dumps(http_json(files.health_port, "/readyz"))
        finally:
            if run.poll() is None:
                run.send_signal(signal.SIGTERM)
            code = run.wait(90)
    outputs["cdc run (supervisor, ingest, sink)"] = log_path.read_text(errors="replace")
    assert code == 0, outputs["cdc run (supervisor, ingest, sink)"][-4000:]
    assert cdc("health", *files.argv("health")).returncode == 0, outputs["health"]

    # The run did log the outage, with where it tried to connect: the check had something
    # to look at.
    run_log = outputs["cdc run (supervisor, ingest, sink)"]
    assert f"port {replica.port} failed" in run_log, run_log[-3000:]
    assert "postgres_sink.write_retry" in run_log, run_log[-3000:]
    assert f"port {source.port} failed" in run_log, run_log[-3000:]
    leaks = [
        f"{what} in {where}"
        for what, value in secrets.items()
        for where, text in outputs.items()
        if value in text
    ]
    assert not leaks, leaks


# --------------------------------------------------------------------------- TLS


def tls_platform(pki: dict[str, str], **extra: object) -> dict[str, object]:
    return {
        "grpc_tls": {
            "enabled": True,
            "cert_file": pki["cert"],
            "key_file": pki["key"],
            "ca_file": pki["ca"],
            **extra,
        }
    }


def sink_health(port: int, credentials: grpc.ChannelCredentials | None) -> str:
    """The sink's grpc.health.v1 status as this client sees it, or the gRPC error code."""
    target = f"127.0.0.1:{port}"
    channel = (
        grpc.insecure_channel(target)
        if credentials is None
        else grpc.secure_channel(target, credentials)
    )
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5
            )
        except grpc.RpcError as exc:
            return str(exc.code().name)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def test_mtls_pipeline_delivers_and_its_sink_refuses_other_clients(pg, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    source_dsn, replica_dsn, files = new_pipeline(
        pg, tmp_path, seed_rows=30, extra_platform=tls_platform(pki, require_client_cert=True)
    )
    port = free_port()
    sink = sink_stage(files, tmp_path, port).start()
    ingest = ingest_stage(files, tmp_path, {"replica": port}).start()
    try:
        wait_until(lambda: ready("127.0.0.1", files.health_port), 90, "ready over mTLS")
        insert_orders(source_dsn, 1, 100)
        wait_until(lambda: tables_equal(source_dsn, replica_dsn, TABLES), 60, "replicated")

        ca = Path(pki["ca"]).read_bytes()
        with_cert = grpc.ssl_channel_credentials(
            ca, Path(pki["key"]).read_bytes(), Path(pki["cert"]).read_bytes()
        )
        assert sink_health(port, with_cert) == "SERVING"
        # TLS but no client certificate: the handshake fails
        assert sink_health(port, grpc.ssl_channel_credentials(ca)) == "UNAVAILABLE"
        # a certificate of another CA
        other = make_pki(tmp_path / "other")
        foreign = grpc.ssl_channel_credentials(
            ca, Path(other["key"]).read_bytes(), Path(other["cert"]).read_bytes()
        )
        assert sink_health(port, foreign) == "UNAVAILABLE"
        # plaintext
        assert sink_health(port, None) == "UNAVAILABLE"
    finally:
        codes = [stage.terminate() for stage in (ingest, sink)]
    assert codes == [0, 0], stage_logs(ingest, sink)
    assert '"tls": true' in sink.log_path.read_text()


def test_cdc_run_over_tls_checks_the_configured_server_name(pg, tmp_path: Path) -> None:
    """TLS without client certificates; the sink's certificate names only
    sink.cdc.internal, which `server_name` makes the ingest expect."""
    pki = make_pki(tmp_path / "pki", names=("sink.cdc.internal",), ip=False)
    source_dsn, replica_dsn, files = new_pipeline(
        pg, tmp_path, extra_platform=tls_platform(pki, server_name="sink.cdc.internal")
    )
    with cdc_run(files, tmp_path):
        insert_orders(source_dsn, 1, 100)
        wait_until(lambda: tables_equal(source_dsn, replica_dsn, TABLES), 60, "replicated")


@pytest.mark.slow
def test_ingest_refuses_a_sink_whose_certificate_does_not_match(pg, tmp_path: Path) -> None:
    """A certificate for another name: the ingest does not deliver and reports the sink."""
    pki = make_pki(tmp_path / "pki", names=("elsewhere.example",))
    source_dsn, replica_dsn, files = new_pipeline(
        pg, tmp_path, extra_platform=tls_platform(pki, server_name="sink.cdc.internal")
    )
    port = free_port()
    sink = sink_stage(files, tmp_path, port).start()
    ingest = ingest_stage(files, tmp_path, {"replica": port}).start()
    try:
        wait_until(
            lambda: "sink:replica" in json.dumps(http_json(files.health_port, "/readyz")),
            60,
            "sink component reported",
        )
        insert_orders(source_dsn, 1, 10)
        time.sleep(5)
        body = http_json(files.health_port, "/readyz")
        assert not body.get("ready"), body
        assert "UNREACHABLE" in json.dumps(body), body
        assert table_rows(replica_dsn, "public.orders") == []
    finally:
        # the ingest exits non-zero: its batch was never acked (redelivered next start)
        ingest.terminate()
        assert sink.terminate() == 0, stage_logs(ingest, sink)


def test_a_missing_certificate_file_stops_every_stage_with_exit_2(pg, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    missing = str(tmp_path / "nowhere" / "tls.key")
    _, _, files = new_pipeline(pg, tmp_path, extra_platform=tls_platform({**pki, "key": missing}))
    port = str(free_port())
    for argv in (
        files.argv("sink", "--sink-id", "replica", "--port", port),
        files.argv("ingest", "--sink-endpoint", f"replica=127.0.0.1:{port}"),
        files.argv("run"),
    ):
        result = subprocess.run(
            argv, capture_output=True, text=True, cwd=REPO, env=_env(), timeout=60
        )
        assert result.returncode == 2, (argv, result.stderr)
        assert f"grpc_tls.key_file: cannot read {missing}" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr, result.stderr
