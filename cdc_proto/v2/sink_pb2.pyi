from cdc_proto.v2 import events_pb2 as _events_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AckStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACK_STATUS_UNSPECIFIED: _ClassVar[AckStatus]
    ACK_STATUS_WRITTEN: _ClassVar[AckStatus]
    ACK_STATUS_REJECTED: _ClassVar[AckStatus]

class Guarantee(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GUARANTEE_UNSPECIFIED: _ClassVar[Guarantee]
    GUARANTEE_EXACTLY_ONCE_EFFECT: _ClassVar[Guarantee]
    GUARANTEE_AT_LEAST_ONCE_IDEMPOTENCY_KEY: _ClassVar[Guarantee]
ACK_STATUS_UNSPECIFIED: AckStatus
ACK_STATUS_WRITTEN: AckStatus
ACK_STATUS_REJECTED: AckStatus
GUARANTEE_UNSPECIFIED: Guarantee
GUARANTEE_EXACTLY_ONCE_EFFECT: Guarantee
GUARANTEE_AT_LEAST_ONCE_IDEMPOTENCY_KEY: Guarantee

class LanePosition(_message.Message):
    __slots__ = ("lane", "position", "sequence")
    LANE_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    lane: str
    position: int
    sequence: int
    def __init__(self, lane: _Optional[str] = ..., position: _Optional[int] = ..., sequence: _Optional[int] = ...) -> None: ...

class BatchAck(_message.Message):
    __slots__ = ("batch_id", "status", "written", "skipped", "dead_lettered", "error", "durable", "durable_positions")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTERED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DURABLE_FIELD_NUMBER: _ClassVar[int]
    DURABLE_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    batch_id: int
    status: AckStatus
    written: int
    skipped: int
    dead_lettered: int
    error: str
    durable: bool
    durable_positions: _containers.RepeatedCompositeFieldContainer[LanePosition]
    def __init__(self, batch_id: _Optional[int] = ..., status: _Optional[_Union[AckStatus, str]] = ..., written: _Optional[int] = ..., skipped: _Optional[int] = ..., dead_lettered: _Optional[int] = ..., error: _Optional[str] = ..., durable: _Optional[bool] = ..., durable_positions: _Optional[_Iterable[_Union[LanePosition, _Mapping]]] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ("wire_version", "pipeline_id")
    WIRE_VERSION_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_ID_FIELD_NUMBER: _ClassVar[int]
    wire_version: str
    pipeline_id: str
    def __init__(self, wire_version: _Optional[str] = ..., pipeline_id: _Optional[str] = ...) -> None: ...

class DescribeReply(_message.Message):
    __slots__ = ("wire_version", "sink_id", "sink_type", "guarantee")
    WIRE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SINK_ID_FIELD_NUMBER: _ClassVar[int]
    SINK_TYPE_FIELD_NUMBER: _ClassVar[int]
    GUARANTEE_FIELD_NUMBER: _ClassVar[int]
    wire_version: str
    sink_id: str
    sink_type: str
    guarantee: Guarantee
    def __init__(self, wire_version: _Optional[str] = ..., sink_id: _Optional[str] = ..., sink_type: _Optional[str] = ..., guarantee: _Optional[_Union[Guarantee, str]] = ...) -> None: ...
