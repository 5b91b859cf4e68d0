from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Operation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OPERATION_UNSPECIFIED: _ClassVar[Operation]
    OPERATION_CREATE: _ClassVar[Operation]
    OPERATION_UPDATE: _ClassVar[Operation]
    OPERATION_DELETE: _ClassVar[Operation]
    OPERATION_READ: _ClassVar[Operation]
    OPERATION_TRUNCATE: _ClassVar[Operation]
OPERATION_UNSPECIFIED: Operation
OPERATION_CREATE: Operation
OPERATION_UPDATE: Operation
OPERATION_DELETE: Operation
OPERATION_READ: Operation
OPERATION_TRUNCATE: Operation

class Column(_message.Message):
    __slots__ = ("name", "type_oid", "type_name", "is_key")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_OID_FIELD_NUMBER: _ClassVar[int]
    TYPE_NAME_FIELD_NUMBER: _ClassVar[int]
    IS_KEY_FIELD_NUMBER: _ClassVar[int]
    name: str
    type_oid: int
    type_name: str
    is_key: bool
    def __init__(self, name: _Optional[str] = ..., type_oid: _Optional[int] = ..., type_name: _Optional[str] = ..., is_key: _Optional[bool] = ...) -> None: ...

class TableSchema(_message.Message):
    __slots__ = ("ref", "schema", "table", "columns")
    REF_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    ref: int
    schema: str
    table: str
    columns: _containers.RepeatedCompositeFieldContainer[Column]
    def __init__(self, ref: _Optional[int] = ..., schema: _Optional[str] = ..., table: _Optional[str] = ..., columns: _Optional[_Iterable[_Union[Column, _Mapping]]] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("operation", "table_ref", "position", "sequence", "commit_time_us", "transaction_id", "before", "after")
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    TABLE_REF_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    COMMIT_TIME_US_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    BEFORE_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    operation: Operation
    table_ref: int
    position: int
    sequence: int
    commit_time_us: int
    transaction_id: int
    before: bytes
    after: bytes
    def __init__(self, operation: _Optional[_Union[Operation, str]] = ..., table_ref: _Optional[int] = ..., position: _Optional[int] = ..., sequence: _Optional[int] = ..., commit_time_us: _Optional[int] = ..., transaction_id: _Optional[int] = ..., before: _Optional[bytes] = ..., after: _Optional[bytes] = ...) -> None: ...

class EventBatch(_message.Message):
    __slots__ = ("batch_id", "pipeline_id", "partition", "tables", "events", "trace_context", "source_database")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_ID_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_DATABASE_FIELD_NUMBER: _ClassVar[int]
    batch_id: int
    pipeline_id: str
    partition: str
    tables: _containers.RepeatedCompositeFieldContainer[TableSchema]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    trace_context: _containers.ScalarMap[str, str]
    source_database: str
    def __init__(self, batch_id: _Optional[int] = ..., pipeline_id: _Optional[str] = ..., partition: _Optional[str] = ..., tables: _Optional[_Iterable[_Union[TableSchema, _Mapping]]] = ..., events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., trace_context: _Optional[_Mapping[str, str]] = ..., source_database: _Optional[str] = ...) -> None: ...
