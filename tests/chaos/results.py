"""The fault-injection suite's results: one row per scenario, filled in as it runs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ChaosResult:
    scenario: str
    changes: int = 0
    lost: int | None = None
    duplicated: int | None = None
    dead_lettered: int | None = None
    recovery_s: float | None = None
    ok: bool = False
    notes: str = ""


_RESULTS: dict[str, ChaosResult] = {}
_OUTCOMES: dict[str, str] = {}
_ERRORS: dict[str, str] = {}
