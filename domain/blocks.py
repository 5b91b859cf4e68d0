"""Change blocks: the bulk, columnar form of the changes of one table in a batch.

A block is an Arrow record batch (pyarrow, used here as a value library: no I/O) with the
change metadata first, then one column per table column (the row image), in table order:

==================  =========================  ===============================================
column              Arrow type                 meaning
==================  =========================  ===============================================
``@index``          uint32                     the change's place in its batch (order across
                                               blocks)
``@op``             string                     Debezium's letter: c, u, d, r, t
``@position``       uint64                     transport position (commit LSN, offset ...)
``@sequence``       uint64                     order among changes sharing ``@position``
``@commit_time``    timestamp[us, UTC]         source commit time
``@xid``            uint64                     source transaction id
``@lane``           uint16                     index into the batch's lanes
``@image``          uint8                      bit 1: the row image is the new row (after);
                                               bit 2: an old row (before) was sent
``@unchanged``      list<int16>                columns the source did not send (unchanged
                                               TOASTed values, distinct from NULL); indices
                                               >= the column count are the old row's
``@before``         struct<columns>            the old row of an update, when sent with the
                                               new one (else null)
<table columns>     per encoding               the new row; a delete's old row
==================  =========================  ===============================================

`encoding` says what the table columns hold: ``postgres_text`` (string columns in
PostgreSQL's text output format, so PostgreSQL -> PostgreSQL converts nothing; sinks that
need typed values cast whole columns) or ``arrow`` (columns of the Arrow type matching each
column's logical type). `SourceEvent` stays the row-level view: `events_of` gives it back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from domain.arrow_types import value_type
from domain.block_text import TextFormError, column_text, struct_text
from domain.events import UNCHANGED, Operation, Position, SourceEvent, TableSchema, TextRow
from domain.rows import RowFormatError, decode_columns

ENCODING_POSTGRES_TEXT = "postgres_text"
ENCODING_ARROW = "arrow"

INDEX, OP, POSITION, SEQUENCE, COMMIT_TIME, XID, LANE, IMAGE, UNCHANGED_COL, BEFORE = (
    "@index",
    "@op",
    "@position",
    "@sequence",
    "@commit_time",
    "@xid",
    "@lane",
    "@image",
    "@unchanged",
    "@before",
)
META_COLUMNS = 10  # the table's columns start here
IMAGE_AFTER = 1
IMAGE_BEFORE = 2

_OPS = {op.value: op for op in Operation}
_COMMIT_TIME_TYPE = pa.timestamp("us", tz="UTC")
_UNCHANGED_TYPE = pa.list_(pa.int16())


class BlockError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ChangeBlock:
    """The changes of one table schema in one batch, as columns."""

    schema: TableSchema
    records: pa.RecordBatch
    encoding: str = ENCODING_POSTGRES_TEXT

    def __len__(self) -> int:
        return int(self.records.num_rows)

    def column(self, i: int) -> pa.Array:
        """The `i`-th table column (the row image)."""
        return self.records.column(META_COLUMNS + i)


def arrow_schema(table: TableSchema, encoding: str = ENCODING_POSTGRES_TEXT) -> pa.Schema:
    """The record batch schema of a block of `table` in `encoding`: string value columns for
    postgres_text, the Arrow type of each column's logical type (domain/arrow_types.py) for
    arrow."""
    if encoding == ENCODING_ARROW:
        values = [pa.field(c.name, value_type(c.logical)) for c in table.columns]
    elif encoding == ENCODING_POSTGRES_TEXT:
        values = [pa.field(c.name, pa.string()) for c in table.columns]
    else:
        raise BlockError(f"unknown block encoding {encoding!r}")
    return pa.schema(
        [
            pa.field(INDEX, pa.uint32(), nullable=False),
            pa.field(OP, pa.string(), nullable=False),
            pa.field(POSITION, pa.uint64(), nullable=False),
            pa.field(SEQUENCE, pa.uint64(), nullable=False),
            pa.field(COMMIT_TIME, _COMMIT_TIME_TYPE, nullable=False),
            pa.field(XID, pa.uint64(), nullable=False),
            pa.field(LANE, pa.uint16(), nullable=False),
            pa.field(IMAGE, pa.uint8(), nullable=False),
            pa.field(UNCHANGED_COL, _UNCHANGED_TYPE),
            pa.field(BEFORE, pa.struct(values)),
            *values,
        ]
    )


LaneOf = int | Sequence[int]  # one lane index for all changes, or one per change


def lane_indices(counts: Sequence[int]) -> list[int]:
    """The lane index of each change of a batch whose changes are grouped by lane, `counts[i]`
    of them in lane i."""
    return [i for i, count in enumerate(counts) for _ in range(count)]


def build_blocks(events: Sequence[SourceEvent], lane: LaneOf = 0) -> list[ChangeBlock]:
    """One block per run of a table's changes in one shape (TableSchema, by identity): a
    table whose shape changes mid-batch gets a new block from there on, so the blocks of one
    table are in change order. Blocks are in order of their first change; `@index` keeps
    each change's place in `events`. `lane`: the index (into the batch's lanes) of every
    change, or of each change (a batch carrying several lanes)."""
    if not isinstance(lane, int) and len(lane) != len(events):
        raise BlockError(f"{len(lane)} lane indices for {len(events)} changes")
    groups: list[tuple[TableSchema, list[int]]] = []
    current: dict[str, tuple[TableSchema, list[int]]] = {}
    last: TableSchema | None = None
    indices: list[int] = []
    for i, ev in enumerate(events):
        table = ev.table
        if table is not last:
            group = current.get(table.qualified_name)
            if group is None or group[0] is not table:
                group = (table, [])
                current[table.qualified_name] = group
                groups.append(group)
            last, indices = table, group[1]
        indices.append(i)
    if len(groups) == 1:
        return [_build(groups[0][0], events, range(len(events)), lane)]
    return [_build(table, [events[i] for i in indices], indices, lane) for table, indices in groups]


_LETTERS = {op: op.value for op in Operation}


def _lane_array(lane: LaneOf, indices: Sequence[int]) -> pa.Array:
    if isinstance(lane, int):
        return pa.repeat(pa.scalar(lane, pa.uint16()), len(indices))
    return pa.array([lane[i] for i in indices], pa.uint16())


def _build(
    table: TableSchema, events: Sequence[SourceEvent], indices: Sequence[int], lane: LaneOf
) -> ChangeBlock:
    fast = _build_from_wire(table, events, indices, lane)
    if fast is not None:
        return fast
    n = len(table.columns)
    m = len(events)
    empty: TextRow = (None,) * n
    ops: list[str] = []
    majors: list[int] = []
    minors: list[int] = []
    times: list[int] = []
    xids: list[int] = []
    images: list[int] = []
    rows: list[TextRow] = []
    befores: list[TextRow | None] = []
    unchanged: list[list[int] | None] = []
    any_before = any_unchanged = False
    for ev in events:
        ops.append(ev.operation.value)
        position = ev.position
        majors.append(position.major)
        minors.append(position.minor)
        times.append(ev.commit_time_us)
        xids.append(ev.transaction_id)
        after = ev.after if ev.has_after else None
        before = ev.before if ev.has_before else None
        missing: list[int] | None = None
        if after is not None:
            row = after
            if before is not None:
                images.append(IMAGE_AFTER | IMAGE_BEFORE)
                if len(before) != n:
                    raise BlockError(f"{table.qualified_name}: before row has {len(before)} values")
                if UNCHANGED in before:
                    missing = [n + i for i, v in enumerate(before) if v is UNCHANGED]
                    before = tuple([None if v is UNCHANGED else v for v in before])
                befores.append(before)
                any_before = True
            else:
                images.append(IMAGE_AFTER)
                befores.append(None)
        elif before is not None:
            row = before
            images.append(IMAGE_BEFORE)
            befores.append(None)
        else:
            row = empty
            images.append(0)
            befores.append(None)
        if len(row) != n:
            raise BlockError(
                f"{table.qualified_name}: row has {len(row)} values but the table has {n} columns"
            )
        if UNCHANGED in row:
            own = [i for i, v in enumerate(row) if v is UNCHANGED]
            missing = own if missing is None else own + missing
            row = tuple([None if v is UNCHANGED else v for v in row])
        if missing is not None:
            any_unchanged = True
        unchanged.append(missing)
        rows.append(row)
    schema = arrow_schema(table)
    value_type = schema.field(BEFORE).type
    columns = list(zip(*rows, strict=True)) if n and m else [() for _ in range(n)]
    string = pa.string()
    if any_before:
        filled = [empty if b is None else b for b in befores]
        children = [pa.array(c, string) for c in zip(*filled, strict=True)] if n else []
        mask = pa.array([b is None for b in befores], pa.bool_())
        before_array: pa.Array = pa.StructArray.from_arrays(
            children, fields=list(value_type), mask=mask
        )
    else:
        before_array = pa.nulls(m, value_type)
    arrays: list[pa.Array] = [
        pa.array(indices, pa.uint32()),
        pa.array(ops, string),
        pa.array(majors, pa.uint64()),
        pa.array(minors, pa.uint64()),
        pa.array(times, _COMMIT_TIME_TYPE),
        pa.array(xids, pa.uint64()),
        _lane_array(lane, indices),
        pa.array(images, pa.uint8()),
        pa.array(unchanged, _UNCHANGED_TYPE) if any_unchanged else pa.nulls(m, _UNCHANGED_TYPE),
        before_array,
        *[pa.array(c, string) for c in columns],
    ]
    return ChangeBlock(table, pa.RecordBatch.from_arrays(arrays, schema=schema))


def _build_from_wire(
    table: TableSchema, events: Sequence[SourceEvent], indices: Sequence[int], lane: LaneOf
) -> ChangeBlock | None:
    """`_build` for the common case of changes read from the WAL: one row each, in its wire
    form (an insert's or update's new row, a delete's old row), decoded straight into
    columns. None when a change does not fit it."""
    datas: list[bytes] = []
    images: list[int] = []
    for ev in events:
        after = ev.after_wire
        if after is not None:
            if ev.has_before:
                return None
            datas.append(after)
            images.append(IMAGE_AFTER)
            continue
        before = ev.before_wire
        if before is None or ev.has_after:
            return None
        datas.append(before)
        images.append(IMAGE_BEFORE)
    n = len(table.columns)
    m = len(events)
    try:
        columns, unchanged = decode_columns(datas, n)
    except RowFormatError as exc:
        raise BlockError(f"{table.qualified_name}: {exc}") from exc
    letters = _LETTERS
    positions = [ev.position for ev in events]
    schema = arrow_schema(table)
    string = pa.string()
    arrays: list[pa.Array] = [
        pa.array(indices, pa.uint32()),
        pa.array([letters[ev.operation] for ev in events], string),
        pa.array([p.major for p in positions], pa.uint64()),
        pa.array([p.minor for p in positions], pa.uint64()),
        pa.array([ev.commit_time_us for ev in events], _COMMIT_TIME_TYPE),
        pa.array([ev.transaction_id for ev in events], pa.uint64()),
        _lane_array(lane, indices),
        pa.array(images, pa.uint8()),
        pa.array(unchanged, _UNCHANGED_TYPE) if unchanged else pa.nulls(m, _UNCHANGED_TYPE),
        pa.nulls(m, schema.field(BEFORE).type),
        *[pa.array(c, string) for c in columns],
    ]
    return ChangeBlock(table, pa.RecordBatch.from_arrays(arrays, schema=schema))


def to_postgres_text(block: ChangeBlock) -> ChangeBlock:
    """`block` in the ``postgres_text`` encoding (a text block is returned as it is): the same
    metadata columns (`@unchanged` kept), the table columns and `@before` as PostgreSQL text
    (domain/block_text.py), whole columns at a time."""
    if block.encoding == ENCODING_POSTGRES_TEXT:
        return block
    if block.encoding != ENCODING_ARROW:
        raise BlockError(f"unknown block encoding {block.encoding!r}")
    rb = block.records
    n = len(block.schema.columns)
    if rb.num_columns != META_COLUMNS + n:
        raise BlockError(
            f"{block.schema.qualified_name}: block has {rb.num_columns - META_COLUMNS} value "
            f"columns, the table {n}"
        )
    schema = arrow_schema(block.schema, ENCODING_POSTGRES_TEXT)
    try:
        values = [column_text(rb.column(META_COLUMNS + i)) for i in range(n)]
        before = struct_text(rb.column(BEFORE), schema.field(BEFORE).type)
    except TextFormError as exc:
        raise BlockError(f"{block.schema.qualified_name}: {exc}") from exc
    arrays = [rb.column(i) for i in range(META_COLUMNS - 1)]
    return ChangeBlock(
        block.schema,
        pa.RecordBatch.from_arrays([*arrays, before, *values], schema=schema),
        ENCODING_POSTGRES_TEXT,
    )


def events_of(
    block: ChangeBlock, lanes: Sequence[str] = ("0",), source_database: str = ""
) -> list[tuple[int, SourceEvent]]:
    """The row-level view of a block: (place in the batch, event) per change; the values of
    an ``arrow`` block as their PostgreSQL text (`to_postgres_text`)."""
    if block.encoding != ENCODING_POSTGRES_TEXT:
        block = to_postgres_text(block)
    rb = block.records
    n = len(block.schema.columns)
    m = rb.num_rows
    if rb.num_columns != META_COLUMNS + n:
        raise BlockError(
            f"{block.schema.qualified_name}: block has {rb.num_columns - META_COLUMNS} value "
            f"columns, the table {n}"
        )
    indices = rb.column(0).to_pylist()
    ops = rb.column(1).to_pylist()
    majors = rb.column(2).to_pylist()
    minors = rb.column(3).to_pylist()
    times = rb.column(4).cast(pa.int64()).to_pylist()
    xids = rb.column(5).to_pylist()
    images = rb.column(7).to_pylist()
    unchanged_col = rb.column(8)
    unchanged = unchanged_col.to_pylist() if unchanged_col.null_count < m else None
    before_col = rb.column(9)
    befores: list[Any] | None = None
    if before_col.null_count < m:
        flat = [before_col.field(i).to_pylist() for i in range(n)]
        valid = before_col.is_valid().to_pylist()
        befores = [
            row if ok else None
            for row, ok in zip(zip(*flat, strict=True) if n else [()] * m, valid, strict=True)
        ]
    values = [rb.column(META_COLUMNS + i).to_pylist() for i in range(n)]
    rows = list(zip(*values, strict=True)) if n else [()] * m
    out: list[tuple[int, SourceEvent]] = []
    table = block.schema
    for j in range(m):
        operation = _OPS.get(ops[j])
        if operation is None:
            raise BlockError(f"unknown operation {ops[j]!r}")
        row: TextRow | None = rows[j]
        before: TextRow | None = befores[j] if befores is not None else None
        missing = unchanged[j] if unchanged is not None else None
        if missing:
            own = [i for i in missing if i < n]
            old = [i - n for i in missing if i >= n]
            if own and row is not None:
                patched = list(row)
                for i in own:
                    patched[i] = UNCHANGED
                row = tuple(patched)
            if old and before is not None:
                patched = list(before)
                for i in old:
                    patched[i] = UNCHANGED
                before = tuple(patched)
        image = images[j]
        if image & IMAGE_AFTER:
            after_row, before_row = row, before
        elif image & IMAGE_BEFORE:
            after_row, before_row = None, row
        else:
            after_row = before_row = None
        out.append(
            (
                indices[j],
                SourceEvent(
                    operation,
                    table,
                    Position(majors[j], minors[j]),
                    before_row,
                    after_row,
                    times[j],
                    xids[j],
                    source_database,
                ),
            )
        )
    return out


def events_of_blocks(
    blocks: Sequence[ChangeBlock], lanes: Sequence[str] = ("0",), source_database: str = ""
) -> list[SourceEvent]:
    """The changes of all `blocks` as events, in their batch order."""
    if len(blocks) == 1:
        return [ev for _, ev in events_of(blocks[0], lanes, source_database)]
    pairs = [p for b in blocks for p in events_of(b, lanes, source_database)]
    pairs.sort(key=lambda p: p[0])
    return [ev for _, ev in pairs]


def lanes_of_blocks(blocks: Sequence[ChangeBlock]) -> list[int]:
    """The lane index of each change of `blocks`, in batch order (`@index`)."""
    if len(blocks) == 1:
        return [int(x) for x in blocks[0].records.column(6).to_pylist()]
    pairs = [
        (int(i), int(lane))
        for b in blocks
        for i, lane in zip(
            b.records.column(0).to_pylist(), b.records.column(6).to_pylist(), strict=True
        )
    ]
    pairs.sort()
    return [lane for _, lane in pairs]


def lane_blocks(blocks: Sequence[ChangeBlock], lane: int) -> list[ChangeBlock]:
    """The changes of lane `lane` in `blocks`, as blocks of a batch of that one lane
    (`@lane` 0); blocks without a change of the lane are left out."""
    out: list[ChangeBlock] = []
    for block in blocks:
        rb = block.records
        lanes = rb.column(6)
        if not len(block):
            continue
        if pc.all(pc.equal(lanes, pa.scalar(lane, pa.uint16()))).as_py():
            picked = rb
        else:
            picked = rb.filter(pc.equal(lanes, pa.scalar(lane, pa.uint16())))
            if not picked.num_rows:
                continue
        if lane:
            picked = picked.set_column(
                6, rb.schema.field(6), pa.repeat(pa.scalar(0, pa.uint16()), picked.num_rows)
            )
        out.append(ChangeBlock(block.schema, picked, block.encoding))
    return out


def after_position(block: ChangeBlock, applied: Position | None) -> ChangeBlock:
    """The changes of `block` past `applied` (the rest are replays)."""
    if applied is None or not len(block):
        return block
    rb = block.records
    major = rb.column(2)
    later = pc.or_(
        pc.greater(major, pa.scalar(applied.major, pa.uint64())),
        pc.and_(
            pc.equal(major, pa.scalar(applied.major, pa.uint64())),
            pc.greater(rb.column(3), pa.scalar(applied.minor, pa.uint64())),
        ),
    )
    if pc.all(later).as_py():
        return block
    return ChangeBlock(block.schema, rb.filter(later), block.encoding)


def after_positions(block: ChangeBlock, applied: Sequence[Position | None]) -> ChangeBlock:
    """The changes of `block` past the applied position of their lane (`applied[i]` for
    lane index i; None: nothing of that lane applied yet)."""
    if len(applied) == 1:
        return after_position(block, applied[0])
    if not len(block) or all(a is None for a in applied):
        return block
    rb = block.records
    lanes, major, minor = rb.column(6), rb.column(2), rb.column(3)
    keep = pa.repeat(pa.scalar(False), len(block))
    for i, a in enumerate(applied):
        in_lane = pc.equal(lanes, pa.scalar(i, pa.uint16()))
        if a is not None:
            in_lane = pc.and_(
                in_lane,
                pc.or_(
                    pc.greater(major, pa.scalar(a.major, pa.uint64())),
                    pc.and_(
                        pc.equal(major, pa.scalar(a.major, pa.uint64())),
                        pc.greater(minor, pa.scalar(a.minor, pa.uint64())),
                    ),
                ),
            )
        keep = pc.or_(keep, in_lane)
    if pc.all(keep).as_py():
        return block
    return ChangeBlock(block.schema, rb.filter(keep), block.encoding)


def last_positions(block: ChangeBlock) -> dict[int, Position]:
    """The highest position of each lane (by index) in `block`."""
    rb = block.records
    if not rb.num_rows:
        return {}
    lanes = rb.column(6)
    present = pc.unique(lanes).to_pylist()
    if len(present) == 1:
        top = last_position(block)
        assert top is not None
        return {int(present[0]): top}
    out: dict[int, Position] = {}
    for i in present:
        picked = rb.filter(pc.equal(lanes, pa.scalar(i, pa.uint16())))
        top = last_position(ChangeBlock(block.schema, picked, block.encoding))
        assert top is not None
        out[int(i)] = top
    return out


def last_position(block: ChangeBlock) -> Position | None:
    """The highest position in `block` (None when empty)."""
    rb = block.records
    if not rb.num_rows:
        return None
    major = pc.max(rb.column(2)).as_py()
    minor = pc.max(rb.column(3).filter(pc.equal(rb.column(2), major))).as_py()
    return Position(int(major), int(minor))
