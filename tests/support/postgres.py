"""Per-test isolation on the session's shared PostgreSQL server (see the ``pg`` fixture)."""

from __future__ import annotations

import re
import uuid
from typing import Any

import psycopg
from psycopg.rows import TupleRow

from services.stack.postgres import SUPERUSER, PostgresServer

__all__ = ["PgTestContext"]


class PgTestContext:
    """What a test sees of the shared server: its address, new databases that are dropped
    (with their replication slots) after the test, and connections that are closed then."""

    def __init__(self, server: PostgresServer) -> None:
        self.server = server
        self._databases: list[str] = []
        self._connections: list[psycopg.Connection[Any]] = []

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def port(self) -> int:
        return self.server.port

    def dsn(self, dbname: str = "postgres", user: str = SUPERUSER) -> str:
        return self.server.dsn(dbname, user)

    def new_database(self, prefix: str = "test") -> str:
        """Create a database named ``<prefix>_<random>`` and return its name."""
        clean = re.sub(r"[^a-z0-9_]+", "_", prefix.lower()).strip("_")[:40] or "test"
        name = f"{clean}_{uuid.uuid4().hex[:12]}"
        self.server.create_database(name)
        self._databases.append(name)
        return name

    def connect(
        self, dbname: str = "postgres", *, autocommit: bool = True, **kwargs: Any
    ) -> psycopg.Connection[TupleRow]:
        """A connection closed at teardown (before the test's databases are dropped)."""
        conn = self.server.connect(dbname, autocommit=autocommit, **kwargs)
        self._connections.append(conn)
        return conn

    def close(self) -> None:
        """Teardown: close connections, drop this test's databases and their slots."""
        for conn in self._connections:
            conn.close()
        self._connections.clear()
        failures: list[str] = []
        if not self.server.is_running():  # a test stopped the shared server: bring it back
            self.server.start()
        for name in reversed(self._databases):
            try:
                self.server.drop_database(name)
            except Exception as exc:
                failures.append(f"{name}: {exc}")
        self._databases.clear()
        if failures:
            raise RuntimeError("could not drop test databases: " + "; ".join(failures))
