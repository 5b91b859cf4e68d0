"""The fault-injection suite (`make chaos`): kept out of the default test run, and a results
table at the end of the run (printed, and written as markdown).

The scenarios are collected only when ``CDC_CHAOS=1`` (what `make chaos` sets) or when a path
under tests/chaos is named on the command line; plain ``pytest`` / `make test` skip the
directory without collecting it. The table goes to ``$CDC_CHAOS_REPORT`` (default
``build/chaos-results.md``).
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.chaos.results import _ERRORS, _OUTCOMES, _RESULTS, ChaosResult

_HERE = Path(__file__).resolve().parent
_REPO = _HERE.parents[1]


def _enabled(config: pytest.Config) -> bool:
    if os.environ.get("CDC_CHAOS") == "1":
        return True
    for arg in config.args:
        path = Path(arg.split("::", 1)[0])
        try:
            path = path.resolve()
        except OSError:
            continue
        if path == _HERE or _HERE in path.parents:
            return True
    return False


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if collection_path.suffix == ".py" and not _enabled(config):
        return True
    return None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chaos: fault-injection scenario (make chaos)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker("chaos")


@pytest.fixture
def chaos_result(request: pytest.FixtureRequest) -> Iterator[Callable[[str], ChaosResult]]:
    """`chaos_result(name)` returns the test's result row; fill it in as the scenario runs."""

    def make(name: str) -> ChaosResult:
        result = ChaosResult(name)
        _RESULTS[request.node.nodeid] = result
        return result

    yield make


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not report.nodeid.startswith("tests/chaos/"):
        return
    first = report.nodeid not in _OUTCOMES
    if (first or report.failed) and (report.when == "call" or report.failed or report.skipped):
        _OUTCOMES[report.nodeid] = report.outcome
    if report.failed and report.nodeid not in _ERRORS:
        text = str(getattr(report.longrepr, "reprcrash", None) or report.longreprtext)
        _ERRORS[report.nodeid] = " ".join(text.split())[:300]


def _fmt(value: float | int | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def results_markdown() -> str:
    rows = [
        "| scenario | changes | lost | duplicated | dead-lettered | recovery s | result |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    notes: list[str] = []
    for nodeid, outcome in _OUTCOMES.items():
        if nodeid not in _RESULTS and outcome == "passed":
            continue  # a check of the harness itself, not a scenario
        result = _RESULTS.get(nodeid) or ChaosResult(nodeid.split("::")[-1])
        verdict = "pass" if outcome == "passed" else ("skipped" if outcome == "skipped" else "FAIL")
        rows.append(
            f"| {result.scenario} | {result.changes} | {_fmt(result.lost)} |"
            f" {_fmt(result.duplicated)} | {_fmt(result.dead_lettered)} |"
            f" {_fmt(result.recovery_s, 1)} | {verdict} |"
        )
        detail = result.notes  # a scenario that got to its checks names its problems there
        if outcome != "passed" and nodeid in _ERRORS and result.lost is None:
            detail = f"{detail} {_ERRORS[nodeid]}".strip()
        if detail:
            notes.append(f"- {result.scenario}: {detail}")
    return "\n".join(rows + (["", *notes] if notes else []))


def _machine() -> str:
    cpus = os.cpu_count()
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=_REPO
        ).stdout.strip()
    except OSError:
        rev = "?"
    return f"{platform.node()}, {cpus} CPUs, Python {platform.python_version()}, commit {rev}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _OUTCOMES or not any(nodeid in _RESULTS for nodeid in _OUTCOMES):
        return
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = results_markdown()
    header = f"Fault-injection results, {when} ({_machine()})"
    terminalreporter.write_sep("=", "fault-injection results")
    terminalreporter.write_line(header)
    terminalreporter.write_line(text)
    report = Path(os.environ.get("CDC_CHAOS_REPORT", str(_REPO / "build" / "chaos-results.md")))
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(f"{header}\n\n{text}\n")
    terminalreporter.write_line(f"written to {report}")
