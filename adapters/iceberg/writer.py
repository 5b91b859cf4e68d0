"""`sink_type: iceberg`: the SinkWriter.

`write()` keeps the fresh changes of each batch per table (replays, by the position per lane
stored in the table's last snapshot or already buffered, are skipped) and answers *accepted*;
once `batch_size` changes are buffered or `flush_interval_seconds` passed, it commits every
table (one snapshot each, with the applied positions per lane in its summary) on the write
executor and answers *durable*. `flush()` commits what is buffered and returns the durable
position per lane. Maintenance (expiry, compaction) runs under the same lock: never
concurrent with the sink's own commits."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import structlog
from pyiceberg.catalog import Catalog

from adapters.config.pipeline import IcebergSinkConfig
from adapters.iceberg import columns as cols
from adapters.iceberg.catalog import load_catalog, shown_uri, table_identifier
from adapters.iceberg.dead_letters import DeadLetterTable
from adapters.iceberg.table_sink import TableSink
from domain.blocks import LANE, OP, POSITION, SEQUENCE, ChangeBlock
from domain.errors import PermanentError, SinkHaltedError, SinkUnavailableError
from domain.events import Position, TableSchema
from domain.health import ComponentHealth, Status
from domain.ports import Guarantee, SinkBatch, WriteResult

log = structlog.get_logger(__name__)


class IcebergSinkWriter:
    guarantee = Guarantee.EXACTLY_ONCE_EFFECT

    def __init__(self, settings: IcebergSinkConfig, pipeline_id: str, sink_id: str) -> None:
        self.settings = settings
        self.pipeline_id = pipeline_id
        self.sink_id = sink_id
        self.catalog: Catalog | None = None
        self.tables: dict[str, TableSink] = {}  # by source table
        self.dead_letters: DeadLetterTable | None = None
        self._executor = ThreadPoolExecutor(
            max_workers=settings.write_executor_threads, thread_name_prefix="iceberg-write"
        )
        self._lock = asyncio.Lock()
        self._buffered = 0
        self._first_buffered: float | None = None
        self._seen: dict[str, Position] = {}  # highest position per lane written or skipped
        self._durable: dict[str, Position] = {}
        self._last_error = ""
        self._maintenance: asyncio.Task[None] | None = None
        self.commits = 0

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _catalog_error(self, exc: Exception) -> str:
        uri = shown_uri(self.settings.catalog_uri)
        detail = str(exc).replace(self.settings.catalog_uri, uri)
        return f"iceberg catalog {uri}: {detail}"

    async def _ensure_catalog(self) -> Catalog:
        """The catalog, loaded on first use: while it is unreachable, writes fail (the
        ingest resends them) and health() says why."""
        if self.catalog is None:
            try:
                catalog = await asyncio.wait_for(self._run(load_catalog, self.settings), 30)
            except Exception as exc:
                self._last_error = self._catalog_error(exc)
                raise SinkUnavailableError(self._last_error) from exc
            self.catalog = catalog
            self.dead_letters = DeadLetterTable(
                catalog, self.settings, self.pipeline_id, self.sink_id
            )
            self._last_error = ""
        return self.catalog

    async def start(self) -> None:
        """Load the catalog (not waiting for it: an unreachable one is retried by the next
        write and reported by health()); start the maintenance schedule."""
        with contextlib.suppress(SinkUnavailableError):
            await self._ensure_catalog()
        if self.settings.maintenance.enabled and self._maintenance is None:
            from adapters.iceberg.maintenance import run_scheduled

            self._maintenance = asyncio.create_task(run_scheduled(self))

    async def stop(self) -> None:
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._maintenance
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def health(self) -> ComponentHealth:
        """The catalog answers (a namespace listing) and the last commit did not fail."""
        name = f"sink:{self.sink_id}"
        try:
            catalog = await self._ensure_catalog()
            await asyncio.wait_for(asyncio.to_thread(catalog.list_namespaces), 10)
        except SinkUnavailableError as exc:
            return ComponentHealth(name, Status.ERROR, {"error": str(exc)})
        except Exception as exc:
            return ComponentHealth(name, Status.ERROR, {"error": self._catalog_error(exc)})
        if self._last_error:
            return ComponentHealth(name, Status.ERROR, {"error": self._last_error})
        return ComponentHealth(
            name,
            Status.OK,
            {
                "tables": len(self.tables),
                "commits": self.commits,
                "durable_positions": {k: f"{p.major}/{p.minor}" for k, p in self._durable.items()},
            },
        )

    # ------------------------------------------------------------------ write
    def _table_sink(self, schema: TableSchema) -> TableSink:
        """The table of `schema`'s source table, created or evolved (blocking)."""
        assert self.catalog is not None
        sink = self.tables.get(schema.qualified_name)
        if sink is None:
            ident = table_identifier(self.settings, schema.schema, schema.table)
            sink = TableSink(self.catalog, ident, self.settings, schema)
            self.tables[schema.qualified_name] = sink
        elif sink.source is not schema and sink.source != schema:
            sink.evolve(schema)
        return sink

    def _accept(self, batch: SinkBatch) -> WriteResult:
        """Buffer the fresh changes of `batch` (blocking: may create or evolve tables)."""
        result = WriteResult(durable=False)
        lanes = batch.lanes
        for block in batch.blocks:
            if not len(block):
                continue
            try:
                sink = self._table_sink(block.schema)
            except cols.UnsafeSchemaChangeError as exc:
                raise SinkHaltedError(str(exc)) from exc
            seen = _max_positions(block, lanes)
            fresh = sink.fresh(block, lanes)
            result.skipped += len(block) - len(fresh)
            fresh, letters = self._split_bad(sink, fresh)
            if letters is not None and len(letters):
                assert self.dead_letters is not None
                self.dead_letters.add(letters, lanes, sink.source.qualified_name)
                result.dead_lettered += len(letters)
            sink.add(fresh, lanes, seen)  # an empty block still advances the positions
            result.written += len(fresh)
            for lane, p in seen.items():
                old = self._seen.get(lane)
                if old is None or (p.major, p.minor) > (old.major, old.minor):
                    self._seen[lane] = p
        return result

    def _split_bad(
        self, sink: TableSink, block: ChangeBlock
    ) -> tuple[ChangeBlock, ChangeBlock | None]:
        """Changes that cannot be written go to the dead letters: a key without a value
        (upsert), a value that does not fit its column type."""
        if not len(block):
            return block, None
        bad: pa.Array | None = None
        if sink.upsert:
            for i, c in enumerate(block.schema.columns):
                if c.is_key:
                    null = pc.and_(
                        pc.is_null(block.column(i)), pc.not_equal(block.records.column(OP), "t")
                    )
                    bad = null if bad is None else pc.or_(bad, null)
        _, wrong = sink.typed(block)
        if wrong is not None:
            bad = wrong if bad is None else pc.or_(bad, wrong)
        if bad is None or not pc.any(bad).as_py():
            return block, None
        rb = block.records
        return (
            ChangeBlock(block.schema, rb.filter(pc.invert(bad)), block.encoding),
            ChangeBlock(block.schema, rb.filter(bad), block.encoding),
        )

    async def write(self, batch: SinkBatch) -> WriteResult:
        await self._ensure_catalog()
        async with self._lock:
            result: WriteResult = await self._run(self._accept, batch)
            self._buffered += result.written + result.dead_lettered
            if self._first_buffered is None:
                self._first_buffered = time.monotonic()
            due = self._buffered >= self.settings.batch_size or (
                time.monotonic() - self._first_buffered >= self.settings.flush_interval_seconds
            )
            if due:
                await self._commit_all()
                result.durable = True
            return result

    async def flush(self) -> Mapping[str, Position]:
        async with self._lock:
            await self._commit_all()
            return dict(self._durable)

    async def _commit_all(self) -> None:
        """Commit every table with buffered changes (dead letters first: a change is never
        acknowledged before its dead letter is durable)."""
        started = time.monotonic()
        seen = dict(self._seen)
        try:
            if self.dead_letters is not None and self.dead_letters.pending:
                await self._run(self.dead_letters.commit)
            pending = [t for t in self.tables.values() if t.buffer.blocks or t.buffer.positions]
            await asyncio.gather(*(self._run(t.commit) for t in pending))
        except PermanentError:
            raise
        except Exception as exc:
            self._last_error = f"commit failed: {exc}"
            log.error("iceberg_sink.commit_failed", error=str(exc))
            raise SinkUnavailableError(f"iceberg commit failed: {exc}") from exc
        self._last_error = ""
        self._durable = seen
        self._buffered = 0
        self._first_buffered = None
        self.commits += 1
        log.debug(
            "iceberg_sink.committed", tables=len(self.tables), seconds=time.monotonic() - started
        )


def _max_positions(block: ChangeBlock, lanes: tuple[str, ...] | list[str]) -> dict[str, Position]:
    rb = block.records
    out: dict[str, Position] = {}
    lane_col = rb.column(LANE)
    for li in pc.unique(lane_col).to_pylist():
        in_lane = pc.equal(lane_col, pa.scalar(li, pa.uint16()))
        major_col = rb.column(POSITION).filter(in_lane)
        major = pc.max(major_col).as_py()
        minor = pc.max(
            rb.column(SEQUENCE).filter(in_lane).filter(pc.equal(major_col, major))
        ).as_py()
        out[lanes[li] if li < len(lanes) else str(li)] = Position(int(major), int(minor))
    return out
