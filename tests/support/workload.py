"""A deterministic mixed workload on two tables: inserts, updates, deletes, one big transaction."""

from __future__ import annotations

import random
import threading
from typing import Any

import psycopg

TABLES = ("public.orders", "public.customers")

DDL = """
CREATE TABLE public.orders (
    id integer PRIMARY KEY,
    customer_id bigint,
    amount numeric(12, 2),
    note text,
    placed_at timestamptz DEFAULT now(),
    paid boolean DEFAULT false
);
CREATE TABLE public.customers (
    id bigint PRIMARY KEY,
    name text NOT NULL,
    profile jsonb,
    token uuid DEFAULT gen_random_uuid(),
    avatar bytea
);
"""


def create_tables(dsn: str, seed_rows: int = 0) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(DDL)
    if seed_rows:
        seed_customers(dsn, seed_rows)


def seed_customers(dsn: str, rows: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO public.customers (id, name, profile)"
            " SELECT g, 'seed ' || g, jsonb_build_object('n', g) FROM generate_series(1, %s) g",
            (rows,),
        )


def run_workload(
    dsn: str,
    changes: int = 10_000,
    big_transaction: int = 5_000,
    seed: int = 7,
    on_progress: Any = None,
    stop: threading.Event | None = None,
) -> int:
    """Apply `changes` row changes; returns how many were made. The big transaction inserts
    `big_transaction` orders at once; the rest are small transactions of 1-20 changes."""
    rng = random.Random(seed)
    done = 0
    next_order = 1_000_000
    next_customer = 1_000_000
    with psycopg.connect(dsn, autocommit=False) as conn:
        with conn.transaction():
            conn.execute(
                "INSERT INTO public.orders (id, customer_id, amount, note)"
                " SELECT 500000 + g, g %% 100, (g * 1.25)::numeric(12,2), repeat('x', g %% 50)"
                " FROM generate_series(1, %s) g",
                (big_transaction,),
            )
        done += big_transaction
        while done < changes:
            if stop is not None and stop.is_set():
                break
            with conn.transaction():
                for _ in range(rng.randint(1, 20)):
                    kind = rng.random()
                    if kind < 0.45:
                        next_order += 1
                        conn.execute(
                            "INSERT INTO public.orders (id, customer_id, amount, note, paid)"
                            " VALUES (%s, %s, %s, %s, %s)",
                            (
                                next_order,
                                rng.randint(1, 500),
                                rng.randint(1, 10**6) / 100,
                                f"order\t{next_order}\nline2 \\ end"
                                if rng.random() < 0.1
                                else None,
                                rng.random() < 0.5,
                            ),
                        )
                    elif kind < 0.6:
                        next_customer += 1
                        conn.execute(
                            "INSERT INTO public.customers (id, name, profile, avatar)"
                            " VALUES (%s, %s, %s, %s)",
                            (
                                next_customer,
                                f"customer {next_customer} é",
                                psycopg.types.json.Jsonb(
                                    {"tier": rng.randint(1, 3), "tags": ["a"]}
                                ),
                                bytes(rng.randrange(256) for _ in range(8)),
                            ),
                        )
                    elif kind < 0.85:
                        conn.execute(
                            "UPDATE public.orders SET amount = amount + 1, paid = NOT paid"
                            " WHERE id = (SELECT id FROM public.orders"
                            " ORDER BY id OFFSET %s LIMIT 1)",
                            (rng.randint(0, 4000),),
                        )
                    else:
                        conn.execute(
                            "DELETE FROM public.orders WHERE id = (SELECT id FROM public.orders"
                            " ORDER BY id OFFSET %s LIMIT 1)",
                            (rng.randint(0, 4000),),
                        )
                    done += 1
            if on_progress is not None:
                on_progress(done)
    return done
