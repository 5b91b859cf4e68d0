"""Applying a table's changes inside the write's transaction: collapsed to the last change
per key (`domain.collapse`), COPYed into a staging table and merged with set-based
statements (upsert mode), or COPYed into the change log (append mode)."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import psycopg
import pyarrow as pa
import pyarrow.compute as pc

from adapters.postgres.sink.copy_text import copy_buffer, copy_escape
from adapters.postgres.sink.plans import Plan, Plans
from domain.blocks import META_COLUMNS, OP
from domain.collapse import KeyCollapse
from domain.events import UNCHANGED, Operation, SourceEvent, TableSchema, TextRow

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(slots=True)
class TxState:
    """What one transaction has used so far: staging tables holding rows of this
    transaction (emptied before their next use)."""

    dirty_stages: set[str] = field(default_factory=set)


class Segment(KeyCollapse):
    """The changes of one table (one schema) between two flushes, collapsed per key
    (`domain.collapse.KeyCollapse`)."""

    __slots__ = ("plan",)

    def __init__(self, plan: Plan) -> None:
        super().__init__(plan.key_idx)
        self.plan = plan


def before_json(names: Sequence[str], row: TextRow) -> str:
    """The old row of an update as a JSON object: column -> its text value (null for SQL
    NULL). A value the source did not send (unchanged TOAST) is left out."""
    return json.dumps(
        {name: value for name, value in zip(names, row, strict=True) if value is not UNCHANGED},
        ensure_ascii=False,
        separators=(",", ":"),
    )


def array_literal(items: Iterable[str]) -> str:
    quoted = ('"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"' for s in items)
    return "{" + ",".join(quoted) + "}"


@functools.lru_cache(maxsize=64)
def commit_time_text(us: int) -> str | None:
    """A commit time (µs since the epoch) as COPY text; 0: unknown."""
    return (_EPOCH + timedelta(microseconds=us)).isoformat() if us else None


def invalid(ev: SourceEvent, plan: Plan) -> str | None:
    """Why this event cannot be applied at all (checked before touching the database)."""
    if plan.error is not None:
        return plan.error
    op = ev.operation
    if op is Operation.TRUNCATE:
        return None
    before, after = ev.before, ev.after
    n = plan.ncols
    if before is not None and len(before) != n:
        return f"before row has {len(before)} values but the table schema has {n} columns"
    if after is not None and len(after) != n:
        return f"after row has {len(after)} values but the table schema has {n} columns"
    if op is Operation.DELETE:
        keyed = before if before is not None else after
        if keyed is None:
            return "delete without a before row"
        other = None
    else:
        if after is None:
            return f"{op.name.lower()} without an after row"
        keyed = after
        other = before if op is Operation.UPDATE else None
    if plan.append:
        return None
    for i in plan.key_idx:
        value = keyed[i]
        if value is None or value is UNCHANGED:
            return f"key column {plan.schema.columns[i].name!r} has no value"
    if other is not None:
        for i in plan.key_idx:
            value = other[i]
            if value is None or value is UNCHANGED:
                return f"key column {plan.schema.columns[i].name!r} has no value"
    return None


async def apply_events(
    conn: psycopg.AsyncConnection[Any],
    events: Sequence[SourceEvent],
    plans: Plans,
    partition: str,
    tx: TxState,
) -> None:
    """Apply `events` in order (per table; tables are independent of each other)."""
    segments: dict[str, Segment] = {}
    appends: dict[int, tuple[Plan, list[SourceEvent]]] = {}
    last_schema: TableSchema | None = None
    plan: Plan | None = None
    for ev in events:
        if ev.table is not last_schema:
            last_schema = ev.table
            plan = plans[id(last_schema)]
        assert plan is not None
        if plan.append:
            entry = appends.get(id(plan))
            if entry is None:
                entry = appends[id(plan)] = (plan, [])
            entry[1].append(ev)
            continue
        segment = segments.get(plan.relname)
        if ev.operation is Operation.TRUNCATE:
            if segment is not None:
                del segments[plan.relname]
                await flush_segment(conn, segment, tx)
            assert plan.truncate_target is not None
            await conn.execute(plan.truncate_target, prepare=False)
            continue
        if segment is None or segment.plan is not plan:
            if segment is not None:
                await flush_segment(conn, segment, tx)
            segment = segments[plan.relname] = Segment(plan)
        segment.add(ev)
    for segment in segments.values():
        await flush_segment(conn, segment, tx)
    for append_plan, planned in appends.values():
        await append_events(conn, append_plan, planned, partition)


async def flush_segment(conn: psycopg.AsyncConnection[Any], segment: Segment, tx: TxState) -> None:
    plan = segment.plan
    if not segment.state:
        return
    assert plan.copy_stage is not None and plan.truncate_stage is not None
    if plan.stage in tx.dirty_stages:
        await conn.execute(plan.truncate_stage, prepare=False)
    tx.dirty_stages.add(plan.stage)
    n = plan.ncols
    kidx = plan.key_idx
    no_origin = (None,) * len(kidx)
    unchanged_cols: set[int] = set()
    deletes = upserts = 0
    async with conn.cursor() as cur, cur.copy(plan.copy_stage) as copy:
        seq = 0
        for key, (op, row, origin) in segment.state.items():
            seq += 1
            if row is None:  # delete
                deletes += 1
                values: list[str | None] = [None] * n
                for j, i in enumerate(kidx):
                    values[i] = key[j]
                await copy.write_row((seq, "d", None, *values, *no_origin))
                continue
            upserts += 1
            if UNCHANGED in row:
                missing = [i for i, v in enumerate(row) if v is UNCHANGED]
                unchanged_cols.update(missing)
                literal = "{" + ",".join(str(i + 1) for i in missing) + "}"
                row = tuple([None if v is UNCHANGED else v for v in row])
                await copy.write_row((seq, op, literal, *row, *(origin or no_origin)))
            else:
                await copy.write_row((seq, op, None, *row, *no_origin))
    # Sent together (pipeline mode), still prepared statements: one round trip.
    async with conn.pipeline():
        if unchanged_cols:
            await conn.execute(plan.fill_sql(frozenset(unchanged_cols)))
        if deletes:
            assert plan.delete_sql is not None
            await conn.execute(plan.delete_sql)
        if upserts:
            assert plan.insert_sql is not None
            await conn.execute(plan.insert_sql)


async def flush_columns(
    conn: psycopg.AsyncConnection[Any], plan: Plan, rows: pa.RecordBatch, tx: TxState
) -> None:
    """`_flush` for rows collapsed column-wise: no unchanged values, no key changes."""
    assert plan.copy_stage is not None and plan.truncate_stage is not None
    if plan.stage in tx.dirty_stages:
        await conn.execute(plan.truncate_stage, prepare=False)
    tx.dirty_stages.add(plan.stage)
    m = rows.num_rows
    deletes = pc.equal(rows.column(OP), "d")
    n_deletes = int(pc.sum(deletes).as_py() or 0)
    null = pa.nulls(m, pa.string())
    columns = [
        pc.cast(pa.array(range(1, m + 1), pa.int64()), pa.string()),
        pc.if_else(deletes, "d", "u"),
        null,  # _unchanged
        *[copy_escape(rows.column(META_COLUMNS + i)) for i in range(plan.ncols)],
        *[null for _ in plan.key_idx],  # origin keys
    ]
    async with conn.cursor() as cur, cur.copy(plan.copy_stage) as copy:
        await copy.write(copy_buffer(columns))
    async with conn.pipeline():
        if n_deletes:
            assert plan.delete_sql is not None
            await conn.execute(plan.delete_sql)
        if n_deletes < m:
            assert plan.insert_distinct_sql is not None
            await conn.execute(plan.insert_distinct_sql)


async def append_events(
    conn: psycopg.AsyncConnection[Any],
    plan: Plan,
    events: list[SourceEvent],
    partition: str,
) -> None:
    assert plan.copy_append is not None
    names = plan.schema.column_names
    empty: TextRow = (None,) * plan.ncols
    async with conn.cursor() as cur, cur.copy(plan.copy_append) as copy:
        for ev in events:
            op = ev.operation
            if op is Operation.DELETE:
                row = ev.before if ev.before is not None else ev.after
            else:
                row = ev.after
            if row is None:  # truncate
                row = empty
            unchanged = None
            if UNCHANGED in row:
                unchanged = array_literal(names[i] for i, v in enumerate(row) if v is UNCHANGED)
                row = tuple([None if v is UNCHANGED else v for v in row])
            before = None
            if op is Operation.UPDATE and ev.before is not None:
                before = before_json(names, ev.before)
            await copy.write_row(
                (
                    op.value,
                    partition,
                    ev.position.major,
                    ev.position.minor,
                    commit_time_text(ev.commit_time_us),
                    unchanged,
                    before,
                    *row,
                )
            )
