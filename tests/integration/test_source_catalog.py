"""What the WAL reader asks the source catalog, against a real PostgreSQL server: the key of
a table (one definition for the snapshot and the stream), tables whose updates cannot be
captured, and generated columns. The stream side is a real pgoutput Relation message read
from a slot on the pipeline's publication.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest

from adapters.postgres.source.catalog import (
    describe_relation,
    ensure_publication,
    identity_index_keys,
    identity_problems,
    missing_generated_columns,
    snapshot_schema,
)
from adapters.postgres.source.pgoutput import PgOutputDecoder
from domain.events import SourceEvent, TableSchema
from services.cli.main import main
from tests.support.pipeline import free_port, write_configs
from tests.support.postgres import PgTestContext

pytestmark = pytest.mark.integration

T = TypeVar("T")

KEYS_DDL = """
CREATE TABLE public.full_keyless (a int, b text);
ALTER TABLE public.full_keyless REPLICA IDENTITY FULL;
CREATE TABLE public.default_keyless (a int, b text);
CREATE TABLE public.with_pk (id int PRIMARY KEY, b text);
CREATE TABLE public.full_pk (id int, tenant int, b text, PRIMARY KEY (tenant, id));
ALTER TABLE public.full_pk REPLICA IDENTITY FULL;
CREATE TABLE public.index_only (code text NOT NULL, b text);
CREATE UNIQUE INDEX index_only_code ON public.index_only (code);
ALTER TABLE public.index_only REPLICA IDENTITY USING INDEX index_only_code;
CREATE TABLE public.pk_and_index (id int PRIMARY KEY, email text NOT NULL, b text);
CREATE UNIQUE INDEX pk_and_index_email ON public.pk_and_index (email);
ALTER TABLE public.pk_and_index REPLICA IDENTITY USING INDEX pk_and_index_email;
CREATE TABLE public.nothing_pk (id int PRIMARY KEY, b text);
ALTER TABLE public.nothing_pk REPLICA IDENTITY NOTHING;
"""
KEY_TABLES = {
    "public.full_keyless": (),
    "public.default_keyless": (),
    "public.with_pk": ("id",),
    "public.full_pk": ("id", "tenant"),
    "public.index_only": ("code",),
    # pgoutput identifies old rows by the replica identity index: that is the key.
    "public.pk_and_index": ("email",),
    "public.nothing_pk": ("id",),
}


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def _aconnect(dsn: str) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(dsn, autocommit=True)


def streamed_schemas(dsn: str, publication: str, dml: str) -> dict[str, TableSchema]:
    """Run `dml` and decode what pgoutput sends for it on `publication`, with the WAL
    reader's describe_relation: the TableSchema of each relation, by table name."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot('catalog_test', 'pgoutput')")
        try:
            conn.execute(dml)
            sent = conn.execute(
                "SELECT data FROM pg_logical_slot_get_binary_changes('catalog_test', NULL,"
                " NULL, 'proto_version', '1', 'publication_names', %s)",
                (publication,),
            ).fetchall()
        finally:
            conn.execute("SELECT pg_drop_replication_slot('catalog_test')")

    async def describe_all() -> dict[int, list[tuple[str, bool]]]:
        out: dict[int, list[tuple[str, bool]]] = {}
        async with await _aconnect(dsn) as aconn:
            for (data,) in sent:
                if bytes(data)[:1] == b"R":
                    oid, *_, raw = PgOutputDecoder.parse_relation(bytes(data))
                    out[oid] = await describe_relation(aconn, oid, raw)
        return out

    described = run(describe_all())
    decoder = PgOutputDecoder("src", describe=lambda oid, raw: described[oid])
    events: list[SourceEvent] = []
    for (data,) in sent:
        decoder.decode(bytes(data), events)
    return {info.schema.qualified_name: info.schema for info in decoder.relations.values()}


def snapshot_schemas(dsn: str, tables: list[str]) -> dict[str, TableSchema]:
    async def read() -> dict[str, TableSchema]:
        async with await _aconnect(dsn) as conn:
            return {t: await snapshot_schema(conn, t) for t in tables}

    return run(read())


