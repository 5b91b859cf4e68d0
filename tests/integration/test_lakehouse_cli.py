"""`cdc lakehouse` against a real SQL catalog and warehouse the Iceberg sink wrote:
snapshots (text and JSON), time travel by id and by time, rollback (asks, --yes), compact,
expire, and its errors (exit 2 naming the option)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import yaml

from adapters.iceberg.writer import IcebergSinkWriter
from services.cli.main import main
from tests.support.iceberg import ORDERS, Source, row, settings


@pytest.fixture
def lake(tmp_path: Path) -> tuple[Path, list[int], list[int]]:
    """Three commits of the sink to public.orders; the pipeline file naming that sink;
    the snapshot ids and the times (ms) between the commits."""
    loop = asyncio.new_event_loop()
    w = IcebergSinkWriter(settings(tmp_path), "it", "lake")
    loop.run_until_complete(w.start())
    s = Source()
    marks: list[int] = []
    for n in range(3):
        events = s.events(*[("u", ORDERS, row(i, qty=n)) for i in range(1, 4 + n)])
        loop.run_until_complete(w.write(s.batch_of(events)))
        loop.run_until_complete(w.flush())
        time.sleep(0.02)
        marks.append(int(time.time() * 1000))
        time.sleep(0.02)
    ids = [sn.snapshot_id for sn in w.tables["public.orders"].table.snapshots()]
    loop.run_until_complete(w.stop())
    loop.close()
    sink = settings(tmp_path).model_dump(exclude_none=True)
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(
        yaml.safe_dump(
            {
                "pipeline_id": "it",
                "source": {"database": "shop", "tables": ["public.orders", "public.items"]},
                "sinks": [{"sink_id": "lake", "sink_type": "iceberg", "iceberg": sink}],
            }
        )
    )
    return pipeline, ids, marks


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_snapshots_query_and_time_travel(lake, capsys) -> None:
    pipeline, ids, marks = lake
    base = [str(pipeline), "--sink-id", "lake", "--table", "public.orders"]
    code, out, _ = cli(capsys, "lakehouse", "snapshots", *base, "--json")
    assert code == 0
    snaps = [json.loads(line) for line in out.splitlines()]
    assert [s["snapshot_id"] for s in snaps] == ids
    assert [s["current"] for s in snaps] == [False, False, True]
    assert all(s["operation"] in ("append", "overwrite") and s["timestamp_ms"] for s in snaps)
    positions = [int(s["positions"]["slot"].split("/")[0]) for s in snaps]
    assert positions == sorted(positions) and len(set(positions)) == 3
    code, out, _ = cli(capsys, "lakehouse", "snapshots", *base)
    assert code == 0 and out.splitlines()[0] == "table cdc.public_orders"
    assert sum(line.startswith("*") for line in out.splitlines()) == 1
    # Time travel: the first snapshot by id, the second by time.
    code, out, _ = cli(capsys, "lakehouse", "query", *base, "--snapshot-id", str(ids[0]), "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and sorted(r["id"] for r in rows) == [1, 2, 3]
    assert {r["qty"] for r in rows} == {0}
    code, out, _ = cli(capsys, "lakehouse", "query", *base, "--as-of", str(marks[1]), "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and sorted(r["id"] for r in rows) == [1, 2, 3, 4]
    assert {r["qty"] for r in rows} == {1}
    code, out, _ = cli(capsys, "lakehouse", "query", *base)
    assert code == 0 and "(5 rows, snapshot current)" in out
    code, _, err = cli(capsys, "lakehouse", "query", *base, "--as-of", "1000")
    assert code == 1 and "had no snapshot yet" in err


def test_rollback_asks_unless_yes(lake, capsys, monkeypatch) -> None:
    pipeline, ids, _ = lake
    base = [str(pipeline), "--sink-id", "lake", "--table", "public.orders"]
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    code, _, err = cli(capsys, "lakehouse", "rollback", *base, "--snapshot-id", str(ids[0]))
    assert code == 1 and "--yes" in err
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    code, out, _ = cli(capsys, "lakehouse", "rollback", *base, "--snapshot-id", str(ids[0]))
    assert code == 1 and "cancelled" in out
    code, out, _ = cli(
        capsys, "lakehouse", "rollback", *base, "--snapshot-id", str(ids[0]), "--yes"
    )
    assert code == 0 and f"snapshot {ids[0]} is current" in out
    code, out, _ = cli(capsys, "lakehouse", "query", *base, "--json")
    assert sorted(json.loads(line)["id"] for line in out.splitlines()) == [1, 2, 3]
    code, out, _ = cli(capsys, "lakehouse", "snapshots", *base, "--json")
    current = [json.loads(line) for line in out.splitlines() if json.loads(line)["current"]]
    assert [c["snapshot_id"] for c in current] == [ids[0]]


def test_compact_and_expire_on_demand(lake, capsys) -> None:
    pipeline, _ids, _ = lake
    base = [str(pipeline), "--sink-id", "lake", "--table", "public.orders"]
    code, out, _ = cli(capsys, "lakehouse", "compact", *base)
    assert code == 0 and "files 5 -> 1" in out  # 3 data files + 2 delete files
    code, out, _ = cli(
        capsys, "lakehouse", "expire", *base, "--older-than-seconds", "0", "--retain-last", "1"
    )
    assert code == 0 and "3 snapshots expired" in out
    code, out, _ = cli(capsys, "lakehouse", "query", *base, "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert sorted(r["id"] for r in rows) == [1, 2, 3, 4, 5] and {r["qty"] for r in rows} == {2}


def test_errors_exit_2_naming_the_option(lake, capsys) -> None:
    pipeline, _, _ = lake
    code, _, err = cli(capsys, "lakehouse", "snapshots", str(pipeline), "--sink-id", "nope")
    assert code == 2 and "--sink-id" in err
    # Two tables in the namespace would need --table; here only one was written.
    code, out, _ = cli(capsys, "lakehouse", "snapshots", str(pipeline), "--sink-id", "lake")
    assert code == 0 and "cdc.public_orders" in out
    code, _, err = cli(
        capsys,
        "lakehouse",
        "snapshots",
        str(pipeline),
        "--sink-id",
        "lake",
        "--table",
        "public.items",
    )
    assert code == 2 and "no Iceberg table cdc.public_items" in err
