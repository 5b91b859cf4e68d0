"""The Iceberg sink writer on a real SQL catalog (SQLite) and a local-file warehouse: typed
columns, upsert with position deletes, soft deletes, keyless tables, schema evolution, the
positions in the snapshot summary, time travel, rollback, expiry and compaction."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow.compute as pc
import pytest

from adapters.config.pipeline import IcebergSinkConfig
from adapters.iceberg import maintenance
from adapters.iceberg.table_sink import positions_of
from adapters.iceberg.writer import IcebergSinkWriter
from domain.errors import SinkHaltedError
from domain.events import Column, Operation, Position, SourceEvent, TableSchema
from tests.support.iceberg import LOG, ORDERS, Source, row, settings


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def started(loop: asyncio.AbstractEventLoop, config: IcebergSinkConfig) -> IcebergSinkWriter:
    writer = IcebergSinkWriter(config, "it", "lake")
    loop.run_until_complete(writer.start())
    return writer


def commit(
    loop: asyncio.AbstractEventLoop,
    writer: IcebergSinkWriter,
    s: Source,
    *changes: tuple[str, TableSchema, tuple[str | None, ...]],
) -> None:
    """Write these changes as one batch and flush it: one Iceberg commit."""
    loop.run_until_complete(writer.write(s.batch_of(s.events(*changes))))
    loop.run_until_complete(writer.flush())


def test_upsert_types_deletes_and_positions(
    tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    w = started(loop, settings(tmp_path))
    s = Source()
    first = s.events(*[("c", ORDERS, row(i)) for i in range(1, 6)])
    loop.run_until_complete(w.write(s.batch_of(first)))
    loop.run_until_complete(w.flush())
    changes = s.events(
        ("u", ORDERS, row(2, qty=7)),
        ("d", ORDERS, ("3", None, None, None, None, None)),
        ("u", ORDERS, row(4, qty=8)),
        ("u", ORDERS, row(4, qty=9)),
    )
    result = loop.run_until_complete(w.write(s.batch_of(changes)))
    assert (result.written, result.skipped, result.durable) == (4, 0, False)
    durable = loop.run_until_complete(w.flush())
    assert durable == {"slot": Position(s.major, 0)}
    table = w.tables["public.orders"].table
    data = table.scan().to_arrow().sort_by("id")
    assert data.column("id").to_pylist() == [1, 2, 4, 5]
    assert data.column("qty").to_pylist() == [1, 7, 9, 1]
    assert str(data.schema.field("price").type) == "decimal128(12, 2)"
    assert str(data.column("price")[0].as_py()) == "1.50"
    assert data.column("paid").to_pylist() == [True] * 4
    assert data.column("at")[0].as_py().isoformat() == "2024-05-01T10:00:00+00:00"
    assert set(data.column("_cdc_op").to_pylist()) == {"c", "u"}
    # Deleted and replaced rows were removed with a position delete file, no rewrite.
    summary = table.current_snapshot().summary
    assert summary["added-position-delete-files"] == "1"
    assert positions_of(summary.additional_properties) == {"slot": Position(s.major, 0)}
    # A replayed batch is skipped: after a restart, from the summary.
    loop.run_until_complete(w.stop())
    again = started(loop, settings(tmp_path))
    replay = loop.run_until_complete(again.write(s.batch_of(changes)))
    assert (replay.written, replay.skipped) == (0, 4)
    loop.run_until_complete(again.flush())
    assert again.tables["public.orders"].table.scan().to_arrow().num_rows == 4
    loop.run_until_complete(again.stop())


def test_soft_delete_keeps_the_row_flagged(tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
    w = started(loop, settings(tmp_path, soft_delete=True))
    s = Source()
    commit(loop, w, s, ("c", ORDERS, row(1)), ("c", ORDERS, row(2)))
    commit(loop, w, s, ("d", ORDERS, ("1", None, None, None, None, None)))
    data = w.tables["public.orders"].table.scan().to_arrow().sort_by("id")
    assert data.column("id").to_pylist() == [1, 2]
    assert data.column("_cdc_deleted").to_pylist() == [True, False]
    assert data.column("note").to_pylist() == ["n", "n"]  # the stored values are kept
    loop.run_until_complete(w.stop())


def test_keyless_table_in_upsert_mode_is_appended(
    tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    w = started(loop, settings(tmp_path))
    s = Source()
    commit(loop, w, s, ("c", LOG, ("a", "1")), ("c", LOG, ("a", "1")))
    sink = w.tables["public.log"]
    assert not sink.upsert
    assert sink.table.scan().to_arrow().num_rows == 2
    loop.run_until_complete(w.stop())


def test_added_column_widening_and_unsafe_change(
    tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    w = started(loop, settings(tmp_path))
    s = Source()
    loop.run_until_complete(w.write(s.batch_of(s.events(("c", ORDERS, row(1))))))
    wider = TableSchema(
        "public",
        "orders",
        (
            ORDERS.columns[0],
            Column("qty", 20, "bigint"),
            *ORDERS.columns[2:],
            Column("color", 25, "text"),
        ),
    )
    commit(loop, w, s, ("c", wider, (*row(2, qty=2**40), "red")))
    data = w.tables["public.orders"].table.scan().to_arrow().sort_by("id")
    assert data.column("color").to_pylist() == [None, "red"]
    assert data.column("qty").to_pylist() == [1, 2**40]
    unsafe = TableSchema(
        "public",
        "orders",
        (ORDERS.columns[0], ORDERS.columns[1], Column("price", 25, "text"), *ORDERS.columns[3:]),
    )
    with pytest.raises(SinkHaltedError, match="column 'price' changed from decimal"):
        loop.run_until_complete(w.write(s.batch_of(s.events(("c", unsafe, row(3))))))
    loop.run_until_complete(w.stop())


def test_partition_by_transforms(tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
    w = started(loop, settings(tmp_path, partition_by=["day(at)", "bucket(4, id)"]))
    s = Source()
    commit(loop, w, s, *[("c", ORDERS, row(i)) for i in range(1, 41)])
    commit(loop, w, s, *[("u", ORDERS, row(i, qty=5)) for i in range(1, 41, 2)])
    table = w.tables["public.orders"].table
    assert [f.name for f in table.spec().fields] == ["at_day", "id_bucket"]
    data = table.scan().to_arrow()
    assert data.num_rows == 40
    assert sorted(data.column("id").to_pylist()) == list(range(1, 41))
    assert pc.sum(data.column("qty")).as_py() == 20 * 5 + 20
    # Compaction of a partitioned table works per partition: every partition with delete
    # files or several data files is rewritten, content kept.
    before = maintenance.file_counts(table)
    assert before[1] > 0
    result = maintenance.compact(table)
    table.refresh()
    after = maintenance.file_counts(table)
    assert after[1] == 0 and after[0] <= before[0] and result.files_after < result.files_before
    assert table.scan().to_arrow().sort_by("id").select(["id", "qty"]) == data.sort_by("id").select(
        ["id", "qty"]
    )
    loop.run_until_complete(w.stop())


def test_a_crash_between_writing_and_committing_leaves_nothing_visible(
    tmp_path: Path, loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process dying after the data and delete files are written but before the catalog
    commit (stood in for by an exception at that point): no partial data is visible, the
    replayed batch applies once after a restart, and the files left behind are orphans that
    maintenance removes."""
    import adapters.iceberg.table_sink as table_sink
    from domain.errors import SinkUnavailableError

    w = started(loop, settings(tmp_path))
    s = Source()
    commit(loop, w, s, *[("c", ORDERS, row(i)) for i in range(10)])
    batch = s.events(
        *[("u", ORDERS, row(i, qty=5)) for i in range(5)],
        ("d", ORDERS, ("7", None, None, None, None, None)),
    )

    def crash(*args: object, **kwargs: object) -> int:
        raise RuntimeError("killed between write and commit")

    monkeypatch.setattr(table_sink, "commit_row_delta", crash)
    with pytest.raises(SinkUnavailableError):
        loop.run_until_complete(w.write(s.batch_of(batch)))
        loop.run_until_complete(w.flush())
    loop.run_until_complete(w.stop())
    monkeypatch.undo()
    table = w.tables["public.orders"].table
    table.refresh()
    assert len(table.snapshots()) == 1
    assert set(table.scan().to_arrow().column("qty").to_pylist()) == {1}
    data_dir = Path(table.metadata.location.removeprefix("file://")) / "data"
    left = [p for p in data_dir.rglob("*.parquet")]
    assert len(left) == 3  # the committed file + the uncommitted data and delete files
    # Restart: the batch comes again and applies once.
    again = started(loop, settings(tmp_path))
    result = loop.run_until_complete(again.write(s.batch_of(batch)))
    assert (result.written, result.skipped) == (6, 0)
    loop.run_until_complete(again.flush())
    table = again.tables["public.orders"].table
    data = table.scan().to_arrow().sort_by("id")
    assert data.column("id").to_pylist() == [0, 1, 2, 3, 4, 5, 6, 8, 9]
    assert data.column("qty").to_pylist() == [5] * 5 + [1] * 4
    for p in data_dir.rglob("*.parquet"):
        os.utime(p, (1, 1))  # old enough
    assert maintenance.remove_orphans(table, older_than_seconds=60) == 2
    assert table.scan().to_arrow().num_rows == 9
    loop.run_until_complete(again.stop())


