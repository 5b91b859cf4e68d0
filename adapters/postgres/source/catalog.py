"""Catalog queries and DDL the WAL reader needs on the source database."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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
    """Create the publication, or make its table list exactly `tables`. On PostgreSQL 18
    it publishes stored generated columns too (`snapshot_schema` reads them then)."""
    if not tables:
        raise ValueError("a publication needs at least one table")
    table_list = sql.SQL(", ").join(sql.Identifier(*split_table(t)) for t in tables)
    generated = publishes_generated_columns(conn.info.server_version)
    current = await published_tables(conn, name)
    if current is None:
        options = sql.SQL(" WITH (publish_generated_columns = stored)" if generated else "")
        await conn.execute(
            sql.SQL("CREATE PUBLICATION {} FOR TABLE {}{}").format(
                sql.Identifier(name), table_list, options
            )
        )
        return
    if current != set(tables):
        await conn.execute(
            sql.SQL("ALTER PUBLICATION {} SET TABLE {}").format(sql.Identifier(name), table_list)
        )
    if generated:
        row = await (
            await conn.execute("SELECT pubgencols FROM pg_publication WHERE pubname = %s", (name,))
        ).fetchone()
        if row is not None and row[0] != "s":  # created by an older release
            await conn.execute(
                sql.SQL("ALTER PUBLICATION {} SET (publish_generated_columns = stored)").format(
                    sql.Identifier(name)
                )
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


# The key of a table, one definition for the snapshot, backfills and the stream: the
# columns of the index REPLICA IDENTITY USING INDEX names, when the table has one (pgoutput
# identifies old rows by exactly those columns), otherwise the primary key. A table with
# neither has no key: sinks keep a change log of it. With REPLICA IDENTITY FULL pgoutput
# flags every column as part of the identity; that is not a key (rows may repeat).
_KEY_COLUMNS = """
SELECT a.attname FROM pg_class c
JOIN pg_index i ON i.indrelid = c.oid AND CASE
    WHEN c.relreplident = 'i'
        AND EXISTS (SELECT 1 FROM pg_index r WHERE r.indrelid = c.oid AND r.indisreplident)
    THEN i.indisreplident ELSE i.indisprimary END
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY(i.indkey) AND a.attnum > 0
WHERE c.oid = %s
"""


async def key_columns(conn: psycopg.AsyncConnection[Any], oid: int) -> set[str]:
    """Names of the key columns of table `oid` (see _KEY_COLUMNS); empty: no key."""
    return {str(r[0]) for r in await (await conn.execute(_KEY_COLUMNS, (oid,))).fetchall()}


_IDENTITY_INDEX_COLUMNS = """
SELECT a.attname FROM pg_class c
JOIN pg_index i ON i.indrelid = c.oid AND i.indisreplident
CROSS JOIN LATERAL unnest(i.indkey::smallint[]) WITH ORDINALITY AS k(attnum, n)
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
WHERE c.oid = to_regclass(quote_ident(%s) || '.' || quote_ident(%s)) AND c.relreplident = 'i'
ORDER BY k.n
"""


async def identity_index_keys(
    conn: psycopg.AsyncConnection[Any], tables: Sequence[str]
) -> dict[str, list[str]]:
    """The tables among `tables` keyed on a `REPLICA IDENTITY USING INDEX` index rather than
    on their primary key (`key_columns`), with the index's columns in index order."""
    out: dict[str, list[str]] = {}
    for table in tables:
        rows = await (await conn.execute(_IDENTITY_INDEX_COLUMNS, split_table(table))).fetchall()
        if rows:
            out[table] = [str(r[0]) for r in rows]
    return out


def publishes_generated_columns(server_version: int) -> bool:
    """PostgreSQL 18 publishes stored generated columns (publication option
    `publish_generated_columns = stored`); earlier servers never send them."""
    return server_version >= 180000


async def describe_relation(
    conn: psycopg.AsyncConnection[Any], oid: int, raw: Sequence[tuple[bool, str, int, int]]
) -> list[tuple[str, bool]]:
    """(type name, is key column) for each column of a Relation message.

    Type names come from format_type() of the message's own OID and typmod, so they
    describe the row as sent even if the table changed since. The key is the catalog's
    (`key_columns`), never the replica identity flags of the message: with REPLICA
    IDENTITY FULL those flag every column, and a table whose rows may repeat would be
    upserted on all its columns (identical rows merged) instead of kept as a change log.
    """
    names = await (
        await conn.execute(
            "SELECT format_type(t, m) FROM unnest(%s::oid[], %s::int[]) WITH ORDINALITY AS"
            " u(t, m, n) ORDER BY n",
            ([r[2] for r in raw], [r[3] for r in raw]),
        )
    ).fetchall()
    key = await key_columns(conn, oid)
    return [(n[0], c[1] in key) for n, c in zip(names, raw, strict=True)]


