"""Process lifecycle shared by `cdc run` and its stages: the per-machine pipeline lock,
children that die with their supervisor, startup errors and exit codes.

Children of `cdc run` stop (as on SIGTERM: drain, confirm, exit) when the supervisor goes
away, by two mechanisms: Linux ``PR_SET_PDEATHSIG`` (SIGTERM when the parent dies) and, where
that is not available or the parent died before it was set, a pipe whose write end only the
supervisor holds: the child watches the read end (``CDC_PARENT_PIPE_FD``) and stops at EOF.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

EXIT_OK = 0
EXIT_STARTUP = 2  # configuration or startup error: restarting will not help
EXIT_DRAIN_INCOMPLETE = 3  # stopped before every batch was acked (redelivered on restart)

PARENT_PIPE_ENV = "CDC_PARENT_PIPE_FD"
PARENT_PID_ENV = "CDC_PARENT_PID"
RUNTIME_DIR_ENV = "CDC_RUNTIME_DIR"


class StartupError(Exception):
    """A stage cannot start (a port in use, a sink type without a writer); the message names
    the port or setting. The CLI prints it as one line and exits 2, without a traceback."""


class PipelineRunningError(Exception):
    """The pipeline already runs on this machine (its lock is held)."""


# ----------------------------------------------------------------------------- the lock


def runtime_dir() -> Path:
    """Where lock files live: $CDC_RUNTIME_DIR, else $XDG_RUNTIME_DIR/cdc, else
    <temp dir>/cdc-<uid>."""
    explicit = os.environ.get(RUNTIME_DIR_ENV, "").strip()
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_RUNTIME_DIR", "").strip()
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "cdc"
    return Path(tempfile.gettempdir()) / f"cdc-{os.getuid()}"


def lock_path(pipeline_id: str) -> Path:
    return runtime_dir() / f"{pipeline_id}.lock"


class PipelineLock:
    """An exclusive ``flock`` on <runtime dir>/<pipeline_id>.lock, holding the owner's pid.

    The stages inherit the descriptor (``fd``), so the lock stays held until the supervisor
    and every stage it started are gone: a new `cdc run` cannot start while orphaned stages
    of an old one still drain. It guards this machine only; across machines the replication
    slot is the guard (PostgreSQL lets one walsender stream from a slot at a time).
    """

    def __init__(self, pipeline_id: str) -> None:
        self.pipeline_id = pipeline_id
        self.path = lock_path(pipeline_id)
        self.fd: int | None = None

    def acquire(self) -> PipelineLock:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise PipelineRunningError(self._running_message()) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None

    def _running_message(self) -> str:
        pid = holder_pid(self.pipeline_id)
        who = describe_holder(pid)
        return (
            f"pipeline '{self.pipeline_id}' is already running on this machine ({who}; "
            f"lock {self.path}): stop it first"
        )


def holder_pid(pipeline_id: str) -> int | None:
    """The pid written in the pipeline's lock file (whoever holds or last held it)."""
    try:
        text = lock_path(pipeline_id).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def describe_holder(pid: int | None) -> str:
    """`pid N`, or what is known when the `cdc run` that wrote it is gone (its stages,
    which inherited the lock, are still stopping)."""
    if not pid:
        return "pid unknown"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"pid {pid} has exited, its stages are still stopping"
    except PermissionError:
        pass
    return f"pid {pid}"


def running_here(pipeline_id: str) -> int | None:
    """The pid of the `cdc run` of `pipeline_id` on this machine (0 if its pid is unknown),
    None when its lock is free."""
    path = lock_path(pipeline_id)
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return holder_pid(pipeline_id) or 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# ------------------------------------------------------------------ dying with the parent


# argv: PARENT_PID PROGRAM ARGS...: sets the death signal in the child, then execs PROGRAM
# (same pid; exit 127, like a shell, when it cannot be run). A ``preexec_fn`` would run
# Python between fork and exec, where the parent's fork handlers run too: a parent holding
# gRPC channels then aborts the child (seen as SIGABRT in tests).
_TRAMPOLINE = """\
import ctypes, os, signal, sys
parent = int(sys.argv[1])
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
if os.getppid() != parent:
    sys.exit(143)  # the parent died before the signal was armed
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as exc:
    print(f"could not run {sys.argv[2]}: {exc}", file=sys.stderr, flush=True)
    sys.exit(127)
"""


