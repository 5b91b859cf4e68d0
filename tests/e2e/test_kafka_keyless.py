"""Tables without a primary key, and a table whose replica identity is a unique index other
than its primary key, through the Kafka transport (PostgreSQL -> Debezium 3.6 on Kafka
Connect -> Tansu -> `cdc run` ingest -> PostgreSQL sink), held to the promise of the direct
path (docs/capture.md, "The key of a table"):

- a table without a key lands in the change log `<table>_changes`, one row per change,
  identical rows as separate rows, so replaying the log rebuilds the source's rows exactly
  (as a multiset), also across a kill -9 of the ingest;
- a `REPLICA IDENTITY USING INDEX` table is keyed on the index's columns;
- a keyless table with `REPLICA IDENTITY DEFAULT` is warned about
  (`source.keyless_table_no_identity`) by `cdc run` and `cdc validate`.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest

from tests.support.kafka_run import KafkaRun, kafka_run
from tests.support.pipeline import REPO, http_status, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# Text columns of each kind the decoder converts, so the rows compare as PostgreSQL prints them.
KEYLESS_DDL = """
CREATE TABLE public.dups (a int, b text, n numeric(8,2), at timestamptz);
ALTER TABLE public.dups REPLICA IDENTITY FULL;
"""
KEYLESS_SEED = """
INSERT INTO public.dups VALUES
    (1, 'same', 1.50, '2024-01-01 10:00:00+00'),
    (1, 'same', 1.50, '2024-01-01 10:00:00+00'),
    (1, 'same', 1.50, '2024-01-01 10:00:00+00'),
    (2, NULL, NULL, NULL),
    (2, NULL, NULL, NULL),
    (3, 'other', -0.01, '1969-12-31 23:59:59.5+00')
"""
COLUMNS = ("a", "b", "n", "at")
Row = tuple[str | None, ...]


def source_rows(dsn: str, table: str = "public.dups") -> Counter[Row]:
    """The table's rows as PostgreSQL prints each column, as a multiset."""
    select = ", ".join(f"{c}::text" for c in COLUMNS)
    with psycopg.connect(dsn) as conn:
        return Counter(conn.execute(f"SELECT {select} FROM {table}").fetchall())


def change_log(dsn: str, table: str = "public.dups_changes") -> list[tuple[Any, ...]]:
    """(op, row as text, _before, position) of every row of a change log, in stream order;
    none while the sink has not created it."""
    select = ", ".join(f"{c}::text" for c in COLUMNS)
    with psycopg.connect(dsn) as conn:
        try:
            rows = conn.execute(
                f"SELECT _op, {select}, _before, _partition, _position_major, _position_minor"
                f" FROM {table} ORDER BY _partition, _position_major, _position_minor"
            ).fetchall()
        except psycopg.errors.UndefinedTable:
            return []
    n = len(COLUMNS)
    return [(r[0], tuple(r[1 : n + 1]), r[n + 1], tuple(r[n + 2 :])) for r in rows]


def replay(log: list[tuple[Any, ...]]) -> Counter[Row]:
    """The multiset of rows the change log describes: snapshot reads and inserts add their
    row, an update replaces its `_before` row by its row, a delete removes its row, a
    truncate empties the table. A change whose old row is not there is an error."""
    rows: Counter[Row] = Counter()
    for op, row, before, _position in log:
        if op in ("r", "c"):
            rows[row] += 1
        elif op == "u":
            assert before is not None, f"an update without its old row: {row}"
            old = tuple(before.get(c) for c in COLUMNS)
            assert rows[old] > 0, f"update of a row the log never had: {old}, in {rows}"
            rows[old] -= 1
            rows[row] += 1
        elif op == "d":
            assert rows[row] > 0, f"delete of a row the log never had: {row}, in {rows}"
            rows[row] -= 1
        elif op == "t":
            rows.clear()
        else:
            raise AssertionError(f"unknown _op {op!r}")
    return +rows


def log_events(log_text: str, event: str) -> list[dict[str, Any]]:
    out = []
    for line in log_text.splitlines():
        try:
            record = json.loads(line[line.find("{") :])
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == event:
            out.append(record)
    return out


def _start(run: KafkaRun) -> KafkaRun:
    run.start()
    wait_until(
        lambda: http_status(run.files.health_port, "/readyz") == 200,
        180,
        "ready\n" + run.log_tail(),
    )
    return run


