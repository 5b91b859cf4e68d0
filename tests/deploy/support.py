"""Shared helpers of the deployment tests: chart rendering, manifest validation, Dockerfiles.

Rendering uses Helm's own engine (helm-python-sdk binds Helm's Go SDK; no helm binary, no
cluster). The Bitnami Kafka and Schema Registry charts cannot be downloaded here (no network
to chart repositories), so `stubbed_chart` copies the umbrella chart and drops small stand-in
charts with the same names, versions and object names into its charts/ folder; that makes
the umbrella's dependency conditions (kafka.enabled, schemaRegistry.enabled) observable in
the rendered output. The real Bitnami templates are not rendered by any test.
"""

from __future__ import annotations

import json
import re
import shutil
import textwrap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "helm" / "cdc-platform"
CI_DIR = CHART_DIR / "ci"
DOCKER_DIR = REPO_ROOT / "docker"
RELEASE = "cdc-platform"
NAMESPACE = "cdc"

# Kubernetes versions every manifest is validated against: the guide's minimum and the
# newest schema kubernetes-validate ships.
KUBE_MIN_VERSION = "1.26.0"


# --------------------------------------------------------------------------- YAML


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (the API server's strict decoding does)."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def load_yaml_strict(text: str) -> list[Any]:
    return [doc for doc in yaml.load_all(text, Loader=_UniqueKeyLoader) if doc is not None]


def load_values(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text()) or {}
    assert isinstance(data, dict), f"{path}: values must be a mapping"
    return data


def ci_values_files() -> list[Path]:
    return sorted(CI_DIR.glob("*-values.yaml"))


# --------------------------------------------------------------------------- Helm


def chart_dependencies() -> list[dict[str, Any]]:
    meta = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    return list(meta.get("dependencies", []))


def _stub_chart(target: Path, name: str, version: str, objects: str) -> None:
    (target / "templates").mkdir(parents=True)
    (target / "Chart.yaml").write_text(
        f"apiVersion: v2\nname: {name}\nversion: {version}\n"
        "description: test stand-in for the Bitnami chart of the same name and version\n"
    )
    (target / "values.yaml").write_text("nameOverride: ''\n")
    (target / "templates" / "objects.yaml").write_text(objects)


# Names follow Bitnami's common.names.fullname (release name, or release-name + chart name,
# where the chart name honours nameOverride); labels follow common.labels.matchLabels.
_STUB_OBJECTS = textwrap.dedent(
    """\
    {{- $name := default .Chart.Name .Values.nameOverride -}}
    {{- $long := printf "%s-%s" .Release.Name $name -}}
    {{- $full := ternary .Release.Name $long (contains $name .Release.Name) -}}
    {{- $labels := dict "app.kubernetes.io/name" $name -}}
    {{- $_ := set $labels "app.kubernetes.io/instance" .Release.Name -}}
    apiVersion: v1
    kind: Service
    metadata:
      name: {{ $full }}
      labels: {{ toJson $labels }}
    spec:
      selector: {{ toJson $labels }}
      ports: [{name: main, port: __PORT__}]
    ---
    apiVersion: apps/v1
    kind: StatefulSet
    metadata:
      name: {{ $full }}
    spec:
      serviceName: {{ $full }}
      selector:
        matchLabels: {{ toJson $labels }}
      template:
        metadata:
          labels: {{ toJson $labels }}
        spec:
          containers:
            - name: main
              image: stand-in/{{ $name }}:test
              resources: {requests: {cpu: 100m, memory: 128Mi}, limits: {memory: 256Mi}}
    """
)


def stubbed_chart(tmp_dir: Path) -> Path:
    """A copy of the umbrella chart with stand-ins for its downloadable dependencies."""
    chart = tmp_dir / "cdc-platform"
    shutil.copytree(CHART_DIR, chart)
    ports = {"kafka": 9092, "schema-registry": 8081}
    for dep in chart_dependencies():
        if dep.get("repository"):
            _stub_chart(
                chart / "charts" / dep["name"],
                dep["name"],
                str(dep["version"]),
                _STUB_OBJECTS.replace("__PORT__", str(ports.get(dep["name"], 8080))),
            )
    return chart


@dataclass(frozen=True)
class Manifest:
    source: str
    obj: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.obj["kind"])

    @property
    def name(self) -> str:
        return str(self.obj["metadata"]["name"])

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.obj["metadata"].get("labels") or {})


