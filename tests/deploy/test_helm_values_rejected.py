"""Values the chart must refuse at install time, with a message that names what to change.

The cases are files (tests/deploy/invalid_values/*.yaml), each layered over a ci/ values set
the way `helm install -f base -f case` layers them. JSON-schema violations come from the
values.schema.json files; contradictions the schema cannot express come from the charts'
validation templates.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from .support import CI_DIR, load_values, render, stubbed_chart

CASES_DIR = Path(__file__).resolve().parent / "invalid_values"
CASES = sorted(CASES_DIR.glob("*.yaml"))


def helm_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Helm's coalescing of two -f files: maps merge, everything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = helm_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def directives(path: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {"base": [], "expect": [], "forbid": []}
    for line in path.read_text().splitlines():
        match = re.match(r"#\s*(base|expect|forbid):\s*(.+?)\s*$", line)
        if match:
            found[match.group(1)].append(match.group(2))
    return found


@pytest.fixture(scope="module")
def chart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return stubbed_chart(tmp_path_factory.mktemp("chart"))


def test_there_are_cases() -> None:
    assert len(CASES) >= 20
    for path in CASES:
        d = directives(path)
        assert len(d["base"]) == 1 and (CI_DIR / d["base"][0]).is_file(), path.name
        assert d["expect"], f"{path.name} expects nothing"


@pytest.mark.parametrize("case", CASES, ids=[p.stem for p in CASES])
def test_values_are_rejected_with_a_clear_message(chart: Path, case: Path) -> None:
    import helm_python as helm

    d = directives(case)
    base = load_values(CI_DIR / d["base"][0])
    values = helm_merge(base, yaml.safe_load(case.read_text()) or {})

    # The base alone is fine: the failure is the case's doing.
    render(chart, base)
    with pytest.raises((helm.HelmValuesError, helm.HelmRenderError)) as caught:
        render(chart, values)
    message = str(caught.value)
    for expected in d["expect"]:
        assert expected in message, f"{case.name}: {expected!r} not in:\n{message}"
    for forbidden in d["forbid"]:
        assert forbidden not in message, f"{case.name}: the message echoes {forbidden!r}"
    assert "nil pointer" not in message and "<no value>" not in message, message


def test_schema_errors_name_the_chart_and_the_path(chart: Path) -> None:
    import helm_python as helm

    values = helm_merge(
        load_values(CI_DIR / "direct-values.yaml"), {"pipeline": {"ports": {"health": 70000}}}
    )
    with pytest.raises(helm.HelmValuesError) as caught:
        render(chart, values)
    message = str(caught.value)
    assert "pipeline:" in message and "/ports/health" in message and "maximum" in message
