"""`cdc stack up | status | down` as a user runs it: real servers, detached, and nothing left
behind (no process, no listening port) after `down`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from services.stack.pubsub_emulator import EmulatorNotInstalled, find_emulator
from services.supervisor import cdc_command


def _cdc(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> Any:
    return subprocess.run(
        [*cdc_command(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _extras() -> str:
    try:
        find_emulator()
    except EmulatorNotInstalled:
        return "s3,kinesis"  # the Pub/Sub emulator part is covered where it is installed
    return "s3,pubsub,kinesis"


def _running(process: psutil.Process | int) -> bool:
    """Runs and is not a zombie; a psutil.Process also must be the same process (pids are
    reused quickly on a busy machine with pid_max 32768)."""
    try:
        if isinstance(process, int):
            process = psutil.Process(process)
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _recorded(directory: Path) -> tuple[list[psutil.Process], set[int]]:
    state = json.loads((directory / "run" / "state.json").read_text())
    processes = [psutil.Process(state["daemon"]["pid"])]
    ports: set[int] = set()
    for part in state["parts"]:
        process = psutil.Process(part["pid"])
        processes += [process, *process.children(recursive=True)]
        ports.update(part["ports"])
    return processes, ports


def _assert_nothing_left(directory: Path, processes: list[psutil.Process], ports: set[int]) -> None:
    deadline = time.monotonic() + 20
    while True:
        alive = [p.pid for p in processes if _running(p)]
        mentioning = [
            p.pid
            for p in psutil.process_iter(["cmdline"])
            if any(str(directory) in arg for arg in (p.info["cmdline"] or [])) and _running(p.pid)
        ]
        listening = {
            c.laddr.port
            for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port in ports
        }
        if not (alive or mentioning or listening) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert alive == [], f"processes left: {alive}"
    assert mentioning == [], f"processes still using {directory}: {mentioning}"
    assert listening == set(), f"ports still listening: {listening}"


@pytest.fixture
def stack_dir(tmp_path: Path) -> Iterator[Path]:
    import shutil

    from services.stack.local_stack import postgres_base_dir

    directory = tmp_path / "stack"
    try:
        yield directory
    finally:
        if (directory / "run" / "state.json").exists():  # a failed test: stop what it left
            _cdc("stack", "down", "--dir", str(directory))
        # as root, pytest's 0700 tmp dir keeps the cluster outside DIR: remove it too
        shutil.rmtree(postgres_base_dir(directory.absolute()), ignore_errors=True)


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_up_status_down_leaves_nothing(stack_dir: Path) -> None:
    import psycopg

    from adapters.config import load_pipeline, load_platform
    from services import registry
    from services.stack.tansu import kafka_api_versions_ok

    extras = _extras()
    up = _cdc("stack", "up", "--dir", str(stack_dir), "--with", extras)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "cdc run" in up.stdout and str(stack_dir / "platform.yaml") in up.stdout

    stack = json.loads((stack_dir / "stack.json").read_text())
    expected = {"postgres", "kafka", "schema_registry", "connect", *extras.split(",")}
    assert expected <= set(stack)
    pg = stack["postgres"]
    assert {"host", "port", "username", "password"} <= set(pg)
    with psycopg.connect(
        host=pg["host"],
        port=pg["port"],
        user=pg["username"],
        password=pg["password"],
        dbname=pg["database"],
    ) as conn:
        row = conn.execute(
            "SELECT rolsuper, rolreplication, current_setting('wal_level') FROM pg_roles"
            " WHERE rolname = current_user"
        ).fetchone()
        assert row == (True, True, "logical")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(
            host=pg["host"],
            port=pg["port"],
            user=pg["username"],
            password="wrong",
            dbname=pg["database"],
        )
    host, port = stack["kafka"]["bootstrap_servers"].split(":")
    assert kafka_api_versions_ok(host, int(port))
    assert _get(f"{stack['schema_registry']['url']}/subjects") == []
    assert _get(f"{stack['connect']['url']}/connectors") == []

    # platform.yaml + the sample pipeline are valid configs (the kafka transport's adapter
    # decides whether `cdc validate` accepts them as runnable)
    platform = load_platform(stack_dir / "platform.yaml")
    assert platform.transport_mode == "kafka"
    assert platform.kafka.bootstrap_servers == stack["kafka"]["bootstrap_servers"]
    load_pipeline(stack_dir / "pipeline.yaml", platform=platform)
    if registry.TRANSPORTS["kafka"].available:
        validate = _cdc(
            "validate",
            str(stack_dir / "pipeline.yaml"),
            "--platform-config",
            str(stack_dir / "platform.yaml"),
        )
        assert validate.returncode == 0, validate.stdout + validate.stderr

    again = _cdc("stack", "up", "--dir", str(stack_dir))
    assert again.returncode == 0 and "already running" in again.stdout
    assert json.loads((stack_dir / "stack.json").read_text()) == stack

    status = _cdc("stack", "status", "--dir", str(stack_dir), "--json")
    assert status.returncode == 0, status.stdout
    parts = {p["name"]: p for p in json.loads(status.stdout)["parts"]}
    assert all(p["up"] for p in parts.values())
    assert set(parts) == {
        "postgres",
        "kafka",
        "schema_registry",
        "connect",
        *({"s3": "s3", "pubsub": "pubsub", "kinesis": "kinesis"}[x] for x in extras.split(",")),
    }

    processes, ports = _recorded(stack_dir)
    # a part that dies is reported, and `down` still cleans up everything else
    kinesis_pid = parts["kinesis"]["detail"].split()[-1]
    os.kill(int(kinesis_pid), signal.SIGKILL)
    time.sleep(0.5)
    broken = _cdc("stack", "status", "--dir", str(stack_dir))
    assert broken.returncode == 1
    assert "DOWN kinesis" in broken.stdout
    deadline = time.monotonic() + 10
    while "kinesis exited" not in (stack_dir / "stack.log").read_text():
        assert time.monotonic() < deadline, "the daemon did not log the part that exited"
        time.sleep(0.2)

    down = _cdc("stack", "down", "--dir", str(stack_dir))
    assert down.returncode == 0, down.stdout + down.stderr
    _assert_nothing_left(stack_dir, processes, ports)
    after = _cdc("stack", "status", "--dir", str(stack_dir))
    assert after.returncode == 1 and "no stack runs" in after.stdout


@pytest.mark.slow
def test_a_killed_daemon_takes_its_parts_along(stack_dir: Path) -> None:
    up = _cdc("stack", "up", "--dir", str(stack_dir))
    assert up.returncode == 0, up.stdout + up.stderr
    import psycopg

    pg = json.loads((stack_dir / "stack.json").read_text())["postgres"]
    conninfo = {
        "host": pg["host"],
        "user": pg["username"],
        "password": pg["password"],
        "dbname": pg["database"],
    }
    with psycopg.connect(port=pg["port"], **conninfo, autocommit=True) as conn:
        conn.execute("INSERT INTO public.orders (id, customer, amount) VALUES (7, 'kept', 1.5)")
    processes, ports = _recorded(stack_dir)
    processes[0].kill()  # the daemon, SIGKILL
    # PR_SET_PDEATHSIG stops the launchers' parts, PostgreSQL's watchdog its cluster
    deadline = time.monotonic() + 60
    while any(_running(p) for p in processes[1:]) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p for p in processes[1:] if _running(p)]
    assert left == [], [p.cmdline()[:3] for p in left]
    status = _cdc("stack", "status", "--dir", str(stack_dir))
    assert status.returncode == 1
    down = _cdc("stack", "down", "--dir", str(stack_dir))
    assert down.returncode == 0, down.stdout + down.stderr
    _assert_nothing_left(stack_dir, processes, ports)
    # and a new `up` in the same directory works, with PostgreSQL's data kept
    again = _cdc("stack", "up", "--dir", str(stack_dir))
    assert again.returncode == 0, again.stdout + again.stderr
    pg = json.loads((stack_dir / "stack.json").read_text())["postgres"]
    assert pg["password"] == conninfo["password"]
    with psycopg.connect(port=pg["port"], **conninfo) as conn:
        assert conn.execute("SELECT customer FROM public.orders WHERE id = 7").fetchone() == (
            "kept",
        )
    assert _cdc("stack", "down", "--dir", str(stack_dir)).returncode == 0


def test_a_part_that_cannot_start_is_named_and_nothing_stays(stack_dir: Path) -> None:
    env = dict(os.environ, CDC_TANSU_BIN=str(stack_dir.parent / "no-tansu-here"))
    up = _cdc("stack", "up", "--dir", str(stack_dir), env=env)
    assert up.returncode == 1
    assert "CDC_TANSU_BIN=" in up.stderr and "is not an executable file" in up.stderr
    assert not (stack_dir / "run" / "state.json").exists()
    leftovers = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if any(str(stack_dir) in arg for arg in (p.info["cmdline"] or [])) and _running(p.pid)
    ]
    assert leftovers == []


def test_unknown_with_part_is_refused(stack_dir: Path) -> None:
    up = _cdc("stack", "up", "--dir", str(stack_dir), "--with", "s3,redis")
    assert up.returncode == 1
    assert "unknown part(s) ['redis']" in up.stderr
    assert not stack_dir.exists()


@pytest.mark.slow
def test_cdc_run_with_the_written_files_replicates(stack_dir: Path) -> None:
    """The README's Kafka quick start: `cdc stack up`, then `cdc run` with the written
    pipeline.yaml and platform.yaml; the replica equals the source row by row."""
    import psycopg

    up = _cdc("stack", "up", "--dir", str(stack_dir))
    assert up.returncode == 0, up.stdout + up.stderr
    pg = json.loads((stack_dir / "stack.json").read_text())["postgres"]
    conninfo = {
        "host": pg["host"],
        "port": pg["port"],
        "user": pg["username"],
        "password": pg["password"],
    }
    with psycopg.connect(dbname=pg["database"], autocommit=True, **conninfo) as conn:
        conn.execute(
            "INSERT INTO public.orders (id, customer, amount)"
            " SELECT g, 'c' || g, g * 1.5 FROM generate_series(1, 100) g"
        )
    log = (stack_dir / "cdc-run.log").open("wb")
    run = subprocess.Popen(
        [
            *cdc_command(),
            "run",
            str(stack_dir / "pipeline.yaml"),
            "--platform-config",
            str(stack_dir / "platform.yaml"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    query = "SELECT id, customer, amount FROM public.orders ORDER BY id"
    try:
        with psycopg.connect(dbname=pg["database"], autocommit=True, **conninfo) as conn:
            conn.execute("UPDATE public.orders SET amount = 0 WHERE id <= 10")
            conn.execute("DELETE FROM public.orders WHERE id > 90")
            conn.execute("INSERT INTO public.orders (id, customer, amount) VALUES (500, 'x', 1)")
            source = conn.execute(query).fetchall()
        deadline = time.monotonic() + 180
        replica: list[Any] = []
        while time.monotonic() < deadline and run.poll() is None:
            try:
                with psycopg.connect(dbname=pg["replica_database"], **conninfo) as conn:
                    replica = conn.execute(query).fetchall()
            except psycopg.errors.UndefinedTable:
                replica = []
            if replica == source:
                break
            time.sleep(1)
        assert run.poll() is None, (stack_dir / "cdc-run.log").read_text()[-3000:]
        assert replica == source
    finally:
        run.terminate()
        try:
            run.wait(60)
        except subprocess.TimeoutExpired:
            run.kill()
            run.wait()
        log.close()


@pytest.mark.slow
def test_kafka_storage_s3_keeps_topics_across_down_and_up(stack_dir: Path) -> None:
    from confluent_kafka import Consumer, Producer

    up = _cdc("stack", "up", "--dir", str(stack_dir), "--kafka-storage", "s3")
    assert up.returncode == 0, up.stdout + up.stderr
    stack = json.loads((stack_dir / "stack.json").read_text())
    assert stack["kafka"]["storage"] == "s3" and "s3" in stack  # s3 was added for it
    producer = Producer({"bootstrap.servers": stack["kafka"]["bootstrap_servers"]})
    producer.produce("kept.across.restarts", value=b"still here")
    assert producer.flush(10) == 0
    assert _cdc("stack", "down", "--dir", str(stack_dir)).returncode == 0

    again = _cdc("stack", "up", "--dir", str(stack_dir), "--kafka-storage", "s3")
    assert again.returncode == 0, again.stdout + again.stderr
    bootstrap = json.loads((stack_dir / "stack.json").read_text())["kafka"]["bootstrap_servers"]
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "kept",
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
        }
    )
    consumer.subscribe(["kept.across.restarts"])
    message = None
    deadline = time.monotonic() + 30
    while message is None and time.monotonic() < deadline:
        message = consumer.poll(0.5)
    consumer.close()
    assert message is not None and message.value() == b"still here"
    assert _cdc("stack", "down", "--dir", str(stack_dir)).returncode == 0
