"""The wire contract: committed generated code matches proto/, and batches round-trip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cdc_proto.v1 import events_pb2, sink_pb2, sink_pb2_grpc
from domain.events import UNCHANGED, Operation
from domain.rows import decode_row, encode_row

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
GENERATED_PATTERNS = ("*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py")


def _generated(base: Path) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    pkg = base / "cdc_proto"
    for pattern in GENERATED_PATTERNS:
        for path in pkg.rglob(pattern):
            files[path.relative_to(base).as_posix()] = path.read_bytes()
    return files


def test_generated_code_matches_proto_files(tmp_path: Path) -> None:
    protos = sorted(p.relative_to(ROOT).as_posix() for p in PROTO_DIR.rglob("*.proto"))
    assert protos, "no .proto files found"
    # The same command as `make proto`, writing into a scratch directory.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Iproto",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            *protos,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr

    fresh = _generated(tmp_path)
    committed = _generated(ROOT)
    assert fresh, "protoc produced nothing"
    assert sorted(committed) == sorted(fresh), "generated file set differs: run `make proto`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"out of date, run `make proto`: {stale}"


def make_batch() -> events_pb2.EventBatch:
    batch = events_pb2.EventBatch(
        batch_id=2**63 + 5,
        pipeline_id="orders-cdc",
        partition="0",
        source_database="shop",
        trace_context={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
    )
    table = batch.tables.add(ref=1, schema="public", table="orders")
    table.columns.add(name="id", type_oid=20, type_name="bigint", is_key=True)
    table.columns.add(name="note", type_oid=25, type_name="text")
    batch.events.add(
        operation=events_pb2.OPERATION_CREATE,
        table_ref=1,
        position=0xFFFF_FFFF_FFFF_FFFF,
        sequence=0,
        commit_time_us=1_714_979_289_123_456,
        transaction_id=4_000_000_000,
        after=encode_row(("1", "héllo\ttab")),
    )
    batch.events.add(
        operation=events_pb2.OPERATION_UPDATE,
        table_ref=1,
        position=0xFFFF_FFFF_FFFF_FFFF,
        sequence=1,
        commit_time_us=-5,  # before 1970 is representable
        before=encode_row(("1", None)),
        after=encode_row(("1", UNCHANGED)),
    )
    batch.events.add(
        operation=events_pb2.OPERATION_DELETE,
        table_ref=1,
        position=7,
        before=encode_row(("1", None)),
    )
    return batch


def test_event_batch_round_trip() -> None:
    batch = make_batch()
    data = batch.SerializeToString()
    restored = events_pb2.EventBatch.FromString(data)

    assert restored == batch
    assert restored.SerializeToString() == data
    assert restored.batch_id == 2**63 + 5
    assert restored.trace_context["traceparent"].startswith("00-0af7")
    assert [c.name for c in restored.tables[0].columns] == ["id", "note"]
    assert restored.tables[0].columns[0].is_key
    assert [e.operation for e in restored.events] == [
        events_pb2.OPERATION_CREATE,
        events_pb2.OPERATION_UPDATE,
        events_pb2.OPERATION_DELETE,
    ]
    first, second, third = restored.events
    assert first.position == 2**64 - 1
    assert first.transaction_id == 4_000_000_000
    assert second.commit_time_us == -5
    assert decode_row(first.after)[0] == ("1", "héllo\ttab")
    assert decode_row(second.after)[0][1] is UNCHANGED
    assert third.after == b""  # empty bytes mean "no row"
    assert decode_row(third.before)[0] == ("1", None)


def test_batch_ack_round_trip_and_service_shape() -> None:
    ack = sink_pb2.BatchAck(
        batch_id=42,
        status=sink_pb2.ACK_STATUS_WRITTEN,
        written=498,
        skipped=1,
        dead_lettered=1,
    )
    assert sink_pb2.BatchAck.FromString(ack.SerializeToString()) == ack

    service = sink_pb2.DESCRIPTOR.services_by_name["SinkService"]
    deliver = service.methods_by_name["Deliver"]
    assert deliver.input_type.full_name == "cdc.v1.EventBatch"
    assert deliver.output_type.full_name == "cdc.v1.BatchAck"
    assert deliver.client_streaming and deliver.server_streaming
    assert hasattr(sink_pb2_grpc, "SinkServiceStub")
    assert hasattr(sink_pb2_grpc, "add_SinkServiceServicer_to_server")


def test_proto_operations_cover_domain_operations() -> None:
    names = set(events_pb2.Operation.keys()) - {"OPERATION_UNSPECIFIED"}
    assert names == {f"OPERATION_{op.name}" for op in Operation}


def test_v2_batch_of_blocks_round_trips_and_the_service_has_the_handshake() -> None:
    from cdc_proto.v2 import events_pb2 as v2_events
    from cdc_proto.v2 import sink_pb2 as v2_sink

    batch = v2_events.EventBatch(batch_id=2**63 + 5, pipeline_id="p", lanes=["slot"], events=3)
    block = batch.blocks.add(
        schema="public",
        table="orders",
        encoding=v2_events.COLUMN_ENCODING_POSTGRES_TEXT,
        records=b"\x00arrow",
        rows=3,
    )
    block.columns.add(name="id", logical_type="int64", source_type="bigint", is_key=True)
    block.columns.add(name="total", logical_type="decimal(12,2)", source_type="numeric(12,2)")
    restored = v2_events.EventBatch.FromString(batch.SerializeToString())
    assert restored == batch
    assert restored.blocks[0].columns[1].logical_type == "decimal(12,2)"

    service = v2_sink.DESCRIPTOR.services_by_name["SinkService"]
    assert service.full_name == "cdc.v2.SinkService"
    describe = service.methods_by_name["Describe"]
    assert describe.input_type.full_name == "cdc.v2.DescribeRequest"
    assert not describe.client_streaming and not describe.server_streaming
    deliver = service.methods_by_name["Deliver"]
    assert deliver.input_type.full_name == "cdc.v2.EventBatch"
    assert deliver.output_type.full_name == "cdc.v2.BatchAck"
    ack = v2_sink.BatchAck(batch_id=1, status=v2_sink.ACK_STATUS_WRITTEN, durable=True)
    ack.durable_positions.add(lane="slot", position=7, sequence=2)
    assert v2_sink.BatchAck.FromString(ack.SerializeToString()) == ack
