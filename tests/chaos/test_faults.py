"""Fault-injection scenarios: a steady keyed workload, one fault, recovery, then every sink
compared with the source row by row (see harness.py for what lost / duplicated mean).

Each scenario records its row of the results table (conftest.py) before asserting.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from services.stack.postgres import PostgresServer
from tests.chaos.harness import (
    CdcRun,
    Outcome,
    Sink,
    prepare_sink,
    prepare_source,
    run_scenario,
    write_chaos_configs,
)
from tests.chaos.results import ChaosResult
from tests.support.pipeline import wait_until

pytestmark = pytest.mark.timeout(150)

Record = Callable[[str], ChaosResult]


def _finish(result: ChaosResult, outcome: Outcome, *extra: str, poison: bool = False) -> None:
    """Fill in the result row, then assert: nothing lost, nothing applied twice."""
    problems = [*extra, *outcome.problems(poison)]
    result.changes = outcome.changes
    result.lost = outcome.lost
    result.duplicated = outcome.duplicated
    result.dead_lettered = outcome.dead_lettered
    result.recovery_s = outcome.recovery_s
    notes = [f"{outcome.audited} sink row writes audited"]
    if outcome.converge_s is not None:
        notes.append(f"converged {outcome.converge_s:.1f} s after the workload stopped")
    result.notes = "; ".join(notes + problems)
    result.ok = not problems
    assert not problems, problems


def _pipeline(
    tmp_path: Path,
    source: PostgresServer,
    sink_server: PostgresServer,
    name: str,
    **sink_kwargs: Any,
) -> tuple[str, Sink, Any]:
    source_dsn = prepare_source(source, f"{name}_src")
    sink = prepare_sink(sink_server, f"{name}_sink", **sink_kwargs)
    files = write_chaos_configs(tmp_path, source, f"{name}_src", [sink], pipeline_id=name)
    return source_dsn, sink, files


def _kill_child(run: CdcRun, marker: str) -> tuple[Callable[[], None], Callable[[], float]]:
    """inject/clear for a `kill -9` of one of `cdc run`'s children; the supervisor restarts
    it, so recovery counts from the kill."""
    state: dict[str, Any] = {}

    def inject() -> None:
        [pid] = run.children(marker)
        state["pid"], state["at"] = pid, time.monotonic()
        os.kill(pid, signal.SIGKILL)

    def clear() -> float:
        wait_until(
            lambda: any(p != state["pid"] for p in run.children(marker)),
            30,
            f"supervisor restarted {marker.strip()}\n" + run.log_tail(),
        )
        return float(state["at"])

    return inject, clear


@pytest.mark.parametrize(
    ("marker", "label"),
    [(" ingest ", "1. kill -9 ingest"), ("--sink-id", "2. kill -9 sink")],
    ids=["ingest", "sink"],
)
def test_kill_9_stage_under_cdc_run(
    pg_server: PostgresServer, tmp_path: Path, chaos_result: Record, marker: str, label: str
) -> None:
    result = chaos_result(label)
    name = "kill_ingest" if "ingest" in marker else "kill_sink"
    source_dsn, sink, files = _pipeline(tmp_path, pg_server, pg_server, name)
    run = CdcRun(files, tmp_path).start()
    try:
        run.wait_ready()
        inject, clear = _kill_child(run, marker)
        outcome = run_scenario(source_dsn, [sink], inject, clear)
    finally:
        code = run.stop()
    _finish(result, outcome, *([] if code == 0 else [f"cdc run exited {code} on SIGTERM"]))
