"""Free TCP ports for the stages `cdc run` starts (and for tests, bench and the demo).

A port found free is only free *now*: between the pick and the child's bind, another process
that asked the kernel for a free port can be handed the same one. Within one process a set of
issued ports prevents that; across processes (several `cdc run`s on one machine, parallel test
workers) each pick is also noted as a file in a shared reservation directory
(``$TMPDIR/cdc-ports-UID``, or ``$CDC_PORT_RESERVATIONS``) that other pickers skip for
:data:`RESERVATION_SECONDS`. The directory is best effort: when it cannot be used (another
user's directory in a shared /tmp, a read-only file system), only the in-process set applies.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

__all__ = ["RESERVATION_SECONDS", "find_free_port"]

RESERVATIONS_ENV: Final = "CDC_PORT_RESERVATIONS"
#: How long a picked port is kept from other processes' picks: far longer than a child needs
#: to bind it, and long enough that a stage restarted on the port it had keeps it.
RESERVATION_SECONDS: Final = 600.0

_ISSUED: set[int] = set()
_ISSUED_LOCK = threading.Lock()


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free now and not handed out recently, by this process or
    (as far as the reservation directory knows) by another one."""
    with _ISSUED_LOCK, _reservations() as reserve:
        for _ in range(200):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((host, 0))
                port = int(sock.getsockname()[1])
            if port in _ISSUED or not reserve(port):
                continue
            _ISSUED.add(port)
            return port
    raise RuntimeError(f"could not find a free TCP port on {host}")


def _directory() -> Path | None:
    return private_directory(RESERVATIONS_ENV, "cdc-ports")


def private_directory(env: str, name: str) -> Path | None:
    """`$env`, else `<tmp>/<name>-<uid>`, created 0700; None when it is not ours (a shared
    /tmp where someone else made it first) or cannot be made."""
    configured = os.environ.get(env, "").strip()
    path = Path(configured or Path(tempfile.gettempdir()) / f"{name}-{os.geteuid()}")
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.lstat()
    except OSError:
        return None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        return None  # someone else's directory in a shared /tmp: do not trust it
    return path


@contextlib.contextmanager
def _reservations() -> Iterator[Callable[[int], bool]]:
    """Yields ``reserve(port) -> bool`` while holding the directory's lock."""
    directory = _directory()
    if directory is None:
        yield lambda port: True
        return
    try:
        lock_fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        yield lambda port: True
        return
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        now = time.time()
        _prune(directory, now)

        def reserve(port: int) -> bool:
            entry = directory / str(port)
            try:
                if now - entry.stat().st_mtime < RESERVATION_SECONDS:
                    return False  # picked recently by another process
            except FileNotFoundError:
                pass
            except OSError:
                return True
            with contextlib.suppress(OSError):
                entry.write_text(f"{os.getpid()}\n")
            return True

        yield reserve
    finally:
        os.close(lock_fd)  # releases the flock


def _prune(directory: Path, now: float) -> None:
    """Remove reservations that expired (at most one scan a minute, keyed on a stamp file)."""
    stamp = directory / ".pruned"
    try:
        if now - stamp.stat().st_mtime < 60:
            return
    except FileNotFoundError:
        pass
    except OSError:
        return
    with contextlib.suppress(OSError):
        stamp.touch()
        for entry in os.scandir(directory):
            if entry.name.isdigit() and now - entry.stat().st_mtime >= RESERVATION_SECONDS:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
