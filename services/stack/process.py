"""One server process of the local stack: started in its own process group with its output in a
log file, waited on until healthy, and stopped with its whole group until its ports are closed.

Every launcher in services/stack/ (tansu, schema_registry, moto, pubsub_emulator, seaweedfs,
connect) builds on :func:`launch`. The child gets ``PR_SET_PDEATHSIG`` (Linux): when the process
that started it dies, even by SIGKILL, it is sent SIGTERM, so a killed test run or a killed
``cdc stack`` daemon leaves no server behind. The process group covers what the child starts
itself (a shell wrapper's JVM, for instance).

The death signal is set by a tiny ``python -S -c`` trampoline that then execs the server, not by
``preexec_fn``: a Python callback between fork and exec runs the parent's fork handlers, and a
parent holding gRPC channels (a test that used the Pub/Sub client) then aborts the child.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from services.lifecycle import with_parent_death_signal

__all__ = [
    "HOST",
    "LaunchError",
    "ManagedProcess",
    "check_port_free",
    "kill_group",
    "launch",
    "port_open",
    "wait_ports_closed",
]

HOST: Final = "127.0.0.1"
_LOG_TAIL_LINES: Final = 30


class LaunchError(RuntimeError):
    """A part of the stack could not start; the message says what is missing or wrong."""


def port_open(port: int, host: str = HOST, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def check_port_free(port: int, what: str, host: str = HOST) -> None:
    """Raise :class:`LaunchError` naming ``what`` when host:port cannot be bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # as servers bind: a port left in TIME_WAIT by a stopped server is free for them
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            reason = "is taken" if exc.errno == errno.EADDRINUSE else f"cannot be bound: {exc}"
            raise LaunchError(
                f"{what}: port {host}:{port} {reason}; stop what uses it or leave the port"
                " unset so that a free one is picked"
            ) from None


def wait_ports_closed(ports: Sequence[int], timeout: float, host: str = HOST) -> list[int]:
    """Wait until nothing listens on ``ports``; return those still open at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        still = [port for port in ports if port_open(port, host, timeout=0.2)]
        if not still or time.monotonic() > deadline:
            return still
        time.sleep(0.05)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_group(
    pgid: int, timeout: float = 15.0, leader: subprocess.Popen[bytes] | None = None
) -> None:
    """SIGTERM the process group, SIGKILL it after ``timeout`` s, and wait until it is gone.

    ``leader`` (our child, the group's leader) is reaped so that it does not linger as a zombie
    (a zombie still counts as a group member for ``killpg``).
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    killed = False
    while True:
        if leader is not None and leader.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                leader.wait(0.05)
        if not _group_alive(pgid):
            return
        if time.monotonic() > deadline:
            if killed:
                return  # only unreapable zombies (not our children) can remain
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            killed = True
            deadline = time.monotonic() + 10
        time.sleep(0.05)


@dataclass
class ManagedProcess:
    """A started server: its process (group leader), ports and log file."""

    name: str
    process: subprocess.Popen[bytes]
    ports: tuple[int, ...]
    log_path: Path
    stop_timeout: float = 15.0
    _stopped: bool = field(default=False, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def pgid(self) -> int:
        return self.process.pid  # started with start_new_session: it leads its own group

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """Stop the whole process group and wait until its ports are closed. Idempotent."""
        if self._stopped:
            return
        kill_group(self.pgid, self.stop_timeout, self.process)
        still = wait_ports_closed(self.ports, timeout=10)
        self._stopped = True
        if still:
            raise LaunchError(f"{self.name}: ports {still} still open after stopping it")

    def kill(self) -> None:
        """SIGKILL the whole process group (a crash, for tests) and wait until its ports are
        closed; ``start`` again with the same ports to bring it back."""
        if self._stopped:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, signal.SIGKILL)
        kill_group(self.pgid, 10.0, self.process)
        self._stopped = True
        still = wait_ports_closed(self.ports, timeout=10)
        if still:
            raise LaunchError(f"{self.name}: ports {still} still open after killing it")

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_bytes().decode(errors="replace")
        except OSError as exc:
            return f"<could not read {self.log_path}: {exc}>"
        return "\n".join(text.splitlines()[-lines:])


def launch(
    name: str,
    argv: Sequence[str],
    *,
    workdir: Path,
    ports: Sequence[int],
    healthy: Callable[[], bool],
    timeout: float,
    env: Mapping[str, str] | None = None,
    log_name: str | None = None,
    stop_timeout: float = 15.0,
) -> ManagedProcess:
    """Start ``argv`` in ``workdir`` (its own process group, output appended to
    ``workdir/<log_name or name>.log``) and wait until ``healthy()`` holds.

    Raises :class:`LaunchError` (after stopping what was started) when a port is taken, the
    executable is missing, the process exits early or it is not healthy within ``timeout`` s.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    for port in ports:
        check_port_free(port, name)
    log_path = workdir / f"{log_name or name}.log"
    full_env = dict(os.environ if env is None else env)
    with log_path.open("ab") as log:
        log.write(
            f"\n--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting: {' '.join(argv)}\n".encode()
        )
        log.flush()
        try:
            proc = subprocess.Popen(
                with_parent_death_signal(argv),
                cwd=workdir,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            raise LaunchError(f"{name}: could not run {argv[0]}: {exc}") from exc
    managed = ManagedProcess(name, proc, tuple(ports), log_path, stop_timeout)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            tail = managed.log_tail()
            managed.stop()
            raise LaunchError(
                f"{name} exited with status {proc.returncode} while starting; {log_path}:\n{tail}"
            )
        try:
            ok = healthy()
        except Exception:
            ok = False
        if ok:
            return managed
        if time.monotonic() > deadline:
            tail = managed.log_tail()
            managed.stop()
            raise LaunchError(f"{name} was not healthy within {timeout:.0f} s; {log_path}:\n{tail}")
        time.sleep(0.1)