class DuplicateWorkload:
    """Changes on public.dups from a thread, one transaction each, counting the change-log
    rows they must produce: inserts of rows that already exist, an update of one of two
    identical rows and a delete of one of them (both by ctid)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.changes = 0
        self.rounds = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.stop.is_set():
                k = 100 + self.rounds % 7
                with conn.transaction():
                    conn.execute("INSERT INTO public.dups VALUES (%s, 'w', 2.5, now())", (k,))
                    conn.execute(
                        "INSERT INTO public.dups SELECT * FROM public.dups WHERE ctid ="
                        " (SELECT min(ctid) FROM public.dups WHERE a = %s)",
                        (k,),
                    )
                    self.changes += 2
                with conn.transaction():
                    cur = conn.execute(
                        "UPDATE public.dups SET b = b || '+' WHERE ctid ="
                        " (SELECT max(ctid) FROM public.dups WHERE a = %s)",
                        (k,),
                    )
                    self.changes += cur.rowcount
                if self.rounds % 3 == 2:
                    cur = conn.execute(
                        "DELETE FROM public.dups WHERE ctid ="
                        " (SELECT min(ctid) FROM public.dups WHERE a = %s)",
                        (k,),
                    )
                    self.changes += cur.rowcount
                self.rounds += 1
                time.sleep(0.003)

    def __enter__(self) -> DuplicateWorkload:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def test_keyless_full_identity_change_log_rebuilds_the_source_across_a_kill_9(
    pg: Any, tansu_broker: Any, schema_registry: Any, kafka_connect: Any, tmp_path: Path
) -> None:
    run = _start(
        kafka_run(
            pg,
            tansu_broker,
            schema_registry,
            kafka_connect.url,
            tmp_path,
            KEYLESS_DDL,
            KEYLESS_SEED,
            ("public.dups",),
        )
    )
    expected_changes = 6  # the snapshot rows

    def rebuilt() -> bool:
        return replay(change_log(run.replica_dsn)) == source_rows(run.source_dsn)

    try:
        wait_until(lambda: len(change_log(run.replica_dsn)) == 6, 120, "the snapshot")
        assert [op for op, *_ in change_log(run.replica_dsn)] == ["r"] * 6
        assert replay(change_log(run.replica_dsn)) == source_rows(run.source_dsn)
        with psycopg.connect(run.source_dsn, autocommit=True) as src:
            src.execute("INSERT INTO public.dups VALUES (2, NULL, NULL, NULL)")  # a third one
            src.execute(  # one of three identical rows changes
                "UPDATE public.dups SET b = 'changed' WHERE ctid ="
                " (SELECT min(ctid) FROM public.dups WHERE a = 1)"
            )
            src.execute(  # one of three identical NULL rows goes
                "DELETE FROM public.dups WHERE ctid ="
                " (SELECT max(ctid) FROM public.dups WHERE a = 2)"
            )
            expected_changes += 3
        wait_until(rebuilt, 60, "the streamed changes\n" + run.log_tail())
        ops = [op for op, *_ in change_log(run.replica_dsn)]
        assert ops == ["r"] * 6 + ["c", "u", "d"]
        update = change_log(run.replica_dsn)[7]
        assert update[1] == ("1", "changed", "1.50", "2024-01-01 10:00:00+00")
        assert update[2] == {"a": "1", "b": "same", "n": "1.50", "at": "2024-01-01 10:00:00+00"}

        with DuplicateWorkload(run.source_dsn) as work:
            wait_until(lambda: work.rounds > 150, 60, "changes made")
            ingest = run.stage_pid("ingest")
            psutil.Process(ingest).kill()  # kill -9 mid-stream; cdc run restarts it
            wait_until(lambda: work.rounds > 400, 120, "more changes made")
        assert run.stage_pid("ingest") != ingest
        expected_changes += work.changes
        wait_until(
            lambda: len(change_log(run.replica_dsn)) >= expected_changes,
            180,
            f"{expected_changes} changes in the log\n" + run.log_tail(),
        )
        time.sleep(2)  # anything written twice would arrive by now
        log = change_log(run.replica_dsn)
        assert len(log) == expected_changes  # nothing lost, nothing twice
        assert len({position for *_, position in log}) == len(log)
        assert replay(log) == source_rows(run.source_dsn)

        with psycopg.connect(run.source_dsn, autocommit=True) as src:
            src.execute("TRUNCATE public.dups")
            src.execute("INSERT INTO public.dups VALUES (9, 'after', 0, NULL)")
        wait_until(rebuilt, 60, "the truncate in the change log\n" + run.log_tail())
        assert [op for op, *_ in change_log(run.replica_dsn)][-2:] == ["t", "c"]
    finally:
        code = run.stop()
    assert code == 0, run.log_tail()


INDEX_DDL = """
CREATE TABLE public.coded (id int PRIMARY KEY, code text NOT NULL, note text);
CREATE UNIQUE INDEX coded_code ON public.coded (code);
ALTER TABLE public.coded REPLICA IDENTITY USING INDEX coded_code;
"""
INDEX_SEED = "INSERT INTO public.coded SELECT g, 'c' || g, 'n' || g FROM generate_series(1, 5) g"


def _coded(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        try:
            return conn.execute("SELECT id, code, note FROM public.coded ORDER BY code").fetchall()
        except psycopg.errors.UndefinedTable:
            return []


def test_replica_identity_index_other_than_the_primary_key_is_the_sink_key(
    pg: Any, tansu_broker: Any, schema_registry: Any, kafka_connect: Any, tmp_path: Path
) -> None:
    run = _start(
        kafka_run(
            pg,
            tansu_broker,
            schema_registry,
            kafka_connect.url,
            tmp_path,
            INDEX_DDL,
            INDEX_SEED,
            ("public.coded",),
        )
    )
    try:
        wait_until(lambda: len(_coded(run.replica_dsn)) == 5, 120, "the snapshot")
        with psycopg.connect(run.source_dsn, autocommit=True) as src:
            src.execute("UPDATE public.coded SET note = 'x' WHERE id = 1")  # neither key
            src.execute("UPDATE public.coded SET code = 'c2b' WHERE id = 2")  # identity changes
            src.execute("UPDATE public.coded SET id = 30 WHERE id = 3")  # primary key changes
            src.execute("DELETE FROM public.coded WHERE id = 4")
            src.execute("INSERT INTO public.coded VALUES (6, 'c6', 'new')")
        wait_until(
            lambda: _coded(run.replica_dsn) == _coded(run.source_dsn),
            60,
            f"replica = source\n{_coded(run.replica_dsn)}\n{run.log_tail()}",
        )
        with psycopg.connect(run.replica_dsn) as dst:
            key = dst.execute(
                "SELECT array_agg(a.attname ORDER BY a.attname) FROM pg_index i"
                " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
                " WHERE i.indrelid = 'public.coded'::regclass AND i.indisprimary"
            ).fetchone()
        assert key == (["code"],)  # the key the source identifies rows by, as direct does
        # A truncate has no message key. The first message a restarted ingest reads (all
        # before it committed), it must still be the keyed table's truncate.
        assert run.stop() == 0, run.log_tail()
        with psycopg.connect(run.source_dsn, autocommit=True) as src:
            src.execute("TRUNCATE public.coded")
            src.execute("INSERT INTO public.coded VALUES (7, 'c7', 'after')")
        _start(run)
        wait_until(
            lambda: _coded(run.replica_dsn) == [(7, "c7", "after")],
            60,
            "the truncate in the replica\n" + run.log_tail(),
        )
        with psycopg.connect(run.replica_dsn) as dst:
            assert dst.execute("SELECT to_regclass('public.coded_changes')").fetchone() == (None,)
    finally:
        code = run.stop()
    assert code == 0, run.log_tail()


DEFAULT_DDL = "CREATE TABLE public.events (a int, b text);  -- no key, REPLICA IDENTITY DEFAULT"
DEFAULT_SEED = "INSERT INTO public.events VALUES (1, 'x'), (1, 'x')"


def test_keyless_default_identity_is_warned_about_and_its_inserts_kept(
    pg: Any, tansu_broker: Any, schema_registry: Any, kafka_connect: Any, tmp_path: Path
) -> None:
    run = kafka_run(
        pg,
        tansu_broker,
        schema_registry,
        kafka_connect.url,
        tmp_path,
        DEFAULT_DDL,
        DEFAULT_SEED,
        ("public.events",),
    )
    validate = subprocess.run(
        run.files.argv("validate"), cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert validate.returncode == 0, validate.stdout + validate.stderr
    assert "warning: table public.events has no primary key" in validate.stdout + validate.stderr
    _start(run)
    try:
        with psycopg.connect(run.source_dsn, autocommit=True) as src:
            src.execute("INSERT INTO public.events VALUES (1, 'x')")
            with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
                src.execute("DELETE FROM public.events WHERE a = 1")

        def log() -> list[tuple[Any, ...]]:
            with psycopg.connect(run.replica_dsn) as dst:
                try:
                    return dst.execute(
                        "SELECT _op, a, b FROM public.events_changes"
                        " ORDER BY _partition, _position_major, _position_minor"
                    ).fetchall()
                except psycopg.errors.UndefinedTable:
                    return []

        wait_until(lambda: len(log()) == 3, 120, "the change log\n" + run.log_tail())
        assert log() == [("r", 1, "x"), ("r", 1, "x"), ("c", 1, "x")]
    finally:
        code = run.stop()
    assert code == 0, run.log_tail()
    warnings = log_events(
        run.log_path.read_text(errors="replace"), "source.keyless_table_no_identity"
    )
    assert [(w["table"], w["replica_identity"]) for w in warnings] == [("public.events", "default")]
    assert warnings[0]["fix"] == "ALTER TABLE public.events REPLICA IDENTITY FULL"
