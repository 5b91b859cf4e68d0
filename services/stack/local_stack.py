"""``cdc stack up | status | down``: the local platform without Docker.

``up`` starts a small daemon (``python -m services.stack.local_stack --dir DIR``) in its own
session; the daemon starts every part as its child (PostgreSQL with logical replication, Tansu,
our schema registry, Kafka Connect with Debezium, and with ``--with`` SeaweedFS, the Pub/Sub
emulator and moto for Kinesis/DynamoDB), writes ``DIR/stack.json`` and ``DIR/platform.yaml``,
and then waits. The parts get SIGTERM if the daemon dies (PR_SET_PDEATHSIG; PostgreSQL has its
own watchdog), so nothing outlives it. ``down`` SIGTERMs the daemon, which stops the parts in
reverse order, and then makes sure every recorded process group is gone and every recorded
port closed. ``DIR/run/state.json`` records the daemon and each part (pid, process group, start
time, ports, endpoint): ``status`` and ``down`` work from it.

PostgreSQL data, the registry's schemas and SeaweedFS objects stay in DIR across ``down`` /
``up``; Tansu keeps topics in memory (a new ``up`` starts with an empty broker) unless
``--kafka-storage s3`` puts them on the stack's SeaweedFS.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

from services.stack.process import LaunchError, kill_group, port_open, wait_ports_closed

__all__ = [
    "DEFAULT_DIR",
    "EXTRAS",
    "PartRecord",
    "PartStatus",
    "StackError",
    "StackState",
    "UpResult",
    "down",
    "parse_extras",
    "pid_alive",
    "postgres_base_dir",
    "read_state",
    "status",
    "up",
]

EXTRAS: Final = ("s3", "pubsub", "kinesis")
DEFAULT_DIR: Final = Path(".cdc-stack")
PG_USER: Final = "cdc"
SOURCE_DB: Final = "cdc_demo"
REPLICA_DB: Final = "replica"
CONNECT_GROUP: Final = "cdc-stack-connect"
LAKEHOUSE_BUCKET: Final = "cdc-lakehouse"
KAFKA_BUCKET: Final = "cdc-kafka"
KAFKA_STORAGES: Final = ("memory", "s3")
UP_TIMEOUT: Final = 300.0


class StackError(RuntimeError):
    """A user-facing failure of ``cdc stack`` (the message says what to do)."""


class _Running(Protocol):
    def stop(self) -> None: ...


# ---------------------------------------------------------------------- state


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def pid_alive(pid: int, start_time: str | None = None) -> bool:
    """True if ``pid`` runs (not a zombie) and, when known, started at ``start_time``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust the pid
    if raw[raw.rfind(")") + 2 :].split()[0] in ("Z", "X"):
        return False
    return start_time is None or _start_time(pid) == start_time


@dataclass
class PartRecord:
    """One started part as ``state.json`` records it."""

    name: str
    what: str
    pid: int
    pgid: int
    start_time: str | None
    ports: list[int]
    endpoint: str
    started_in_seconds: float
    log: str

    def alive(self) -> bool:
        return pid_alive(self.pid, self.start_time)


@dataclass
class StackState:
    directory: Path
    status: str = "starting"  # starting | running | failed | stopping
    error: str | None = None
    daemon_pid: int | None = None
    daemon_start_time: str | None = None
    extras: list[str] = field(default_factory=list)
    kafka_storage: str = "memory"
    parts: list[PartRecord] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return state_path(self.directory)

    def daemon_alive(self) -> bool:
        return self.daemon_pid is not None and pid_alive(self.daemon_pid, self.daemon_start_time)

    def save(self) -> None:
        data = {
            "status": self.status,
            "error": self.error,
            "daemon": {"pid": self.daemon_pid, "start_time": self.daemon_start_time},
            "with": self.extras,
            "kafka_storage": self.kafka_storage,
            "parts": [vars(part) for part in self.parts],
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.path, json.dumps(data, indent=2) + "\n")


def state_path(directory: Path) -> Path:
    return directory / "run" / "state.json"


def read_state(directory: Path) -> StackState | None:
    path = state_path(directory)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StackError(
            f"{path}: unreadable stack state ({exc}); remove it if no stack runs"
        ) from exc
    daemon = data.get("daemon") or {}
    return StackState(
        directory=directory,
        status=str(data.get("status", "starting")),
        error=data.get("error"),
        daemon_pid=daemon.get("pid"),
        daemon_start_time=daemon.get("start_time"),
        extras=list(data.get("with", [])),
        kafka_storage=str(data.get("kafka_storage", "memory")),
        parts=[PartRecord(**part) for part in data.get("parts", [])],
    )


