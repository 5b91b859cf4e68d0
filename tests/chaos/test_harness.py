"""The measuring instruments checked against known damage: a comparison that cannot see a
lost row or a re-applied change would make every scenario pass."""

from __future__ import annotations

import psycopg
from psycopg.types.json import Jsonb

from services.stack.postgres import PostgresServer
from tests.chaos.harness import KEYED_TABLES, check_sink, prepare_sink, prepare_source


def test_check_sink_sees_missing_stale_undeleted_and_reapplied_rows(
    pg_server: PostgresServer,
) -> None:
    source_dsn = prepare_source(pg_server, "selfcheck_src", seed=200)
    sink = prepare_sink(pg_server, "selfcheck_sink")
    with psycopg.connect(source_dsn) as src, psycopg.connect(sink.dsn) as dst:
        for table in KEYED_TABLES:
            rows = [
                tuple(Jsonb(v) if isinstance(v, dict) else v for v in row)
                for row in src.execute(f"SELECT * FROM {table}")
            ]
            marks = ", ".join(["%s"] * len(rows[0]))
            with dst.cursor() as cur:
                cur.executemany(f"INSERT INTO {table} VALUES ({marks})", rows)
        dst.commit()
        clean = check_sink(source_dsn, sink)
        assert (clean.lost, clean.duplicated, clean.regressions) == (0, 0, 0), clean.details
        assert clean.audited == 300
        dst.execute("DELETE FROM public.accounts WHERE id = 1")  # missing
        dst.execute("UPDATE public.transfers SET version = version - 1 WHERE id = 1")  # stale
        dst.execute("UPDATE public.accounts SET version = version WHERE id = 2")  # re-applied
        dst.execute(
            "INSERT INTO public.accounts (id, version, balance) VALUES (99999, 1, 0)"
        )  # a delete that never arrived
        dst.commit()
    damaged = check_sink(source_dsn, sink)
    assert damaged.lost == 3, damaged.details
    assert damaged.duplicated == 1, damaged.details
    assert damaged.regressions == 1, damaged.details
