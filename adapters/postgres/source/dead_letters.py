"""The dead letters of `transport_mode: direct`: a table in PostgreSQL, by default the source
database's ``cdc_platform`` schema (or the database of ``dlq.postgres_dsn``).

`PostgresErrorRouter` is both the transport's `ErrorRouter` (sinks hand it the changes they
cannot deliver; it returns once they are committed, raises otherwise) and its
`DeadLetterStore` (`cdc dlq list / replay`). A change is kept whole (domain.event_codec),
with the sink id, lane, error class and message, attempt count and time. The same change
dead-lettered again (a batch resent after a restart) updates its row instead of adding one.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Json, Jsonb

from adapters.postgres.dead_letter_rows import PipelineDeadLetterRows, delete_query, select_query
from domain.event_codec import event_from_doc, event_to_doc
from domain.ports import DeadLetter, StoredDeadLetter

DEFAULT_SCHEMA = "cdc_platform"
TABLE = "dead_letters"
_NUL = "\x00"
_MAX_ERROR_CHARS = 4000


def _clean(text: str) -> str:
    text = text.replace(_NUL, "\ufffd")
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


def _key_doc(letter: DeadLetter) -> dict[str, Any]:
    return {
        k: (v.replace(_NUL, "\ufffd") if isinstance(v, str) else v)
        for k, v in letter.event.key.items()
    }


class PostgresErrorRouter(PipelineDeadLetterRows):
    """ErrorRouter + DeadLetterStore on one PostgreSQL table."""

    def __init__(self, conninfo: str, pipeline_id: str, schema: str = DEFAULT_SCHEMA) -> None:
        self._conninfo = conninfo
        self.pipeline_id = pipeline_id
        self.schema = schema
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._ready = False

    @property
    def location(self) -> str:
        return f"postgres table {self.schema}.{TABLE}"

    def _table(self) -> sql.Identifier:
        return sql.Identifier(self.schema, TABLE)

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = await psycopg.AsyncConnection.connect(
                self._conninfo, autocommit=True, connect_timeout=10
            )
            self._ready = False
        if not self._ready:
            await self._conn.execute(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema))
            )
            await self._conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} ("
                    " id bigserial PRIMARY KEY,"
                    " pipeline_id text NOT NULL,"
                    " sink_id text NOT NULL,"
                    " lane text NOT NULL,"
                    " major numeric(20,0) NOT NULL,"
                    " minor bigint NOT NULL,"
                    " table_name text NOT NULL,"
                    " operation text NOT NULL,"
                    " key jsonb NOT NULL,"
                    " change json NOT NULL,"
                    " error_class text NOT NULL,"
                    " error text NOT NULL,"
                    " attempts integer NOT NULL,"
                    " created_at timestamptz NOT NULL DEFAULT now(),"
                    " UNIQUE (pipeline_id, sink_id, lane, major, minor))"
                ).format(self._table())
            )
            self._ready = True
        return self._conn

    # ------------------------------------------------------------------ ErrorRouter

    async def dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        if not letters:
            return
        conn = await self._connection()
        query = sql.SQL(
            "INSERT INTO {} AS d (pipeline_id, sink_id, lane, major, minor, table_name,"
            " operation, key, change, error_class, error, attempts)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (pipeline_id, sink_id, lane, major, minor) DO UPDATE SET"
            " error_class = EXCLUDED.error_class, error = EXCLUDED.error,"
            " attempts = d.attempts + EXCLUDED.attempts, created_at = now()"
        ).format(self._table())
        params = [
            (
                letter.pipeline_id or self.pipeline_id,
                letter.sink_id,
                letter.lane,
                letter.event.position.major,
                letter.event.position.minor,
                letter.event.table.qualified_name,
                letter.event.operation.value,
                Jsonb(_key_doc(letter)),
                Json(event_to_doc(letter.event)),
                _clean(letter.error_class or letter.stage),
                _clean(letter.error),
                letter.attempts,
            )
            for letter in letters
        ]
        async with conn.transaction(), conn.cursor() as cur:
            await cur.executemany(query, params)

    # -------------------------------------------------------------- DeadLetterStore

    async def _delete(self, numbers: builtins.list[int]) -> int:
        conn = await self._connection()
        cur = await conn.execute(delete_query(self._table()), (self.pipeline_id, numbers))
        return cur.rowcount

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def _select(
        self, where: sql.Composable, params: builtins.list[Any], limit: int | None
    ) -> builtins.list[StoredDeadLetter]:
        conn = await self._connection()
        query = select_query(
            "id, pipeline_id, sink_id, lane, change::text, error_class, error, attempts,"
            " created_at",
            self._table(),
            where,
            limit,
        )
        cur = await conn.execute(query, params)
        return [
            StoredDeadLetter(
                id=str(row[0]),
                pipeline_id=row[1],
                sink_id=row[2],
                lane=row[3],
                event=event_from_doc(json.loads(row[4])),
                error_class=row[5],
                error=row[6],
                attempts=int(row[7]),
                created_at=row[8],
                location=self.location,
            )
            for row in await cur.fetchall()
        ]
