"""What a webhook receiver should hold, for e2e tests: the source tables as the JSON values
the sink sends (docs/types.md), keyed like `WebhookReceiver.state()`, and the row-by-row
differences between the two."""

from __future__ import annotations

import json
from typing import Any

import psycopg

from adapters.webhook.payload import jsonable
from tests.support.workload import TABLES


def source_state(dsn: str) -> dict[str, dict[str, dict[str, Any]]]:
    """The source tables as JSON values (docs/types.md), keyed like the receiver's state."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    with psycopg.connect(dsn) as conn:
        for table in TABLES:
            cur = conn.execute(f"SELECT * FROM {table}")
            names = [d.name for d in cur.description or []]
            rows: dict[str, dict[str, Any]] = {}
            for values in cur.fetchall():
                row = {n: jsonable(v) for n, v in zip(names, values, strict=True)}
                rows[json.dumps({"id": row["id"]}, sort_keys=True)] = row
            out[table] = rows
    return out


def differences(
    source: dict[str, Any], received: dict[str, Any], skip: frozenset[str] = frozenset()
) -> list[str]:
    """One line per key whose row differs between source and receiver; keys in `skip` are
    left out (e.g. poisoned keys whose changes were dead-lettered)."""
    problems = []
    for table in TABLES:
        src, got = source.get(table, {}), received.get(table, {})
        for key in (src.keys() | got.keys()) - skip:
            if src.get(key) != got.get(key):
                problems.append(f"{table} {key}: source {src.get(key)} received {got.get(key)}")
    return problems
