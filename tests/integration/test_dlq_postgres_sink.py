"""`cdc dlq` on the PostgreSQL sink's own dead letters (`<target_schema>._cdc_dead_letters`,
written in the sink's transaction): listed with the transport's, replayed once the target
accepts them (a column widened by the operator)."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import psycopg
import yaml

from adapters.config import load_pipeline, load_platform
from domain.events import Column, Operation, Position, SourceEvent, TableSchema
from services import registry
from services.wire import decode_batch, encode_batch
from tests.support.pipeline import REPO, cdc_argv

ITEMS = TableSchema(
    "public", "items", (Column("id", 20, "bigint", is_key=True), Column("name", 25, "text"))
)


def cdc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cdc_argv(*args), cwd=REPO, capture_output=True, text=True, timeout=120)


def test_postgres_sink_dead_letters_are_listed_and_replayed(pg: Any, tmp_path: Path) -> None:
    source, target = pg.new_database("dlqsrc"), pg.new_database("dlqdst")
    with psycopg.connect(pg.dsn(source), autocommit=True) as conn:
        conn.execute("CREATE TABLE public.items (id bigint PRIMARY KEY, name text)")
    with psycopg.connect(pg.dsn(target), autocommit=True) as conn:
        # An operator-made target whose column is too narrow for one value.
        conn.execute("CREATE TABLE public.items (id bigint PRIMARY KEY, name varchar(3))")
    pipeline_file, platform_file = tmp_path / "pipeline.yaml", tmp_path / "platform.yaml"
    pipeline_file.write_text(
        yaml.safe_dump(
            {
                "pipeline_id": "pgdlq",
                "source": {
                    "host": pg.host,
                    "port": pg.port,
                    "database": source,
                    "tables": ["public.items"],
                },
                "sinks": [
                    {
                        "sink_id": "replica",
                        "sink_type": "postgres",
                        "postgres": {"host": pg.host, "port": pg.port, "database": target},
                    }
                ],
            }
        )
    )
    platform_file.write_text("transport_mode: direct\n")
    platform = load_platform(platform_file)
    pipeline = load_pipeline(pipeline_file, platform=platform)
    writer = registry.build_postgres_writer(pipeline, pipeline.sinks[0], platform)

    async def write() -> Any:
        await writer.start()
        try:
            events = [
                SourceEvent(Operation.CREATE, ITEMS, Position(10, 1), after=("1", "ab")),
                SourceEvent(Operation.CREATE, ITEMS, Position(10, 2), after=("2", "too long")),
            ]
            return await writer.write(decode_batch(encode_batch(1, "pgdlq", "slot", events)))
        finally:
            await writer.stop()

    result = asyncio.run(write())
    assert (result.written, result.dead_lettered) == (1, 1)
    args = (str(pipeline_file), "--platform-config", str(platform_file))
    listed = cdc("dlq", "list", *args, "--json")
    assert listed.returncode == 0, listed.stderr
    letters = [json.loads(line) for line in listed.stdout.splitlines()]
    assert len(letters) == 1
    letter = letters[0]
    assert (letter["sink_id"], letter["table"], letter["key"]) == (
        "replica",
        "public.items",
        {"id": 2},
    )
    assert letter["after"] == {"id": 2, "name": "too long"}
    assert "too long" in letter["error"] and "_cdc_dead_letters" in letter["location"]

    refused = cdc("dlq", "replay", *args, "--all")  # not fixed yet: stays a dead letter
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert len(cdc("dlq", "list", *args, "--json").stdout.splitlines()) == 1

    with psycopg.connect(pg.dsn(target), autocommit=True) as conn:
        conn.execute("ALTER TABLE public.items ALTER COLUMN name TYPE text")
    replay = cdc("dlq", "replay", *args, "--sink-id", "replica", "--all")
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert "replayed 1 dead letter(s)" in replay.stdout
    with psycopg.connect(pg.dsn(target)) as conn:
        rows = conn.execute("SELECT id, name FROM public.items ORDER BY id").fetchall()
    assert rows == [(1, "ab"), (2, "too long")]
    assert cdc("dlq", "list", *args, "--json").stdout == ""
    unknown = cdc("dlq", "list", *args, "--sink-id", "nope")
    assert unknown.returncode == 2 and "no such sink" in unknown.stderr
