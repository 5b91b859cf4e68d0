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
    refs: dict[int, int] = {}
    tables: list[pb.TableSchema] = []
    out: list[pb.Event] = []
    make_event = pb.Event
    source_database = ""
    for event in events:
        schema = event.table
        ref = refs.get(id(schema))
        if ref is None:
            ref = len(tables)
            refs[id(schema)] = ref
            tables.append(
                pb.TableSchema(
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
            )
        source_database = event.source_database
        out.append(
            make_event(
                operation=_TO_PB[event.operation],
                table_ref=ref,
                position=event.position.major,
                sequence=event.position.minor,
                commit_time_us=event.commit_time_us,
                transaction_id=event.transaction_id,
                before=b"" if event.before is None else encode_row(event.before),
                after=b"" if event.after is None else encode_row(event.after),
            )
        )
    return pb.EventBatch(
        batch_id=batch_id,
        pipeline_id=pipeline_id,
        partition=partition,
        tables=tables,
        events=out,
        trace_context=dict(trace_context or {}),
        source_database=source_database,
    )


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
    for e in message.events:
        schema = schemas.get(e.table_ref)
        operation = _FROM_PB.get(e.operation)
        if schema is None or operation is None:
            raise WireFormatError(
                f"batch {message.batch_id}: event with unknown table or operation"
            )
        events.append(
            SourceEvent(
                operation=operation,
                table=schema,
                position=Position(e.position, e.sequence),
                partition=partition,
                before=decode_row(e.before)[0] if e.before else None,
                after=decode_row(e.after)[0] if e.after else None,
                commit_time_us=e.commit_time_us,
                transaction_id=e.transaction_id,
                source_database=database,
            )
        )
    return SinkBatch(message.pipeline_id, partition, message.batch_id, events)
