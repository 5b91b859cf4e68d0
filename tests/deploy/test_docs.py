"""docs/deployment.md stays true: what it names exists and its versions are the pinned ones."""

from __future__ import annotations

import re
from typing import Any

import yaml

from .support import CHART_DIR, REPO_ROOT, chart_dependencies, ci_values_files, parse_dockerfile

DOC = REPO_ROOT / "docs" / "deployment.md"


def doc() -> str:
    return DOC.read_text()


def test_every_path_the_doc_names_exists() -> None:
    paths = set(
        re.findall(
            r"`((?:helm|docker|tests/deploy|docs)/[A-Za-z0-9_./<>*-]+|Dockerfile\.\w+|\.dockerignore)`",
            doc(),
        )
    )
    assert paths, "no paths found"
    for path in paths:
        if "<" in path or "*" in path:
            assert list(REPO_ROOT.glob(path.split("<")[0].split("*")[0] + "*")), path
            continue
        assert (REPO_ROOT / path).exists(), f"docs/deployment.md names {path}, which does not exist"


def test_every_ci_values_set_is_documented() -> None:
    for path in ci_values_files():
        assert f"helm/cdc-platform/ci/{path.name}" in doc(), path.name


def leaves(tree: dict[str, Any], prefix: str = "") -> list[str]:
    out: list[str] = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out += leaves(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


def test_every_global_value_is_documented() -> None:
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    text = doc()
    for key in leaves(values["global"]):
        if key.startswith("security."):
            assert "global.security.allowInsecureImages" in text
            continue
        assert f"`{key}`" in text or f"global.{key}" in text, f"global.{key} is not documented"


def test_pipeline_and_platform_values_are_documented() -> None:
    text = doc()
    pipeline = yaml.safe_load((CHART_DIR / "charts/pipeline/values.yaml").read_text())
    for key in pipeline:
        assert f"`{key}" in text, f"pipeline.{key} is not documented"
    platform = yaml.safe_load((CHART_DIR / "charts/platform/values.yaml").read_text())
    for key in platform["kafkaConnect"]:
        if key in {
            "imagePullSecrets",
            "service",
            "podAnnotations",
            "nodeSelector",
            "tolerations",
            "affinity",
            "podSecurityContext",
            "securityContext",
            "enabled",
        }:
            continue
        assert f"kafkaConnect.{key}" in text, f"platform.kafkaConnect.{key} is not documented"


def test_documented_versions_are_the_pinned_ones() -> None:
    text = doc()
    for dep in chart_dependencies():
        if dep.get("repository"):
            assert f"{dep['name']} {dep['version']}" in text, dep
    plugins, final = parse_dockerfile(REPO_ROOT / "Dockerfile.connect")
    args = dict(i.args.split("=", 1) for i in plugins.find("ARG") if "=" in i.args)
    assert f"`{args['DEBEZIUM_VERSION']}`" in text
    assert f"`{args['AVRO_CONVERTER_VERSION']}`" in text
    assert f"`{final.base}`" in text
    ingest_base = parse_dockerfile(REPO_ROOT / "Dockerfile.ingest")[-1].base
    assert f"`{ingest_base}`" in text
