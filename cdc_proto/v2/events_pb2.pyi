from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ColumnEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COLUMN_ENCODING_UNSPECIFIED: _ClassVar[ColumnEncoding]
    COLUMN_ENCODING_POSTGRES_TEXT: _ClassVar[ColumnEncoding]
    COLUMN_ENCODING_ARROW: _ClassVar[ColumnEncoding]
COLUMN_ENCODING_UNSPECIFIED: ColumnEncoding
COLUMN_ENCODING_POSTGRES_TEXT: ColumnEncoding
COLUMN_ENCODING_ARROW: ColumnEncoding

class Column(_message.Message):
    __slots__ = ("name", "logical_type", "source_type", "is_key", "postgres_type_oid")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LOGICAL_TYPE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TYPE_FIELD_NUMBER: _ClassVar[int]
    IS_KEY_FIELD_NUMBER: _ClassVar[int]
    POSTGRES_TYPE_OID_FIELD_NUMBER: _ClassVar[int]
    name: str
    logical_type: str
    source_type: str
    is_key: bool
    postgres_type_oid: int
    def __init__(self, name: _Optional[str] = ..., logical_type: _Optional[str] = ..., source_type: _Optional[str] = ..., is_key: _Optional[bool] = ..., postgres_type_oid: _Optional[int] = ...) -> None: ...

class TableBlock(_message.Message):
    __slots__ = ("schema", "table", "columns", "encoding", "records", "rows")
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    schema: str
    table: str
    columns: _containers.RepeatedCompositeFieldContainer[Column]
    encoding: ColumnEncoding
    records: bytes
    rows: int
    def __init__(self, schema: _Optional[str] = ..., table: _Optional[str] = ..., columns: _Optional[_Iterable[_Union[Column, _Mapping]]] = ..., encoding: _Optional[_Union[ColumnEncoding, str]] = ..., records: _Optional[bytes] = ..., rows: _Optional[int] = ...) -> None: ...

class EventBatch(_message.Message):
    __slots__ = ("batch_id", "pipeline_id", "lanes", "blocks", "trace_context", "source_database", "events")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_ID_FIELD_NUMBER: _ClassVar[int]
    LANES_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_DATABASE_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    batch_id: int
    pipeline_id: str
    lanes: _containers.RepeatedScalarFieldContainer[str]
    blocks: _containers.RepeatedCompositeFieldContainer[TableBlock]
    trace_context: _containers.ScalarMap[str, str]
    source_database: str
    events: int
    def __init__(self, batch_id: _Optional[int] = ..., pipeline_id: _Optional[str] = ..., lanes: _Optional[_Iterable[str]] = ..., blocks: _Optional[_Iterable[_Union[TableBlock, _Mapping]]] = ..., trace_context: _Optional[_Mapping[str, str]] = ..., source_database: _Optional[str] = ..., events: _Optional[int] = ...) -> None: ...
