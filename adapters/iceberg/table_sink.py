"""One Iceberg table of the sink: its schema (created, evolved), the changes buffered for it,
and the commit that applies them with the applied positions per lane in the same snapshot.

Blocking code: the writer (adapters/iceberg/writer.py) runs it on its executor threads."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import structlog
from pyiceberg.catalog import Catalog
from pyiceberg.exceptions import CommitFailedException, NoSuchTableError
from pyiceberg.io.pyarrow import _dataframe_to_data_files
from pyiceberg.partitioning import UNPARTITIONED_PARTITION_SPEC, PartitionField, PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.table import Table
from pyiceberg.table.snapshots import Snapshot
from pyiceberg.transforms import parse_transform
from pyiceberg.types import NestedField

from adapters.config.pipeline import IcebergSinkConfig
from adapters.iceberg import columns as cols
from adapters.iceberg.key_index import KeyIndex, Located, as_row_deletes, key_array
from adapters.iceberg.row_delta import commit_row_delta, write_delete_files
from domain.blocks import (
    COMMIT_TIME,
    ENCODING_POSTGRES_TEXT,
    LANE,
    OP,
    POSITION,
    SEQUENCE,
    ChangeBlock,
    build_blocks,
    events_of,
)
from domain.collapse import DELETED, KeyCollapse, last_per_key, simple_block
from domain.errors import PermanentError, SinkUnavailableError
from domain.events import UNCHANGED, Operation, Position, SourceEvent, TableSchema

log = structlog.get_logger(__name__)

POSITION_PREFIX = "cdc.position."
COMMIT_ATTEMPTS = 5


class PartitionSpecError(PermanentError):
    pass


def positions_of(summary: dict[str, str] | None) -> dict[str, Position]:
    """The applied position per lane stored in a snapshot summary."""
    out: dict[str, Position] = {}
    for k, v in (summary or {}).items():
        if k.startswith(POSITION_PREFIX):
            major, _, minor = v.partition("/")
            out[k[len(POSITION_PREFIX) :]] = Position(int(major), int(minor or 0))
    return out


def position_properties(positions: dict[str, Position]) -> dict[str, str]:
    return {f"{POSITION_PREFIX}{lane}": f"{p.major}/{p.minor}" for lane, p in positions.items()}


@dataclass
class Buffered:
    blocks: list[ChangeBlock] = field(default_factory=list)
    positions: dict[str, Position] = field(default_factory=dict)
    changes: int = 0


class TableSink:
    """Changes of one source table into one Iceberg table."""

    def __init__(
        self,
        catalog: Catalog,
        identifier: tuple[str, str],
        settings: IcebergSinkConfig,
        source: TableSchema,
    ) -> None:
        self.catalog = catalog
        self.identifier = identifier
        self.name = ".".join(identifier)
        self.settings = settings
        self.source = source
        keys = source.key_columns
        self.upsert = settings.write_mode == "upsert" and bool(keys)
        self.key_names: tuple[str, ...] = keys if self.upsert else ()
        if settings.write_mode == "upsert" and not keys:
            log.warning(
                "iceberg_sink.keyless_append",
                table=self.name,
                source=source.qualified_name,
                detail="the source table has no primary key: its changes are appended",
            )
        self.table: Table = self._load_or_create(source)
        self.index: KeyIndex | None = None
        self.buffer = Buffered()
        self.applied = self._current_positions()

    # ------------------------------------------------------------------ schema
    def _schema_for(self, source: TableSchema) -> Schema:
        fields = []
        fid = itertools.count(1)
        for c in source.columns:
            required = c.name in self.key_names
            fields.append(
                NestedField(next(fid), c.name, cols.iceberg_type(c.logical), required=required)
            )
        for name, t in cols.META_TYPES.items():
            fields.append(NestedField(next(fid), name, t, required=False))
        if self.settings.soft_delete:
            from pyiceberg.types import BooleanType

            fields.append(NestedField(next(fid), cols.DELETED_COL, BooleanType(), required=False))
        ids = [f.field_id for f in fields if f.name in self.key_names]
        return Schema(*fields, identifier_field_ids=ids)

    def _partition_spec(self, schema: Schema) -> PartitionSpec:
        specs = self.settings.partition_by
        if not specs:
            return UNPARTITIONED_PARTITION_SPEC
        out = []
        for i, text in enumerate(specs):
            transform_text, column = _parse_partition(text)
            try:
                source = schema.find_field(column)
            except ValueError:
                raise PartitionSpecError(
                    f"partition_by[{i}] {text!r}: table {self.name} has no column {column!r}"
                ) from None
            transform = parse_transform(transform_text)
            name = (
                column
                if transform_text == "identity"
                else f"{column}_{transform_text.split('[')[0]}"
            )
            out.append(PartitionField(source.field_id, 1000 + i, transform, name))
        return PartitionSpec(*out)

    def _load_or_create(self, source: TableSchema) -> Table:
        namespace, _ = self.identifier
        try:
            table = self.catalog.load_table(self.identifier)
        except NoSuchTableError:
            self.catalog.create_namespace_if_not_exists(namespace)
            schema = self._schema_for(source)
            table = self.catalog.create_table_if_not_exists(
                self.identifier,
                schema=schema,
                partition_spec=self._partition_spec(schema),
                properties={"format-version": "2", "write.cdc.mode": self.settings.write_mode},
            )
            log.info("iceberg_sink.table_created", table=self.name, upsert=self.upsert)
        self.table = table
        self.evolve(source)
        return self.table

    def evolve(self, source: TableSchema) -> None:
        """Follow the source table's shape (columns added, widened; refuse unsafe changes)."""
        self.source = source
        existing = {f.name: f.field_type for f in self.table.schema().fields}
        plan = cols.plan_evolution(self.name, existing, source.columns)
        if not plan.add and not plan.widen:
            return
        with self.table.update_schema() as update:
            for name, t in plan.add:
                update.add_column(name, t)
            for name, t in plan.widen:
                update.update_column(name, t)
        self.table = self.catalog.load_table(self.identifier)
        log.info(
            "iceberg_sink.schema_evolved",
            table=self.name,
            added=[n for n, _ in plan.add],
            widened=[n for n, _ in plan.widen],
        )

    def _current_positions(self) -> dict[str, Position]:
        snapshot = self.table.current_snapshot()
        return positions_of(_summary(snapshot))

    # ------------------------------------------------------------------ typing
    def typed(self, block: ChangeBlock) -> tuple[pa.Table, pa.Array | None]:
        """The block's rows as the table's columns (cast whole columns) plus `_cdc_*`; and
        a mask of rows with a value that does not fit its column (None: all fit)."""
        schema = self.table.schema()
        rb = block.records
        n = rb.num_rows
        by_name = {c.name: i for i, c in enumerate(block.schema.columns)}
        arrays: list[pa.Array] = []
        fields: list[pa.Field] = []
        bad: pa.Array | None = None
        for f in schema.fields:
            target = cols.arrow_type(f.field_type)
            if f.name == cols.OP_COL:
                arr: pa.Array = rb.column(OP).cast(target)
            elif f.name == cols.COMMIT_TIME_COL:
                arr = rb.column(COMMIT_TIME).cast(target)
            elif f.name == cols.POSITION_COL:
                arr = rb.column(POSITION).cast(pa.int64())
            elif f.name == cols.SEQUENCE_COL:
                arr = rb.column(SEQUENCE).cast(pa.int64())
            elif f.name == cols.DELETED_COL:
                arr = pc.equal(rb.column(OP), "d")
            elif f.name in by_name:
                raw = block.column(by_name[f.name])
                if block.encoding == ENCODING_POSTGRES_TEXT:
                    arr, wrong = cols.cast_text(raw, target)
                else:
                    arr, wrong = cols.cast_typed(raw, target)
                if wrong is not None:
                    bad = wrong if bad is None else pc.or_(bad, wrong)
            else:
                arr = pa.nulls(n, target)
            arrays.append(arr)
            fields.append(pa.field(f.name, target, nullable=not f.required))
        return pa.Table.from_arrays(arrays, schema=pa.schema(fields)), bad

    # ------------------------------------------------------------------ buffering
    def fresh(self, block: ChangeBlock, lanes: Sequence[str]) -> ChangeBlock:
        """The changes of `block` not applied yet (committed or buffered) per lane."""
        rb = block.records
        if not rb.num_rows:
            return block
        keep = None
        lane_col = rb.column(LANE)
        for li in pc.unique(lane_col).to_pylist():
            name = lanes[li] if li < len(lanes) else str(li)
            done = _max(self.applied.get(name), self.buffer.positions.get(name))
            in_lane = pc.equal(lane_col, pa.scalar(li, pa.uint16()))
            if done is None:
                later = in_lane
            else:
                major = rb.column(POSITION)
                later = pc.and_(
                    in_lane,
                    pc.or_(
                        pc.greater(major, pa.scalar(done.major, pa.uint64())),
                        pc.and_(
                            pc.equal(major, pa.scalar(done.major, pa.uint64())),
                            pc.greater(rb.column(SEQUENCE), pa.scalar(done.minor, pa.uint64())),
                        ),
                    ),
                )
            keep = later if keep is None else pc.or_(keep, later)
        assert keep is not None
        if pc.all(keep).as_py():
            return block
        return ChangeBlock(block.schema, rb.filter(keep), block.encoding)

    def add(self, block: ChangeBlock, lanes: Sequence[str], seen: dict[str, Position]) -> None:
        """Buffer `block` (fresh changes only); `seen` is the highest position per lane."""
        self.buffer.blocks.append(block)
        self.buffer.changes += len(block)
        for lane, p in seen.items():
            self.buffer.positions[lane] = _max(self.buffer.positions.get(lane), p) or p

    # ------------------------------------------------------------------ commit
    def commit(self, extra_positions: dict[str, Position] | None = None) -> int:
        """Apply the buffered changes in one snapshot whose summary holds the applied
        positions. Returns the number of rows written (data rows + deleted rows)."""
        if not self.buffer.blocks and not extra_positions:
            return 0
        last_error: Exception | None = None
        for attempt in range(COMMIT_ATTEMPTS):
            try:
                written = self._commit_once(extra_positions or {})
                self.applied = _merge(self.applied, self.buffer.positions, extra_positions or {})
                self.buffer = Buffered()
                return written
            except CommitFailedException as exc:
                last_error = exc
                log.warning("iceberg_sink.commit_conflict", table=self.name, attempt=attempt + 1)
                self.table = self.catalog.load_table(self.identifier)
                self.index = None
                time.sleep(0.05 * (attempt + 1))
        # Still buffered: the write is refused and the ingest resends it later.
        raise SinkUnavailableError(
            f"iceberg table {self.name}: {COMMIT_ATTEMPTS} commits in a row lost to another"
            f" writer's ({last_error})"
        )

    def _commit_once(self, extra_positions: dict[str, Position]) -> int:
        self.table.refresh()
        snapshot = self.table.current_snapshot()
        carried = _summary(snapshot)
        positions = _merge(positions_of(carried), self.buffer.positions, extra_positions)
        properties = {k: v for k, v in carried.items() if k.startswith("cdc.")}
        properties.update(position_properties(positions))
        if self.upsert:
            rows, removed = self._upsert_plan()
        else:
            rows = self._append_rows()
            removed = []
        tx = self.table.transaction()
        data_files = []
        if rows is not None and rows.num_rows:
            data_files = list(
                _dataframe_to_data_files(
                    table_metadata=tx.table_metadata,
                    df=rows,
                    io=self.table.io,
                    write_uuid=uuid.uuid4(),
                )
            )
        delete_files = write_delete_files(self.table, as_row_deletes(removed)) if removed else []
        snapshot_id = commit_row_delta(tx, data_files, delete_files, properties)
        tx.commit_transaction()
        self.table = self.catalog.load_table(self.identifier)
        if self.index is not None:
            # The index now describes our snapshot (not whatever is current by now: a
            # commit of another writer right after ours makes the next commit rebuild it).
            self.index.mark_deleted(removed)
            spec_id = self.table.metadata.default_spec_id
            for f in data_files:
                self.index.add_file(self.table, f.file_path, spec_id, f.partition)
            self.index.snapshot_id = snapshot_id
        return (rows.num_rows if rows is not None else 0) + sum(len(r.positions) for r in removed)

    def _append_rows(self) -> pa.Table | None:
        tables = [self.typed(b)[0] for b in self.buffer.blocks if len(b)]
        if not tables:
            return None
        return pa.concat_tables(tables, promote_options="permissive")

    def _key_index(self) -> KeyIndex:
        current = self.table.current_snapshot()
        sid = current.snapshot_id if current else None
        if self.index is None or self.index.snapshot_id != sid:
            started = time.monotonic()
            self.index = KeyIndex.build(self.table, self.key_names)
            log.info(
                "iceberg_sink.key_index_built",
                table=self.name,
                files=len(self.index.files),
                seconds=round(time.monotonic() - started, 3),
            )
        return self.index

    def _upsert_plan(self) -> tuple[pa.Table | None, list[Located]]:
        """The rows to write and the stored rows to delete for the buffered changes."""
        blocks = [b for b in self.buffer.blocks if len(b)]
        index = self._key_index()
        key_idx = [i for i, c in enumerate(self.source.columns) if c.name in self.key_names]
        truncated = False
        unchanged: dict[int, list[str]] = {}
        simple = all(
            simple_block(b, [i for i, c in enumerate(b.schema.columns) if c.is_key]) for b in blocks
        )
        if simple:
            typed = [self.typed(b)[0] for b in blocks]
            if not typed:
                return None, []
            data = pa.concat_tables(typed, promote_options="permissive")
            last = last_per_key(key_array(data, self.key_names))
            if last is not None:  # keep each key's last change, in change order
                data = data.take(last)
        else:
            data, unchanged, truncated = self._collapse_rows(blocks, key_idx)
        keys = key_array(data, self.key_names)
        removed = index.live_rows() if truncated else index.locate(keys)
        deleted = pc.equal(data.column(cols.OP_COL), "d")
        if unchanged or self.settings.soft_delete:
            data = self._fill_from_stored(data, keys, removed, unchanged, deleted)
        if not self.settings.soft_delete:
            data = data.filter(pc.invert(deleted))
        return data, removed

    def _collapse_rows(
        self, blocks: Sequence[ChangeBlock], key_idx: Sequence[int]
    ) -> tuple[pa.Table, dict[int, list[str]], bool]:
        """The row-level collapse (unchanged TOASTed values, key changes, truncates)."""
        latest = self.source
        names = [c.name for c in latest.columns]
        collapse = KeyCollapse(key_idx)
        last_event: dict[tuple[str | None, ...], SourceEvent] = {}
        truncated = False
        for block in blocks:
            for _, ev in events_of(block):  # arrow blocks: values as PostgreSQL text
                if ev.operation is Operation.TRUNCATE:
                    collapse = KeyCollapse(key_idx)
                    last_event.clear()
                    truncated = True
                    continue
                ev = _reshape(ev, latest, names)
                before_keys = set(collapse.state)
                collapse.add(ev)
                for k in collapse.state.keys() - before_keys:
                    last_event[k] = ev
                row = ev.after if ev.after is not None else ev.before
                assert row is not None
                last_event[tuple(row[i] for i in key_idx)] = ev
        events: list[SourceEvent] = []
        unchanged: dict[int, list[str]] = {}
        for key, (op, row, _origin) in collapse.state.items():
            ev = last_event[key]
            if (op, row, _origin) == DELETED:
                before = tuple(
                    key[key_idx.index(i)] if i in key_idx else None for i in range(len(names))
                )
                events.append(
                    SourceEvent(
                        Operation.DELETE,
                        latest,
                        ev.position,
                        before=before,
                        commit_time_us=ev.commit_time_us,
                    )
                )
                continue
            assert row is not None
            missing = [names[i] for i, v in enumerate(row) if v is UNCHANGED]
            if missing:
                unchanged[len(events)] = missing
                row = tuple(None if v is UNCHANGED else v for v in row)
            events.append(
                SourceEvent(
                    ev.operation, latest, ev.position, after=row, commit_time_us=ev.commit_time_us
                )
            )
        if not events:
            empty = self.typed(
                build_blocks(
                    [
                        SourceEvent(
                            Operation.CREATE, latest, Position(0, 0), after=(None,) * len(names)
                        )
                    ]
                )[0]
            )[0]
            return empty.slice(0, 0), {}, truncated
        typed = self.typed(build_blocks(events)[0])[0]
        return typed, unchanged, truncated

    def _fill_from_stored(
        self,
        data: pa.Table,
        keys: pa.Array,
        removed: Sequence[Located],
        unchanged: dict[int, list[str]],
        deleted: pa.Array,
    ) -> pa.Table:
        """Values the source did not send (unchanged TOAST) and soft-deleted rows' values,
        from the stored rows being replaced."""
        stored = _read_rows(self.table, removed)
        if stored is None or not stored.num_rows:
            return data
        stored_keys = key_array(stored, self.key_names)
        where = pc.index_in(keys, value_set=stored_keys)
        rows_needing: dict[str, list[int]] = {}
        for row, names in unchanged.items():
            for n in names:
                rows_needing.setdefault(n, []).append(row)
        if self.settings.soft_delete:
            for row in pc.indices_nonzero(deleted).to_pylist():
                for f in self.table.schema().fields:
                    if f.name not in self.key_names and not f.name.startswith("_cdc_"):
                        rows_needing.setdefault(f.name, []).append(row)
        for name, rows in rows_needing.items():
            if name not in stored.column_names:
                continue
            mask = pc.is_in(
                pa.array(range(data.num_rows), pa.int64()), value_set=pa.array(rows, pa.int64())
            )
            mask = pc.and_(mask, pc.is_valid(where))
            fill = pc.take(stored.column(name), where)
            i = data.column_names.index(name)
            merged = pc.if_else(mask, fill, data.column(name))
            data = data.set_column(i, data.schema.field(i), merged.cast(data.schema.field(i).type))
        return data


