"""Confluent-framed Avro (magic byte 0, 4-byte schema id, Avro body) through a Schema
Registry, decoded with fastavro into Debezium changes (adapters/debezium/envelope.py), which
adapters/debezium/block_builder.py turns into typed Arrow blocks.

Schemas are read with their ``logicalType`` annotations removed, so fastavro hands out
Connect's raw representations (unscaled decimal bytes, day and ms counts) instead of
building a `Decimal` / `date` / `datetime` per value that the column builders would take
apart again.

`SchemaRegistry` is a small client of the Confluent Schema Registry REST API (also served
by Karapace, Apicurio's ccompat API and `services.stack.schema_registry`): schemas by id,
subjects' versions and compatibility checks. Schemas are immutable per id, so they are
cached for the life of the process.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import fastavro

from adapters.debezium.envelope import (
    Change,
    EnvelopeError,
    EnvelopeShape,
    compile_shape,
    read_change,
)
from domain.events import SchemaChange, TableSchema

MAGIC = 0
_HEADER = struct.Struct(">bI")


class RegistryError(RuntimeError):
    """The Schema Registry could not be reached or answered an error (retried: not poison)."""


class SchemaNotFoundError(EnvelopeError):
    """The registry has no schema with a message's id (the message is poison)."""


def frame(schema_id: int, body: bytes) -> bytes:
    """A Confluent wire-format message."""
    return _HEADER.pack(MAGIC, schema_id) + body


def unframe(data: bytes) -> tuple[int, memoryview]:
    if len(data) < _HEADER.size:
        raise EnvelopeError(f"a {len(data)}-byte message is not Confluent-framed Avro")
    magic, schema_id = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise EnvelopeError(f"magic byte {magic}, not the Confluent wire format's 0")
    return schema_id, memoryview(data)[_HEADER.size :]


class SchemaRegistry:
    def __init__(
        self, url: str, auth: tuple[str, str] | None = None, timeout: float = 10.0
    ) -> None:
        parsed = urllib.parse.urlsplit(url)
        self._auth: str | None = None
        if auth is not None:
            self._auth = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        if parsed.username:
            user = urllib.parse.unquote(parsed.username)
            password = urllib.parse.unquote(parsed.password or "")
            self._auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
            netloc = parsed.hostname or ""
            if parsed.port:
                netloc += f":{parsed.port}"
            parsed = parsed._replace(netloc=netloc)
        self.url = urllib.parse.urlunsplit(parsed).rstrip("/")
        self.timeout = timeout
        self._by_id: dict[int, dict[str, Any]] = {}

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Accept", "application/vnd.schemaregistry.v1+json, application/json")
        if data is not None:
            request.add_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        if self._auth:
            request.add_header("Authorization", self._auth)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")[:300]
            if exc.code == 404:
                raise LookupError(f"{path}: {text}") from exc
            raise RegistryError(f"schema registry {method} {path}: HTTP {exc.code} {text}") from exc
        except (OSError, ValueError) as exc:
            raise RegistryError(f"schema registry {self.url} unreachable: {exc}") from exc

    def schema(self, schema_id: int) -> dict[str, Any]:
        """The Avro schema (parsed JSON) registered under `schema_id`."""
        found = self._by_id.get(schema_id)
        if found is None:
            try:
                answer = self._request("GET", f"/schemas/ids/{schema_id}")
            except LookupError as exc:
                raise SchemaNotFoundError(f"schema id {schema_id} is not in the registry") from exc
            found = json.loads(answer["schema"])
            self._by_id[schema_id] = found
        return found

    def register(self, subject: str, schema: Mapping[str, Any]) -> int:
        answer = self._request(
            "POST",
            f"/subjects/{urllib.parse.quote(subject, safe='')}/versions",
            {"schema": json.dumps(schema)},
        )
        return int(answer["id"])

    def versions(self, subject: str) -> list[int]:
        try:
            return [int(v) for v in self._request("GET", f"/subjects/{_q(subject)}/versions")]
        except LookupError:
            return []

    def version(self, subject: str, version: int | str) -> dict[str, Any]:
        """``{"subject", "version", "id", "schema"}`` of one version."""
        answer: dict[str, Any] = self._request("GET", f"/subjects/{_q(subject)}/versions/{version}")
        return answer

    def is_compatible(self, subject: str, version: int, schema: str) -> bool:
        """Whether `schema` is compatible with `version` of `subject` (the registry's rule)."""
        answer = self._request(
            "POST",
            f"/compatibility/subjects/{_q(subject)}/versions/{version}",
            {"schema": schema},
        )
        return bool(answer.get("is_compatible"))


