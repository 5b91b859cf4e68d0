"""Suite-wide fixtures: real PostgreSQL servers (no Docker) from services.stack.postgres.

* ``pg_server`` (session): one started server shared by the whole run, or by one worker of a
  parallel run (``-n``: each pytest-xdist worker is its own session, with its own server on
  its own port and directory; ports come from services.net, which keeps workers' picks apart).
* ``pg`` (function): the shared server plus isolation: ``pg.new_database(prefix)`` creates a
  uniquely named database that is dropped, with its replication slots, after the test.
* ``fresh_pg_server`` (function): a dedicated server for tests that restart, kill or
  reconfigure it; parametrize indirectly with a dict to pass extra ``settings``.
* ``pg_server_factory`` (function): starts any number of dedicated servers.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # the project is not necessarily pip-installed
    sys.path.insert(0, str(_ROOT))

from services.stack.postgres import PostgresServer  # noqa: E402
from tests.support.postgres import PgTestContext  # noqa: E402

# Session fixtures for the local-stack servers: tansu_broker, schema_registry, moto_server,
# pubsub_emulator, seaweedfs_s3, kafka_connect.
pytest_plugins = ["tests.support.stack"]

# Markers are declared in pyproject.toml; `slow` is put on the tests themselves.
_DIR_MARKERS = {"integration": "integration", "e2e": "e2e", "deploy": "deploy"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests under tests/integration, tests/e2e and tests/deploy get their directory's marker."""
    tests_dir = Path(__file__).resolve().parent
    for item in items:
        try:
            parts = Path(str(item.path)).resolve().relative_to(tests_dir).parts
        except ValueError:
            continue
        if parts and parts[0] in _DIR_MARKERS:
            item.add_marker(_DIR_MARKERS[parts[0]])
    if getattr(config.option, "numprocesses", None):
        # Parallel run: the slow tests first, so that none of them starts last and leaves the
        # other workers idle while it finishes (the rest keep their order: a stable sort).
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def _cdc_runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test its own pipeline lock directory (services/lifecycle.py): `cdc run`s of
    same-named pipelines in concurrent test sessions on one machine must not collide."""
    monkeypatch.setenv("CDC_RUNTIME_DIR", str(tmp_path / "cdc-runtime"))


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def pg(pg_server: PostgresServer) -> Iterator[PgTestContext]:
    if not pg_server.is_running():  # an earlier test stopped or killed the shared server
        pg_server.start()
    context = PgTestContext(pg_server)
    try:
        yield context
    finally:
        context.close()


@pytest.fixture
def fresh_pg_server(request: pytest.FixtureRequest) -> Iterator[PostgresServer]:
    settings: Mapping[str, str] | None = getattr(request, "param", None)
    server = PostgresServer(settings=settings)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def pg_server_factory() -> Iterator[Callable[..., PostgresServer]]:
    servers: list[PostgresServer] = []

    def start(**kwargs: Any) -> PostgresServer:
        server = PostgresServer(**kwargs)
        servers.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in servers:
            server.cleanup()