def _write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


# ---------------------------------------------------------------------- postgres


def postgres_base_dir(directory: Path) -> Path:
    """``DIR/postgres``, unless this process is root and the unprivileged OS user PostgreSQL
    runs as cannot traverse DIR's parents (a home directory, pytest's tmp): then a directory
    under the system temp dir named after DIR, so that the cluster still survives down/up."""
    inside = directory / "postgres"
    if os.geteuid() != 0:
        return inside
    for parent in [directory, *directory.parents]:
        try:
            mode = parent.stat().st_mode
        except FileNotFoundError:
            continue
        if not mode & stat.S_IXOTH:
            digest = hashlib.sha1(str(directory).encode()).hexdigest()[:12]
            return Path(tempfile.gettempdir()) / f"cdc-stack-pg-{digest}"
    return inside


def _pg_password(directory: Path) -> str:
    path = directory / "run" / "postgres-password"
    if path.exists():
        return path.read_text().strip()
    password = secrets.token_urlsafe(18)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, password + "\n", mode=0o600)
    return password


_HBA: Final = """\
# Written by `cdc stack up`. The `postgres` role is trusted on 127.0.0.1 (the launcher
# administers the cluster with it); every other role logs in with its password.
local   all          all                      trust
host    all          postgres  127.0.0.1/32   trust
host    replication  postgres  127.0.0.1/32   trust
host    all          all       127.0.0.1/32   scram-sha-256
host    replication  all       127.0.0.1/32   scram-sha-256
"""


def _start_postgres(directory: Path, password: str) -> tuple[Any, PartRecord]:
    from psycopg import sql

    from services.stack.postgres import PostgresServer

    began = time.monotonic()
    server = PostgresServer(postgres_base_dir(directory))
    try:
        server.start()
    except RuntimeError as exc:
        raise LaunchError(f"postgres: {exc}") from exc
    with server.connect() as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (PG_USER,)).fetchone()
        verb = "ALTER" if exists else "CREATE"
        conn.execute(
            sql.SQL(verb + " ROLE {} LOGIN SUPERUSER REPLICATION PASSWORD {}").format(
                sql.Identifier(PG_USER), sql.Literal(password)
            )
        )
        for dbname in (SOURCE_DB, REPLICA_DB):
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone():
                continue
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(dbname), sql.Identifier(PG_USER)
                )
            )
        hba = server.data_dir / "pg_hba.conf"
        if hba.read_text() != _HBA:
            with hba.open("w") as fh:  # in place: keeps the server's ownership of the file
                fh.write(_HBA)
            conn.execute("SELECT pg_reload_conf()")
    with server.connect(SOURCE_DB) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS public.orders (id bigint PRIMARY KEY, customer text NOT"
            " NULL, amount numeric(12,2) NOT NULL, created_at timestamptz NOT NULL DEFAULT now())"
        )
        conn.execute(
            sql.SQL("ALTER TABLE public.orders OWNER TO {}").format(sql.Identifier(PG_USER))
        )
    pid = server.pid
    assert pid is not None
    record = PartRecord(
        name="postgres",
        what="PostgreSQL (wal_level=logical)",
        pid=pid,
        pgid=os.getpgid(pid),
        start_time=_start_time(pid),
        ports=[server.port],
        endpoint=f"{server.host}:{server.port}",
        started_in_seconds=round(time.monotonic() - began, 2),
        log=str(server.log_path),
    )
    return server, record


# ---------------------------------------------------------------------- the daemon


def _record(name: str, what: str, part: Any, endpoint: str, began: float) -> PartRecord:
    managed = part.process
    return PartRecord(
        name=name,
        what=what,
        pid=managed.pid,
        pgid=managed.pgid,
        start_time=_start_time(managed.pid),
        ports=list(managed.ports),
        endpoint=endpoint,
        started_in_seconds=round(time.monotonic() - began, 2),
        log=str(managed.log_path),
    )