def _read_rows(table: Table, located: Sequence[Located]) -> pa.Table | None:
    import pyarrow.parquet as pq

    parts = []
    schema = table.schema().as_arrow()
    for loc in located:
        with table.io.new_input(loc.file.path).open() as stream:
            data = pq.read_table(stream)
        part = data.take(loc.positions)
        present = [c for c in schema.names if c in part.column_names]
        parts.append(part.select(present))
    if not parts:
        return None
    return pa.concat_tables(parts, promote_options="permissive")


def _reshape(ev: SourceEvent, latest: TableSchema, names: list[str]) -> SourceEvent:
    if ev.table is latest or ev.table.column_names == latest.column_names:
        return ev
    old = ev.table.column_names

    def fit(row: tuple[str | None, ...] | None) -> tuple[str | None, ...] | None:
        if row is None:
            return None
        by = dict(zip(old, row, strict=True))
        return tuple(by.get(n) for n in names)

    return SourceEvent(
        ev.operation,
        latest,
        ev.position,
        fit(ev.before),
        fit(ev.after),
        ev.commit_time_us,
        ev.transaction_id,
    )


def _summary(snapshot: Snapshot | None) -> dict[str, str]:
    if snapshot is None or snapshot.summary is None:
        return {}
    return dict(snapshot.summary.additional_properties)


def _parse_partition(text: str) -> tuple[str, str]:
    """``day(created_at)`` -> ("day", "created_at"); ``bucket(16, id)`` -> ("bucket[16]", "id");
    ``region`` -> ("identity", "region")."""
    text = text.strip()
    if "(" not in text:
        return "identity", text
    name, _, rest = text.partition("(")
    args = [a.strip() for a in rest.rstrip(")").split(",")]
    name = name.strip().lower()
    if name in ("bucket", "truncate"):
        if len(args) != 2:
            raise PartitionSpecError(
                f"partition_by {text!r}: {name}(N, column) takes two arguments"
            )
        return f"{name}[{int(args[0])}]", args[1]
    if name in ("year", "month", "day", "hour", "identity", "void"):
        return name, args[0]
    raise PartitionSpecError(f"partition_by {text!r}: unknown transform {name!r}")


def _max(a: Position | None, b: Position | None) -> Position | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if (a.major, a.minor) >= (b.major, b.minor) else b


def _merge(*maps: dict[str, Position]) -> dict[str, Position]:
    out: dict[str, Position] = {}
    for m in maps:
        for lane, p in m.items():
            out[lane] = _max(out.get(lane), p) or p
    return out
