"""The target tables of the PostgreSQL sink and how they follow the source (schema
evolution): created from the events' columns, columns added, retyped where the sink
created or adopted them, never dropped; the bookkeeping tables (offsets, dead letters,
followed source types); a plan per table shape (`plans.py`). DDL runs in transactions of
its own under an advisory lock shared by every writer of the target schema."""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Sequence
from typing import Any, Final

import psycopg
import structlog
from psycopg import sql

from adapters.config.pipeline import PostgresSinkConfig
from adapters.postgres.sink.dead_letter import DEAD_LETTER_TABLE, create_dead_letter_table_sql
from adapters.postgres.sink.errors import describe, is_data_error
from adapters.postgres.sink.offsets import OFFSETS_TABLE, create_offsets_table_sql
from adapters.postgres.sink.plans import (
    APPEND_META,
    TEXT_TYPE,
    Plan,
    Plans,
    SinkType,
    Target,
    plan_append,
    plan_upsert,
)
from domain.events import Column, TableSchema

log = structlog.get_logger(__name__)

COLUMNS_TABLE: Final = "_cdc_columns"


class TargetTables:
    """The target schema as this writer knows it: tables read from the catalog, plans per
    table shape, how source type names are stored here, the staging tables each pooled
    connection has."""

    def __init__(self, settings: PostgresSinkConfig) -> None:
        self._settings = settings
        self._schema = settings.target_schema
        self._meta_ready = False
        self._targets: dict[str, Target] = {}
        self._plans: dict[TableSchema, Plan] = {}
        self._types: dict[str, SinkType] = {}
        # (relname, column, ddl) of column type changes PostgreSQL refused: not tried again.
        self._retype_failed: set[tuple[str, str, str]] = set()
        self._staged: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], set[str]] = (
            weakref.WeakKeyDictionary()
        )
        digest = hashlib.blake2b(f"cdc-sink-ddl:{self._schema}".encode(), digest_size=8)
        self._ddl_lock_key = int.from_bytes(digest.digest(), "big", signed=True)
        self._columns = sql.Identifier(self._schema, COLUMNS_TABLE)

    def forget(self) -> None:
        """The targets may have changed under us (dropped, altered): read them again."""
        self._targets.clear()
        self._plans.clear()

    async def meta(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if not self._meta_ready:
            await self._ensure_meta(conn)
            self._meta_ready = True

    async def prepare(
        self,
        conn: psycopg.AsyncConnection[Any],
        schemas: Sequence[TableSchema],
        newest: frozenset[int] = frozenset(),
    ) -> Plans:
        """Make sure the bookkeeping tables, the target tables and this connection's staging
        tables exist; return a plan per schema. DDL commits on its own (before the data).

        `newest` holds the id() of each table's newest schema among the events to apply:
        only those may change column types. They are prepared first, so the plans of older
        schemas of the same table are built against the changed columns."""
        await self.meta(conn)
        plans: Plans = {}
        staged = self._staged.get(conn)
        if staged is None:
            staged = self._staged[conn] = set()
        ordered = sorted(schemas, key=lambda sc: id(sc) not in newest)  # stable: newest first
        for schema in ordered:
            plan = self._plans.get(schema)
            if plan is None:
                plan = await self._build_plan(conn, schema, retype=id(schema) in newest)
                if plan.error is None:
                    self._plans[schema] = plan
            if plan.error is None and not plan.append and plan.stage not in staged:
                assert plan.create_stage is not None
                await conn.execute(plan.create_stage, prepare=False)
                staged.add(plan.stage)
            plans[id(schema)] = plan
        return plans

    async def _ensure_meta(self, conn: psycopg.AsyncConnection[Any]) -> None:
        async with conn.transaction():
            await self._ddl_lock(conn)
            cur = await conn.execute(
                "SELECT 1 FROM pg_namespace WHERE nspname = %s", (self._schema,)
            )
            if await cur.fetchone() is None:
                await conn.execute(
                    sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self._schema))
                )
            if not await self._relation_exists(conn, OFFSETS_TABLE):
                await conn.execute(create_offsets_table_sql(self._schema))
            if not await self._relation_exists(conn, DEAD_LETTER_TABLE):
                await conn.execute(create_dead_letter_table_sql(self._schema))
            if not await self._relation_exists(conn, COLUMNS_TABLE):
                await conn.execute(
                    sql.SQL(
                        "CREATE TABLE IF NOT EXISTS {} ("
                        " table_name text NOT NULL,"
                        " column_name text NOT NULL,"
                        " source_type text NOT NULL,"
                        " updated_at timestamptz NOT NULL DEFAULT now(),"
                        " PRIMARY KEY (table_name, column_name))"
                    ).format(self._columns)
                )

    async def _ddl_lock(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Serialize DDL on the target schema among all writers (other sinks, replicas)."""
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._ddl_lock_key,))

    async def _relation_exists(self, conn: psycopg.AsyncConnection[Any], relname: str) -> bool:
        cur = await conn.execute(
            "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relname = %s",
            (self._schema, relname),
        )
        return await cur.fetchone() is not None

    async def _build_plan(
        self, conn: psycopg.AsyncConnection[Any], schema: TableSchema, retype: bool = False
    ) -> Plan:
        """The plan for `schema`, creating or extending the target table first; with `retype`
        also changing the target's column types to the schema's."""
        key_columns = schema.key_columns
        append = self._settings.write_mode == "append" or not key_columns
        relname = self._settings.target_table(schema.schema, schema.table, change_log=append)
        wanted = [(c.name, c.type_name) for c in schema.columns]
        if append:
            wanted = [*APPEND_META, *wanted]
        plan = Plan(
            schema=schema,
            append=append,
            relname=relname,
            target=sql.Identifier(self._schema, relname),
            ncols=len(schema.columns),
        )
        target = self._targets.get(relname)
        if (
            target is None
            or any(name not in target.casts for name, _ in wanted)
            or (retype and await self._retypes(conn, target, schema.columns))
        ):
            try:
                target = await self._ensure_table(
                    conn, relname, wanted, () if append else key_columns, schema.columns, retype
                )
            except Exception as exc:
                if not is_data_error(exc):
                    raise
                plan.error = f"cannot prepare {self._schema}.{relname}: {describe(exc)}"
                log.error("postgres_sink.target_table_failed", table=relname, error=plan.error)
                return plan
            previous = self._targets.get(relname)
            if previous is not None and previous.types != target.types:
                # Plans of other schemas of this table cast to the old column types.
                for stale in [k for k, p in self._plans.items() if p.relname == relname]:
                    del self._plans[stale]
            self._targets[relname] = target
        if append:
            plan_append(plan)
            return plan
        if target.key != frozenset(key_columns):
            have = ", ".join(sorted(target.key)) or "none"
            plan.error = (
                f"{self._schema}.{relname} has primary key ({have}) but the source table "
                f"{schema.qualified_name} has key ({', '.join(key_columns)}); "
                "rows cannot be upserted"
            )
            return plan
        plan_upsert(plan, target)
        return plan

    async def _ensure_table(
        self,
        conn: psycopg.AsyncConnection[Any],
        relname: str,
        wanted: Sequence[tuple[str, str]],
        key: Sequence[str],
        source: Sequence[Column] = (),
        retype: bool = False,
    ) -> Target:
        """Create the table, or add the columns it lacks, and with `retype` change the types
        of the columns the source retyped; record the source types the columns follow.
        Return what the catalog says. Columns are never dropped."""
        async with conn.transaction():
            await self._ddl_lock(conn)
            target = await self._read_target(conn, relname)
            ident = sql.Identifier(self._schema, relname)
            if target is None:
                columns = [
                    sql.SQL("{} {}").format(
                        sql.Identifier(name), sql.SQL((await self._sink_type(conn, type_name)).ddl)
                    )
                    for name, type_name in wanted
                ]
                if key:
                    columns.append(
                        sql.SQL("PRIMARY KEY ({})").format(
                            sql.SQL(", ").join(sql.Identifier(k) for k in key)
                        )
                    )
                await conn.execute(
                    sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(
                        ident, sql.SQL(", ").join(columns)
                    )
                )
                await self._follow(conn, relname, [(c.name, c.type_name) for c in source])
                target = await self._read_target(conn, relname)
                assert target is not None
            missing = [(n, t) for n, t in wanted if n not in target.casts]
            if missing:
                additions = [
                    sql.SQL("ADD COLUMN IF NOT EXISTS {} {}").format(
                        sql.Identifier(name), sql.SQL((await self._sink_type(conn, type_name)).ddl)
                    )
                    for name, type_name in missing
                ]
                await conn.execute(
                    sql.SQL("ALTER TABLE {} {}").format(ident, sql.SQL(", ").join(additions))
                )
                log.info(
                    "postgres_sink.columns_added",
                    table=f"{self._schema}.{relname}",
                    columns=[n for n, _ in missing],
                )
                added = {n for n, _ in missing}
                await self._follow(
                    conn, relname, [(c.name, c.type_name) for c in source if c.name in added]
                )
                target = await self._read_target(conn, relname)
                assert target is not None
            changes = await self._retypes(conn, target, source) if retype else []
            if changes:
                followed = [
                    (name, type_name)
                    for name, type_name, want, alter in changes
                    if not alter or await self._retype(conn, target, name, want)
                ]
                await self._follow(conn, relname, followed)
                target = await self._read_target(conn, relname)
                assert target is not None
            return target

    async def _follow(
        self,
        conn: psycopg.AsyncConnection[Any],
        relname: str,
        columns: Sequence[tuple[str, str]],
    ) -> None:
        """Record the source type each of `columns` follows (inside the DDL transaction)."""
        if not columns:
            return
        async with conn.cursor() as cur:
            await cur.executemany(
                sql.SQL(
                    "INSERT INTO {} (table_name, column_name, source_type) VALUES (%s, %s, %s)"
                    " ON CONFLICT (table_name, column_name) DO UPDATE"
                    " SET source_type = EXCLUDED.source_type, updated_at = now()"
                ).format(self._columns),
                [(relname, name, type_name) for name, type_name in columns],
            )

    async def _retypes(
        self, conn: psycopg.AsyncConnection[Any], target: Target, columns: Sequence[Column]
    ) -> list[tuple[str, str, SinkType, bool]]:
        """What to do for the source `columns` whose type differs from the one recorded for
        them: (column, source type, its type here, whether the column must be altered). A
        column without a record is adopted (recorded, not altered) when its type is the
        source's; otherwise an operator chose it and it is left alone. Changes PostgreSQL
        refused earlier are left out."""
        out: list[tuple[str, str, SinkType, bool]] = []
        for col in columns:
            have = target.types.get(col.name)
            recorded = target.followed.get(col.name)
            if have is None or recorded == col.type_name:
                continue
            want = await self._sink_type(conn, col.type_name)
            same = (want.oid, want.typmod) == have
            if recorded is None and not same:
                continue
            if not same and (target.relname, col.name, want.ddl) in self._retype_failed:
                continue
            out.append((col.name, col.type_name, want, not same))
        return out

    async def _retype(
        self, conn: psycopg.AsyncConnection[Any], target: Target, name: str, want: SinkType
    ) -> bool:
        """ALTER COLUMN .. TYPE, inside the caller's DDL transaction. USING casts to the
        base type: the typmod is then checked on assignment (a value too long for the new
        varchar fails the change instead of being cut); without a cast between the types,
        through text. A refusal is logged, remembered and answered with False."""
        table = f"{self._schema}.{target.relname}"
        ident = sql.Identifier(self._schema, target.relname)
        col = sql.Identifier(name)
        alter = "ALTER TABLE {} ALTER COLUMN {} TYPE {} USING {}::{}"
        attempts = [
            sql.SQL(alter).format(ident, col, sql.SQL(want.ddl), col, sql.SQL(want.base)),
            sql.SQL(alter + "::text::{}").format(
                ident, col, sql.SQL(want.ddl), col, sql.SQL("pg_catalog.text"), sql.SQL(want.base)
            ),
        ]
        error = ""
        for statement in attempts:
            try:
                async with conn.transaction():  # a savepoint: a refusal must not abort
                    await conn.execute(statement)
            except Exception as exc:
                if not is_data_error(exc):
                    raise
                error = describe(exc)
                if not isinstance(
                    exc, (psycopg.errors.CannotCoerce, psycopg.errors.DatatypeMismatch)
                ):
                    break
                continue
            log.info(
                "postgres_sink.column_retyped",
                table=table,
                column=name,
                from_type=target.declared.get(name),
                to_type=want.ddl,
            )
            return True
        self._retype_failed.add((target.relname, name, want.ddl))
        log.error(
            "postgres_sink.retype_failed",
            table=table,
            column=name,
            from_type=target.declared.get(name),
            to_type=want.ddl,
            error=error,
            action="column kept as it is; events whose values do not fit it are dead-lettered",
        )
        return False

    async def _sink_type(self, conn: psycopg.AsyncConnection[Any], type_name: str) -> SinkType:
        """How `type_name` is stored here: itself if this database knows it (it then parses as
        exactly one type name, so it is safe to splice into DDL), else text: the value is
        kept, in its text form. Cached per name."""
        known = self._types.get(type_name)
        if known is not None:
            return known
        found = TEXT_TYPE
        if type_name.strip():
            try:
                async with conn.transaction():  # a savepoint: a parse error must not abort
                    cur = await conn.execute(
                        "SELECT t.oid, quote_ident(n.nspname) || '.' || quote_ident(t.typname)"
                        " FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace"
                        " WHERE t.oid = to_regtype(%s)",
                        (type_name,),
                    )
                    row = await cur.fetchone()
                    if row is not None:
                        # The typmod a column declared with this name gets, as the server
                        # computes it (varchar(10) -> 14); a domain reports its base type.
                        cur = await conn.execute(
                            sql.SQL("SELECT NULL::{} LIMIT 0").format(sql.SQL(type_name))
                        )
                        result = cur.pgresult
                        assert result is not None
                        oid = int(row[0])
                        typmod = result.fmod(0) if result.ftype(0) == oid else -1
                        found = SinkType(type_name, oid, typmod, str(row[1]))
            except Exception as exc:
                if not is_data_error(exc):
                    raise
        self._types[type_name] = found
        return found

    async def _read_target(self, conn: psycopg.AsyncConnection[Any], relname: str) -> Target | None:
        cur = await conn.execute(
            "SELECT a.attname, quote_ident(tn.nspname) || '.' || quote_ident(t.typname),"
            " coalesce(a.attnum = ANY(i.indkey), false), a.atttypid, a.atttypmod,"
            " format_type(a.atttypid, a.atttypmod)"
            " FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped"
            " JOIN pg_type t ON t.oid = a.atttypid"
            " JOIN pg_namespace tn ON tn.oid = t.typnamespace"
            " LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary"
            " WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')"
            " ORDER BY a.attnum",
            (self._schema, relname),
        )
        rows = await cur.fetchall()
        if not rows:
            return None
        cur = await conn.execute(
            sql.SQL("SELECT column_name, source_type FROM {} WHERE table_name = %s").format(
                self._columns
            ),
            (relname,),
        )
        followed = {str(r[0]): str(r[1]) for r in await cur.fetchall()}
        return Target(
            relname=relname,
            casts={r[0]: r[1] for r in rows},
            key=frozenset(r[0] for r in rows if r[2]),
            types={r[0]: (int(r[3]), int(r[4])) for r in rows},
            declared={r[0]: r[5] for r in rows},
            followed=followed,
        )
