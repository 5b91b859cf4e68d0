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

Blocks in the ``arrow`` encoding (typed columns, from a Kafka source decoding Avro) are
turned into PostgreSQL text once on entry (`domain.blocks.to_postgres_text`, whole columns)
and from there take the same paths as text blocks: COPY, isolation, dead letters, replays.

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

The rooms of this sink: this module (lifecycle, health, retries, the transaction of a
batch and the isolation of rejected events), ``tables.py`` (target tables and schema
evolution), ``plans.py`` (the statements per table shape), ``apply.py`` (changes into the
staging table or change log; collapse-by-key is ``domain/collapse.py``), ``offsets.py``
(the applied position per lane), ``dead_letter.py``, ``copy_text.py`` (COPY text from
whole columns), ``errors.py`` (retry or dead-letter).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import weakref
from collections.abc import Awaitable, Sequence
from typing import Any, Final

import psycopg
import structlog
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from adapters.config.pipeline import PostgresSinkConfig
from adapters.config.platform import RetryConfig
from adapters.postgres.sink.apply import (
    TxState,
    apply_events,
    flush_columns,
    invalid,
)
from adapters.postgres.sink.dead_letter import (
    DEAD_LETTER_TABLE,
    FailedEvent,
    insert_dead_letters,
)
from adapters.postgres.sink.errors import describe, is_data_error, is_transient
from adapters.postgres.sink.offsets import OFFSETS_TABLE, Offsets
from adapters.postgres.sink.plans import Plans
from adapters.postgres.sink.tables import COLUMNS_TABLE, TargetTables
from domain.blocks import (
    ENCODING_POSTGRES_TEXT,
    ChangeBlock,
    after_positions,
    last_positions,
    to_postgres_text,
)
from domain.collapse import collapse_block, simple_block
from domain.errors import PermanentError, SinkUnavailableError
from domain.events import Position, SourceEvent, TableSchema
from domain.health import ComponentHealth, Status
from domain.ports import Guarantee, SinkBatch, WriteResult

__all__ = ["COLUMNS_TABLE", "OFFSETS_TABLE", "PostgresSinkWriter"]

log = structlog.get_logger(__name__)