async def snapshot_schema(conn: psycopg.AsyncConnection[Any], qualified: str) -> TableSchema:
    """The table's columns as pgoutput sends them: no dropped columns; stored generated
    columns only where the server publishes them (PostgreSQL 18), virtual ones never. The
    key is `key_columns`, the same the stream's relations get."""
    schema, table = split_table(qualified)
    generated = "'', 's'" if publishes_generated_columns(conn.info.server_version) else "''"
    found = await (
        await conn.execute(
            "SELECT (quote_ident(%s) || '.' || quote_ident(%s))::regclass::oid", (schema, table)
        )
    ).fetchone()
    assert found is not None
    oid = int(found[0])
    rows = await (
        await conn.execute(
            "SELECT a.attname, a.atttypid, format_type(a.atttypid, a.atttypmod)"
            " FROM pg_attribute a WHERE a.attrelid = %s"
            " AND a.attnum > 0 AND NOT a.attisdropped"
            f" AND a.attgenerated IN ({generated})"
            " ORDER BY a.attnum",
            (oid,),
        )
    ).fetchall()
    if not rows:
        raise ValueError(f"table {qualified} has no columns or does not exist")
    key = await key_columns(conn, oid)
    return TableSchema(
        schema, table, tuple(Column(r[0], int(r[1]), r[2], r[0] in key) for r in rows)
    )


@dataclass(frozen=True, slots=True)
class IdentityProblem:
    """A captured table whose UPDATEs and DELETEs PostgreSQL refuses while it is published
    (it has no replica identity to send), and the statement that fixes it."""

    table: str
    replica_identity: str  # default | nothing | index (its index is gone)
    has_key: bool

    @property
    def fix(self) -> str:
        return f"ALTER TABLE {self.table} REPLICA IDENTITY FULL"

    def describe(self) -> str:
        what = "has no primary key and " if not self.has_key else ""
        return (
            f"table {self.table} {what}has REPLICA IDENTITY {self.replica_identity.upper()}:"
            " PostgreSQL refuses UPDATE and DELETE on it while it is published, so only"
            f" inserts can be captured; fix: {self.fix}"
            + (" (or add a primary key)" if not self.has_key else "")
        )

    def log_warning(self, log: Any) -> None:
        """The start-up warning every PostgreSQL source (our reader, Debezium's provisioner)
        logs for it: `source.keyless_table_no_identity` or `source.table_no_identity`."""
        log.warning(
            "source.keyless_table_no_identity" if not self.has_key else "source.table_no_identity",
            table=self.table,
            replica_identity=self.replica_identity,
            fix=self.fix,
            detail=self.describe(),
        )


_IDENTITY = """
SELECT c.relreplident::text,
    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident)
FROM pg_class c WHERE c.oid = to_regclass(quote_ident(%s) || '.' || quote_ident(%s))
"""
_IDENTITY_NAMES = {"d": "default", "n": "nothing", "i": "index", "f": "full"}


async def identity_problems(
    conn: psycopg.AsyncConnection[Any], tables: Sequence[str]
) -> list[IdentityProblem]:
    """The tables among `tables` whose updates and deletes cannot be captured: REPLICA
    IDENTITY DEFAULT without a primary key, NOTHING, or USING INDEX whose index is gone.
    Tables that do not exist are left out (other checks report them)."""
    out: list[IdentityProblem] = []
    for table in tables:
        row = await (await conn.execute(_IDENTITY, split_table(table))).fetchone()
        if row is None:
            continue
        ident, has_pk, has_index = str(row[0]), bool(row[1]), bool(row[2])
        if (ident == "d" and not has_pk) or ident == "n" or (ident == "i" and not has_index):
            out.append(IdentityProblem(table, _IDENTITY_NAMES[ident], has_pk or has_index))
    return out


async def missing_generated_columns(
    conn: psycopg.AsyncConnection[Any], tables: Sequence[str]
) -> dict[str, list[str]]:
    """Generated columns of `tables` that pgoutput will not send, per table: virtual ones
    always, stored ones before PostgreSQL 18. Sinks never get these columns."""
    kinds = "'v'" if publishes_generated_columns(conn.info.server_version) else "'s', 'v'"
    out: dict[str, list[str]] = {}
    for table in tables:
        rows = await (
            await conn.execute(
                "SELECT attname FROM pg_attribute"
                " WHERE attrelid = to_regclass(quote_ident(%s) || '.' || quote_ident(%s))"
                f" AND attnum > 0 AND NOT attisdropped AND attgenerated IN ({kinds})"
                " ORDER BY attnum",
                split_table(table),
            )
        ).fetchall()
        if rows:
            out[table] = [str(r[0]) for r in rows]
    return out
