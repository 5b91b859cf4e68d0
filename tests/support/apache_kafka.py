"""A real Apache Kafka 4.x broker (KRaft combined mode: broker and controller, one node) with
PLAINTEXT, SSL, SASL_PLAINTEXT and SASL_SSL listeners on 127.0.0.1 free ports, for the live
security tests (tests/integration/test_kafka_security_live.py).

* Jars: ``$CDC_KAFKA_LIBS`` (a directory of the broker's jars, e.g. the ``libs/`` of an
  unpacked Kafka distribution), else ``~/.cache/cdc-platform/apache-kafka-<version>/``, filled
  once by ``mvn dependency:copy-dependencies`` on tests/support/kafka_broker/pom.xml (Maven
  Central). :class:`BrokerUnavailable` says which of java, mvn or the registry is missing;
  the fixture turns it into a skip with that reason.
* TLS: a throwaway CA and a server certificate for 127.0.0.1 (tests/support/tls.py), given
  to the broker as PEM files (``ssl.keystore.type=PEM``).
* SASL: PLAIN users in the listeners' JAAS settings; SCRAM-SHA-256/512 credentials written
  into the metadata log at format time (``StorageTool format --add-scram``).
* The broker runs under services/stack/process.py's ``launch`` (its own process group, the
  parent-death signal of services/lifecycle.py), so a killed test run leaves no JVM behind.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from services.net import find_free_port
from services.stack.java import find_java
from services.stack.process import HOST, LaunchError, ManagedProcess, launch
from services.stack.tansu import kafka_api_versions_ok
from tests.support.tls import make_pki

KAFKA_VERSION: Final = os.environ.get("CDC_KAFKA_VERSION", "4.3.1")
LIBS_ENV: Final = "CDC_KAFKA_LIBS"
POM: Final = Path(__file__).resolve().parent / "kafka_broker" / "pom.xml"
PROTOCOLS: Final = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SCRAM_MECHANISMS: Final = ("SCRAM-SHA-256", "SCRAM-SHA-512")
_COMPLETE: Final = ".complete"
_RESOLVE_TIMEOUT: Final = 300.0
# Maven's words when the registry cannot be reached (as opposed to a wrong version or pom).
_UNREACHABLE: Final = re.compile(
    r"Unknown host|Could not transfer|Connection refused|Network is unreachable|timed out"
    r"|No route to host|offline mode",
    re.IGNORECASE,
)


class BrokerUnavailable(Exception):
    """java, mvn or the registry (or the jars) are missing here; the message says which."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str


@dataclass
class ApacheKafka:
    """A running broker: ``bootstrap(protocol)`` is that listener's ``127.0.0.1:PORT``;
    ``ca_file`` verifies its certificate; ``user`` authenticates with PLAIN and both SCRAM
    mechanisms."""

    version: str
    ports: dict[str, int]
    ca_file: str
    user: Credentials
    process: ManagedProcess

    def bootstrap(self, protocol: str) -> str:
        return f"{HOST}:{self.ports[protocol]}"

    def stop(self) -> None:
        self.process.stop()


# ----------------------------------------------------------------------------------- jars


def cache_dir(version: str = KAFKA_VERSION) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", "").strip() or Path.home() / ".cache")
    return base / "cdc-platform" / f"apache-kafka-{version}"


def _has_broker(directory: Path) -> bool:
    return any(directory.glob("kafka_2.13-*.jar"))


def broker_jars(version: str = KAFKA_VERSION) -> Path:
    """The directory of the broker's jars, resolved with Maven on first use (under a file
    lock, so parallel test workers resolve once)."""
    configured = os.environ.get(LIBS_ENV, "").strip()
    if configured:
        libs = Path(configured)
        if not _has_broker(libs):
            raise BrokerUnavailable(f"{LIBS_ENV}={configured} holds no kafka_2.13-*.jar")
        return libs
    target = cache_dir(version)
    if (target / _COMPLETE).exists():
        return target
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerUnavailable(
            "mvn (Maven) not found on PATH: it fetches the Apache Kafka jars"
            f" (apt-get install maven), or set {LIBS_ENV} to a directory of them"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f"{target.name}.lock"):
        if (target / _COMPLETE).exists():
            return target
        _resolve(mvn, version, target)
    return target


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _resolve(mvn: str, version: str, target: Path) -> None:
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    started = time.monotonic()
    try:
        result = subprocess.run(
            [
                mvn,
                "-B",
                "-q",
                "-Dstyle.color=never",
                "-f",
                str(POM),
                f"-Dkafka.version={version}",
                "dependency:copy-dependencies",
                "-DincludeScope=runtime",
                f"-DoutputDirectory={partial}",
            ],
            capture_output=True,
            text=True,
            timeout=_RESOLVE_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        shutil.rmtree(partial, ignore_errors=True)
        raise BrokerUnavailable(
            f"Maven did not fetch the Apache Kafka {version} jars within"
            f" {_RESOLVE_TIMEOUT:.0f} s (registry unreachable or too slow)"
        ) from None
    output = result.stdout + result.stderr
    if result.returncode != 0 or not _has_broker(partial):
        shutil.rmtree(partial, ignore_errors=True)
        errors = [
            line.split("[ERROR]", 1)[1].strip() for line in output.splitlines() if "[ERROR]" in line
        ]
        first = next((e for e in errors if e), output.strip()[-500:])[:400]
        causes = list(_UNREACHABLE.finditer(output))
        if causes:
            # the last one is the root cause ("... Unknown host repo.maven.apache.org")
            cause = output[causes[-1].start() :].splitlines()[0].split(" -> ")[0][:160]
            raise BrokerUnavailable(
                f"the Maven registry is unreachable from here ({cause}), so the Apache Kafka"
                f" {version} jars cannot be fetched"
            )
        raise RuntimeError(f"mvn could not resolve org.apache.kafka:kafka_2.13:{version}: {first}")
    (partial / "resolution-seconds").write_text(f"{time.monotonic() - started:.1f}\n")
    (partial / _COMPLETE).touch()
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)