def _files(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*") if p.is_file()}


def test_time_travel_rollback_expiry_and_compaction(
    tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    w = started(loop, settings(tmp_path))
    s = Source()
    for n in range(6):
        commit(loop, w, s, *[("u", ORDERS, row(i, qty=n)) for i in range(1, 11)])
    table = w.tables["public.orders"].table
    snaps = table.snapshots()
    assert len(snaps) == 6
    old = table.scan(snapshot_id=snaps[0].snapshot_id).to_arrow()
    assert set(old.column("qty").to_pylist()) == {0}
    live = table.scan().to_arrow().sort_by("id")
    data_files, delete_files = maintenance.file_counts(table)
    assert (data_files, delete_files) == (6, 5)
    # Compaction: fewer files, same content, positions carried forward.
    result = maintenance.compact(table)
    table.refresh()
    assert result.files_after < result.files_before
    assert maintenance.file_counts(table) == (1, 0)
    assert table.scan().to_arrow().sort_by("id").select(["id", "qty", "price"]) == live.select(
        ["id", "qty", "price"]
    )
    assert positions_of(table.current_snapshot().summary.additional_properties) == {
        "slot": Position(s.major, 0)
    }
    # Expiry deletes the files only expired snapshots referenced.
    warehouse = tmp_path / "warehouse"
    before = _files(warehouse)
    expired = maintenance.expire(table, older_than_seconds=0, retain_last=1)
    after = _files(warehouse)
    assert expired.expired_snapshots == 6 and expired.deleted_files > 0
    assert len(before - after) == expired.deleted_files
    assert table.scan().to_arrow().num_rows == 10
    for path in maintenance.reachable_files(table):
        assert os.path.exists(path.removeprefix("file://")), path
    # Rollback: the sink continues on the snapshot made current.
    commit(loop, w, s, ("c", ORDERS, row(99)))
    table.refresh()
    assert table.scan().to_arrow().num_rows == 11
    compacted = table.snapshots()[0].snapshot_id
    table.manage_snapshots().rollback_to_snapshot(compacted).commit()
    assert table.scan().to_arrow().num_rows == 10
    commit(loop, w, s, ("u", ORDERS, row(1, qty=42)))
    data = w.tables["public.orders"].table.scan().to_arrow().sort_by("id")
    assert data.num_rows == 10 and data.column("qty")[0].as_py() == 42
    loop.run_until_complete(w.stop())


def test_orphans_of_an_uncommitted_write_are_removed(
    tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    w = started(loop, settings(tmp_path))
    s = Source()
    commit(loop, w, s, ("c", ORDERS, row(1)))
    table = w.tables["public.orders"].table
    orphan = (
        Path(table.metadata.location.removeprefix("file://")) / "data" / "crashed-00000.parquet"
    )
    orphan.write_bytes(b"left by a crash between write and commit")
    os.utime(orphan, (1, 1))
    assert maintenance.remove_orphans(table, older_than_seconds=60) == 1
    assert not orphan.exists()
    assert table.scan().to_arrow().num_rows == 1
    loop.run_until_complete(w.stop())


def test_postgresql_catalog(pg, tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
    db = pg.new_database("catalog")
    uri = f"postgresql://postgres@{pg.host}:{pg.port}/{db}"  # as the deployment guide writes it
    w = started(loop, settings(tmp_path, catalog_uri=uri))
    s = Source()
    commit(loop, w, s, ("c", ORDERS, row(1)), ("c", ORDERS, row(2)))
    with pg.connect(db) as conn:
        names = [r[0] for r in conn.execute("SELECT table_name FROM iceberg_tables").fetchall()]
    assert names == ["public_orders"]
    assert w.tables["public.orders"].table.scan().to_arrow().num_rows == 2
    loop.run_until_complete(w.stop())


def test_truncate_in_upsert_mode_empties_the_table(
    tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    w = started(loop, settings(tmp_path))
    s = Source()
    commit(loop, w, s, *[("c", ORDERS, row(i)) for i in range(5)])
    s.major += 1
    truncate = SourceEvent(Operation.TRUNCATE, ORDERS, Position(s.major, 0))
    after = s.events(("c", ORDERS, row(9)))
    loop.run_until_complete(w.write(s.batch_of([truncate, *after])))
    loop.run_until_complete(w.flush())
    data = w.tables["public.orders"].table.scan().to_arrow()
    assert data.column("id").to_pylist() == [9]
    loop.run_until_complete(w.stop())


def test_scheduled_maintenance_compacts_and_expires_tables_created_at_runtime(
    tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    maint = {
        "enabled": True,
        # Long enough that the four commits below land before the first run, also on a
        # loaded machine (0.5 s let maintenance compact between them in a CI run).
        "compaction_interval_seconds": 3.0,
        "expire_snapshots_older_than_seconds": 0.1,
        "retain_last_snapshots": 1,
    }
    w = started(loop, settings(tmp_path, maintenance=maint))
    s = Source()
    for n in range(4):  # the table is created after the sink started
        commit(loop, w, s, *[("u", ORDERS, row(i, qty=n)) for i in range(20)])
    table = w.tables["public.orders"].table
    assert maintenance.file_counts(table) == (4, 3)

    async def settle() -> None:
        for _ in range(300):
            await asyncio.sleep(0.1)
            t = w.tables["public.orders"].table
            t.refresh()
            if maintenance.file_counts(t) == (1, 0) and len(t.snapshots()) == 1:
                return

    loop.run_until_complete(settle())
    t = w.tables["public.orders"].table
    assert maintenance.file_counts(t) == (1, 0)
    assert len(t.snapshots()) == 1
    data = t.scan().to_arrow()
    assert data.num_rows == 20 and set(data.column("qty").to_pylist()) == {3}
    # Writing goes on after maintenance (the key index is rebuilt from the compacted file).
    commit(loop, w, s, ("u", ORDERS, row(1, qty=77)))
    data = w.tables["public.orders"].table.scan().to_arrow()
    assert data.num_rows == 20 and sorted(data.column("qty").to_pylist())[-1] == 77
    loop.run_until_complete(w.stop())


def test_compaction_concurrent_with_sink_commits_loses_nothing(
    tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    """A compaction from another process (the CLI) while the sink commits: each commit is
    planned on one snapshot and refused when another landed; both retry, nothing is lost."""
    import threading

    from adapters.iceberg.catalog import load_catalog

    w = started(loop, settings(tmp_path))
    s = Source()
    expected: dict[int, int] = {}
    commit(loop, w, s, *[("c", ORDERS, row(i)) for i in range(50)])
    expected.update({i: 1 for i in range(50)})
    stop = threading.Event()
    compactions: list[int] = []

    def compact_forever() -> None:
        other = load_catalog(settings(tmp_path)).load_table(("cdc", "public_orders"))
        while not stop.is_set():
            maintenance.compact(other, min_files=2)
            compactions.append(1)

    thread = threading.Thread(target=compact_forever)
    thread.start()
    try:
        rng = __import__("random").Random(5)
        for n in range(30):
            keys = rng.sample(range(60), 10)
            commit(loop, w, s, *[("u", ORDERS, row(k, qty=n)) for k in keys])
            expected.update({k: n for k in keys})
    finally:
        stop.set()
        thread.join(60)
    assert compactions
    data = w.tables["public.orders"].table.scan().to_arrow()
    got = dict(zip(data.column("id").to_pylist(), data.column("qty").to_pylist(), strict=True))
    assert len(got) == data.num_rows  # one row per key
    assert got == expected
    loop.run_until_complete(w.stop())


def test_rest_catalog(tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
    """The sink through pyiceberg's REST client, against tests/support/rest_catalog.py (a
    REST server over a real SQL catalog: no REST catalog server installs here)."""
    from tests.support.rest_catalog import rest_catalog

    with rest_catalog(tmp_path / "rest") as url:
        w = started(loop, settings(tmp_path, catalog_uri=url))
        s = Source()
        commit(loop, w, s, *[("c", ORDERS, row(i)) for i in range(5)])
        commit(
            loop,
            w,
            s,
            ("u", ORDERS, row(1, qty=9)),
            ("d", ORDERS, ("2", None, None, None, None, None)),
        )
        table = w.tables["public.orders"].table
        assert type(w.catalog).__name__ == "RestCatalog"
        data = table.scan().to_arrow().sort_by("id")
        assert data.column("id").to_pylist() == [0, 1, 3, 4]
        assert data.column("qty").to_pylist() == [1, 9, 1, 1]
        assert positions_of(table.current_snapshot().summary.additional_properties) == {
            "slot": Position(s.major, 0)
        }
        assert maintenance.compact(table).files_after == 1
        loop.run_until_complete(w.stop())


def test_unreachable_catalog_fails_writes_and_health_not_start(
    tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    from domain.errors import SinkUnavailableError
    from services.net import find_free_port

    uri = f"postgresql://cat:topsecret@127.0.0.1:{find_free_port()}/ice"
    w = IcebergSinkWriter(settings(tmp_path, catalog_uri=uri), "it", "lake")
    loop.run_until_complete(w.start())  # does not wait for the catalog
    report = loop.run_until_complete(w.health())
    assert report.status.value == "error"
    assert "postgresql://cat:***@127.0.0.1" in report.detail["error"]
    assert "topsecret" not in str(report.as_dict())
    s = Source()
    with pytest.raises(SinkUnavailableError, match="iceberg catalog"):
        loop.run_until_complete(w.write(s.batch_of(s.events(("c", ORDERS, row(1))))))
    loop.run_until_complete(w.stop())
    # Healthy once the catalog is there.
    ok = started(loop, settings(tmp_path))
    assert loop.run_until_complete(ok.health()).status.value == "ok"
    loop.run_until_complete(ok.stop())
