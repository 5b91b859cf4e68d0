"""Conversion between domain batches and the cdc.v2 protobuf messages.

A batch travels as one block per table shape (`domain.blocks`), each an Arrow IPC stream
of one record batch. `WIRE_VERSION` is what the Describe handshake compares: an ingest and
a sink of different wire versions refuse each other instead of misreading batches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from cdc_proto.v2 import events_pb2 as pb
from domain.arrow_types import value_type
from domain.blocks import (
    ENCODING_ARROW,
    ENCODING_POSTGRES_TEXT,
    META_COLUMNS,
    BlockError,
    ChangeBlock,
    build_blocks,
    lane_indices,
)
from domain.events import Column, SourceEvent, TableSchema
from domain.ports import OutboundBatch, SinkBatch

WIRE_VERSION = "cdc.v2"

_ENCODINGS = {
    ENCODING_POSTGRES_TEXT: pb.COLUMN_ENCODING_POSTGRES_TEXT,
    ENCODING_ARROW: pb.COLUMN_ENCODING_ARROW,
}
_FROM_ENCODING = {v: k for k, v in _ENCODINGS.items()}


class WireFormatError(ValueError):
    pass


def wire_version_mismatch(ours: str, theirs: str, role: str) -> str:
    """The message both sides give when the handshake finds different wire versions."""
    return (
        f"wire version mismatch: this {role} speaks {ours}, the other side {theirs or 'cdc.v1'}; "
        "run the ingest and its sinks from the same release"
    )


def _ipc(records: pa.RecordBatch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, records.schema) as writer:
        writer.write_batch(records)
    return bytes(sink.getvalue().to_pybytes())


def encode_blocks(
    batch_id: int,
    pipeline_id: str,
    lanes: Sequence[str],
    blocks: Sequence[ChangeBlock],
    trace_context: Mapping[str, str] | None = None,
    source_database: str = "",
) -> pb.EventBatch:
    message = pb.EventBatch(
        batch_id=batch_id,
        pipeline_id=pipeline_id,
        lanes=list(lanes),
        trace_context=dict(trace_context or {}),
        source_database=source_database,
        events=sum(len(b) for b in blocks),
    )
    add = message.blocks.add
    for block in blocks:
        schema = block.schema
        add(
            schema=schema.schema,
            table=schema.table,
            columns=[
                pb.Column(
                    name=c.name,
                    logical_type=str(c.logical),
                    source_type=c.type_name,
                    is_key=c.is_key,
                    postgres_type_oid=c.type_oid,
                )
                for c in schema.columns
            ],
            encoding=_ENCODINGS[block.encoding],
            records=_ipc(block.records),
            rows=len(block),
        )
    return message


def encode_outbound(batch: OutboundBatch) -> pb.EventBatch:
    """A routed batch, of one lane or several (`OutboundBatch.lane_counts`); its change
    blocks as they are when it carries blocks."""
    if batch.blocks is not None:
        return encode_blocks(
            batch.batch_id, batch.pipeline_id, batch.lanes, batch.blocks, batch.trace_context
        )
    events = batch.events
    lane: int | list[int] = lane_indices(batch.lane_counts) if batch.lane_counts else 0
    try:
        blocks = build_blocks(events, lane)
    except BlockError as exc:
        raise WireFormatError(str(exc)) from exc
    database = events[-1].source_database if events else ""
    return encode_blocks(
        batch.batch_id, batch.pipeline_id, batch.lanes, blocks, batch.trace_context, database
    )


def encode_batch(
    batch_id: int,
    pipeline_id: str,
    partition: str,
    events: Sequence[SourceEvent],
    trace_context: Mapping[str, str] | None = None,
) -> pb.EventBatch:
    """The events of one lane (`partition`) as a batch of blocks."""
    try:
        blocks = build_blocks(events)
    except BlockError as exc:
        raise WireFormatError(str(exc)) from exc
    database = events[-1].source_database if events else ""
    return encode_blocks(batch_id, pipeline_id, [partition], blocks, trace_context, database)


def _schema(block: pb.TableBlock) -> TableSchema:
    return TableSchema(
        block.schema,
        block.table,
        tuple(
            Column(
                c.name,
                c.postgres_type_oid,
                c.source_type,
                c.is_key,
                # PostgreSQL columns derive it from their type (same value, one Column).
                "" if c.postgres_type_oid else c.logical_type,
            )
            for c in block.columns
        ),
    )


def decode_blocks(message: pb.EventBatch) -> list[ChangeBlock]:
    blocks: list[ChangeBlock] = []
    lanes = len(message.lanes)
    for b in message.blocks:
        encoding = _FROM_ENCODING.get(b.encoding)
        if encoding is None:
            raise WireFormatError(f"batch {message.batch_id}: unknown column encoding {b.encoding}")
        try:
            reader = pa.ipc.open_stream(pa.py_buffer(b.records))
            records = reader.read_next_batch()
        except (pa.ArrowInvalid, StopIteration, OSError) as exc:
            raise WireFormatError(
                f"batch {message.batch_id}: unreadable block of {b.schema}.{b.table}: {exc}"
            ) from exc
        schema = _schema(b)
        if records.num_columns != META_COLUMNS + len(schema.columns):
            raise WireFormatError(
                f"batch {message.batch_id}: block of {schema.qualified_name} has "
                f"{records.num_columns - META_COLUMNS} value columns, its schema "
                f"{len(schema.columns)}"
            )
        if records.num_rows != b.rows:
            raise WireFormatError(f"batch {message.batch_id}: block row count differs")
        if encoding == ENCODING_ARROW:
            _check_value_types(message.batch_id, schema, records.schema)
        if lanes and records.num_rows:
            top = pc.max(records.column(6)).as_py()
            if int(top) >= lanes:
                raise WireFormatError(f"batch {message.batch_id}: change of an unknown lane")
        blocks.append(ChangeBlock(schema, records, encoding))
    return blocks


def _check_value_types(batch_id: int, table: TableSchema, records: pa.Schema) -> None:
    """An ``arrow`` block's columns must hold the Arrow type of their logical type, which is
    what sinks cast from."""
    for i, column in enumerate(table.columns):
        expected = value_type(column.logical)
        found = records.field(META_COLUMNS + i).type
        if found != expected:
            raise WireFormatError(
                f"batch {batch_id}: column {table.qualified_name}.{column.name} of logical type "
                f"{column.logical} holds {found}, not {expected}"
            )


def decode_batch(message: pb.EventBatch) -> SinkBatch:
    blocks = decode_blocks(message)
    lanes = list(message.lanes) or ["0"]
    batch = SinkBatch(
        message.pipeline_id,
        lanes[0],
        message.batch_id,
        blocks=blocks,
        lanes=lanes,
        source_database=message.source_database,
    )
    try:
        # Validates operations up front, as the row view is what most sinks read; the
        # PostgreSQL sink reads the blocks (it checks them itself).
        _check_ops(blocks)
    except BlockError as exc:
        raise WireFormatError(f"batch {message.batch_id}: {exc}") from exc
    return batch


_KNOWN_OPS = pa.array(["c", "u", "d", "r", "t"])


def _check_ops(blocks: Sequence[ChangeBlock]) -> None:
    for block in blocks:
        ops = block.records.column(1)
        if not pc.all(pc.is_in(ops, value_set=_KNOWN_OPS)).as_py() and len(block):
            raise BlockError("change with an unknown operation")