def publish(dsn: str, name: str, tables: list[str]) -> None:
    async def create() -> None:
        async with await _aconnect(dsn) as conn:
            await ensure_publication(conn, name, tables)

    run(create())


def test_snapshot_and_stream_give_every_table_the_same_key(pg: PgTestContext) -> None:
    db = pg.new_database("keys")
    dsn = pg.dsn(db)
    pg.connect(db).execute(KEYS_DDL)
    tables = list(KEY_TABLES)
    publish(dsn, "keys_pub", tables)
    dml = (
        "INSERT INTO public.full_keyless VALUES (1, 'x');"
        "INSERT INTO public.default_keyless VALUES (1, 'x');"
        "INSERT INTO public.with_pk VALUES (1, 'x');"
        "INSERT INTO public.full_pk VALUES (1, 2, 'x');"
        "INSERT INTO public.index_only VALUES ('c', 'x');"
        "INSERT INTO public.pk_and_index VALUES (1, 'e', 'x');"
        "INSERT INTO public.nothing_pk VALUES (1, 'x');"
    )
    streamed = streamed_schemas(dsn, "keys_pub", dml)
    snapshot = snapshot_schemas(dsn, tables)
    for table, key in KEY_TABLES.items():
        assert snapshot[table].key_columns == key, table
        assert streamed[table] == snapshot[table], table
    # REPLICA IDENTITY FULL flags every column in the Relation message; that is no key.
    assert streamed["public.full_keyless"].key_columns == ()


def test_identity_problems_name_tables_whose_updates_cannot_be_captured(
    pg: PgTestContext,
) -> None:
    db = pg.new_database("identity")
    pg.connect(db).execute(KEYS_DDL + 'CREATE SCHEMA "Odd"; CREATE TABLE "Odd"."T" (a int);')

    async def check() -> list[Any]:
        async with await _aconnect(pg.dsn(db)) as conn:
            return await identity_problems(conn, [*KEY_TABLES, "Odd.T", "public.missing"])

    problems = run(check())
    assert [(p.table, p.replica_identity, p.has_key) for p in problems] == [
        ("public.default_keyless", "default", False),
        ("public.nothing_pk", "nothing", True),
        ("Odd.T", "default", False),
    ]
    text = problems[0].describe()
    assert "ALTER TABLE public.default_keyless REPLICA IDENTITY FULL" in text
    assert "no primary key" in text
    # The statement the warning proposes is accepted and removes the problem.
    pg.connect(db).execute(problems[0].fix)
    assert [p.table for p in run(check())] == ["public.nothing_pk", "Odd.T"]


def test_identity_index_keys_are_the_tables_keyed_on_an_index_not_their_primary_key(
    pg: PgTestContext,
) -> None:
    """What the Kafka provisioner keys Debezium's messages on (message.key.columns)."""
    db = pg.new_database("identity_index")
    pg.connect(db).execute(
        KEYS_DDL + "CREATE TABLE public.two (x int NOT NULL, y int NOT NULL, id int PRIMARY KEY);"
        " CREATE UNIQUE INDEX two_yx ON public.two (y, x);"
        " ALTER TABLE public.two REPLICA IDENTITY USING INDEX two_yx;"
    )

    async def check() -> dict[str, list[str]]:
        async with await _aconnect(pg.dsn(db)) as conn:
            return await identity_index_keys(conn, [*KEY_TABLES, "public.two", "public.missing"])

    assert run(check()) == {
        "public.index_only": ["code"],
        "public.pk_and_index": ["email"],
        "public.two": ["y", "x"],  # index order
    }
    assert {t: tuple(sorted(c)) for t, c in run(check()).items()} == {
        t: KEY_TABLES.get(t, ("x", "y")) for t in run(check())
    }  # the same columns as the direct transport's key


GENERATED_DDL = """
CREATE TABLE public.priced (
    id int PRIMARY KEY,
    net numeric(10,2),
    gross numeric(10,2) GENERATED ALWAYS AS (net * 1.2) STORED,
    label text GENERATED ALWAYS AS ('#' || id) VIRTUAL,
    note text
);
"""


