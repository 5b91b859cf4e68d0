"""PostgresProvisioner (adapters/postgres/source/provisioner.py) against real PostgreSQL: the
publication and bookkeeping are created idempotently, the slot by `create_slot`, and
teardown drops slot and publication, refusing a slot in use unless forced. The end-to-end
`cdc undeploy` next to a running pipeline is in tests/e2e/test_process_lifecycle.py."""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any

import psycopg
import pytest

from adapters.postgres.source.provisioner import PostgresProvisioner
from adapters.postgres.source.replication import connect_replication
from domain.errors import TeardownRefusedError
from domain.ports import Provisioner
from tests.support.postgres import PgTestContext

pytestmark = pytest.mark.integration


def _setup(pg: PgTestContext, tables: tuple[str, ...] = ("public.a",)) -> PostgresProvisioner:
    db = pg.new_database("prov")
    with psycopg.connect(pg.dsn(db), autocommit=True) as conn:
        conn.execute("CREATE TABLE public.a (id int PRIMARY KEY)")
        conn.execute("CREATE TABLE public.b (id int PRIMARY KEY)")
    suffix = uuid.uuid4().hex[:8]
    return PostgresProvisioner(
        pg.dsn(db), f"slot_{suffix}", f"pub_{suffix}", tables, settle_seconds=0.5
    )


def _published(p: PostgresProvisioner) -> set[str]:
    with psycopg.connect(p.conninfo, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = %s",
            (p.publication_name,),
        ).fetchall()
    return {r[0] for r in rows}


def _slot_exists(p: PostgresProvisioner) -> bool:
    with psycopg.connect(p.conninfo, autocommit=True) as conn:
        row = conn.execute(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (p.slot_name,)
        ).fetchone()
    return row is not None


async def _create_slot(p: PostgresProvisioner) -> int:
    conn = await connect_replication(p.conninfo)
    try:
        created = await p.create_slot(conn, export_snapshot=False)
    finally:
        await conn.close()
    assert created.snapshot_name is None
    return created.consistent_lsn


def test_is_a_provisioner(pg: PgTestContext) -> None:
    provisioner: Provisioner = _setup(pg)  # mypy checks the port; this checks it runs
    assert callable(provisioner.teardown)


def test_provision_is_idempotent_and_follows_the_table_list(pg: PgTestContext) -> None:
    p = _setup(pg)
    asyncio.run(p.provision())
    asyncio.run(p.provision())
    assert _published(p) == {"public.a"}
    wider = PostgresProvisioner(
        p.conninfo, p.slot_name, p.publication_name, ("public.a", "public.b")
    )
    asyncio.run(wider.provision())
    assert _published(p) == {"public.a", "public.b"}
    with psycopg.connect(p.conninfo, autocommit=True) as conn:
        assert conn.execute("SELECT to_regclass('cdc_platform.snapshot_state')").fetchone() != (
            None,
        )


def test_slot_state_and_teardown_of_an_idle_slot(pg: PgTestContext) -> None:
    p = _setup(pg)
    asyncio.run(p.provision())
    lsn = asyncio.run(_create_slot(p))

    async def state() -> Any:
        async with await psycopg.AsyncConnection.connect(p.conninfo, autocommit=True) as c:
            return await p.slot(c)

    slot = asyncio.run(state())
    assert slot is not None and not slot.lost and slot.active_pid is None
    assert slot.confirmed_flush_lsn == lsn
    done = asyncio.run(p.teardown())
    assert done == [
        f"dropped replication slot {p.slot_name}",
        f"dropped publication {p.publication_name}",
    ]
    assert not _slot_exists(p) and asyncio.run(state()) is None
    # Nothing left: a second teardown says so and succeeds.
    assert asyncio.run(p.teardown()) == [
        f"replication slot {p.slot_name} did not exist",
        f"publication {p.publication_name} did not exist",
    ]


def _stream_from(p: PostgresProvisioner, started: threading.Event, stop: threading.Event) -> None:
    """A walsender holding the slot, as a running pipeline's reader does."""
    conn = psycopg.connect(p.conninfo, autocommit=True, replication="database")
    try:
        conn.pgconn.send_query(
            f"START_REPLICATION SLOT {p.slot_name} LOGICAL 0/0"
            f" (proto_version '1', publication_names '{p.publication_name}')".encode()
        )
        conn.pgconn.flush()
        started.set()
        stop.wait(30)
    finally:
        conn.pgconn.finish()  # mid copy-both: close the socket, no COMMIT


def test_teardown_refuses_a_slot_in_use_and_force_terminates_it(pg: PgTestContext) -> None:
    p = _setup(pg)
    asyncio.run(p.provision())
    asyncio.run(_create_slot(p))
    started, stop = threading.Event(), threading.Event()
    holder = threading.Thread(target=_stream_from, args=(p, started, stop), daemon=True)
    holder.start()
    try:
        assert started.wait(10)

        async def active() -> bool:
            async with await psycopg.AsyncConnection.connect(p.conninfo, autocommit=True) as c:
                for _ in range(100):
                    slot = await p.slot(c)
                    if slot is not None and slot.active_pid:
                        return True
                    await asyncio.sleep(0.05)
            return False

        assert asyncio.run(active())
        with pytest.raises(TeardownRefusedError) as refused:
            asyncio.run(p.teardown())
        assert f"replication slot {p.slot_name} is in use" in str(refused.value)
        assert "--force" in str(refused.value)
        assert refused.value.done == []
        assert _slot_exists(p) and _published(p) == {"public.a"}

        done = asyncio.run(p.teardown(force=True))
        assert done[0] == f"dropped replication slot {p.slot_name}"
        assert not _slot_exists(p)
    finally:
        stop.set()
        holder.join(10)
