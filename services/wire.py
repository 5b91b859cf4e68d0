"""Conversion between domain events and the cdc.v1 protobuf messages."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from cdc_proto.v1 import events_pb2 as pb
from domain.events import Column, Operation, Position, SourceEvent, TableSchema
from domain.ports import SinkBatch
from domain.rows import decode_row, encode_row

_TO_PB = {
    Operation.CREATE: pb.OPERATION_CREATE,
    Operation.UPDATE: pb.OPERATION_UPDATE,
    Operation.DELETE: pb.OPERATION_DELETE,
    Operation.READ: pb.OPERATION_READ,
    Operation.TRUNCATE: pb.OPERATION_TRUNCATE,
}
_FROM_PB = {v: k for k, v in _TO_PB.items()}


class WireFormatError(ValueError):
    pass


def encode_batch(
    batch_id: int,
    pipeline_id: str,
    partition: str,
    events: Sequence[SourceEvent],
    trace_context: Mapping[str, str] | None = None,
) -> pb.EventBatch:
    message = pb.EventBatch(
        batch_id=batch_id,
        pipeline_id=pipeline_id,
        partition=partition,
        trace_context=dict(trace_context or {}),
    )
    add_table = message.tables.add
    add_event = message.events.add  # fills the repeated field in place: no Event copies
    to_pb = _TO_PB
    refs: dict[int, int] = {}
    source_database = ""
    for event in events:
        schema = event.table
        ref = refs.get(id(schema))
        if ref is None:
            ref = refs[id(schema)] = len(refs)
            add_table(
                ref=ref,
                schema=schema.schema,
                table=schema.table,
                columns=[
                    pb.Column(
                        name=c.name, type_oid=c.type_oid, type_name=c.type_name, is_key=c.is_key
                    )
                    for c in schema.columns
                ],
            )
        source_database = event.source_database
        # Rows read from the WAL are still in their wire encoding: passed on as they are.
        before = event.before_wire
        if before is None:
            row = event.before
            before = b"" if row is None else encode_row(row)
        after = event.after_wire
        if after is None:
            row = event.after
            after = b"" if row is None else encode_row(row)
        position = event.position
        add_event(
            operation=to_pb[event.operation],
            table_ref=ref,
            position=position.major,
            sequence=position.minor,
            commit_time_us=event.commit_time_us,
            transaction_id=event.transaction_id,
            before=before,
            after=after,
        )
    message.source_database = source_database
    return message


def decode_batch(message: pb.EventBatch) -> SinkBatch:
    schemas = {
        t.ref: TableSchema(
            t.schema,
            t.table,
            tuple(Column(c.name, c.type_oid, c.type_name, c.is_key) for c in t.columns),
        )
        for t in message.tables
    }
    partition = message.partition
    database = message.source_database
    events: list[SourceEvent] = []
    append = events.append
    from_pb = _FROM_PB
    for e in message.events:
        schema = schemas.get(e.table_ref)
        operation = from_pb.get(e.operation)
        if schema is None or operation is None:
            raise WireFormatError(
                f"batch {message.batch_id}: event with unknown table or operation"
            )
        before = e.before
        after = e.after
        append(
            SourceEvent(
                operation,
                schema,
                Position(e.position, e.sequence),
                partition,
                decode_row(before)[0] if before else None,
                decode_row(after)[0] if after else None,
                e.commit_time_us,
                e.transaction_id,
                database,
            )
        )
    return SinkBatch(message.pipeline_id, partition, message.batch_id, events)