def test_stored_generated_columns_are_published_and_snapshotted_alike(pg: PgTestContext) -> None:
    db = pg.new_database("generated")
    dsn = pg.dsn(db)
    conn = pg.connect(db)
    version = conn.execute("SHOW server_version_num").fetchone()
    assert version is not None
    if int(version[0]) < 180000:
        pytest.skip("publish_generated_columns needs PostgreSQL 18")
    conn.execute(GENERATED_DDL)
    publish(dsn, "gen_pub", ["public.priced"])
    assert conn.execute(
        "SELECT pubgencols FROM pg_publication WHERE pubname = 'gen_pub'"
    ).fetchone() == ("s",)
    streamed = streamed_schemas(
        dsn, "gen_pub", "INSERT INTO public.priced (id, net, note) VALUES (1, 10, 'n')"
    )["public.priced"]
    snapshot = snapshot_schemas(dsn, ["public.priced"])["public.priced"]
    assert snapshot.column_names == ("id", "net", "gross", "note")
    assert streamed == snapshot

    async def missing() -> dict[str, list[str]]:
        async with await _aconnect(dsn) as aconn:
            return await missing_generated_columns(aconn, ["public.priced"])

    assert run(missing()) == {"public.priced": ["label"]}


def test_a_publication_from_an_older_release_gets_generated_columns(pg: PgTestContext) -> None:
    db = pg.new_database("genold")
    conn = pg.connect(db)
    version = conn.execute("SHOW server_version_num").fetchone()
    assert version is not None
    if int(version[0]) < 180000:
        pytest.skip("publish_generated_columns needs PostgreSQL 18")
    conn.execute(GENERATED_DDL + "CREATE PUBLICATION old_pub FOR TABLE public.priced;")
    assert conn.execute(
        "SELECT pubgencols FROM pg_publication WHERE pubname = 'old_pub'"
    ).fetchone() == ("n",)
    publish(pg.dsn(db), "old_pub", ["public.priced"])
    assert conn.execute(
        "SELECT pubgencols FROM pg_publication WHERE pubname = 'old_pub'"
    ).fetchone() == ("s",)


# --------------------------------------------------------------------------- cdc validate


def _validate_files(pg: PgTestContext, tmp_path: Path, ddl: str, tables: list[str]) -> Path:
    db = pg.new_database("validate")
    pg.connect(db).execute(ddl)
    files = write_configs(
        tmp_path,
        host=pg.host,
        port=pg.port,
        source_db=db,
        replica_db=db,
        tables=tables,
    )
    return files.pipeline


def test_cdc_validate_warns_about_the_source_and_still_exits_0(
    pg: PgTestContext, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ddl = KEYS_DDL + GENERATED_DDL.replace(" VIRTUAL", "")
    tables = ["public.default_keyless", "public.full_keyless", "public.priced", "public.gone"]
    pipeline = _validate_files(pg, tmp_path, ddl, tables)
    assert main(["validate", str(pipeline)]) == 0
    out, err = capsys.readouterr()
    assert "ok: pipeline" in out
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 3, err
    assert "table public.gone does not exist" in warnings[0]
    assert (
        "public.default_keyless has no primary key and has REPLICA IDENTITY DEFAULT"
        in (warnings[1])
    )
    assert "ALTER TABLE public.default_keyless REPLICA IDENTITY FULL" in warnings[1]
    # PostgreSQL 18 publishes the stored column; the virtual one is never sent.
    assert "public.priced: generated column(s) label will be missing" in warnings[2]


def test_cdc_validate_without_problems_prints_no_warning(
    pg: PgTestContext, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pipeline = _validate_files(pg, tmp_path, KEYS_DDL, ["public.full_keyless", "public.with_pk"])
    assert main(["validate", str(pipeline)]) == 0
    assert capsys.readouterr().err == ""


def test_cdc_validate_with_the_source_unreachable_skips_the_checks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = write_configs(
        tmp_path,
        host="127.0.0.1",
        port=free_port(),  # nothing listens there
        source_db="src",
        replica_db="dst",
        tables=["public.t"],
    )
    assert main(["validate", str(files.pipeline)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("note: source checks skipped, the source is not reachable:"), err
    assert "warning" not in err
