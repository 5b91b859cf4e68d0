"""The workload: ~200-byte rows; 10k-row transactions, single-row transactions from many
clients, and a steady-rate mode. Every function returns the number of changes it made (rows
affected), so each consumer can be checked against the exact count."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass

import psycopg

TABLE = "public.bench_rows"
START_MARKER = -2
END_MARKER = -1
BULK_TX_ROWS = 10_000
# ~200 bytes a row: 128-char note + bigint/int/status/amount/timestamp.
_ROW_SQL = "repeat(md5({g}::text), 4)"

SCHEMA_SQL = f"""
CREATE TABLE {TABLE} (
    id bigint PRIMARY KEY,
    account integer NOT NULL,
    status text NOT NULL,
    amount numeric(12,2) NOT NULL,
    note text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True)
class BacklogSpec:
    bulk_rows: int  # inserted in 10k-row transactions; half updated, a fifth deleted
    clients: int  # concurrent single-row-transaction clients
    ops_per_client: int


@dataclass(frozen=True)
class SteadySpec:
    rate: int  # changes per second
    seconds: float
    clients: int = 4
    tick: float = 0.02  # each client commits one transaction per tick


def create_schema(dsn: str, publication: str, slot: str) -> None:
    """Table, publication and pgoutput slot, before any change, so the slot holds them all."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA_SQL)
        conn.execute(f"CREATE PUBLICATION {publication} FOR TABLE {TABLE}")
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))


def insert_marker(dsn: str, marker_id: int) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO {TABLE} (id, account, status, amount, note)"
            " VALUES (%s, 0, 'marker', 0, 'marker')",
            (marker_id,),
        )
    return 1


def current_lsn(dsn: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return str(row[0])


def _bulk(conn: psycopg.Connection, spec: BacklogSpec) -> int:
    n = spec.bulk_rows
    made = 0
    for lo in range(1, n + 1, BULK_TX_ROWS):
        hi = min(n, lo + BULK_TX_ROWS - 1)
        cur = conn.execute(
            f"INSERT INTO {TABLE} (id, account, status, amount, note)"
            f" SELECT g, g %% 1000, 'new', (g %% 100000) / 100.0, {_ROW_SQL.format(g='g')}"
            " FROM generate_series(%s::bigint, %s::bigint) g",
            (lo, hi),
        )
        made += cur.rowcount
    for lo in range(1, n // 2 + 1, BULK_TX_ROWS):
        hi = min(n // 2, lo + BULK_TX_ROWS - 1)
        cur = conn.execute(
            f"UPDATE {TABLE} SET status = 'paid', amount = amount + 1, updated_at = now()"
            " WHERE id BETWEEN %s AND %s",
            (lo, hi),
        )
        made += cur.rowcount
    first_del, last_del = n // 2 + 1, n // 2 + n // 5
    for lo in range(first_del, last_del + 1, BULK_TX_ROWS):
        hi = min(last_del, lo + BULK_TX_ROWS - 1)
        made += conn.execute(f"DELETE FROM {TABLE} WHERE id BETWEEN %s AND %s", (lo, hi)).rowcount
    return made


def _single_row_client(dsn: str, spec: BacklogSpec, client: int, out: list[int]) -> None:
    """Autocommit single-row transactions: 50% insert, 35% update, 15% delete."""
    rng = random.Random(1000 + client)
    base = 10_000_000 * (client + 1)
    mine: list[int] = []
    made = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET synchronous_commit = off")
        for i in range(spec.ops_per_client):
            pick = rng.random()
            if pick < 0.15 and mine:
                made += conn.execute(f"DELETE FROM {TABLE} WHERE id = %s", (mine.pop(),)).rowcount
            elif pick < 0.50 and spec.bulk_rows >= 2:
                key = rng.randint(1, spec.bulk_rows // 2)
                made += conn.execute(
                    f"UPDATE {TABLE} SET amount = amount + 1, status = 'single',"
                    " updated_at = now() WHERE id = %s",
                    (key,),
                ).rowcount
            else:
                key = base + i
                made += conn.execute(
                    f"INSERT INTO {TABLE} (id, account, status, amount, note)"
                    f" VALUES (%s, %s, 'new', %s, {_ROW_SQL.format(g='%s')})",
                    (key, key % 1000, (key % 100000) / 100, key),
                ).rowcount
                mine.append(key)
    out[client] = made


def single_row_clients(dsn: str, spec: BacklogSpec) -> int:
    counts = [0] * spec.clients
    threads = [
        threading.Thread(target=_single_row_client, args=(dsn, spec, c, counts))
        for c in range(spec.clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts)


def backlog(dsn: str, spec: BacklogSpec) -> int:
    """Start marker, bulk 10k-row transactions, single-row transactions, end marker."""
    made = insert_marker(dsn, START_MARKER)
    with psycopg.connect(dsn, autocommit=True) as conn:
        made += _bulk(conn, spec)
    made += single_row_clients(dsn, spec)
    return made + insert_marker(dsn, END_MARKER)


@dataclass
class SteadyResult:
    changes: int
    seconds: float
    behind_ticks: int  # ticks a client started late by more than one tick

    @property
    def rate(self) -> float:
        return self.changes / self.seconds if self.seconds else 0.0


def _steady_client(
    dsn: str, spec: SteadySpec, client: int, start: float, out: list[tuple[int, int]]
) -> None:
    """One transaction per tick: 60% inserts, 30% updates, 10% deletes of own rows."""
    rng = random.Random(2000 + client)
    per_tx = max(1, round(spec.rate * spec.tick / spec.clients))
    base = 100_000_000 * (client + 1)
    next_id = base
    live: list[int] = []
    made = behind = 0
    ticks = int(spec.seconds / spec.tick)
    with psycopg.connect(dsn) as conn:
        for tick in range(ticks):
            due = start + tick * spec.tick
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -spec.tick:
                behind += 1
            inserts: list[tuple[int, int, float, int]] = []
            updates: list[tuple[int]] = []
            deletes: list[tuple[int]] = []
            for _ in range(per_tx):
                pick = rng.random()
                if pick < 0.10 and len(live) > per_tx:
                    deletes.append((live.pop(rng.randrange(len(live) // 2)),))
                elif pick < 0.40 and len(live) > per_tx:
                    updates.append((live[rng.randrange(len(live))],))
                else:
                    inserts.append((next_id, next_id % 1000, (next_id % 100000) / 100, next_id))
                    next_id += 1
            with conn.transaction(), conn.cursor() as cur:
                if inserts:
                    cur.executemany(
                        f"INSERT INTO {TABLE} (id, account, status, amount, note)"
                        f" VALUES (%s, %s, 'new', %s, {_ROW_SQL.format(g='%s')})",
                        inserts,
                    )
                    made += len(inserts)
                if updates:
                    # an id may appear twice in one transaction; count statements, not rows
                    cur.executemany(
                        f"UPDATE {TABLE} SET amount = amount + 1, updated_at = now() WHERE id = %s",
                        updates,
                    )
                    made += len(updates)
                if deletes:
                    cur.executemany(f"DELETE FROM {TABLE} WHERE id = %s", deletes)
                    made += len(deletes)
            live.extend(row[0] for row in inserts)
    out[client] = (made, behind)


def steady(dsn: str, spec: SteadySpec) -> SteadyResult:
    """Changes at a fixed rate for spec.seconds, then the end marker."""
    results = [(0, 0)] * spec.clients
    start = time.monotonic() + 0.1
    threads = [
        threading.Thread(target=_steady_client, args=(dsn, spec, c, start, results))
        for c in range(spec.clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    made = sum(r[0] for r in results) + insert_marker(dsn, END_MARKER)
    return SteadyResult(made, elapsed, sum(r[1] for r in results))
