"""The PostgreSQL sink: row upserts by primary key (or a change log), idempotent by position.

Each source table ``schema.table`` lands as ``<target_schema>.<name>``, ``name`` being the
sink's ``table_name_template`` (``{table}`` by default; ``{schema}`` and ``{table}`` are the
source's), created from the event's columns when absent. Config validation refuses two
source tables with one target name. The target follows the shape of the events (schema
evolution):

* a column the events have and the target lacks is added (``ADD COLUMN``, no default: rows
  already stored read NULL until a change for them arrives; a source ``ADD COLUMN ...
  DEFAULT`` does not send its existing rows again, so re-read the table with a backfill);
* a column the source dropped is kept, never dropped: the data in it stays, rows inserted
  afterwards get NULL in it, and updated rows keep the value they had;
* a column the source retyped (``int`` -> ``bigint``, ``varchar(10)`` -> ``text``, a new
  typmod) is changed with ``ALTER COLUMN .. TYPE new USING col::new``. The sink records in
  ``<target_schema>._cdc_columns`` the source type each column follows (the columns it
  created, and existing columns whose type matches the source's); a column whose recorded
  source type differs from the events' is changed. Columns whose type an operator chose
  (no record, or a type other than the source's) are left alone: values that do not fit
  them are dead-lettered. Only the newest shape of a table in a batch, among events not yet
  applied, may change types, so a replay of older changes does not turn a column back. If
  PostgreSQL refuses (values that do not convert, a view on the column), the column is
  kept as it is, the refusal is logged as ``postgres_sink.retype_failed`` and not tried
  again by this process; the events are still written, and those whose values do not fit
  the old type go to the dead letters.

One transaction per batch (per ``batch_size`` events of it) does all of this:

1. Insert-or-lock the row of ``<target_schema>._cdc_offsets`` for (pipeline, sink,
   partition) and read the applied position; events at or below it are skipped (a replay).
2. Upsert mode: the changes of each table are COPYed into a temporary staging table (text
   values, as they came) after collapsing them to the last change per key in Python (which
   also resolves unchanged TOASTed values against earlier changes in the batch and follows
   primary key changes). Then three set-based statements: copy stored values into the
   staging rows for columns the source did not send (unchanged TOAST), delete the keys whose
   last change is a delete (including the old key of a primary key change), and
   ``INSERT ... SELECT ... ON CONFLICT DO UPDATE`` the rest, casting text to the column types
   in SQL. A truncate flushes what came before it for that table, then TRUNCATEs it.
   Append mode, and tables without a key (the events' key columns: the source's primary
   key or REPLICA IDENTITY USING INDEX index): every change becomes one row of
   ``<target_schema>.<name>_changes`` (COPY straight into it): ``_op``, position, commit
   time, ``_unchanged`` (columns the source did not send), ``_before`` (an update's old
   row as the source sent it, jsonb column -> text value; complete with REPLICA IDENTITY
   FULL, else NULL or the key only), then the row's columns: the new row, or for a delete
   the old row.
3. Store the last applied position; COMMIT. ``write()`` returns only after the commit.

If a batch fails on its data (a value that does not fit its column, a constraint), it is
applied again in a fresh transaction in halves, each inside a savepoint, down to single
events: the events that still fail go to ``<target_schema>._cdc_dead_letters`` in that same
transaction, everything else is written. Connection problems are retried with backoff until
the database answers again or ``stop()`` is called.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import structlog
from psycopg import sql
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from adapters.config.pipeline import CHANGE_LOG_SUFFIX, PostgresSinkConfig
from adapters.config.platform import RetryConfig
from adapters.postgres.sink.copy_text import copy_buffer, copy_escape
from adapters.postgres.sink.dead_letter import (
    DEAD_LETTER_TABLE,
    FailedEvent,
    create_dead_letter_table_sql,
    insert_dead_letters,
)
from domain.blocks import META_COLUMNS, OP, ChangeBlock, after_position, last_position
from domain.collapse import KeyCollapse, collapse_block, simple_block
from domain.errors import PermanentError, SinkUnavailableError
from domain.events import (
    UNCHANGED,
    Column,
    Operation,
    Position,
    SourceEvent,
    TableSchema,
    TextRow,
)
from domain.health import ComponentHealth, Status
from domain.ports import Guarantee, SinkBatch, WriteResult

__all__ = ["COLUMNS_TABLE", "OFFSETS_TABLE", "PostgresSinkWriter"]

log = structlog.get_logger(__name__)

OFFSETS_TABLE: Final = "_cdc_offsets"
COLUMNS_TABLE: Final = "_cdc_columns"
CHANGES_SUFFIX: Final = CHANGE_LOG_SUFFIX

# Leading columns of a change-log table (append mode), before the row's own columns.
_APPEND_META: Final[tuple[tuple[str, str], ...]] = (
    ("_op", "text"),
    ("_partition", "text"),
    ("_position_major", "numeric(20,0)"),
    ("_position_minor", "bigint"),
    ("_commit_time", "timestamp with time zone"),
    ("_unchanged", "text[]"),
    ("_before", "jsonb"),
)

_HEALTH_TIMEOUT_SECONDS: Final = 2.0
_CHECK_IDLE_SECONDS: Final = 1.0  # a connection idle longer is checked before a write

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_Plans = dict[int, "_Plan"]  # by id() of the TableSchema objects of the batch at hand


# Not about any one event, and fixed by an operator rather than by dropping data: retry the
# batch (with backoff) instead of dead-lettering everything it touches.
_RETRY_SERVER_ERRORS: Final = (
    psycopg.errors.InsufficientPrivilege,
    psycopg.errors.ReadOnlySqlTransaction,
)


def _is_transient(exc: BaseException) -> bool:
    """Connection-level trouble (or a setup problem): worth retrying the whole batch later."""
    return isinstance(exc, (psycopg.OperationalError, OSError, TimeoutError, *_RETRY_SERVER_ERRORS))


def _is_data_error(exc: BaseException) -> bool:
    """The server rejected what we sent (a value, a constraint, the target's shape)."""
    return isinstance(exc, psycopg.DatabaseError) and not _is_transient(exc)


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    sqlstate = getattr(exc, "sqlstate", None)
    name = type(exc).__name__
    return f"{name} [{sqlstate}]: {text}" if sqlstate else f"{name}: {text}"


def _before_json(names: Sequence[str], row: TextRow) -> str:
    """The old row of an update as a JSON object: column -> its text value (null for SQL
    NULL). A value the source did not send (unchanged TOAST) is left out."""
    return json.dumps(
        {name: value for name, value in zip(names, row, strict=True) if value is not UNCHANGED},
        ensure_ascii=False,
        separators=(",", ":"),
    )


def _array_literal(items: Iterable[str]) -> str:
    quoted = ('"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"' for s in items)
    return "{" + ",".join(quoted) + "}"


@dataclass(frozen=True, slots=True)
class _Target:
    """A target table as the catalog describes it."""

    relname: str
    casts: dict[str, str]  # column -> its base type, qualified and quoted (no typmod)
    key: frozenset[str]  # primary key columns (empty: no primary key)
    types: dict[str, tuple[int, int]] = field(default_factory=dict)  # (type oid, typmod)
    declared: dict[str, str] = field(default_factory=dict)  # format_type() for messages
    followed: dict[str, str] = field(default_factory=dict)  # column -> recorded source type


@dataclass(frozen=True, slots=True)
class _SinkType:
    """How a source type name is stored in this database: the DDL to declare a column of it
    (the name itself, or text when the database does not know it), the type and typmod a
    column declared so has, and the base type to cast to (qualified, quoted, no typmod)."""

    ddl: str
    oid: int
    typmod: int
    base: str


_TEXT_TYPE: Final = _SinkType("text", 25, -1, "pg_catalog.text")


@dataclass(slots=True)
class _Plan:
    """How the events of one TableSchema are written (built once, reused every batch)."""

    schema: TableSchema
    append: bool
    relname: str
    target: sql.Identifier
    ncols: int
    key_idx: tuple[int, ...] = ()
    error: str | None = None  # set: every event of this schema is dead-lettered with it
    stage: str = ""
    create_stage: sql.Composed | None = None
    truncate_stage: sql.Composed | None = None
    copy_stage: sql.Composed | None = None
    delete_sql: sql.Composed | None = None
    insert_sql: sql.Composed | None = None
    insert_distinct_sql: sql.Composed | None = None  # staging rows are one per key
    truncate_target: sql.Composed | None = None
    copy_append: sql.Composed | None = None
    fill_template: tuple[sql.Composed, ...] = ()  # per column: its SET clause
    fill_where: sql.Composed | None = None
    fill_cache: dict[frozenset[int], sql.Composed] = field(default_factory=dict)

    def fill_sql(self, columns: frozenset[int]) -> sql.Composed:
        """UPDATE of the staging rows: stored values for the columns the source omitted."""
        query = self.fill_cache.get(columns)
        if query is None:
            assert self.fill_where is not None
            sets = sql.SQL(", ").join(self.fill_template[i] for i in sorted(columns))
            query = sql.SQL("UPDATE {} s SET {} FROM {} o WHERE {}").format(
                sql.Identifier("pg_temp", self.stage), sets, self.target, self.fill_where
            )
            self.fill_cache[columns] = query
        return query


class _Segment(KeyCollapse):
    """The changes of one table (one schema) between two flushes, collapsed per key
    (`domain.collapse.KeyCollapse`)."""

    __slots__ = ("plan",)

    def __init__(self, plan: _Plan) -> None:
        super().__init__(plan.key_idx)
        self.plan = plan


@dataclass(slots=True)
class _TxState:
    dirty_stages: set[str] = field(default_factory=set)


class PostgresSinkWriter:
    """`domain.ports.SinkWriter` for PostgreSQL: durable on return from `write()` (one
    transaction per batch, the applied position stored with the rows), idempotent, ordered
    per lane: an exactly-once effect."""

    guarantee = Guarantee.EXACTLY_ONCE_EFFECT

    def __init__(
        self,
        settings: PostgresSinkConfig,
        pipeline_id: str,
        sink_id: str,
        *,
        retry: RetryConfig | None = None,
    ) -> None:
        """``retry`` (platform.yaml ``retry``): the backoff between attempts of a batch that
        failed on a connection problem; after ``max_attempts`` the write raises
        SinkUnavailableError (the batch is rejected, the ingest resends it). None: retry
        with the same backoff until the database answers or stop() is called."""
        self._settings = settings
        self._retry = retry if retry is not None else RetryConfig()
        self._retry_forever = retry is None
        self._pipeline_id = pipeline_id
        self._sink_id = sink_id
        self._schema = settings.target_schema
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] | None = None
        self._lock = asyncio.Lock()  # one batch at a time: batches of a partition apply in order
        self._stopping = asyncio.Event()
        self._last_error: str | None = None
        self.retries = 0  # write attempts retried after a transient error (sink metrics)
        self.columnar_batches = 0  # batches written by the columnar path (tests, profiles)
        self._applied: dict[str, Position] = {}
        self._meta_ready = False
        self._targets: dict[str, _Target] = {}
        self._plans: dict[TableSchema, _Plan] = {}
        self._types: dict[str, _SinkType] = {}
        # (relname, column, ddl) of column type changes PostgreSQL refused: not tried again.
        self._retype_failed: set[tuple[str, str, str]] = set()
        self._staged: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], set[str]] = (
            weakref.WeakKeyDictionary()
        )
        self._commit_time_cache: tuple[int, str | None] = (0, None)
        # When each pooled connection last completed a write (see _check_connection).
        self._used_ok: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], float] = (
            weakref.WeakKeyDictionary()
        )
        digest = hashlib.blake2b(f"cdc-sink-ddl:{self._schema}".encode(), digest_size=8)
        self._ddl_lock_key = int.from_bytes(digest.digest(), "big", signed=True)
        self._offsets = sql.Identifier(self._schema, OFFSETS_TABLE)
        self._columns = sql.Identifier(self._schema, COLUMNS_TABLE)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the pool. Does not wait for the database: while it is down, health() reports
        the error and write() keeps retrying."""
        if self._pool is not None:
            return
        self._stopping.clear()
        timeout = float(self._settings.connect_timeout_seconds)
        self._pool = AsyncConnectionPool(
            self._settings.conninfo(),
            min_size=1,
            max_size=max(1, self._settings.pool_max_size),
            kwargs={"autocommit": True},
            check=self._check_connection,
            timeout=timeout,
            # Give up a reconnection series soon: the next request starts a fresh one, so the
            # pool notices a database that came back within about our own retry interval.
            reconnect_timeout=max(10.0, 2 * timeout),
            name=f"cdc-sink-{self._sink_id}",
            open=False,
        )
        await self._pool.open(wait=False)

    async def _check_connection(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """The pool's check before lending a connection, skipped for one that just completed a
        write: a round trip less per batch. One that broke since fails the write, which is
        retried (and the pool drops the broken connection)."""
        used = self._used_ok.get(conn)
        if used is not None and time.monotonic() - used < _CHECK_IDLE_SECONDS:
            return
        await AsyncConnectionPool.check_connection(conn)

    async def stop(self) -> None:
        """Stop retrying (a write in its retry loop raises SinkUnavailableError), let a write
        in progress finish for a while, then close the pool."""
        self._stopping.set()
        acquired = False
        wait = max(5.0, 2 * float(self._settings.connect_timeout_seconds))
        with contextlib.suppress(TimeoutError):
            # not wait_for: on 3.11 it can swallow a cancel (or, cancelled as the lock is
            # granted, lose the acquired lock)
            async with asyncio.timeout(wait):
                await self._lock.acquire()
            acquired = True
        try:
            if self._pool is not None:
                pool, self._pool = self._pool, None
                await pool.close(timeout=5.0)
        finally:
            if acquired:
                self._lock.release()

    async def health(self) -> ComponentHealth:
        name = f"sink:{self._sink_id}"
        pool = self._pool
        if pool is None:
            return ComponentHealth(name, Status.ERROR, {"error": "not started"})
        try:
            async with pool.connection(timeout=_HEALTH_TIMEOUT_SECONDS) as conn:
                await asyncio.wait_for(conn.execute("SELECT 1"), _HEALTH_TIMEOUT_SECONDS)
        except PoolTimeout:
            if self._lock.locked() and self._last_error is None:
                # Every connection is busy writing; that is not an outage.
                return ComponentHealth(name, Status.OK, self._applied_detail(probe="pool busy"))
            problem = await self._connect_problem()
            if problem is not None:
                return ComponentHealth(name, Status.ERROR, {"error": problem})
            # Reachable; the pool has not reconnected yet.
            error = self._last_error or "no pooled connection yet (reconnecting)"
            return ComponentHealth(
                name, Status.DEGRADED, {**self._applied_detail(), "error": error}
            )
        except (psycopg.Error, OSError, TimeoutError) as exc:
            return ComponentHealth(name, Status.ERROR, {"error": _describe(exc)})
        if self._last_error is not None:  # reachable again, but the last write attempt failed
            return ComponentHealth(
                name, Status.DEGRADED, {**self._applied_detail(), "error": self._last_error}
            )
        return ComponentHealth(name, Status.OK, self._applied_detail())

    async def _connect_problem(self) -> str | None:
        """Why a new connection fails (the pool only says it had none to give), or None."""
        try:
            conn = await asyncio.wait_for(
                psycopg.AsyncConnection.connect(
                    self._settings.conninfo(), connect_timeout=2, autocommit=True
                ),
                _HEALTH_TIMEOUT_SECONDS + 1,
            )
        except Exception as exc:
            return f"database unreachable: {_describe(exc)}"
        with contextlib.suppress(Exception):
            await conn.close()
        return None

    def _applied_detail(self, **extra: str) -> dict[str, Any]:
        return {"applied": {p: str(pos) for p, pos in self._applied.items()}, **extra}

    # -- writing ---------------------------------------------------------------------------

    async def flush(self) -> dict[str, Position]:
        """Nothing is buffered: every write is durable on return. The applied position per
        lane, as far as this process wrote or read it."""
        return dict(self._applied)

    async def write(self, batch: SinkBatch) -> WriteResult:
        total = WriteResult()
        if not len(batch):
            return total
        async with self._lock:
            size = max(1, self._settings.batch_size)
            if batch.has_blocks and len(batch) <= size:
                # The columnar path (falls back to the rows inside when it does not apply).
                return await self._write_with_retry(batch, None)
            events = batch.events
            for start in range(0, len(events), size):
                part = events[start : start + size]
                result = await self._write_with_retry(batch, part)
                total.written += result.written
                total.skipped += result.skipped
                total.dead_lettered += result.dead_lettered
        return total

    async def _write_with_retry(
        self, batch: SinkBatch, events: Sequence[SourceEvent] | None
    ) -> WriteResult:
        """`events`: a part of the batch's changes; None: the whole batch, from its blocks
        where the columnar path applies."""
        policy = self._retry
        backoff = policy.initial_wait_seconds
        attempt = 0
        while True:
            if self._stopping.is_set() or self._pool is None:
                raise SinkUnavailableError(self._unavailable_message())
            attempt += 1
            try:
                result = await self._write_once(self._pool, batch, events)
            except Exception as exc:
                if _is_transient(exc):
                    self._last_error = _describe(exc)
                    if self._stopping.is_set():
                        raise SinkUnavailableError(self._unavailable_message()) from exc
                    if not self._retry_forever and attempt >= policy.max_attempts:
                        raise SinkUnavailableError(
                            f"postgres sink {self._sink_id}: gave up after {attempt} attempts"
                            f" (retry.max_attempts): {self._last_error}"
                        ) from exc
                    self.retries += 1
                    delay = backoff * random.uniform(0.75, 1.25) if policy.jitter else backoff
                    log.warning(
                        "postgres_sink.write_retry",
                        sink_id=self._sink_id,
                        partition=batch.partition,
                        batch_id=batch.batch_id,
                        attempt=attempt,
                        error=self._last_error,
                        retry_in=round(delay, 2),
                    )
                    await self._sleep_or_stop(delay)
                    backoff = min(backoff * policy.multiplier, policy.max_wait_seconds)
                    continue
                if isinstance(exc, psycopg.Error):
                    # Not about one event (offsets or dead-letter table, privileges...).
                    self._last_error = _describe(exc)
                    log.error(
                        "postgres_sink.write_failed",
                        sink_id=self._sink_id,
                        partition=batch.partition,
                        batch_id=batch.batch_id,
                        error=self._last_error,
                    )
                    raise PermanentError(
                        f"postgres sink {self._sink_id}: {self._last_error}"
                    ) from exc
                raise
            self._last_error = None
            return result

    def _unavailable_message(self) -> str:
        reason = f": {self._last_error}" if self._last_error else ""
        return f"postgres sink {self._sink_id} is stopping{reason}"

    async def _sleep_or_stop(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):  # not wait_for: it can swallow a cancel
                await self._stopping.wait()

    async def _write_once(
        self,
        pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]],
        batch: SinkBatch,
        events: Sequence[SourceEvent] | None,
    ) -> WriteResult:
        async with pool.connection() as conn:
            await self._meta(conn)
            if events is None:
                blocks = batch.blocks
                block_plans = await self._block_plans(conn, batch, blocks)
                if block_plans is not None:
                    try:
                        result = await self._apply_blocks(conn, batch, blocks, block_plans)
                        self._used_ok[conn] = time.monotonic()
                        return result
                    except Exception as exc:
                        if not _is_data_error(exc):
                            raise
                        return await self._isolate_after_rejection(conn, batch, exc)
                events = batch.events
            newest = _newest_schemas(events, await self._applied_hint(conn, batch.partition))
            schemas = _distinct_schemas(events)
            plans = await self._prepare(conn, schemas, newest)
            invalid = self._invalid
            if all(invalid(ev, plans[id(ev.table)]) is None for ev in events):
                try:
                    result = await self._apply_batch(conn, batch, events, plans)
                    self._used_ok[conn] = time.monotonic()
                    return result
                except Exception as exc:
                    if not _is_data_error(exc):
                        raise
                    return await self._isolate_after_rejection(conn, batch, exc, events)
            return await self._apply_isolating(conn, batch, events, plans)

    async def _isolate_after_rejection(
        self,
        conn: psycopg.AsyncConnection[Any],
        batch: SinkBatch,
        exc: BaseException,
        events: Sequence[SourceEvent] | None = None,
    ) -> WriteResult:
        """The fast path's transaction failed on the data: apply again in parts."""
        if events is None:
            events = batch.events
        log.warning(
            "postgres_sink.batch_rejected",
            sink_id=self._sink_id,
            partition=batch.partition,
            batch_id=batch.batch_id,
            events=len(events),
            error=_describe(exc),
            action="applying in parts; events that fail go to the dead letters",
        )
        # The target may have changed under us (dropped, altered): look again.
        self._targets.clear()
        self._plans.clear()
        newest = _newest_schemas(events, await self._applied_hint(conn, batch.partition))
        plans = await self._prepare(conn, _distinct_schemas(events), newest)
        return await self._apply_isolating(conn, batch, events, plans)

    # -- the columnar path -----------------------------------------------------------------

    async def _block_plans(
        self,
        conn: psycopg.AsyncConnection[Any],
        batch: SinkBatch,
        blocks: Sequence[ChangeBlock],
    ) -> _Plans | None:
        """Plans for writing `blocks` column-wise, or None when a block needs the row path
        (append mode, a table without a usable plan, truncates, unchanged values, key
        changes, changes that cannot be applied)."""
        hint = await self._applied_hint(conn, batch.partition)
        newest: dict[str, int] = {}
        for block in blocks:
            if len(after_position(block, hint)):
                newest[block.schema.qualified_name] = id(block.schema)
        schemas = list({id(b.schema): b.schema for b in blocks}.values())
        plans = await self._prepare(conn, schemas, frozenset(newest.values()))
        for block in blocks:
            plan = plans[id(block.schema)]
            if plan.error is not None or plan.append or not simple_block(block, plan.key_idx):
                return None
        return plans

    async def _apply_blocks(
        self,
        conn: psycopg.AsyncConnection[Any],
        batch: SinkBatch,
        blocks: Sequence[ChangeBlock],
        plans: _Plans,
    ) -> WriteResult:
        """`_apply_batch` for blocks: per block, the last change per key is computed on whole
        columns (domain.collapse) and COPYed as one buffer built from whole columns."""
        written = 0

        async def apply(applied: Position | None) -> Position | None:
            nonlocal written
            tx = _TxState()
            last: Position | None = None
            for block in blocks:
                block = after_position(block, applied)
                if not len(block):
                    continue
                written += len(block)
                plan = plans[id(block.schema)]
                rows = collapse_block(block, plan.key_idx, checked=True)
                assert rows is not None
                await self._flush_columns(conn, plan, rows, tx)
                top = last_position(block)
                if top is not None and (last is None or top > last):
                    last = top
            assert last is not None or not written
            return last

        await self._positioned_transaction(conn, batch.partition, apply)
        self.columnar_batches += 1
        return WriteResult(written=written, skipped=len(batch) - written)

    async def _flush_columns(
        self, conn: psycopg.AsyncConnection[Any], plan: _Plan, rows: pa.RecordBatch, tx: _TxState
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

    async def _apply_batch(
        self,
        conn: psycopg.AsyncConnection[Any],
        batch: SinkBatch,
        events: Sequence[SourceEvent],
        plans: _Plans,
    ) -> WriteResult:
        """The fast path: the whole batch in one `_positioned_transaction`, so a batch costs
        few round trips besides its COPY and merge statements."""
        todo: list[SourceEvent] = []

        async def apply(applied: Position | None) -> Position | None:
            todo.extend(_after(events, applied))
            if not todo:
                return None
            await self._apply(conn, todo, plans, batch.partition, _TxState())
            return max(ev.position for ev in todo)

        await self._positioned_transaction(conn, batch.partition, apply)
        return WriteResult(written=len(todo), skipped=len(events) - len(todo))

    async def _positioned_transaction(
        self,
        conn: psycopg.AsyncConnection[Any],
        partition: str,
        apply: Callable[[Position | None], Awaitable[Position | None]],
    ) -> None:
        """One transaction around the offsets row of `partition`: BEGIN goes with the row's
        lock and the applied position is read; `apply(applied)` writes what is newer and
        returns the last position it wrote (None: nothing); that position is saved with the
        COMMIT (simple-query statements sent together, few round trips). Any error rolls
        the whole transaction back."""
        try:
            cur = await conn.execute(self._begin_lock_sql(partition), prepare=False)
            cur.nextset()  # the first result is BEGIN's
            applied = _position(await cur.fetchone())
            last = await apply(applied)
            if last is not None:
                await conn.execute(self._save_commit_sql(partition, last), prepare=False)
                applied = last
            else:
                await conn.execute("COMMIT", prepare=False)
        except BaseException:
            await _rollback(conn)
            raise
        self._remember(partition, applied)

    async def _apply_isolating(
        self,
        conn: psycopg.AsyncConnection[Any],
        batch: SinkBatch,
        events: Sequence[SourceEvent],
        plans: _Plans,
    ) -> WriteResult:
        """The slow path: apply in ever smaller parts inside savepoints; what fails on its
        own is dead-lettered in the same transaction."""
        failed: list[FailedEvent] = []
        async with conn.transaction():
            applied = await self._lock_position(conn, batch.partition)
            todo = _after(events, applied)
            good: list[SourceEvent] = []
            for ev in todo:
                problem = self._invalid(ev, plans[id(ev.table)])
                if problem is None:
                    good.append(ev)
                else:
                    failed.append(FailedEvent(ev, problem))
            await self._apply_parts(conn, good, plans, batch.partition, _TxState(), failed)
            failed.sort(key=lambda f: f.event.position)
            await insert_dead_letters(
                conn,
                self._schema,
                pipeline_id=self._pipeline_id,
                sink_id=self._sink_id,
                partition=batch.partition,
                failed=failed,
            )
            if todo:
                last = max(ev.position for ev in todo)
                await self._save_position(conn, batch.partition, last)
                applied = last
        self._remember(batch.partition, applied)
        if failed:
            log.error(
                "postgres_sink.dead_lettered",
                sink_id=self._sink_id,
                partition=batch.partition,
                batch_id=batch.batch_id,
                count=len(failed),
                first_error=failed[0].error,
                table=f"{self._schema}.{DEAD_LETTER_TABLE}",
            )
        return WriteResult(
            written=len(todo) - len(failed),
            skipped=len(events) - len(todo),
            dead_lettered=len(failed),
        )

    async def _apply_parts(
        self,
        conn: psycopg.AsyncConnection[Any],
        events: list[SourceEvent],
        plans: _Plans,
        partition: str,
        tx: _TxState,
        failed: list[FailedEvent],
    ) -> None:
        if not events:
            return
        try:
            async with conn.transaction():  # a savepoint
                await self._apply(conn, events, plans, partition, tx)
            return
        except Exception as exc:
            if not _is_data_error(exc):
                raise
            if len(events) == 1:
                failed.append(FailedEvent(events[0], _describe(exc)))
                return
        middle = len(events) // 2
        await self._apply_parts(conn, events[:middle], plans, partition, tx, failed)
        await self._apply_parts(conn, events[middle:], plans, partition, tx, failed)

    def _remember(self, partition: str, applied: Position | None) -> None:
        if applied is not None:
            self._applied[partition] = applied

    # -- positions -------------------------------------------------------------------------

    async def _lock_position(
        self, conn: psycopg.AsyncConnection[Any], partition: str
    ) -> Position | None:
        """Create-or-lock this partition's offsets row and return its applied position."""
        cur = await conn.execute(self._lock_sql, (self._pipeline_id, self._sink_id, partition))
        return _position(await cur.fetchone())

    @property
    def _lock_sql(self) -> sql.Composed:
        return self._lock_statement(sql.Placeholder(), sql.Placeholder(), sql.Placeholder())

    def _lock_statement(self, *values: sql.Composable) -> sql.Composed:
        return sql.SQL(
            "INSERT INTO {} AS o (pipeline_id, sink_id, partition, updated_at)"
            " VALUES ({}, {}, {}, now())"
            " ON CONFLICT (pipeline_id, sink_id, partition)"
            " DO UPDATE SET updated_at = o.updated_at"
            " RETURNING major, minor"
        ).format(self._offsets, *values)

    def _begin_lock_sql(self, partition: str) -> sql.Composed:
        """BEGIN, then the lock statement with its values inlined (one simple query)."""
        return sql.SQL("BEGIN; {}").format(
            self._lock_statement(
                sql.Literal(self._pipeline_id), sql.Literal(self._sink_id), sql.Literal(partition)
            )
        )

    def _save_commit_sql(self, partition: str, position: Position) -> sql.Composed:
        """`_save_position`'s UPDATE with its values inlined, then COMMIT."""
        return sql.SQL(
            "UPDATE {} SET major = {}, minor = {}, updated_at = now()"
            " WHERE pipeline_id = {} AND sink_id = {} AND partition = {}; COMMIT"
        ).format(
            self._offsets,
            sql.Literal(position.major),
            sql.Literal(position.minor),
            sql.Literal(self._pipeline_id),
            sql.Literal(self._sink_id),
            sql.Literal(partition),
        )

    async def _save_position(
        self, conn: psycopg.AsyncConnection[Any], partition: str, position: Position
    ) -> None:
        await conn.execute(
            sql.SQL(
                "UPDATE {} SET major = %s, minor = %s, updated_at = now()"
                " WHERE pipeline_id = %s AND sink_id = %s AND partition = %s"
            ).format(self._offsets),
            (position.major, position.minor, self._pipeline_id, self._sink_id, partition),
        )

    # -- applying changes ------------------------------------------------------------------

    def _invalid(self, ev: SourceEvent, plan: _Plan) -> str | None:
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

    async def _apply(
        self,
        conn: psycopg.AsyncConnection[Any],
        events: Sequence[SourceEvent],
        plans: _Plans,
        partition: str,
        tx: _TxState,
    ) -> None:
        """Apply `events` in order (per table; tables are independent of each other)."""
        segments: dict[str, _Segment] = {}
        appends: dict[int, tuple[_Plan, list[SourceEvent]]] = {}
        last_schema: TableSchema | None = None
        plan: _Plan | None = None
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
                    await self._flush(conn, segment, tx)
                assert plan.truncate_target is not None
                await conn.execute(plan.truncate_target, prepare=False)
                continue
            if segment is None or segment.plan is not plan:
                if segment is not None:
                    await self._flush(conn, segment, tx)
                segment = segments[plan.relname] = _Segment(plan)
            segment.add(ev)
        for segment in segments.values():
            await self._flush(conn, segment, tx)
        for append_plan, append_events in appends.values():
            await self._append(conn, append_plan, append_events, partition)

    async def _flush(
        self, conn: psycopg.AsyncConnection[Any], segment: _Segment, tx: _TxState
    ) -> None:
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

    async def _append(
        self,
        conn: psycopg.AsyncConnection[Any],
        plan: _Plan,
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
                    unchanged = _array_literal(
                        names[i] for i, v in enumerate(row) if v is UNCHANGED
                    )
                    row = tuple([None if v is UNCHANGED else v for v in row])
                before = None
                if op is Operation.UPDATE and ev.before is not None:
                    before = _before_json(names, ev.before)
                await copy.write_row(
                    (
                        op.value,
                        partition,
                        ev.position.major,
                        ev.position.minor,
                        self._commit_time(ev.commit_time_us),
                        unchanged,
                        before,
                        *row,
                    )
                )

    def _commit_time(self, us: int) -> str | None:
        cached_us, cached = self._commit_time_cache
        if us == cached_us and cached is not None:
            return cached
        text = (_EPOCH + timedelta(microseconds=us)).isoformat() if us else None
        self._commit_time_cache = (us, text)
        return text

    # -- preparing targets -----------------------------------------------------------------

    async def _meta(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if not self._meta_ready:
            await self._ensure_meta(conn)
            self._meta_ready = True

    async def _applied_hint(
        self, conn: psycopg.AsyncConnection[Any], partition: str
    ) -> Position | None:
        """The applied position as last seen (read once per partition, without a lock): only
        used to leave events that are certainly replays out of column type changes."""
        known = self._applied.get(partition)
        if known is not None:
            return known
        cur = await conn.execute(
            sql.SQL(
                "SELECT major, minor FROM {} WHERE pipeline_id = %s AND sink_id = %s"
                " AND partition = %s"
            ).format(self._offsets),
            (self._pipeline_id, self._sink_id, partition),
        )
        row = await cur.fetchone()
        if row is None or row[0] is None:
            return None
        position = Position(int(row[0]), int(row[1] or 0))
        self._applied[partition] = position
        return position

    async def _prepare(
        self,
        conn: psycopg.AsyncConnection[Any],
        schemas: Sequence[TableSchema],
        newest: frozenset[int] = frozenset(),
    ) -> _Plans:
        """Make sure the bookkeeping tables, the target tables and this connection's staging
        tables exist; return a plan per schema. DDL commits on its own (before the data).

        `newest` holds the id() of each table's newest schema among the events to apply:
        only those may change column types. They are prepared first, so the plans of older
        schemas of the same table are built against the changed columns."""
        await self._meta(conn)
        plans: _Plans = {}
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
                await conn.execute(
                    sql.SQL(
                        "CREATE TABLE IF NOT EXISTS {} ("
                        " pipeline_id text NOT NULL,"
                        " sink_id text NOT NULL,"
                        " partition text NOT NULL,"
                        " major numeric(20,0),"
                        " minor bigint,"
                        " updated_at timestamptz NOT NULL DEFAULT now(),"
                        " PRIMARY KEY (pipeline_id, sink_id, partition))"
                    ).format(self._offsets)
                )
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
    ) -> _Plan:
        """The plan for `schema`, creating or extending the target table first; with `retype`
        also changing the target's column types to the schema's."""
        key_columns = schema.key_columns
        append = self._settings.write_mode == "append" or not key_columns
        relname = self._settings.target_table(schema.schema, schema.table, change_log=append)
        wanted = [(c.name, c.type_name) for c in schema.columns]
        if append:
            wanted = [*_APPEND_META, *wanted]
        plan = _Plan(
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
                if not _is_data_error(exc):
                    raise
                plan.error = f"cannot prepare {self._schema}.{relname}: {_describe(exc)}"
                log.error("postgres_sink.target_table_failed", table=relname, error=plan.error)
                return plan
            previous = self._targets.get(relname)
            if previous is not None and previous.types != target.types:
                # Plans of other schemas of this table cast to the old column types.
                for stale in [k for k, p in self._plans.items() if p.relname == relname]:
                    del self._plans[stale]
            self._targets[relname] = target
        if append:
            self._plan_append(plan)
            return plan
        if target.key != frozenset(key_columns):
            have = ", ".join(sorted(target.key)) or "none"
            plan.error = (
                f"{self._schema}.{relname} has primary key ({have}) but the source table "
                f"{schema.qualified_name} has key ({', '.join(key_columns)}); "
                "rows cannot be upserted"
            )
            return plan
        self._plan_upsert(plan, target)
        return plan

    async def _ensure_table(
        self,
        conn: psycopg.AsyncConnection[Any],
        relname: str,
        wanted: Sequence[tuple[str, str]],
        key: Sequence[str],
        source: Sequence[Column] = (),
        retype: bool = False,
    ) -> _Target:
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
        self, conn: psycopg.AsyncConnection[Any], target: _Target, columns: Sequence[Column]
    ) -> list[tuple[str, str, _SinkType, bool]]:
        """What to do for the source `columns` whose type differs from the one recorded for
        them: (column, source type, its type here, whether the column must be altered). A
        column without a record is adopted (recorded, not altered) when its type is the
        source's; otherwise an operator chose it and it is left alone. Changes PostgreSQL
        refused earlier are left out."""
        out: list[tuple[str, str, _SinkType, bool]] = []
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
        self, conn: psycopg.AsyncConnection[Any], target: _Target, name: str, want: _SinkType
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
                if not _is_data_error(exc):
                    raise
                error = _describe(exc)
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

    async def _sink_type(self, conn: psycopg.AsyncConnection[Any], type_name: str) -> _SinkType:
        """How `type_name` is stored here: itself if this database knows it (it then parses as
        exactly one type name, so it is safe to splice into DDL), else text: the value is
        kept, in its text form. Cached per name."""
        known = self._types.get(type_name)
        if known is not None:
            return known
        found = _TEXT_TYPE
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
                        found = _SinkType(type_name, oid, typmod, str(row[1]))
            except Exception as exc:
                if not _is_data_error(exc):
                    raise
        self._types[type_name] = found
        return found

    async def _read_target(
        self, conn: psycopg.AsyncConnection[Any], relname: str
    ) -> _Target | None:
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
        return _Target(
            relname=relname,
            casts={r[0]: r[1] for r in rows},
            key=frozenset(r[0] for r in rows if r[2]),
            types={r[0]: (int(r[3]), int(r[4])) for r in rows},
            declared={r[0]: r[5] for r in rows},
            followed=followed,
        )

    # -- statements ------------------------------------------------------------------------

    def _plan_upsert(self, plan: _Plan, target: _Target) -> None:
        schema = plan.schema
        n = plan.ncols
        key_idx = tuple(i for i, c in enumerate(schema.columns) if c.is_key)
        plan.key_idx = key_idx
        plan.stage = f"_cdc_stage_{n}_{len(key_idx)}"
        stage = sql.Identifier("pg_temp", plan.stage)
        c = [sql.Identifier(f"c{i + 1}") for i in range(n)]
        o = [sql.Identifier(f"o{j + 1}") for j in range(len(key_idx))]
        names = [sql.Identifier(col.name) for col in schema.columns]
        casts = [sql.SQL(target.casts[col.name]) for col in schema.columns]
        comma = sql.SQL(", ")

        stage_columns: list[sql.Composable] = [sql.SQL("_seq bigint, _op text, _unchanged int[]")]
        stage_columns += [sql.SQL("{} text").format(x) for x in (*c, *o)]
        plan.create_stage = sql.SQL(
            "CREATE TEMP TABLE IF NOT EXISTS {} ({}) ON COMMIT DELETE ROWS"
        ).format(sql.Identifier(plan.stage), comma.join(stage_columns))
        plan.truncate_stage = sql.SQL("TRUNCATE {}").format(stage)
        plan.copy_stage = sql.SQL("COPY {} (_seq, _op, _unchanged, {}) FROM STDIN").format(
            stage, comma.join([*c, *o])
        )
        plan.truncate_target = sql.SQL("TRUNCATE {}").format(plan.target)

        # Casting to the base type (no typmod) leaves the typmod to the assignment into the
        # column: a too long varchar fails instead of being cut, as an explicit cast would.
        plan.delete_sql = sql.SQL("DELETE FROM {} t USING {} s WHERE s._op = 'd' AND {}").format(
            plan.target,
            stage,
            sql.SQL(" AND ").join(
                sql.SQL("t.{} = s.{}::{}").format(names[i], c[i], casts[i]) for i in key_idx
            ),
        )
        key_exprs = comma.join(sql.SQL("{}::{}").format(c[i], casts[i]) for i in key_idx)
        non_key = [i for i in range(n) if i not in key_idx]
        on_conflict: sql.Composable
        if non_key:
            on_conflict = sql.SQL("DO UPDATE SET {}").format(
                comma.join(sql.SQL("{} = EXCLUDED.{}").format(names[i], names[i]) for i in non_key)
            )
        else:
            on_conflict = sql.SQL("DO NOTHING")
        # Rows collapsed column-wise have one row per key already: no DISTINCT ON (a sort).
        plan.insert_distinct_sql = sql.SQL(
            "INSERT INTO {target} ({columns}) SELECT {values} FROM {stage} s WHERE _op = 'u'"
            " ON CONFLICT ({key_names}) {on_conflict}"
        ).format(
            target=plan.target,
            columns=comma.join(names),
            values=comma.join(sql.SQL("s.{}::{}").format(c[i], casts[i]) for i in range(n)),
            stage=stage,
            key_names=comma.join(names[i] for i in key_idx),
            on_conflict=on_conflict,
        )
        plan.insert_sql = sql.SQL(
            "INSERT INTO {target} ({columns}) SELECT {values} FROM"
            " (SELECT DISTINCT ON ({keys}) * FROM {stage} WHERE _op = 'u'"
            " ORDER BY {keys}, _seq DESC) s"
            " ON CONFLICT ({key_names}) {on_conflict}"
        ).format(
            target=plan.target,
            columns=comma.join(names),
            values=comma.join(sql.SQL("s.{}::{}").format(c[i], casts[i]) for i in range(n)),
            keys=key_exprs,
            stage=stage,
            key_names=comma.join(names[i] for i in key_idx),
            on_conflict=on_conflict,
        )
        plan.fill_template = tuple(
            sql.SQL(
                "{c} = CASE WHEN {pos} = ANY(s._unchanged) THEN o.{col}::text ELSE s.{c} END"
            ).format(c=c[i], pos=sql.Literal(i + 1), col=names[i])
            for i in range(n)
        )
        plan.fill_where = sql.SQL("s._op = 'u' AND s._unchanged IS NOT NULL AND {}").format(
            sql.SQL(" AND ").join(
                sql.SQL("o.{} = coalesce(s.{}, s.{})::{}").format(names[i], o[j], c[i], casts[i])
                for j, i in enumerate(key_idx)
            )
        )

    def _plan_append(self, plan: _Plan) -> None:
        columns = [sql.Identifier(name) for name, _ in _APPEND_META]
        columns += [sql.Identifier(col.name) for col in plan.schema.columns]
        plan.copy_append = sql.SQL("COPY {} ({}) FROM STDIN").format(
            plan.target, sql.SQL(", ").join(columns)
        )


def _position(row: Sequence[Any] | None) -> Position | None:
    """The applied position of an offsets row (major, minor); None when nothing is applied."""
    if row is None or row[0] is None:
        return None
    return Position(int(row[0]), int(row[1] or 0))


async def _rollback(conn: psycopg.AsyncConnection[Any]) -> None:
    """End a transaction the fast path left open (after an error). A connection still busy
    with a query (cancelled mid-way) is left to the pool, which discards it."""
    status = conn.info.transaction_status
    if status in (psycopg.pq.TransactionStatus.INTRANS, psycopg.pq.TransactionStatus.INERROR):
        with contextlib.suppress(Exception):
            await conn.execute("ROLLBACK", prepare=False)


def _distinct_schemas(events: Sequence[SourceEvent]) -> list[TableSchema]:
    """The distinct TableSchema objects (by identity: no hashing per event)."""
    seen: dict[int, TableSchema] = {}
    last: TableSchema | None = None
    for ev in events:
        table = ev.table
        if table is not last:
            last = table
            if id(table) not in seen:
                seen[id(table)] = table
    return list(seen.values())


def _newest_schemas(events: Sequence[SourceEvent], applied: Position | None) -> frozenset[int]:
    """id() of each table's last TableSchema among the events after `applied`: the shape a
    target may be changed to. Events at or below `applied` are replays of older shapes."""
    newest: dict[str, int] = {}
    last: TableSchema | None = None
    for ev in reversed(events):
        if applied is not None and ev.position <= applied:
            break
        table = ev.table
        if table is not last:
            last = table
            newest.setdefault(table.qualified_name, id(table))
    return frozenset(newest.values())


def _after(events: Sequence[SourceEvent], applied: Position | None) -> list[SourceEvent]:
    if applied is None:
        return list(events)
    return [ev for ev in events if ev.position > applied]