class _Daemon:
    def __init__(self, directory: Path, extras: Sequence[str], kafka_storage: str) -> None:
        self.directory = directory
        self.state = StackState(
            directory,
            daemon_pid=os.getpid(),
            daemon_start_time=_start_time(os.getpid()),
            extras=list(extras),
            kafka_storage=kafka_storage,
        )
        self.running: list[_Running] = []
        self.stop_requested = threading.Event()

    def _add(self, part: _Running, record: PartRecord) -> None:
        self.running.append(part)
        self.state.parts.append(record)
        self.state.save()
        print(
            f"{record.name} up in {record.started_in_seconds:.2f} s: {record.endpoint}", flush=True
        )

    def _timed(
        self, name: str, what: str, start: Callable[[], Any], endpoint: Callable[[Any], str]
    ) -> Any:
        if self.stop_requested.is_set():
            raise LaunchError("stopped while starting")
        began = time.monotonic()
        part = start()
        self._add(part, _record(name, what, part, endpoint(part), began))
        return part

    def start_all(self) -> dict[str, Any]:
        from services.stack import connect, schema_registry, tansu

        d = self.directory
        password = _pg_password(d)
        server, record = _start_postgres(d, password)
        self._add(server, record)
        sections: dict[str, Any] = {
            "postgres": {
                "host": server.host,
                "port": server.port,
                "username": PG_USER,
                "password": password,
                "database": SOURCE_DB,
                "replica_database": REPLICA_DB,
            }
        }
        s3 = None
        if "s3" in self.state.extras:  # first: Tansu may keep its topics there
            from services.stack import seaweedfs

            s3 = self._timed(
                "s3",
                "SeaweedFS (S3)",
                lambda: seaweedfs.start(d / "seaweedfs", buckets=[LAKEHOUSE_BUCKET, KAFKA_BUCKET]),
                lambda p: p.endpoint_url,
            )
            sections["s3"] = {
                "endpoint_url": s3.endpoint_url,
                "access_key": s3.access_key,
                "secret_key": s3.secret_key,
                "region": s3.region,
                "bucket": LAKEHOUSE_BUCKET,
            }
        storage = f"s3://{KAFKA_BUCKET}/" if self.state.kafka_storage == "s3" else "memory://tansu/"
        broker = self._timed(
            "kafka",
            f"Tansu (Kafka protocol, {self.state.kafka_storage} storage)",
            lambda: tansu.start(
                d / "tansu", storage=storage, s3=s3 if s3 and "s3" in storage else None
            ),
            lambda p: p.bootstrap_servers,
        )
        sections["kafka"] = {
            "bootstrap_servers": broker.bootstrap_servers,
            "storage": self.state.kafka_storage,
        }
        registry = self._timed(
            "schema_registry",
            "schema registry (Confluent API)",
            lambda: schema_registry.start(d / "schema_registry"),
            lambda p: p.url,
        )
        sections["schema_registry"] = {"url": registry.url}
        worker = self._timed(
            "connect",
            "Kafka Connect + Debezium",
            lambda: connect.start(
                d / "connect",
                bootstrap_servers=broker.bootstrap_servers,
                registry_url=registry.url,
                group_id=CONNECT_GROUP,
            ),
            lambda p: p.url,
        )
        sections["connect"] = {"url": worker.url}
        if "pubsub" in self.state.extras:
            from services.stack import pubsub_emulator

            emulator = self._timed(
                "pubsub",
                "Pub/Sub emulator",
                lambda: pubsub_emulator.start(d / "pubsub"),
                lambda p: p.host_port,
            )
            sections["pubsub"] = {
                "emulator_host": emulator.host_port,
                "project_id": emulator.project_id,
            }
        if "kinesis" in self.state.extras:
            from services.stack import moto

            aws = self._timed(
                "kinesis",
                "moto (Kinesis, DynamoDB)",
                lambda: moto.start(d / "moto"),
                lambda p: p.endpoint_url,
            )
            sections["kinesis"] = {
                "endpoint_url": aws.endpoint_url,
                "region": aws.region,
                "access_key": aws.access_key,
                "secret_key": aws.secret_key,
            }
        return sections

    def stop_all(self) -> None:
        errors: list[str] = []
        for part in reversed(self.running):
            try:
                part.stop()
            except Exception as exc:
                errors.append(str(exc))
            cleanup = getattr(part, "cleanup", None)
            if cleanup is not None:  # PostgresServer: also releases its watchdog
                with contextlib.suppress(Exception):
                    cleanup()
        self.running.clear()
        if errors:
            print("errors while stopping: " + "; ".join(errors), file=sys.stderr, flush=True)

    def run(self) -> int:
        from services.stack import files

        def on_signal(signum: int, frame: object) -> None:
            self.stop_requested.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self.state.save()
        try:
            sections = self.start_all()
            files.write_outputs(self.directory, sections)
        except Exception as exc:
            message = str(exc) if isinstance(exc, LaunchError) else f"{type(exc).__name__}: {exc}"
            print(f"stack failed to start: {message}", file=sys.stderr, flush=True)
            self.state.status, self.state.error = "failed", message
            self.state.save()
            self.stop_all()
            self.state.parts = [p for p in self.state.parts if p.alive()]
            self.state.save()
            return 1
        self.state.status = "running"
        self.state.save()
        print("stack running", flush=True)
        reported: set[str] = set()
        while not self.stop_requested.wait(1.0):
            for part in self.state.parts:  # `cdc stack status` shows it too; the log says when
                if part.name not in reported and not part.alive():
                    reported.add(part.name)
                    print(f"{part.name} exited; see {part.log}", file=sys.stderr, flush=True)
        self.state.status = "stopping"
        self.state.save()
        self.stop_all()
        self.state.path.unlink(missing_ok=True)
        print("stack stopped", flush=True)
        return 0


