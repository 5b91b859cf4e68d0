"""docker/connect/fetch_plugins.py, the download-verify-unpack step of Dockerfile.connect.

Maven Central and Confluent Hub are out of reach here, so a local HTTP server on 127.0.0.1
serves archives laid out like theirs, built by the test with the versions pinned in
Dockerfile.connect. The script runs exactly as the image's RUN line runs it, with only the
two base URLs pointed at the local server.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from .support import DOCKER_DIR, REPO_ROOT, parse_dockerfile

SCRIPT = DOCKER_DIR / "connect" / "fetch_plugins.py"
CONNECTORS = ("postgres", "mysql", "mongodb", "sqlserver")


def pinned_versions() -> tuple[str, str]:
    plugins = parse_dockerfile(REPO_ROOT / "Dockerfile.connect")[0]
    args = dict(i.args.split("=", 1) for i in plugins.find("ARG") if "=" in i.args)
    return args["DEBEZIUM_VERSION"], args["AVRO_CONVERTER_VERSION"]


def tarball(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def zipball(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@dataclass
class Repo:
    """What the fake Maven Central + Confluent Hub serve: URL path -> bytes."""

    debezium: str
    avro: str
    files: dict[str, bytes] = field(default_factory=dict)

    def debezium_path(self, connector: str) -> str:
        artifact, version = f"debezium-connector-{connector}", self.debezium
        return f"/maven/io/debezium/{artifact}/{version}/{artifact}-{version}-plugin.tar.gz"

    def avro_path(self) -> str:
        plugin = "confluentinc/kafka-connect-avro-converter"
        name = f"confluentinc-kafka-connect-avro-converter-{self.avro}"
        return f"/hub/api/plugins/{plugin}/versions/{self.avro}/{name}.zip"

    def publish_debezium(
        self, connector: str, members: dict[str, bytes] | None = None, sha1: str | None = None
    ) -> None:
        top = f"debezium-connector-{connector}"
        data = tarball(
            members
            or {
                f"{top}/{top}-{self.debezium}.jar": b"jar " + connector.encode(),
                f"{top}/debezium-core-{self.debezium}.jar": b"core",
            }
        )
        self.files[self.debezium_path(connector)] = data
        self.files[self.debezium_path(connector) + ".sha1"] = (
            sha1 or hashlib.sha1(data).hexdigest()  # what Maven Central publishes
        ).encode() + b"  plugin.tar.gz\n"

    def publish_avro(self, members: dict[str, bytes] | None = None) -> None:
        top = f"confluentinc-kafka-connect-avro-converter-{self.avro}"
        self.files[self.avro_path()] = zipball(
            members
            or {
                f"{top}/manifest.json": b"{}",
                f"{top}/lib/kafka-connect-avro-converter-{self.avro}.jar": b"avro",
                f"{top}/lib/kafka-avro-serializer-{self.avro}.jar": b"serializer",
            }
        )

    def publish_all(self) -> None:
        for connector in CONNECTORS:
            self.publish_debezium(connector)
        self.publish_avro()


@pytest.fixture
def repo() -> Iterator[tuple[Repo, str]]:
    debezium, avro = pinned_versions()
    state = Repo(debezium, avro)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = state.files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def run_script(
    base: str, dest: Path, *extra: str, pins: str = ""
) -> subprocess.CompletedProcess[str]:
    debezium, avro = pinned_versions()
    env = dict(os.environ, PLUGIN_SHA256=pins)
    return subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--dest",
            str(dest),
            "--debezium-version",
            debezium,
            "--connectors",
            ",".join(CONNECTORS),
            "--avro-converter-version",
            avro,
            "--maven-url",
            f"{base}/maven",
            "--hub-url",
            f"{base}/hub",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_installs_four_connectors_and_the_avro_converter(
    repo: tuple[Repo, str], tmp_path: Path
) -> None:
    state, base = repo
    state.publish_all()
    result = run_script(base, tmp_path / "plugins")
    assert result.returncode == 0, result.stderr
    for connector in CONNECTORS:
        jar = (
            tmp_path
            / "plugins"
            / f"debezium-connector-{connector}"
            / f"debezium-connector-{connector}-{state.debezium}.jar"
        )
        assert jar.read_bytes() == b"jar " + connector.encode()
    avro_dir = (
        tmp_path / "plugins" / f"confluentinc-kafka-connect-avro-converter-{state.avro}" / "lib"
    )
    assert (avro_dir / f"kafka-connect-avro-converter-{state.avro}.jar").is_file()
    assert sorted(p.name for p in (tmp_path / "plugins").iterdir()) == sorted(
        [f"debezium-connector-{c}" for c in CONNECTORS]
        + [f"confluentinc-kafka-connect-avro-converter-{state.avro}"]
    )


def test_a_tarball_not_matching_the_published_sha1_fails(
    repo: tuple[Repo, str], tmp_path: Path
) -> None:
    state, base = repo
    state.publish_all()
    state.publish_debezium("mysql", sha1="0" * 40)
    result = run_script(base, tmp_path / "plugins")
    assert result.returncode == 1
    assert "does not match the published" in result.stderr and "mysql" in result.stderr


def test_sha256_pins_are_enforced(repo: tuple[Repo, str], tmp_path: Path) -> None:
    state, base = repo
    state.publish_all()
    good = hashlib.sha256(state.files[state.avro_path()]).hexdigest()
    assert run_script(base, tmp_path / "a", pins=f"avro-converter={good}").returncode == 0
    bad = run_script(base, tmp_path / "b", pins=f"avro-converter={'f' * 64}")
    assert bad.returncode == 1 and "does not match the pinned" in bad.stderr


def test_path_traversal_in_an_archive_is_refused(repo: tuple[Repo, str], tmp_path: Path) -> None:
    state, base = repo
    state.publish_all()
    state.publish_debezium("postgres", members={"../../escaped.jar": b"x"})
    result = run_script(base, tmp_path / "deep" / "plugins")
    assert result.returncode == 1 and "refusing archive member" in result.stderr
    assert not (tmp_path / "escaped.jar").exists()


def test_a_plugin_without_its_connector_jar_fails(repo: tuple[Repo, str], tmp_path: Path) -> None:
    state, base = repo
    state.publish_all()
    state.publish_debezium(
        "sqlserver", members={"debezium-connector-sqlserver/README.md": b"no jar"}
    )
    result = run_script(base, tmp_path / "plugins")
    assert result.returncode == 1 and "missing after unpacking" in result.stderr


def test_a_missing_artifact_fails_at_once(repo: tuple[Repo, str], tmp_path: Path) -> None:
    state, base = repo
    state.publish_all()
    del state.files[state.avro_path()]
    result = run_script(base, tmp_path / "plugins")
    assert result.returncode == 1 and "HTTP 404" in result.stderr
