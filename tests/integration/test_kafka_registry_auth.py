"""Schema Registry basic auth, end to end: a registry that requires credentials (our local
registry, services/stack/schema_registry.py), a Debezium connector whose Avro converters get
them from platform.yaml (adapters/kafka/security.py), `cdc health` checking the registry
with them, and failing without."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from confluent_kafka.schema_registry import SchemaRegistryClient

from adapters.config import loads_pipeline, loads_platform
from adapters.kafka.provisioner import KafkaProvisioner
from adapters.kafka.security import registry_settings
from services.cli.main import main as cdc_main
from services.ops import undeploy
from tests.support.postgres import PgTestContext

pytestmark = pytest.mark.integration

USER, PASSWORD = "sr-user", "sr:pa ss"


@pytest.fixture
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from services.stack import schema_registry

    server = schema_registry.start(
        tmp_path_factory.mktemp("registry-auth"), basic_auth=(USER, PASSWORD)
    )
    try:
        yield server
    finally:
        server.stop()


def test_connector_and_clients_use_registry_basic_auth(
    pg: PgTestContext,
    tansu_broker: Any,
    kafka_connect: Any,
    auth_registry: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    database = pg.new_database("srauth")
    with psycopg.connect(pg.dsn(database), autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, name text)")
        conn.execute("INSERT INTO items VALUES (1, 'a'), (2, 'b')")
    tag = uuid.uuid4().hex[:8]
    kafka: dict[str, Any] = {
        "bootstrap_servers": tansu_broker.bootstrap_servers,
        "schema_registry_url": auth_registry.url,
        "schema_registry_username": USER,
        "schema_registry_password": PASSWORD,
    }
    platform_doc = {
        "transport_mode": "kafka",
        "kafka": kafka,
        "connector": {"connect_url": kafka_connect.url},
    }
    pipeline_doc = {
        "pipeline_id": f"srauth-{tag}",
        "topic_prefix": f"a{tag}",
        "source": {
            "host": pg.host,
            "port": pg.port,
            "database": database,
            "tables": ["public.items"],
        },
    }
    platform = loads_platform(yaml.safe_dump(platform_doc))
    pipeline = loads_pipeline(yaml.safe_dump(pipeline_doc), platform=platform)

    asyncio.run(KafkaProvisioner(pipeline, platform).provision())
    # The connector's converters registered the value schema with the credentials.
    authed = SchemaRegistryClient(registry_settings(platform.kafka))
    subject = f"{pipeline.topic_prefix}.public.items-value"
    for _ in range(60):
        if subject in authed.get_subjects():
            break
        time.sleep(0.5)
    assert subject in authed.get_subjects()
    with pytest.raises(Exception, match=r"401|Unauthorized"):
        SchemaRegistryClient({"url": auth_registry.url}).get_subjects()

    # `cdc health` checks the registry with the credentials; without them it is an error.
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(pipeline_doc))
    for name, doc in (
        ("platform.yaml", platform_doc),
        (
            "noauth.yaml",
            {
                **platform_doc,
                "kafka": {
                    k: v
                    for k, v in kafka.items()
                    if k not in ("schema_registry_username", "schema_registry_password")
                },
            },
        ),
    ):
        (tmp_path / name).write_text(yaml.safe_dump(doc))
    capsys.readouterr()
    assert cdc_main(["health", "--platform-config", str(tmp_path / "platform.yaml"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["components"]["schema_registry"]["status"] == "ok"
    assert cdc_main(["health", "--platform-config", str(tmp_path / "noauth.yaml"), "--json"]) == 1
    registry = json.loads(capsys.readouterr().out)["components"]["schema_registry"]
    assert registry["status"] == "error" and "HTTP 401" in registry["error"]
    asyncio.run(undeploy(pipeline, platform))