# ---------------------------------------------------------------------- commands


def _daemon_command(directory: Path, extras: Sequence[str], kafka_storage: str) -> list[str]:
    argv = [sys.executable, "-m", "services.stack.local_stack", "--dir", str(directory)]
    argv += ["--kafka-storage", kafka_storage]
    if extras:
        argv += ["--with", ",".join(extras)]
    return argv


def parse_extras(value: str | None, kafka_storage: str = "memory") -> list[str]:
    """The --with parts, in start order; ``kafka_storage`` s3 needs (and adds) s3."""
    if kafka_storage not in KAFKA_STORAGES:
        raise StackError(f"--kafka-storage: {kafka_storage!r} is not one of {KAFKA_STORAGES}")
    chosen = [item.strip().lower() for item in (value or "").split(",") if item.strip()]
    unknown = [item for item in chosen if item not in EXTRAS]
    if unknown:
        raise StackError(f"--with: unknown part(s) {unknown}; choose from {', '.join(EXTRAS)}")
    if kafka_storage == "s3":
        chosen.append("s3")
    return [item for item in EXTRAS if item in chosen]


@dataclass
class UpResult:
    already_running: bool
    state: StackState
    stack_json: dict[str, Any]


@contextlib.contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    """One ``up`` or ``down`` at a time per directory (a second one waits)."""
    (directory / "run").mkdir(parents=True, exist_ok=True)
    with (directory / "run" / "lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _wait_stopped(state: StackState, timeout: float = 120.0) -> None:
    """A daemon that is stopping its parts (a `down` elsewhere): wait until it is gone."""
    deadline = time.monotonic() + timeout
    while state.daemon_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    if state.daemon_alive():
        raise StackError(f"the stack in {state.directory} is still stopping; try again later")


def up(
    directory: Path,
    extras: Iterable[str] = (),
    *,
    timeout: float = UP_TIMEOUT,
    progress: Callable[[str], None] | None = None,
    kafka_storage: str = "memory",
) -> UpResult:
    """Start the stack in ``directory`` (detached) and wait until every part is healthy."""
    directory = directory.absolute()
    directory.mkdir(parents=True, exist_ok=True)
    with _exclusive(directory):
        return _up(directory, list(extras), kafka_storage, timeout, progress)


def _up(
    directory: Path,
    chosen: list[str],
    kafka_storage: str,
    timeout: float,
    progress: Callable[[str], None] | None,
) -> UpResult:
    existing = read_state(directory)
    if existing is not None and existing.daemon_alive() and existing.status == "stopping":
        _wait_stopped(existing)
    if (
        existing is not None
        and existing.daemon_alive()
        and existing.status in ("starting", "running")
    ):
        return UpResult(True, existing, _read_stack_json(directory))
    if existing is not None:
        _stop_leftovers(existing)  # a daemon that died: make sure its parts are gone
        existing.path.unlink(missing_ok=True)
    (directory / "stack.json").unlink(missing_ok=True)
    log_path = directory / "stack.log"
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    with log_path.open("ab") as log:
        daemon = subprocess.Popen(
            _daemon_command(directory, chosen, kafka_storage),
            cwd=directory,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # detached: survives this command and its terminal
        )
    deadline = time.monotonic() + timeout
    reported: set[str] = set()
    while True:
        state = read_state(directory)
        if state is not None and progress is not None:
            for part in state.parts:
                if part.name not in reported:
                    reported.add(part.name)
                    progress(
                        f"{part.name:<16} up in {part.started_in_seconds:6.2f} s  {part.endpoint}"
                    )
        if state is not None and state.status == "running" and state.daemon_pid == daemon.pid:
            return UpResult(False, state, _read_stack_json(directory))
        code = daemon.poll()
        if code is not None or (state is not None and state.status == "failed"):
            with contextlib.suppress(subprocess.TimeoutExpired):
                daemon.wait(60)
            error = state.error if state is not None and state.error else _tail(log_path)
            if state is not None:
                _stop_leftovers(state)
            state_path(directory).unlink(missing_ok=True)
            raise StackError(f"the stack did not start: {error}\n(log: {log_path})")
        if time.monotonic() > deadline:
            daemon.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                daemon.wait(60)
            if state is not None:
                _stop_leftovers(state)
            state_path(directory).unlink(missing_ok=True)
            raise StackError(f"the stack was not up within {timeout:.0f} s; see {log_path}")
        time.sleep(0.2)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


def _read_stack_json(directory: Path) -> dict[str, Any]:
    try:
        data = json.loads((directory / "stack.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@dataclass
class PartStatus:
    name: str
    what: str
    endpoint: str
    up: bool
    detail: str


def status(directory: Path) -> tuple[StackState | None, list[PartStatus]]:
    """Each recorded part: up when its process runs and its ports accept connections."""
    state = read_state(directory.absolute())
    if state is None:
        return None, []
    rows: list[PartStatus] = []
    for part in state.parts:
        closed = [port for port in part.ports[:1] if not port_open(port)]
        if not part.alive():
            rows.append(
                PartStatus(
                    part.name, part.what, part.endpoint, False, f"process {part.pid} is gone"
                )
            )
        elif closed:
            rows.append(
                PartStatus(part.name, part.what, part.endpoint, False, f"port {closed[0]} closed")
            )
        else:
            rows.append(PartStatus(part.name, part.what, part.endpoint, True, f"pid {part.pid}"))
    return state, rows


def _stop_leftovers(state: StackState) -> list[str]:
    """Kill every recorded part still running and wait for its ports; returns problems."""
    problems: list[str] = []
    for part in reversed(state.parts):
        if part.name == "postgres" and part.alive():
            os.kill(part.pid, signal.SIGINT)  # PostgreSQL's fast shutdown
            deadline = time.monotonic() + 30
            while part.alive() and time.monotonic() < deadline:
                time.sleep(0.05)
        if part.alive():
            kill_group(part.pgid, 15.0)
        still = wait_ports_closed(part.ports, timeout=15)
        if part.alive():
            problems.append(f"{part.name}: process {part.pid} still runs")
        if still:
            problems.append(f"{part.name}: ports {still} still open")
    return problems


def down(directory: Path, timeout: float = 120.0) -> StackState | None:
    """Stop what ``up`` started in ``directory``; None when nothing was recorded."""
    directory = directory.absolute()
    if read_state(directory) is None:
        return None
    with _exclusive(directory):
        return _down(directory, timeout)


def _down(directory: Path, timeout: float) -> StackState | None:
    state = read_state(directory)
    if state is None:
        return None
    if state.daemon_alive():
        assert state.daemon_pid is not None
        os.kill(state.daemon_pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while state.daemon_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if state.daemon_alive():
            os.kill(state.daemon_pid, signal.SIGKILL)
    problems = _stop_leftovers(state)
    if problems:
        raise StackError("some parts did not stop: " + "; ".join(problems))
    state.path.unlink(missing_ok=True)
    return state


def main(argv: Sequence[str] | None = None) -> int:
    """The daemon's entry point (started by :func:`up`)."""
    parser = argparse.ArgumentParser(prog="python -m services.stack.local_stack")
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--with", dest="extras", default="")
    parser.add_argument("--kafka-storage", choices=KAFKA_STORAGES, default="memory")
    args = parser.parse_args(argv)
    extras = parse_extras(args.extras, args.kafka_storage)
    return _Daemon(args.dir.absolute(), extras, args.kafka_storage).run()


if __name__ == "__main__":
    sys.exit(main())