@dataclass(frozen=True)
class Rendered:
    manifests: list[Manifest]
    text: dict[str, str]  # template path -> rendered text (NOTES.txt excluded)

    def of_kind(self, kind: str) -> list[Manifest]:
        return [m for m in self.manifests if m.kind == kind]

    def get(self, kind: str, name: str) -> Manifest:
        found = [m for m in self.manifests if m.kind == kind and m.name == name]
        assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
        return found[0]

    def names(self, kind: str) -> set[str]:
        return {m.name for m in self.of_kind(kind)}

    @property
    def all_text(self) -> str:
        return "\n".join(self.text.values())


def render(
    chart_dir: Path,
    values: dict[str, Any] | None = None,
    *,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
) -> Rendered:
    import helm_python as helm

    with helm.Chart.load(chart_dir) as chart:
        out = chart.render(values or {}, name=release, namespace=namespace, is_install=True)
    manifests: list[Manifest] = []
    text: dict[str, str] = {}
    for path, body in sorted(out.items()):
        if path.endswith("NOTES.txt") or not body.strip():
            continue
        text[path] = body
        for doc in load_yaml_strict(body):
            assert isinstance(doc, dict) and "kind" in doc, f"{path}: not a Kubernetes object"
            manifests.append(Manifest(path, doc))
    return Rendered(manifests, text)


# --------------------------------------------------------------------------- Kubernetes


def kube_versions() -> tuple[str, ...]:
    import kubernetes_validate

    return (KUBE_MIN_VERSION, kubernetes_validate.latest_version() + ".0")


def validate_manifests(manifests: Iterable[Manifest]) -> list[str]:
    """Strict schema validation (unknown fields are errors) for every supported version."""
    import kubernetes_validate

    errors: list[str] = []
    for manifest in manifests:
        for version in kube_versions():
            try:
                kubernetes_validate.validate(manifest.obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                errors.append(
                    f"{manifest.source}: {manifest.kind}/{manifest.name} @ {version}: "
                    f"{path}: {exc.message}"
                )
            except kubernetes_validate.SchemaNotFoundError as exc:
                errors.append(f"{manifest.source}: {exc.message}")
    return errors


def pod_spec(workload: Manifest) -> dict[str, Any]:
    spec: dict[str, Any] = workload.obj["spec"]["template"]["spec"]
    return spec


def containers(workload: Manifest) -> list[dict[str, Any]]:
    return list(pod_spec(workload)["containers"])


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --------------------------------------------------------------------------- Dockerfiles


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    base: str
    alias: str | None
    instructions: list[Instruction]

    def find(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(path: Path) -> list[Stage]:
    """Split a Dockerfile into stages of instructions (continuations joined, comments dropped)."""
    logical: list[tuple[int, str]] = []
    buffer = ""
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        buffer += stripped
        logical.append((start, buffer))
        buffer = ""
    stages: list[Stage] = []
    for number, text in logical:
        keyword, _, args = text.partition(" ")
        keyword = keyword.upper()
        args = args.strip()
        if keyword == "FROM":
            parts = args.split()
            alias = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], alias, []))
            continue
        assert stages, f"{path}:{number}: instruction before FROM"
        stages[-1].instructions.append(Instruction(keyword, args, number))
    return stages


def exec_form(instruction: Instruction) -> list[str]:
    value = json.loads(instruction.args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def healthcheck_command(stage: Stage) -> list[str]:
    (check,) = stage.find("HEALTHCHECK")
    match = re.search(r"\bCMD\s+(\[.*\])\s*$", check.args)
    assert match, f"HEALTHCHECK is not in exec form: {check.args}"
    command = json.loads(match.group(1))
    assert isinstance(command, list)
    return [str(c) for c in command]


def image_command(dockerfile: Path) -> list[str]:
    """ENTRYPOINT + CMD of the final stage: the command line the image runs."""
    final = parse_dockerfile(dockerfile)[-1]
    (entrypoint,) = final.find("ENTRYPOINT")
    (cmd,) = final.find("CMD")
    return exec_form(entrypoint) + exec_form(cmd)


@cache
def pyproject() -> dict[str, Any]:
    import tomllib

    with (REPO_ROOT / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)


def iter_strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from iter_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from iter_strings(item)