def with_parent_death_signal(argv: Sequence[str]) -> list[str]:
    """`argv` run so that it gets SIGTERM when this process dies, even by SIGKILL (Linux
    ``PR_SET_PDEATHSIG``); elsewhere `argv` itself (the pipe watched by watch_parent covers
    it)."""
    if not sys.platform.startswith("linux"):
        return list(argv)
    return [sys.executable, "-S", "-c", _TRAMPOLINE, str(os.getpid()), *argv]


def watch_parent(loop: asyncio.AbstractEventLoop, on_gone: Callable[[], None]) -> None:
    """Call `on_gone` once when the supervisor that started this process is gone: EOF on the
    pipe named by CDC_PARENT_PIPE_FD, or (without it) a changed parent pid."""
    fd_text = os.environ.get(PARENT_PIPE_ENV, "").strip()
    if fd_text.isdigit():
        fd = int(fd_text)
        try:
            os.set_blocking(fd, False)
        except OSError:
            fd = -1
        if fd >= 0:

            def readable() -> None:
                try:
                    data = os.read(fd, 64)
                except BlockingIOError:
                    return
                except OSError:
                    data = b""
                if not data:
                    loop.remove_reader(fd)
                    on_gone()

            loop.add_reader(fd, readable)
            return
    parent_text = os.environ.get(PARENT_PID_ENV, "").strip()
    if parent_text.isdigit():
        parent = int(parent_text)

        async def poll() -> None:
            while os.getppid() == parent:
                await asyncio.sleep(1.0)
            on_gone()

        loop.create_task(poll(), name="watch-parent")


# ------------------------------------------------------------------------ shutdown budget


def sink_stop_seconds(total: float) -> float:
    """Of a shutdown budget of `total` seconds, what a sink stage gets to stop (after the
    ingest stage is done): its gRPC grace plus closing its writer."""
    return min(5.0, 0.2 * total)


def ingest_drain_seconds(total: float) -> float:
    """Of a shutdown budget of `total` seconds, how long the ingest stage waits for acks of
    in-flight batches. The rest covers confirming the final position, the process exit and,
    under `cdc run`, stopping the sinks afterwards."""
    return max(0.5, total - sink_stop_seconds(total) - min(3.0, 0.1 * total))


# ------------------------------------------------------------------- the last resort

# Past a stage's part of the budget: time to log, exit and let the supervisor notice.
WATCHDOG_MARGIN_SECONDS = 3.0


def ingest_stop_seconds(total: float) -> float:
    """Of a shutdown budget of `total` seconds, the ingest stage's part: everything but the
    sinks' part (which comes after it under `cdc run`)."""
    return total - sink_stop_seconds(total)


def start_shutdown_watchdog(
    stage: str, budget_seconds: float, exit_code: int = EXIT_DRAIN_INCOMPLETE
) -> threading.Thread:
    """Once a stop is requested: end the process with `exit_code` if it still runs
    `budget_seconds` + WATCHDOG_MARGIN_SECONDS later, logging ``process.shutdown_forced``.

    A daemon thread, so it works whatever the event loop does (a task that ignores its
    cancel, a blocking call). It never fires on a stop that keeps to its budget; an exit
    before it does not wait for it. Nothing acked is lost by it: what was not confirmed is
    redelivered on the next start.
    """
    limit = budget_seconds + WATCHDOG_MARGIN_SECONDS
    started = time.monotonic()

    def watch() -> None:
        time.sleep(limit)
        with contextlib.suppress(Exception):
            structlog.get_logger(__name__).error(
                "process.shutdown_forced",
                stage=stage,
                after_seconds=round(time.monotonic() - started, 1),
                budget_seconds=budget_seconds,
                exit_code=exit_code,
            )
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(exit_code)

    thread = threading.Thread(target=watch, name=f"shutdown-watchdog-{stage}", daemon=True)
    thread.start()
    return thread
