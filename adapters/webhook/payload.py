"""The webhook request body: changes as JSON events, values as JSON by their type
(docs/types.md "JSON values", docs/webhooks.md)."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import math
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from domain.events import UNCHANGED, Column, Operation, SourceEvent, TableSchema
from domain.pgtypes import converter_for, to_python
from domain.types import LogicalType


def event_id(pipeline_id: str, lane: str, event: SourceEvent) -> str:
    """The change's idempotency key: the same for every delivery of the same change
    (retries, restarts, replays), different for any other change of the pipeline."""
    p = event.position
    digest = hashlib.sha256(f"{pipeline_id}\x1f{lane}\x1f{p.major}\x1f{p.minor}".encode())
    return "evt_" + digest.hexdigest()[:32]


def request_id(event_ids: Sequence[str]) -> str:
    """`webhook-id` of a request: the same across its retries (same events)."""
    return "msg_" + hashlib.sha256("\x1f".join(event_ids).encode()).hexdigest()[:32]


def _float(value: float) -> float | str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def jsonable(value: Any) -> Any:
    """A Python value of `domain.pgtypes.to_python` as JSON: exact numbers as strings,
    times as ISO 8601, bytes as base64."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return _float(value)
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
        return value.isoformat()
    if isinstance(value, date | time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return _iso_duration(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, uuid.UUID | ipaddress.IPv4Interface | ipaddress.IPv6Interface):
        return str(value)
    return str(value)


def _iso_duration(delta: timedelta) -> str:
    """ISO 8601 duration in days and seconds (a PostgreSQL interval without months)."""
    sign = "-" if delta < timedelta(0) else ""
    delta = abs(delta)
    seconds = delta.seconds + delta.microseconds / 1_000_000
    text = f"{seconds:f}".rstrip("0").rstrip(".") if seconds else "0"
    return f"{sign}P{delta.days}DT{text}S"


def _by_logical(logical: LogicalType, text: str) -> Any:
    """Values of a non-PostgreSQL source (no type OID): by the logical type only."""
    kind = logical.kind
    if kind in ("int", "uint"):
        return int(text)
    if kind == "float":
        return _float(float(text))
    if kind == "bool":
        return text.lower() in ("t", "true", "1")
    if kind == "json":
        return json.loads(text)
    return text


def value_json(column_oid: int, type_name: str, logical: str, text: Any) -> Any:
    if text is None:
        return None
    if column_oid:
        return jsonable(to_python(column_oid, text, type_name))
    if type_name and converter_for(0, type_name) is not None:
        # Another engine's column (a Kafka source): its value comes as the PostgreSQL text of
        # its logical type, and `type_name` is that PostgreSQL type, so it reads the same way.
        return jsonable(to_python(0, text, type_name))
    return _by_logical(LogicalType.parse(logical), text) if logical else text


# PostgreSQL types whose text needs no general conversion (the common ones, for speed):
# numeric's text is already the exact decimal (NaN and Infinity included).
_INT_OIDS = frozenset({20, 21, 23, 26})
_TEXT_OIDS = frozenset({25, 1043, 19, 2950, 1700})  # text, varchar, name, uuid, numeric
_FLOAT_OIDS = frozenset({700, 701})
_JSON_OIDS = frozenset({114, 3802})


def _converter(column: Column) -> Callable[[str], Any]:
    oid, type_name, logical = column.type_oid, column.type_name, column.logical_type
    if oid in _INT_OIDS:
        return int
    if oid in _TEXT_OIDS:
        return str
    if oid == 16:
        return _is_true
    if oid in _FLOAT_OIDS:
        return _float_text
    if oid in _JSON_OIDS:
        return json.loads
    return lambda text: value_json(oid, type_name, logical, text)


def _is_true(text: str) -> bool:
    return text == "t"


def _float_text(text: str) -> float | str:
    return _float(float(text))


_CONVERTERS: dict[TableSchema, tuple[tuple[str, Callable[[str], Any]], ...]] = {}


def _converters(table: TableSchema) -> tuple[tuple[str, Callable[[str], Any]], ...]:
    found = _CONVERTERS.get(table)
    if found is None:
        if len(_CONVERTERS) > 1000:
            _CONVERTERS.clear()
        found = _CONVERTERS[table] = tuple((c.name, _converter(c)) for c in table.columns)
    return found


def _row_json(
    event: SourceEvent, row: Any, lenient: bool
) -> tuple[dict[str, Any] | None, list[str]]:
    if row is None:
        return None, []
    out: dict[str, Any] = {}
    unchanged: list[str] = []
    for (name, convert), value in zip(_converters(event.table), row, strict=False):
        if value is None:
            out[name] = None
        elif value is UNCHANGED:
            unchanged.append(name)
        elif lenient:
            try:
                out[name] = convert(value)
            except ValueError:
                out[name] = value
        else:
            out[name] = convert(value)
    return out, unchanged


def _commit_time(us: int) -> str | None:
    if not us:
        return None
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)
    return moment.isoformat().replace("+00:00", "Z")


def event_json(event_id_: str, event: SourceEvent, *, lenient: bool = False) -> dict[str, Any]:
    """One EVENT of the body (docs/webhooks.md). A value whose text does not parse as its
    type (malformed JSON, a format `to_python` refuses) raises ValueError; `lenient` gives
    its text instead (for showing a dead letter, whose value is often why it is one)."""
    before, _ = _row_json(event, event.before, lenient)
    after, unchanged = _row_json(event, event.after, lenient)
    row = after if after is not None else before
    key_names = event.table.key_columns
    key = {name: row.get(name) for name in key_names} if row is not None else {}
    doc: dict[str, Any] = {
        "id": event_id_,
        "op": event.operation.value,
        "table": event.table.qualified_name,
        "key": key,
        "before": before,
        "after": after,
        "position": str(event.position),
        "commit_time": _commit_time(event.commit_time_us),
        "transaction_id": event.transaction_id or None,
    }
    if unchanged:
        doc["unchanged"] = unchanged
    return doc


def order_key(event: SourceEvent, key_json: dict[str, Any]) -> str:
    """What two requests in flight must not share: the table and the key (a keyless table,
    or a truncate, orders the whole table)."""
    table = event.table.qualified_name
    if event.operation is Operation.TRUNCATE or not key_json:
        return table
    return table + "\x1f" + json.dumps(key_json, sort_keys=True, default=str)


def body_bytes(pipeline_id: str, sink_id: str, events: Sequence[dict[str, Any]]) -> bytes:
    body = {"pipeline_id": pipeline_id, "sink_id": sink_id, "events": list(events)}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
