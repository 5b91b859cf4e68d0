"""Session fixtures for the local-stack servers (services/stack/): each is started the first time
a test asks for it, once per pytest-xdist worker, and stopped at the end of the session.

Loaded for every test through ``pytest_plugins`` in tests/conftest.py. A server that cannot
start here makes the tests needing it fail with the launcher's message (what is missing and
what to install), except the Pub/Sub emulator: it is a Google Cloud SDK component that no
package registry reachable from every machine provides, so without it those tests are skipped
with the exact reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol, TypeVar

import pytest

if TYPE_CHECKING:
    from services.stack.connect import KafkaConnect
    from services.stack.moto import MotoServer
    from services.stack.pubsub_emulator import PubSubEmulator
    from services.stack.schema_registry import SchemaRegistryServer
    from services.stack.seaweedfs import SeaweedFS
    from services.stack.tansu import TansuBroker


class _Stoppable(Protocol):
    def stop(self) -> object: ...


_Server = TypeVar("_Server", bound=_Stoppable)


def _running(server: _Server) -> Iterator[_Server]:
    """Hands the started server to the session and stops it at its end."""
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tansu_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TansuBroker]:
    from services.stack import tansu

    yield from _running(tansu.start(tmp_path_factory.mktemp("tansu")))


@pytest.fixture(scope="session")
def schema_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SchemaRegistryServer]:
    from services.stack import schema_registry as registry

    yield from _running(registry.start(tmp_path_factory.mktemp("schema-registry")))


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    from services.stack import moto

    yield from _running(moto.start(tmp_path_factory.mktemp("moto")))


@pytest.fixture(scope="session")
def pubsub_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PubSubEmulator]:
    from services.stack import pubsub_emulator as emulator

    try:
        server = emulator.start(tmp_path_factory.mktemp("pubsub"))
    except emulator.EmulatorNotInstalled as exc:
        pytest.skip(str(exc))
    yield from _running(server)


@pytest.fixture(scope="session")
def seaweedfs_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """S3 on SeaweedFS: ``.endpoint_url``, ``.access_key``, ``.secret_key``, ``.bucket(name)``
    (creates it; bucket names need 3-63 characters), ``.client()`` (boto3)."""
    from services.stack import seaweedfs

    yield from _running(seaweedfs.start(tmp_path_factory.mktemp("seaweedfs")))


@pytest.fixture(scope="session")
def kafka_connect(
    tmp_path_factory: pytest.TempPathFactory,
    tansu_broker: TansuBroker,
    schema_registry: SchemaRegistryServer,
) -> Iterator[KafkaConnect]:
    """A distributed Connect worker (Debezium connectors, Avro converter defaulting to the
    session's schema registry) on the session's Tansu broker; ``.url`` is its REST API."""
    from services.stack import connect

    yield from _running(
        connect.start(
            tmp_path_factory.mktemp("connect"),
            bootstrap_servers=tansu_broker.bootstrap_servers,
            registry_url=schema_registry.url,
        )
    )
