"""The generated connector configs of all four source types, checked by the real Debezium
connector classes: Kafka Connect's `PUT /connector-plugins/<class>/config/validate` runs
each connector's own config definition and validation. No MongoDB or SQL Server server
exists here (and the MySQL one is not started in this test), so the database connection
checks fail; every other key (snapshot mode, include lists, heartbeats, schema history,
topic routing, converters, retries) must validate cleanly."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import pytest
import yaml

from adapters.config import loads_pipeline, loads_platform
from adapters.debezium import connectors
from services.net import find_free_port

pytestmark = pytest.mark.integration

SOURCES: dict[str, dict[str, Any]] = {
    "postgres": {"tables": ["public.orders"], "slot_name": "v_slot"},
    "mysql": {"tables": ["shop.orders"], "mysql_server_id": 184054},
    "mongodb": {
        "tables": ["shop.orders"],
        "replica_set_name": "rs0",
        "auth_source": "admin",
        "password": "p@ss:w/rd",
    },
    "sqlserver": {"tables": ["dbo.orders"]},
}
# Keys whose check needs the database: a connection error is expected there, and only there.
CONNECTION_KEYS = {
    "database.hostname",
    "database.port",
    "database.user",
    "database.password",
    "database.dbname",
    "database.names",
    "mongodb.connection.string",
    "database.server.id",
    "slot.name",
    "plugin.name",
    "publication.name",
    "database.include.list",
    "collection.include.list",
    "table.include.list",
}


def validate(url: str, config: dict[str, str]) -> dict[str, list[str]]:
    cls = config["connector.class"]
    request = urllib.request.Request(
        f"{url}/connector-plugins/{cls}/config/validate",
        data=json.dumps(config).encode(),
        method="PUT",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        body = json.loads(response.read())
    return {
        c["value"]["name"]: c["value"]["errors"] for c in body["configs"] if c["value"]["errors"]
    }


@pytest.mark.slow
@pytest.mark.parametrize("source_type", sorted(SOURCES))
@pytest.mark.parametrize("snapshot_mode", ["initial", "never"])
def test_generated_config_passes_the_connectors_own_validation(
    kafka_connect: Any,
    tansu_broker: Any,
    schema_registry: Any,
    source_type: str,
    snapshot_mode: str,
) -> None:
    platform = loads_platform(
        yaml.safe_dump(
            {
                "transport_mode": "kafka",
                "kafka": {
                    "bootstrap_servers": tansu_broker.bootstrap_servers,
                    "schema_registry_url": schema_registry.url,
                    "security_protocol": "SASL_PLAINTEXT",
                    "auth_mechanism": "sasl_scram_512",
                    "sasl_username": "cdc",
                    "sasl_password": "pw",
                },
            }
        )
    )
    source = {
        "source_type": source_type,
        "host": "127.0.0.1",
        "port": find_free_port(),  # nothing listens: the connection checks fail fast
        "database": "shop",
        "username": "cdc",
        "password": "pw",
        "snapshot_mode": snapshot_mode,
        **SOURCES[source_type],
    }
    pipeline = loads_pipeline(
        yaml.safe_dump({"pipeline_id": "validate-me", "source": source}), platform=platform
    )
    config = connectors.connector_config(pipeline, platform)
    assert config["connector.class"] in kafka_connect.plugins()
    errors = validate(kafka_connect.url, {**config, "name": "validate-me"})
    # The connector did validate (its connection check failed, as no server listens) ...
    assert errors, "the connector reported nothing: its validation did not run"
    # ... and nothing else it checks is wrong.
    unexpected = {k: v for k, v in errors.items() if k not in CONNECTION_KEYS}
    assert not unexpected, unexpected