def _q(subject: str) -> str:
    return urllib.parse.quote(subject, safe="")


@dataclass(frozen=True, slots=True)
class Decoded:
    """One message's change (None for a tombstone) and the table shape change it brings."""

    change: Change | None
    schema_change: SchemaChange | None = None


def _without_logical_types(schema: Any) -> Any:
    """`schema` with every ``logicalType`` annotation removed (values read raw)."""
    if isinstance(schema, list):
        return [_without_logical_types(s) for s in schema]
    if isinstance(schema, dict):
        return {k: _without_logical_types(v) for k, v in schema.items() if k != "logicalType"}
    return schema


class TopicDecoder:
    """Decodes the messages of one topic (one source table) into changes, remembering the
    shape of every (key schema id, value schema id) pair it met."""

    def __init__(
        self,
        registry: SchemaRegistry,
        schema_name: str,
        table_name: str,
        source_database: str,
        topic: str | None = None,
    ) -> None:
        self.registry = registry
        self.topic = topic
        self.schema_name = schema_name
        self.table_name = table_name
        self.source_database = source_database
        self._parsed: dict[int, Any] = {}
        self._shapes: dict[tuple[int | None, int], EnvelopeShape] = {}
        self._keyed: dict[int, EnvelopeShape] = {}  # value schema id -> its shape with a key
        self.table: TableSchema | None = None
        self.value_schema_id: int | None = None

    def _reader(self, schema_id: int) -> Any:
        parsed = self._parsed.get(schema_id)
        if parsed is None:
            raw = self.registry.schema(schema_id)
            try:
                parsed = fastavro.parse_schema(_without_logical_types(raw))
            except Exception as exc:  # fastavro raises several types for a bad schema
                raise EnvelopeError(f"schema id {schema_id} is not valid Avro: {exc}") from exc
            self._parsed[schema_id] = parsed
        return parsed

    def _read(self, data: bytes) -> tuple[int, Any]:
        schema_id, body = unframe(data)
        return schema_id, self._read_body(schema_id, body)

    def _read_body(self, schema_id: int, body: memoryview) -> Any:
        parsed = self._reader(schema_id)
        try:
            return fastavro.schemaless_reader(io.BytesIO(body), parsed, None)
        except Exception as exc:  # a truncated or foreign body: several exception types
            raise EnvelopeError(
                f"the body does not decode with schema id {schema_id}: {type(exc).__name__}: {exc}"
            ) from exc

    def _registered_key_id(self) -> int | None:
        """The id of the newest key schema of the topic (Debezium's subject `<topic>-key`);
        None without a topic, or when the table never had a key."""
        if self.topic is None:
            return None
        try:
            return int(self.registry.version(f"{self.topic}-key", "latest")["id"])
        except LookupError:
            return None

    def decode(self, key: bytes | None, value: bytes | None, offset: int) -> Decoded:
        if value is None:
            return Decoded(None)  # a tombstone: log compaction's delete marker
        key_id: int | None = None
        key_body: memoryview | None = None
        if key is not None:
            key_id, key_body = unframe(key)
        value_id, record = self._read(value)
        if not isinstance(record, dict):
            raise EnvelopeError(f"the value (schema id {value_id}) is not a record")
        shape = self._shapes.get((key_id, value_id))
        if shape is None and key_id is None:
            # No key: a truncate of a keyed table (or a table without a key).
            shape = self._keyed.get(value_id)
            if shape is None and record.get("op") == "t":
                # A truncate read before any keyed message (the first after a restart):
                # the table's key is the one the registry holds for the topic's keys.
                key_id = self._registered_key_id()
                if key_id is not None:
                    shape = self._shapes.get((key_id, value_id))
        change = None
        if shape is None:
            key_schema = self.registry.schema(key_id) if key_id is not None else None
            shape = compile_shape(
                self.schema_name, self.table_name, self.registry.schema(value_id), key_schema
            )
            if self.table is not None and shape.table == self.table:
                shape = EnvelopeShape(self.table, shape.builders, shape.mongodb)
            self._shapes[(key_id, value_id)] = shape
            if key_id is not None:
                self._keyed[value_id] = shape
        if shape.table is not self.table:
            change = SchemaChange(self.table, shape.table)
            self.table = shape.table
        self.value_schema_id = value_id
        key_record: Any = None
        if shape.mongodb and key_id is not None and key_body is not None:
            # Only MongoDB's key is read: a relational row carries its key columns itself.
            key_record = self._read_body(key_id, key_body)
            if not isinstance(key_record, dict):
                key_record = None
        return Decoded(read_change(shape, record, key_record, offset), change)
