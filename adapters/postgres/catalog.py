"""Catalog queries and DDL the WAL reader needs on the source database."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from domain.events import Column, TableSchema

# The text form of values depends on session settings the walsender and COPY inherit from
# the database and role (ALTER DATABASE ... SET datestyle = 'SQL, DMY' turns 2024-04-03
# into 03/04/2024). The reader pins the settings every stage parses with.
READER_SESSION_OPTIONS = (
    "-c datestyle=ISO -c intervalstyle=postgres -c extra_float_digits=3"
    " -c bytea_output=hex -c timezone=UTC"
)


def reader_conninfo(conninfo: str) -> str:
    """`conninfo` with the reader's session settings added to any `options` it has."""
    params = conninfo_to_dict(conninfo)
    extra = params.get("options")
    options = f"{extra} {READER_SESSION_OPTIONS}" if extra else READER_SESSION_OPTIONS
    return make_conninfo(conninfo, options=options)


def parse_lsn(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) + int(low, 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def split_table(qualified: str) -> tuple[str, str]:
    schema, _, table = qualified.partition(".")
    return schema, table


async def published_tables(conn: psycopg.AsyncConnection[Any], name: str) -> set[str] | None:
    """The tables of publication `name` as schema.table, None if it does not exist."""
    exists = await (
        await conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (name,))
    ).fetchone()
    if exists is None:
        return None
    rows = await (
        await conn.execute(
            "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s", (name,)
        )
    ).fetchall()
    return {f"{r[0]}.{r[1]}" for r in rows}


async def ensure_publication(
    conn: psycopg.AsyncConnection[Any], name: str, tables: Sequence[str]
) -> None:
    """Create the publication, or make its table list exactly `tables`."""
    if not tables:
        raise ValueError("a publication needs at least one table")
    table_list = sql.SQL(", ").join(sql.Identifier(*split_table(t)) for t in tables)
    current = await published_tables(conn, name)
    if current is None:
        await conn.execute(
            sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(sql.Identifier(name), table_list)
        )
        return
    if current != set(tables):
        await conn.execute(
            sql.SQL("ALTER PUBLICATION {} SET TABLE {}").format(sql.Identifier(name), table_list)
        )


_STATE_DDL = """
CREATE SCHEMA IF NOT EXISTS cdc_platform;
CREATE TABLE IF NOT EXISTS cdc_platform.snapshot_state (
    slot_name text PRIMARY KEY, status text NOT NULL, consistent_lsn pg_lsn,
    updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS cdc_platform.snapshot_progress (
    slot_name text NOT NULL, kind text NOT NULL, table_name text NOT NULL,
    last_key text[], rows_read bigint NOT NULL DEFAULT 0, done boolean NOT NULL DEFAULT false,
    job_id bigint NOT NULL DEFAULT 0, updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (slot_name, kind, table_name));
CREATE TABLE IF NOT EXISTS cdc_platform.signals (
    id bigserial PRIMARY KEY, slot_name text NOT NULL, kind text NOT NULL,
    tables text[] NOT NULL, created_at timestamptz NOT NULL DEFAULT now(),
    started_at timestamptz, finished_at timestamptz, rows_read bigint, error text);
CREATE TABLE IF NOT EXISTS cdc_platform.heartbeat (
    slot_name text PRIMARY KEY, beat_at timestamptz NOT NULL DEFAULT now());
"""


async def ensure_state_table(conn: psycopg.AsyncConnection[Any]) -> None:
    """The reader's own bookkeeping on the source: snapshot state and progress per table,
    the signal table (`cdc backfill` writes it) and the heartbeat table."""
    await conn.execute(_STATE_DDL)


async def forget_slot_state(conn: psycopg.AsyncConnection[Any], slot: str) -> None:
    """Delete the reader's bookkeeping of one slot (after the slot itself is dropped)."""
    row = await (
        await conn.execute("SELECT to_regclass('cdc_platform.snapshot_progress') IS NOT NULL")
    ).fetchone()
    if row and row[0]:
        for table in ("snapshot_state", "snapshot_progress", "heartbeat", "signals"):
            await conn.execute(
                sql.SQL("DELETE FROM {} WHERE slot_name = %s").format(
                    sql.Identifier("cdc_platform", table)
                ),
                (slot,),
            )
        return
    row = await (
        await conn.execute("SELECT to_regclass('cdc_platform.snapshot_state') IS NOT NULL")
    ).fetchone()
    if row and row[0]:  # state written by an older release
        await conn.execute("DELETE FROM cdc_platform.snapshot_state WHERE slot_name = %s", (slot,))


_PK_COLUMNS = """
SELECT a.attname FROM pg_index i
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
WHERE i.indrelid = %s AND i.indisprimary
"""


async def describe_relation(
    conn: psycopg.AsyncConnection[Any], oid: int, raw: Sequence[tuple[bool, str, int, int]]
) -> list[tuple[str, bool]]:
    """(type name, is primary key column) for each column of a Relation message.

    Type names come from format_type() of the message's own OID and typmod, so they
    describe the row as sent even if the table changed since. Without a primary key the
    replica identity flags of the message mark the key.
    """
    names = await (
        await conn.execute(
            "SELECT format_type(t, m) FROM unnest(%s::oid[], %s::int[]) WITH ORDINALITY AS"
            " u(t, m, n) ORDER BY n",
            ([r[2] for r in raw], [r[3] for r in raw]),
        )
    ).fetchall()
    pk = {r[0] for r in await (await conn.execute(_PK_COLUMNS, (oid,))).fetchall()}
    return [(n[0], (c[1] in pk) if pk else c[0]) for n, c in zip(names, raw, strict=True)]


async def snapshot_schema(conn: psycopg.AsyncConnection[Any], qualified: str) -> TableSchema:
    """The table's columns as pgoutput would send them (no dropped or generated columns)."""
    schema, table = split_table(qualified)
    rows = await (
        await conn.execute(
            "SELECT a.attname, a.atttypid, format_type(a.atttypid, a.atttypmod),"
            " coalesce(a.attnum = ANY(i.indkey), false)"
            " FROM pg_attribute a"
            " LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary"
            " WHERE a.attrelid = (quote_ident(%s) || '.' || quote_ident(%s))::regclass"
            " AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''"
            " ORDER BY a.attnum",
            (schema, table),
        )
    ).fetchall()
    if not rows:
        raise ValueError(f"table {qualified} has no columns or does not exist")
    return TableSchema(
        schema, table, tuple(Column(r[0], int(r[1]), r[2], bool(r[3])) for r in rows)
    )