def java_executable() -> Path:
    try:
        return find_java("apache kafka")
    except LaunchError as exc:
        raise BrokerUnavailable(str(exc)) from None


# --------------------------------------------------------------------------------- broker


def _cluster_id() -> str:
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def server_properties(
    ports: dict[str, int], data_dir: Path, keystore: Path, ca_file: str, user: Credentials
) -> dict[str, str]:
    """server.properties of a one-node KRaft cluster with the four client listeners (PLAIN
    users in JAAS; SCRAM users come from the metadata log) and a PLAINTEXT controller."""
    listeners = {**{p: ports[p] for p in PROTOCOLS}, "CONTROLLER": ports["CONTROLLER"]}
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{HOST}:{ports['CONTROLLER']}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listeners": ",".join(f"{name}://{HOST}:{port}" for name, port in listeners.items()),
        "advertised.listeners": ",".join(f"{p}://{HOST}:{ports[p]}" for p in PROTOCOLS),
        "listener.security.protocol.map": ",".join(
            [f"{p}:{p}" for p in PROTOCOLS] + ["CONTROLLER:PLAINTEXT"]
        ),
        "sasl.enabled.mechanisms": ",".join(("PLAIN", *SCRAM_MECHANISMS)),
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(keystore),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": ca_file,
        "ssl.client.auth": "none",
        "log.dirs": str(data_dir),
        "num.partitions": "1",
        "auto.create.topics.enable": "false",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
    }
    plain = (
        "org.apache.kafka.common.security.plain.PlainLoginModule required"
        f' user_{user.username}="{user.password}";'
    )
    scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
    for listener in ("sasl_plaintext", "sasl_ssl"):
        props[f"listener.name.{listener}.plain.sasl.jaas.config"] = plain
        for mechanism in SCRAM_MECHANISMS:
            props[f"listener.name.{listener}.{mechanism.lower()}.sasl.jaas.config"] = scram
    return props


def _write_properties(path: Path, props: dict[str, str]) -> None:
    # No value here holds a backslash, newline or leading blank, so no escaping is needed.
    path.write_text("".join(f"{key}={value}\n" for key, value in props.items()))


_LOG4J2: Final = """\
status = warn
appender.console.type = Console
appender.console.name = console
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.console.ref = console
"""


def start(
    workdir: Path, *, jars: Path, java: Path, version: str = KAFKA_VERSION, timeout: float = 90.0
) -> ApacheKafka:
    """Format the storage (with the SCRAM users) and start the broker; returns once it
    answers on its PLAINTEXT listener with itself registered."""
    workdir.mkdir(parents=True, exist_ok=True)
    pki = make_pki(workdir / "pki")
    keystore = workdir / "pki" / "server.pem"
    keystore.write_text(Path(pki["key"]).read_text() + Path(pki["cert"]).read_text())
    user = Credentials("cdc-user", f"pw-{uuid.uuid4().hex[:12]}")
    ports = {name: find_free_port() for name in (*PROTOCOLS, "CONTROLLER")}
    properties = workdir / "server.properties"
    _write_properties(
        properties, server_properties(ports, workdir / "data", keystore, pki["ca"], user)
    )
    log4j = workdir / "log4j2.properties"
    log4j.write_text(_LOG4J2)
    jvm = [
        str(java),
        "-Xmx384m",
        "-XX:+UseSerialGC",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={log4j}",
        "-cp",
        f"{jars}/*",
    ]
    scram = [
        arg
        for mechanism in SCRAM_MECHANISMS
        for arg in ("--add-scram", f"{mechanism}=[name={user.username},password={user.password}]")
    ]
    storage_format = ["kafka.tools.StorageTool", "format", "-t", _cluster_id(), "-c"]
    formatted = subprocess.run(
        [*jvm, *storage_format, str(properties), *scram],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if formatted.returncode != 0:
        raise LaunchError(
            f"apache kafka: storage format failed ({formatted.returncode}):"
            f" {(formatted.stdout + formatted.stderr).strip()[-2000:]}"
        )
    bootstrap = f"{HOST}:{ports['PLAINTEXT']}"
    managed = launch(
        "apache-kafka",
        [*jvm, "kafka.Kafka", str(properties)],
        workdir=workdir,
        ports=list(ports.values()),
        healthy=lambda: _registered(bootstrap, ports["PLAINTEXT"]),
        timeout=timeout,
    )
    return ApacheKafka(version, ports, pki["ca"], user, managed)


def _registered(bootstrap: str, port: int) -> bool:
    """The broker answers and lists itself (it registered with the controller)."""
    if not kafka_api_versions_ok(HOST, port):
        return False
    from confluent_kafka.admin import AdminClient

    metadata = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=2)
    return len(metadata.brokers) == 1
