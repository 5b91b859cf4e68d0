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
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from services.stack.schema_registry import SchemaRegistryServer
    from services.stack.tansu import TansuBroker


@pytest.fixture(scope="session")
def tansu_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TansuBroker]:
    from services.stack import tansu

    broker = tansu.start(tmp_path_factory.mktemp("tansu"))
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def schema_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SchemaRegistryServer]:
    from services.stack import schema_registry as registry

    server = registry.start(tmp_path_factory.mktemp("schema-registry"))
    try:
        yield server
    finally:
        server.stop()
