"""services.lifecycle.start_shutdown_watchdog in a process of its own: it ends a process
whose stop hangs (even with the event loop blocked) with exit 3 and one log line, and it
never holds up or changes the exit of a process that stops in time."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from services import lifecycle
from tests.support.pipeline import REPO

_SCRIPT = """
import asyncio, sys, time
from services import lifecycle
from services.logging import setup_logging
setup_logging("sink:x")
lifecycle.start_shutdown_watchdog("sink:x", float(sys.argv[1]))
async def stop() -> None:
    time.sleep(float(sys.argv[2]))  # blocks the event loop: nothing else runs
asyncio.run(stop())
sys.exit(0)
"""


def _run(budget: float, stop_takes: float) -> tuple[int, float, list[dict[str, object]]]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(budget), str(stop_takes)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "CDC_LOG_FORMAT": "json"},
        timeout=60,
    )
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    return done.returncode, time.monotonic() - started, lines


def test_a_stop_that_hangs_is_ended_after_its_budget_and_the_margin() -> None:
    code, took, lines = _run(budget=0.5, stop_takes=30)
    limit = 0.5 + lifecycle.WATCHDOG_MARGIN_SECONDS
    assert code == lifecycle.EXIT_DRAIN_INCOMPLETE == 3
    assert limit <= took < limit + 5, took
    forced = [line for line in lines if line["event"] == "process.shutdown_forced"]
    assert len(forced) == 1, lines
    assert forced[0]["stage"] == "sink:x" and forced[0]["after_seconds"] >= limit


def test_a_stop_within_the_budget_exits_as_it_would_have() -> None:
    code, took, lines = _run(budget=5.0, stop_takes=0.2)
    assert code == 0
    assert took < 5.0, took  # the daemon thread does not keep the process alive
    assert not [line for line in lines if line["event"] == "process.shutdown_forced"]
