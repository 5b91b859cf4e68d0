from cdc_proto.v1 import events_pb2 as _events_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AckStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACK_STATUS_UNSPECIFIED: _ClassVar[AckStatus]
    ACK_STATUS_WRITTEN: _ClassVar[AckStatus]
    ACK_STATUS_REJECTED: _ClassVar[AckStatus]
ACK_STATUS_UNSPECIFIED: AckStatus
ACK_STATUS_WRITTEN: AckStatus
ACK_STATUS_REJECTED: AckStatus

class BatchAck(_message.Message):
    __slots__ = ("batch_id", "status", "written", "skipped", "dead_lettered", "error")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTERED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    batch_id: int
    status: AckStatus
    written: int
    skipped: int
    dead_lettered: int
    error: str
    def __init__(self, batch_id: _Optional[int] = ..., status: _Optional[_Union[AckStatus, str]] = ..., written: _Optional[int] = ..., skipped: _Optional[int] = ..., dead_lettered: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...
