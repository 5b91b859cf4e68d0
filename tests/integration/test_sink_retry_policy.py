"""platform.yaml ``retry`` drives the PostgreSQL sink writer's backoff, against a real server.

The writer is built the way `cdc sink` builds it: platform.yaml text -> PlatformConfig ->
SinkContainer (the adapter registry). A write then fails transiently (the sink's role lost its
privilege on the target table, which the writer retries rather than dead-letters), so the
attempts and their waits are the policy's alone, with no connect timeouts in between.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from adapters.config import PipelineConfig, PlatformConfig, loads_platform
from adapters.postgres.sink.writer import PostgresSinkWriter
from domain.errors import SinkUnavailableError
from domain.events import Column, Operation, Position, SourceEvent, TableSchema
from domain.ports import SinkBatch
from services.sink.container import SinkContainer
from tests.support.postgres import PgTestContext

pytestmark = pytest.mark.integration

ITEMS = TableSchema(
    "shop",
    "items",
    (Column("id", 23, "integer", is_key=True), Column("qty", 23, "integer")),
)


def _event(major: int, id_: int, qty: int) -> SourceEvent:
    return SourceEvent(
        operation=Operation.CREATE,
        table=ITEMS,
        position=Position(major, 0),
        after=(str(id_), str(qty)),
        commit_time_us=1_714_557_600_000_000 + major,
    )


def _batch(batch_id: int, *events: SourceEvent) -> SinkBatch:
    return SinkBatch("retrypipe", "0", batch_id, list(events))


class Target:
    """A target database and a login role that can create the sink's tables."""

    def __init__(self, pg: PgTestContext) -> None:
        self.db = pg.new_database("sinkretry")
        self.role = f"sink_retry_{uuid.uuid4().hex[:8]}"
        self.admin: psycopg.Connection[Any] = pg.connect(self.db)
        self.admin.execute(f"CREATE ROLE {self.role} LOGIN")
        self.admin.execute(f"GRANT CREATE ON DATABASE {self.db} TO {self.role}")
        self.dsn = pg.dsn(self.db, user=self.role)

    def revoke(self) -> None:
        """The role loses INSERT on the table it created: writes fail with
        InsufficientPrivilege, a transient error for the writer."""
        self.admin.execute("ALTER TABLE sink.items OWNER TO postgres")

    def grant(self) -> None:
        self.admin.execute(f"GRANT ALL ON sink.items TO {self.role}")

    def close(self) -> None:
        self.admin.execute("DROP SCHEMA IF EXISTS sink CASCADE")
        self.admin.execute(f"REVOKE ALL ON DATABASE {self.db} FROM {self.role}")
        # A writer's backend may still be exiting after the writer closed it, and its
        # temporary staging tables (owned by the role) go only with the backend: wait for
        # the role's sessions to end, else DROP ROLE fails on them.
        sessions = "FROM pg_stat_activity WHERE usename = %s"
        self.admin.execute(f"SELECT pg_terminate_backend(pid) {sessions}", (self.role,))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            row = self.admin.execute(f"SELECT count(*) {sessions}", (self.role,)).fetchone()
            if row is None or row[0] == 0:
                break
            time.sleep(0.05)
        self.admin.execute(f"DROP ROLE {self.role}")


@pytest.fixture
def target(pg: PgTestContext) -> Iterator[Target]:
    t = Target(pg)
    try:
        yield t
    finally:
        t.close()


def _writer(dsn: str, platform_yaml: str) -> PostgresSinkWriter:
    platform: PlatformConfig = loads_platform(platform_yaml, env={})
    pipeline = PipelineConfig.model_validate(
        {
            "pipeline_id": "retrypipe",
            "source": {"database": "src", "tables": ["shop.items"]},
            "sinks": [
                {
                    "sink_id": "replica",
                    "sink_type": "postgres",
                    "postgres": {"dsn": dsn, "target_schema": "sink"},
                }
            ],
        }
    )
    writer = SinkContainer(pipeline=pipeline, sink=pipeline.sinks[0], platform=platform).writer()
    assert isinstance(writer, PostgresSinkWriter)
    return writer


def test_retry_attempts_and_waits_come_from_platform_yaml(target: Target) -> None:
    """max_attempts 3, waits 0.4 s then 0.8 s capped to 0.6 s (multiplier 2, max_wait 0.6),
    no jitter: the write gives up after 3 attempts and about 1.0 s with
    SinkUnavailableError (the sink rejects the batch; the ingest resends it), and the
    resent batch is written once the privilege is back."""
    platform_yaml = (
        "retry:\n"
        "  max_attempts: 3\n"
        "  initial_wait_seconds: 0.4\n"
        "  multiplier: 2\n"
        "  max_wait_seconds: 0.6\n"
        "  jitter: false\n"
    )
    writer = _writer(target.dsn, platform_yaml)

    async def scenario() -> tuple[float, str, int]:
        await writer.start()
        try:
            assert (await writer.write(_batch(1, _event(100, 1, 1)))).written == 1
            target.revoke()
            started = time.monotonic()
            with pytest.raises(SinkUnavailableError) as info:
                await writer.write(_batch(2, _event(200, 2, 2)))
            elapsed = time.monotonic() - started
            retries = writer.retries
            target.grant()
            resent = await writer.write(_batch(3, _event(200, 2, 2)))
            assert (resent.written, resent.skipped) == (1, 0)
            return elapsed, str(info.value), retries
        finally:
            await writer.stop()

    elapsed, message, retries = asyncio.run(scenario())
    assert retries == 2  # attempts 2 and 3 were retries
    assert "gave up after 3 attempts (retry.max_attempts)" in message
    assert "InsufficientPrivilege" in message
    assert 1.0 <= elapsed < 3.0, elapsed
    assert target.admin.execute("SELECT id, qty FROM sink.items ORDER BY id").fetchall() == [
        (1, 1),
        (2, 2),
    ]


def test_default_retry_keeps_trying_until_the_problem_is_fixed(target: Target) -> None:
    """The guide's defaults (5 attempts, 1 s doubling): a problem fixed within the first
    waits costs no rejected batch."""
    writer = _writer(target.dsn, "{}\n")

    async def scenario() -> int:
        await writer.start()
        try:
            await writer.write(_batch(1, _event(100, 1, 1)))
            target.revoke()
            pending = asyncio.create_task(writer.write(_batch(2, _event(200, 2, 2))))
            await asyncio.sleep(1.5)
            assert not pending.done()
            target.grant()
            result = await asyncio.wait_for(pending, 30)
            return result.written
        finally:
            await writer.stop()

    assert asyncio.run(scenario()) == 1
    assert writer.retries >= 1
