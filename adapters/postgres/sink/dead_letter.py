"""The PostgreSQL sink's dead-letter table: events it could not apply, stored next to the rows.

A dead letter is written in the same transaction as the rest of its batch and the batch's
applied position, so an event is either applied, or dead-lettered, or neither (and then the
position did not move either): nothing is dropped silently.

``row`` and ``before`` hold the event's rows as ``{column: text}`` (JSON null for SQL NULL);
a column whose value the source did not send (an unchanged TOASTed value) is left out, which
keeps it apart from NULL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from domain.events import UNCHANGED, Operation, SourceEvent, TextRow

DEAD_LETTER_TABLE = "_cdc_dead_letters"

# jsonb cannot hold U+0000; PostgreSQL text cannot either, but a bad event may still carry it.
_NUL = "\x00"
_NUL_REPLACEMENT = "\ufffd"
_MAX_ERROR_CHARS = 4000


@dataclass(frozen=True, slots=True)
class FailedEvent:
    event: SourceEvent
    error: str


def create_dead_letter_table_sql(schema: str) -> sql.Composed:
    return sql.SQL(
        "CREATE TABLE IF NOT EXISTS {} ("
        " id bigserial PRIMARY KEY,"
        " pipeline_id text NOT NULL,"
        " sink_id text NOT NULL,"
        " partition text NOT NULL,"
        " major numeric(20,0) NOT NULL,"
        " minor bigint NOT NULL,"
        " table_name text NOT NULL,"
        " operation text NOT NULL,"
        " row jsonb,"
        " before jsonb,"
        " error text NOT NULL,"
        " created_at timestamptz NOT NULL DEFAULT now())"
    ).format(sql.Identifier(schema, DEAD_LETTER_TABLE))


def row_as_json(event: SourceEvent, row: TextRow | None) -> Jsonb | None:
    """``{column: text}`` of `row`; columns beyond the schema are named ``_col<n>``."""
    if row is None:
        return None
    names = event.table.column_names
    out: dict[str, Any] = {}
    for i, value in enumerate(row):
        if value is UNCHANGED:
            continue
        name = names[i] if i < len(names) else f"_col{i + 1}"
        if isinstance(value, str) and _NUL in value:
            value = value.replace(_NUL, _NUL_REPLACEMENT)
        out[name] = value
    return Jsonb(out)


def _clean(text: str) -> str:
    text = text.replace(_NUL, _NUL_REPLACEMENT)
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


async def insert_dead_letters(
    conn: psycopg.AsyncConnection[Any],
    schema: str,
    *,
    pipeline_id: str,
    sink_id: str,
    partition: str,
    failed: Sequence[FailedEvent],
) -> None:
    """Insert `failed` into the dead-letter table, inside the caller's transaction.

    Errors propagate: a dead letter that cannot be stored must keep the batch from being
    acknowledged."""
    if not failed:
        return
    query = sql.SQL(
        "INSERT INTO {} (pipeline_id, sink_id, partition, major, minor, table_name,"
        " operation, row, before, error) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    ).format(sql.Identifier(schema, DEAD_LETTER_TABLE))
    params = []
    for item in failed:
        ev = item.event
        main_row = ev.before if ev.operation is Operation.DELETE and ev.before else ev.after
        before = ev.before if ev.operation is not Operation.DELETE else None
        params.append(
            (
                pipeline_id,
                sink_id,
                partition,
                ev.position.major,
                ev.position.minor,
                _clean(ev.table.qualified_name),
                ev.operation.value,
                row_as_json(ev, main_row),
                row_as_json(ev, before),
                _clean(item.error),
            )
        )
    async with conn.cursor() as cur:
        await cur.executemany(query, params)
