"""Tables without a primary key, generated columns and same-named tables of two schemas,
through real `cdc` stages (ingest + sink processes talking gRPC) and real PostgreSQL.

A table without a key lands in `<table>_changes`, one row per change, snapshot and stream
alike (docs/types.md, "What each sink does"); nothing is merged and no second table is made.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from tests.support.pipeline import (
    Stage,
    pipeline_with_ddl,
    running_stages,
    stage_logs,
    table_rows,
    wait_until,
)

KEYLESS_DDL = """
CREATE TABLE public.t (a int, b text);
ALTER TABLE public.t REPLICA IDENTITY FULL;
INSERT INTO public.t VALUES (1, 'a'), (1, 'a'), (2, 'b');
CREATE TABLE public.events (a int, b text);  -- REPLICA IDENTITY DEFAULT, no key
INSERT INTO public.events VALUES (1, 'x'), (1, 'x');
"""


def change_log(dsn: str, table: str) -> list[tuple[Any, ...]]:
    """(op, a, b, before) of every row of a change log, in stream order."""
    with psycopg.connect(dsn) as conn:
        try:
            return conn.execute(
                f"SELECT _op, a, b, _before FROM {table} ORDER BY _position_major, _position_minor"
            ).fetchall()
        except psycopg.errors.UndefinedTable:
            return []


def log_events(stage: Stage, event: str) -> list[dict[str, Any]]:
    out = []
    for line in stage.log_path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == event:
            out.append(record)
    return out


def test_keyless_tables_keep_every_change_in_the_change_log(pg: Any, tmp_path: Path) -> None:
    tables = ["public.t", "public.events"]
    source_dsn, replica_dsn, files = pipeline_with_ddl(pg, tmp_path, KEYLESS_DDL, tables)
    with (
        psycopg.connect(source_dsn, autocommit=True) as src,
        running_stages(files, tmp_path) as (ingest, sinks),
    ):
        stages = (ingest, *sinks.values())
        wait_until(
            lambda: (
                len(change_log(replica_dsn, "public.t_changes")) == 3
                and len(change_log(replica_dsn, "public.events_changes")) == 2
            ),
            60,
            "snapshot in the change logs\n" + stage_logs(*stages),
        )
        # REPLICA IDENTITY FULL: updates and deletes carry the whole old row.
        src.execute("UPDATE public.t SET b = 'upd' WHERE a = 2")
        src.execute(
            "DELETE FROM public.t WHERE ctid = (SELECT ctid FROM public.t WHERE a = 1 LIMIT 1)"
        )
        src.execute("INSERT INTO public.t VALUES (7, 'dup')")
        src.execute("INSERT INTO public.t VALUES (7, 'dup')")
        # REPLICA IDENTITY DEFAULT without a key: only inserts are possible at the source.
        src.execute("INSERT INTO public.events VALUES (5, 'y'), (5, 'y')")
        for statement in (
            "UPDATE public.events SET b = 'no' WHERE a = 5",
            "DELETE FROM public.events WHERE a = 1",
        ):
            with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
                src.execute(statement)
        src.execute("INSERT INTO public.events VALUES (6, 'z')")
        wait_until(
            lambda: (
                len(change_log(replica_dsn, "public.t_changes")) == 7
                and len(change_log(replica_dsn, "public.events_changes")) == 5
            ),
            60,
            "changes in the change logs\n" + stage_logs(*stages),
        )
        assert change_log(replica_dsn, "public.t_changes") == [
            ("r", 1, "a", None),
            ("r", 1, "a", None),
            ("r", 2, "b", None),
            ("u", 2, "upd", {"a": "2", "b": "b"}),
            ("d", 1, "a", None),
            ("c", 7, "dup", None),
            ("c", 7, "dup", None),
        ]
        assert change_log(replica_dsn, "public.events_changes") == [
            ("r", 1, "x", None),
            ("r", 1, "x", None),
            ("c", 5, "y", None),
            ("c", 5, "y", None),
            ("c", 6, "z", None),
        ]
        # The change log is the only target: no upsert table beside it.
        with psycopg.connect(replica_dsn) as dst:
            assert dst.execute(
                "SELECT to_regclass('public.t'), to_regclass('public.events')"
            ).fetchone() == (None, None)
        # The start-up warning names the table without identity, and only that one.
        warnings = log_events(ingest, "source.keyless_table_no_identity")
        assert [(w["table"], w["replica_identity"]) for w in warnings] == [
            ("public.events", "default")
        ]
        assert warnings[0]["fix"] == "ALTER TABLE public.events REPLICA IDENTITY FULL"


GENERATED_DDL = """
CREATE SCHEMA archive;
CREATE TABLE public.priced (
    id int PRIMARY KEY,
    net numeric(10,2),
    gross numeric(10,2) GENERATED ALWAYS AS (net * 1.2) STORED,
    label text GENERATED ALWAYS AS ('#' || id) VIRTUAL
);
INSERT INTO public.priced (id, net) VALUES (1, 10), (2, 20);
CREATE TABLE archive.priced (id int PRIMARY KEY, net numeric(10,2));
INSERT INTO archive.priced VALUES (1, 99);
"""


def test_stored_generated_columns_arrive_and_same_named_tables_stay_apart(
    pg: Any, tmp_path: Path
) -> None:
    with pg.connect() as conn:
        version = conn.execute("SHOW server_version_num").fetchone()
    if int(version[0]) < 180000:
        pytest.skip("publish_generated_columns needs PostgreSQL 18")
    tables = ["public.priced", "archive.priced"]
    source_dsn, replica_dsn, files = pipeline_with_ddl(pg, tmp_path, GENERATED_DDL, tables)
    pipeline = yaml.safe_load(files.pipeline.read_text())
    pipeline["sinks"][0]["postgres"]["table_name_template"] = "{schema}_{table}"
    files.pipeline.write_text(yaml.safe_dump(pipeline, sort_keys=False))

    def replica() -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        return (
            table_rows(replica_dsn, "public.public_priced"),
            table_rows(replica_dsn, "public.archive_priced"),
        )

    with (
        psycopg.connect(source_dsn, autocommit=True) as src,
        running_stages(files, tmp_path) as (ingest, sinks),
    ):
        stages = (ingest, *sinks.values())
        src.execute("INSERT INTO public.priced (id, net) VALUES (3, 30)")
        src.execute("UPDATE public.priced SET net = 11 WHERE id = 1")
        src.execute("UPDATE archive.priced SET net = 98 WHERE id = 1")
        expected = (
            src.execute("SELECT id, net, gross FROM public.priced ORDER BY id").fetchall(),
            [(1, 98)],
        )
        assert [r[2] for r in expected[0]] == [Decimal("13.20"), Decimal("24.00"), Decimal("36.00")]
        wait_until(lambda: replica() == expected, 60, "replica = source\n" + stage_logs(*stages))
        warnings = log_events(ingest, "source.generated_columns_not_replicated")
        assert [(w["table"], w["columns"]) for w in warnings] == [("public.priced", ["label"])]
    # The stored generated column is a plain column in the sink; the virtual one is absent.
    with psycopg.connect(replica_dsn) as dst:
        columns = dst.execute(
            "SELECT attname, attgenerated FROM pg_attribute WHERE attnum > 0"
            " AND attrelid = 'public.public_priced'::regclass ORDER BY attnum"
        ).fetchall()
    assert columns == [("id", ""), ("net", ""), ("gross", "")]
