"""`cdc` whose ingest read loop ignores its cancel, as on Python 3.11 when `asyncio.wait_for`
swallowed it (CPython gh-86296): reads as usual until cancelled, then waits forever and
cancels no longer stop it. Run as ``python -m tests.support.hung_ingest ingest ...``; only
the shutdown watchdog (services/lifecycle.py) can end such a process within its budget."""

from __future__ import annotations

import asyncio
import contextlib
import sys

from services.cli.main import main
from services.ingest.service import IngestService

_read_loop = IngestService._read_loop


async def _read_loop_ignoring_cancel(self: IngestService) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        await _read_loop(self)
    while True:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            continue


IngestService._read_loop = _read_loop_ignoring_cancel  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main())