_HEALTH_TIMEOUT_SECONDS: Final = 2.0
_CHECK_IDLE_SECONDS: Final = 1.0  # a connection idle longer is checked before a write


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
        self._offsets = Offsets(self._schema, pipeline_id, sink_id)
        self._tables = TargetTables(settings)
        # When each pooled connection last completed a write (see _check_connection).
        self._used_ok: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], float] = (
            weakref.WeakKeyDictionary()
        )

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
            return ComponentHealth(name, Status.ERROR, {"error": describe(exc)})
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
            return f"database unreachable: {describe(exc)}"
        with contextlib.suppress(Exception):
            await conn.close()
        return None

    def _applied_detail(self, **extra: str) -> dict[str, Any]:
        return {"applied": {p: str(pos) for p, pos in self._offsets.applied.items()}, **extra}

    # -- writing ---------------------------------------------------------------------------

    async def flush(self) -> dict[str, Position]:
        """Nothing is buffered: every write is durable on return. The applied position per
        lane, as far as this process wrote or read it."""
        return dict(self._offsets.applied)

    async def write(self, batch: SinkBatch) -> WriteResult:
        """Durable on return. A batch of several lanes goes in one transaction with the
        position of each lane when the columnar path applies; otherwise lane by lane, each
        lane's changes with its position in a transaction of their own (positions are
        ordered within a lane only): a crash in between leaves the written lanes skipped on
        the replay."""
        total = WriteResult()
        if not len(batch):
            return total
        batch = _as_text(batch)
        async with self._lock:
            size = max(1, self._settings.batch_size)
            if len(batch.lanes) > 1 and batch.has_blocks and len(batch) <= size:
                together = await self._write_with_retry(batch, None)
                if together is not None:
                    return together
            for part in batch.by_lane():
                result = await self._write_lane(part)
                total.written += result.written
                total.skipped += result.skipped
                total.dead_lettered += result.dead_lettered
        return total

    async def _write_lane(self, batch: SinkBatch) -> WriteResult:
        size = max(1, self._settings.batch_size)
        if batch.has_blocks and len(batch) <= size:
            # The columnar path (falls back to the rows inside when it does not apply).
            result = await self._write_with_retry(batch, None)
            assert result is not None  # one lane: the row path takes over inside
            return result
        total = WriteResult()
        events = batch.events
        for start in range(0, len(events), size):
            part = events[start : start + size]
            result = await self._write_with_retry(batch, part)
            assert result is not None
            total.written += result.written
            total.skipped += result.skipped
            total.dead_lettered += result.dead_lettered
        return total

    async def _write_with_retry(
        self, batch: SinkBatch, events: Sequence[SourceEvent] | None
    ) -> WriteResult | None:
        """`events`: a part of the batch's changes; None: the whole batch, from its blocks
        where the columnar path applies. None: a batch of several lanes the columnar path
        cannot write at once (nothing written); the caller writes it lane by lane."""
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
                if is_transient(exc):
                    self._last_error = describe(exc)
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
                    self._last_error = describe(exc)
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
    ) -> WriteResult | None:
        several = len(batch.lanes) > 1
        async with pool.connection() as conn:
            await self._tables.meta(conn)
            if events is None:
                blocks = batch.blocks
                block_plans = await self._block_plans(conn, batch, blocks)
                if block_plans is not None:
                    # Several lanes: rolled back; each lane isolates its own events.
                    return await self._apply_or_isolate(
                        conn,
                        batch,
                        self._apply_blocks(conn, batch, blocks, block_plans),
                        isolate=not several,
                    )
                if several:
                    return None
                events = batch.events
            plans = await self._row_plans(conn, batch, events)
            if all(invalid(ev, plans[id(ev.table)]) is None for ev in events):
                return await self._apply_or_isolate(
                    conn, batch, self._apply_batch(conn, batch, events, plans), events=events
                )
            return await self._apply_isolating(conn, batch, events, plans)

    async def _apply_or_isolate(
        self,
        conn: psycopg.AsyncConnection[Any],
        batch: SinkBatch,
        apply: Awaitable[WriteResult],
        *,
        isolate: bool = True,
        events: Sequence[SourceEvent] | None = None,
    ) -> WriteResult | None:
        """`apply`'s result (the connection marked sound). When the database refuses the data:
        the batch applied again in parts, or None when the caller isolates (`isolate`
        false)."""
        try:
            result = await apply
        except Exception as exc:
            if not is_data_error(exc):
                raise
            if not isolate:
                return None
            return await self._isolate_after_rejection(conn, batch, exc, events)
        self._used_ok[conn] = time.monotonic()
        return result

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
            error=describe(exc),
            action="applying in parts; events that fail go to the dead letters",
        )
        # The target may have changed under us (dropped, altered): look again.
        self._tables.forget()
        plans = await self._row_plans(conn, batch, events)
        return await self._apply_isolating(conn, batch, events, plans)

    async def _row_plans(
        self,
        conn: psycopg.AsyncConnection[Any],
        batch: SinkBatch,
        events: Sequence[SourceEvent],
    ) -> Plans:
        newest = _newest_schemas(events, await self._offsets.hint(conn, batch.partition))
        return await self._tables.prepare(conn, _distinct_schemas(events), newest)

    # -- the columnar path -----------------------------------------------------------------

    async def _block_plans(
        self,
        conn: psycopg.AsyncConnection[Any],
        batch: SinkBatch,
        blocks: Sequence[ChangeBlock],
    ) -> Plans | None:
        """Plans for writing `blocks` column-wise, or None when a block needs the row path
        (append mode, a table without a usable plan, truncates, unchanged values, key
        changes, changes that cannot be applied)."""
        hints = [await self._offsets.hint(conn, lane) for lane in batch.lanes]
        newest: dict[str, int] = {}
        for block in blocks:
            if len(after_positions(block, hints)):
                newest[block.schema.qualified_name] = id(block.schema)
        schemas = list({id(b.schema): b.schema for b in blocks}.values())
        plans = await self._tables.prepare(conn, schemas, frozenset(newest.values()))
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
        plans: Plans,
    ) -> WriteResult:
        """`_apply_batch` for blocks, of one lane or several (one transaction, the position
        of each lane): per block, the last change per key is computed on whole columns
        (domain.collapse; keys do not cross lanes) and COPYed as one buffer built from whole
        columns."""
        written = 0
        lanes = batch.lanes

        async def apply(applied: dict[str, Position | None]) -> dict[str, Position]:
            nonlocal written
            tx = TxState()
            thresholds = [applied.get(lane) for lane in lanes]
            last: dict[str, Position] = {}
            for block in blocks:
                block = after_positions(block, thresholds)
                if not len(block):
                    continue
                written += len(block)
                plan = plans[id(block.schema)]
                rows = collapse_block(block, plan.key_idx, checked=True)
                assert rows is not None
                await flush_columns(conn, plan, rows, tx)
                for index, top in last_positions(block).items():
                    lane = lanes[index]
                    if lane not in last or top > last[lane]:
                        last[lane] = top
            return last

        await self._offsets.positioned_transaction(conn, lanes, apply)
        self.columnar_batches += 1
        return WriteResult(written=written, skipped=len(batch) - written)

    async def _apply_batch(
        self,
        conn: psycopg.AsyncConnection[Any],
        batch: SinkBatch,
        events: Sequence[SourceEvent],
        plans: Plans,
    ) -> WriteResult:
        """The fast path: the whole batch in one `_positioned_transaction`, so a batch costs
        few round trips besides its COPY and merge statements."""
        todo: list[SourceEvent] = []

        lane = batch.partition

        async def apply(applied: dict[str, Position | None]) -> dict[str, Position]:
            todo.extend(_after(events, applied.get(lane)))
            if not todo:
                return {}
            await apply_events(conn, todo, plans, lane, TxState())
            return {lane: max(ev.position for ev in todo)}

        await self._offsets.positioned_transaction(conn, [lane], apply)
        return WriteResult(written=len(todo), skipped=len(events) - len(todo))

    async def _apply_isolating(
        self,
        conn: psycopg.AsyncConnection[Any],
        batch: SinkBatch,
        events: Sequence[SourceEvent],
        plans: Plans,
    ) -> WriteResult:
        """The slow path: apply in ever smaller parts inside savepoints; what fails on its
        own is dead-lettered in the same transaction."""
        failed: list[FailedEvent] = []
        async with conn.transaction():
            applied = await self._offsets.lock(conn, batch.partition)
            todo = _after(events, applied)
            good: list[SourceEvent] = []
            for ev in todo:
                problem = invalid(ev, plans[id(ev.table)])
                if problem is None:
                    good.append(ev)
                else:
                    failed.append(FailedEvent(ev, problem))
            await self._apply_parts(conn, good, plans, batch.partition, TxState(), failed)
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
                await self._offsets.save(conn, batch.partition, last)
                applied = last
        self._offsets.remember(batch.partition, applied)
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
        plans: Plans,
        partition: str,
        tx: TxState,
        failed: list[FailedEvent],
    ) -> None:
        if not events:
            return
        try:
            async with conn.transaction():  # a savepoint
                await apply_events(conn, events, plans, partition, tx)
            return
        except Exception as exc:
            if not is_data_error(exc):
                raise
            if len(events) == 1:
                failed.append(FailedEvent(events[0], describe(exc)))
                return
        middle = len(events) // 2
        await self._apply_parts(conn, events[:middle], plans, partition, tx, failed)
        await self._apply_parts(conn, events[middle:], plans, partition, tx, failed)

    # -- positions -------------------------------------------------------------------------

    # -- applying changes ------------------------------------------------------------------

    # -- preparing targets -----------------------------------------------------------------

    # -- statements ------------------------------------------------------------------------


def _as_text(batch: SinkBatch) -> SinkBatch:
    """The batch with its blocks in the postgres_text encoding: typed (arrow) blocks are
    converted once here, whole columns at a time, and then take the same COPY path, row
    path, isolation and dead letters as text blocks."""
    if not batch.has_blocks or all(b.encoding == ENCODING_POSTGRES_TEXT for b in batch.blocks):
        return batch
    return SinkBatch(
        batch.pipeline_id,
        batch.partition,
        batch.batch_id,
        blocks=[to_postgres_text(b) for b in batch.blocks],
        lanes=batch.lanes,
        source_database=batch.source_database,
    )


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
