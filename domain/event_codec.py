"""A change as a JSON-able document and back, losslessly: how dead-letter stores keep the
change they could not deliver so that `cdc dlq replay` can deliver exactly that change.

Rows keep PostgreSQL's text form (strings, None for NULL); an unchanged TOASTed value is
``{"$unchanged": true}`` so it is never taken for NULL. The table's shape goes with the
change (a replay must not depend on the table still having it).
"""

from __future__ import annotations

from typing import Any

from domain.events import UNCHANGED, Column, Operation, Position, SourceEvent, TableSchema, TextRow

_UNCHANGED_MARK = {"$unchanged": True}


def _row_doc(row: TextRow | None) -> list[Any] | None:
    if row is None:
        return None
    return [_UNCHANGED_MARK if v is UNCHANGED else v for v in row]


def _row_of(doc: list[Any] | None) -> TextRow | None:
    if doc is None:
        return None
    return tuple(UNCHANGED if isinstance(v, dict) and v.get("$unchanged") else v for v in doc)


def event_to_doc(event: SourceEvent) -> dict[str, Any]:
    table = event.table
    return {
        "op": event.operation.value,
        "schema": table.schema,
        "table": table.table,
        "columns": [
            [c.name, c.type_oid, c.type_name, c.is_key, c.logical_type] for c in table.columns
        ],
        "position": [event.position.major, event.position.minor],
        "before": _row_doc(event.before),
        "after": _row_doc(event.after),
        "commit_time_us": event.commit_time_us,
        "transaction_id": event.transaction_id,
        "source_database": event.source_database,
    }


def event_from_doc(doc: dict[str, Any]) -> SourceEvent:
    columns = tuple(
        Column(str(name), int(oid), str(type_name), bool(is_key), str(logical))
        for name, oid, type_name, is_key, logical in doc["columns"]
    )
    major, minor = doc["position"]
    return SourceEvent(
        Operation(doc["op"]),
        TableSchema(doc["schema"], doc["table"], columns),
        Position(int(major), int(minor)),
        before=_row_of(doc.get("before")),
        after=_row_of(doc.get("after")),
        commit_time_us=int(doc.get("commit_time_us") or 0),
        transaction_id=int(doc.get("transaction_id") or 0),
        source_database=str(doc.get("source_database") or ""),
    )
