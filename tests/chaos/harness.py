"""What every fault-injection scenario shares: the keyed workload, the sink's apply audit,
the row-by-row comparison, the recovery marker and the result row.

Measures, per sink:

* **lost**: keys whose sink row differs from the source's final row: missing, stale (an
  older ``version``), or still present although deleted at the source. Every insert and
  update at the source sets ``version`` from one sequence, so a stale row is visible as such.
* **duplicated**: changes the sink applied more than once. A trigger on each sink table logs
  every row it writes as (table, key, version) into ``chaos_audit.applied``, in the sink's own
  transaction (a rolled-back attempt leaves nothing); a (table, key, version) logged twice is
  a change applied twice (a replay the stored position should have skipped), an update that
  lowers ``version`` (an older change applied after a newer one) is logged too. Duplicate
  primary keys are also counted, though the primary key makes them impossible.
* **dead-lettered**: rows of ``<target_schema>._cdc_dead_letters``.
* **recovery**: from the moment the fault is cleared to the moment the sink holds a marker
  row committed at the source right then; changes reach a sink in commit order, so by then
  it has every change committed before the fault was cleared (the final comparison checks).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import yaml
from psycopg.types.json import Jsonb

from adapters.postgres.source.catalog import parse_lsn
from services.stack.postgres import PostgresServer
from tests.support.pipeline import (
    REPO,
    CommitAudit,
    PipelineFiles,
    http_status,
    wait_until,
    write_configs,
)

KEYED_TABLES = ("public.accounts", "public.transfers")
MARK_TABLE = "public.chaos_marks"
TABLES = (*KEYED_TABLES, MARK_TABLE)
POISON_BASE = 10**12  # keys of poison rows (scenario 8): never updated or deleted

_COLUMNS = {
    "public.accounts": "id bigint PRIMARY KEY, version bigint NOT NULL,"
    " balance numeric(14,2) NOT NULL, owner text, tags text[]",
    "public.transfers": "id bigint PRIMARY KEY, version bigint NOT NULL,"
    " amount numeric(14,2), memo text, payload jsonb",
    MARK_TABLE: "id integer PRIMARY KEY, at timestamptz NOT NULL",
}

SOURCE_DDL = "CREATE SEQUENCE public.chaos_version;\n" + "\n".join(
    f"CREATE TABLE {t} ({cols});" for t, cols in _COLUMNS.items()
)

# The sink's tables, created before the pipeline starts so that the audit trigger sees every
# write. Same columns and keys as the source: the sink adopts them as they are.
AUDIT_DDL = """
CREATE SCHEMA chaos_audit;
CREATE TABLE chaos_audit.applied (
    tbl text NOT NULL, id bigint NOT NULL, version bigint NOT NULL, op text NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE FUNCTION chaos_audit.log() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO chaos_audit.applied (tbl, id, version, op)
        VALUES (TG_TABLE_NAME, OLD.id, OLD.version, 'D');
        RETURN OLD;
    END IF;
    INSERT INTO chaos_audit.applied (tbl, id, version, op)
    VALUES (TG_TABLE_NAME, NEW.id, NEW.version,
            CASE WHEN TG_OP = 'UPDATE' AND NEW.version < OLD.version THEN 'R'
                 ELSE left(TG_OP, 1) END);
    RETURN NEW;
END $$;
"""


def sink_ddl(extra: Mapping[str, str] | None = None) -> str:
    """The sink's keyed tables with the audit trigger; `extra` adds table constraints (an
    operator's CHECK, scenario 8) by table name."""
    parts = [AUDIT_DDL]
    for table, cols in _COLUMNS.items():
        if table == MARK_TABLE:
            continue
        more = f", {extra[table]}" if extra and table in extra else ""
        parts.append(f"CREATE TABLE {table} ({cols}{more});")
        parts.append(
            f"CREATE TRIGGER chaos_audit AFTER INSERT OR UPDATE OR DELETE ON {table}"
            " FOR EACH ROW EXECUTE FUNCTION chaos_audit.log();"
        )
    return "\n".join(parts)


# --------------------------------------------------------------------------- databases


@dataclass
class Sink:
    sink_id: str
    server: PostgresServer
    database: str
    username: str = "postgres"

    @property
    def dsn(self) -> str:
        return self.server.dsn(self.database)


def prepare_source(server: PostgresServer, database: str, seed: int = 2000) -> str:
    server.create_database(database)
    dsn = server.dsn(database)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SOURCE_DDL)
        conn.execute(
            "INSERT INTO public.accounts (id, version, balance, owner, tags)"
            " SELECT g, nextval('public.chaos_version'), g * 1.5, 'seed ' || g, ARRAY['s']"
            " FROM generate_series(1, %s) g",
            (seed,),
        )
        conn.execute(
            "INSERT INTO public.transfers (id, version, amount, memo, payload)"
            " SELECT g, nextval('public.chaos_version'), g, 'seed', jsonb_build_object('g', g)"
            " FROM generate_series(1, %s) g",
            (seed // 2,),
        )
    return dsn


def prepare_sink(
    server: PostgresServer,
    database: str,
    sink_id: str = "replica",
    constraints: Mapping[str, str] | None = None,
    username: str = "postgres",
) -> Sink:
    server.create_database(database)
    with psycopg.connect(server.dsn(database), autocommit=True) as conn:
        conn.execute(sink_ddl(constraints))
        if username != "postgres":
            # A sink role that is no superuser (so privileges can be revoked from it): it owns
            # nothing but what the sink creates itself (offsets, dead letters).
            with contextlib.suppress(psycopg.errors.DuplicateObject):
                conn.execute(f"CREATE ROLE {username} LOGIN")
            conn.execute(f"GRANT CREATE, USAGE ON SCHEMA public TO {username}")
            conn.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {username}")
    return Sink(sink_id, server, database, username)


def write_chaos_configs(
    directory: Path,
    source: PostgresServer,
    source_db: str,
    sinks: Sequence[Sink],
    pipeline_id: str,
    sink_ports: Mapping[str, int] | None = None,
) -> PipelineFiles:
    """write_configs' files, with each sink on its own server/database/role."""
    files = write_configs(
        directory,
        host=source.host,
        port=source.port,
        source_db=source_db,
        replica_db=sinks[0].database,
        tables=TABLES,
        pipeline_id=pipeline_id,
        batch_max_events=2000,  # the product's default
    )
    pipeline = yaml.safe_load(files.pipeline.read_text())
    template = pipeline["sinks"][0]
    pipeline["sinks"] = []
    for sink in sinks:
        entry = {**template, "sink_id": sink.sink_id}
        entry["postgres"] = {
            **template["postgres"],
            "host": sink.server.host,
            "port": sink.server.port,
            "database": sink.database,
            "username": sink.username,
        }
        pipeline["sinks"].append(entry)
    files.pipeline.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    return files


# --------------------------------------------------------------------------- workload


class Workload:
    """Inserts, updates and deletes on the keyed tables at a bounded rate, on a thread, in
    transactions of 1-8 changes. Survives a source outage: it reconnects and carries on (a
    transaction whose commit got no answer may or may not have happened; the source is the
    truth the sinks are compared with, so that does not matter)."""

    def __init__(self, dsn: str, rate: int = 800, seed: int = 1, poison_every: int = 0) -> None:
        self.dsn = dsn
        self.rate = rate
        self.poison_every = poison_every
        self.rng = random.Random(seed)
        self.changes = 0
        self.transactions = 0
        self.poison = 0
        self.failed_transactions = 0
        self.stop_event = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="chaos-workload")
        self._live: dict[str, list[int]] = {}
        self._next: dict[str, int] = {}
        self.error: BaseException | None = None

    def start(self) -> Workload:
        with psycopg.connect(self.dsn) as conn:
            for table in KEYED_TABLES:
                ids = [
                    int(r[0])
                    for r in conn.execute(f"SELECT id FROM {table} WHERE id < %s", (POISON_BASE,))
                ]
                self._live[table] = ids
                self._next[table] = max(ids, default=0) + 1
        self.started = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self._thread.join(30)
        if self.error is not None:
            raise RuntimeError(f"workload failed: {self.error!r}") from self.error

    def _run(self) -> None:
        try:
            while not self.stop_event.is_set():
                try:
                    with psycopg.connect(self.dsn, connect_timeout=3) as conn:
                        self._loop(conn)
                except psycopg.OperationalError:
                    self.failed_transactions += 1
                    self.stop_event.wait(0.2)
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def _loop(self, conn: psycopg.Connection[Any]) -> None:
        rng = self.rng
        while not self.stop_event.is_set():
            ops = [self._op() for _ in range(rng.randint(1, 8))]
            with conn.transaction():
                for sql_text, params in ops:
                    conn.execute(sql_text, params)
            self.changes += len(ops)
            self.transactions += 1
            ahead = self.started + self.changes / self.rate - time.monotonic()
            if ahead > 0:
                self.stop_event.wait(ahead)
            elif ahead < -0.5:  # after an outage: carry on at the rate, no catch-up burst
                self.started -= ahead + 0.5

    def _op(self) -> tuple[str, tuple[Any, ...]]:
        rng = self.rng
        table = KEYED_TABLES[0] if rng.random() < 0.6 else KEYED_TABLES[1]
        live = self._live[table]
        kind = rng.random()
        if self.poison_every and table == KEYED_TABLES[0] and rng.random() * self.poison_every < 1:
            self.poison += 1
            return (
                "INSERT INTO public.accounts (id, version, balance, owner)"
                " VALUES (%s, nextval('public.chaos_version'), 99999999.99, 'poison')",
                (POISON_BASE + self.poison,),
            )
        if kind < 0.3 or len(live) < 100:
            key = self._next[table]
            self._next[table] += 1
            live.append(key)
            if table == "public.accounts":
                return (
                    "INSERT INTO public.accounts (id, version, balance, owner, tags)"
                    " VALUES (%s, nextval('public.chaos_version'), %s, %s, %s)",
                    (key, rng.randint(0, 10**7) / 100, f"owner {key} é", ["a", str(key % 7)]),
                )
            return (
                "INSERT INTO public.transfers (id, version, amount, memo, payload)"
                " VALUES (%s, nextval('public.chaos_version'), %s, %s, %s)",
                (
                    key,
                    rng.randint(1, 10**6) / 100,
                    "memo\twith tab" if rng.random() < 0.1 else None,
                    Jsonb({"k": key, "r": rng.random()}),
                ),
            )
        index = rng.randrange(len(live))
        key = live[index]
        if kind < 0.85:
            if table == "public.accounts":
                return (
                    "UPDATE public.accounts SET version = nextval('public.chaos_version'),"
                    " balance = balance + 1, owner = owner || '.' WHERE id = %s",
                    (key,),
                )
            return (
                "UPDATE public.transfers SET version = nextval('public.chaos_version'),"
                " amount = amount + 0.01 WHERE id = %s",
                (key,),
            )
        live[index] = live[-1]
        live.pop()
        return (f"DELETE FROM {table} WHERE id = %s", (key,))


BIG_BASE = 5 * 10**11  # keys of big_transaction() rows


def big_transaction(dsn: str, rows: int, first: int = 0) -> None:
    """One transaction inserting `rows` transfers (keys from BIG_BASE + first): streamed as
    many batches that the slot cannot confirm until the last one is acknowledged, so a stage
    killed meanwhile leaves the sink ahead of the slot and the restart replays into it."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO public.transfers (id, version, amount, memo)"
            " SELECT %s + g, nextval('public.chaos_version'), g / 100.0, 'bulk'"
            " FROM generate_series(1, %s) g",
            (BIG_BASE + first, rows),
        )


# --------------------------------------------------------------------------- measuring


def _rows(dsn: str, table: str, where: str = "") -> dict[int, tuple[Any, ...]]:
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        try:
            rows = conn.execute(f"SELECT * FROM {table} {where}").fetchall()
        except psycopg.errors.UndefinedTable:
            return {}
    return {int(r[0]): tuple(r) for r in rows}


@dataclass
class SinkCheck:
    sink_id: str
    lost: int = 0
    duplicated: int = 0
    dead_lettered: int = 0
    poison_dead_lettered: int = 0
    audited: int = 0  # row writes the audit trigger logged in this sink
    regressions: int = 0  # updates that lowered a row's version (an older change re-applied)
    details: list[str] = field(default_factory=list)


def check_sink(source_dsn: str, sink: Sink, poison: bool = False) -> SinkCheck:
    """Row-by-row comparison of the keyed tables, the apply audit and the dead letters."""
    out = SinkCheck(sink.sink_id)
    dead = dead_letter_keys(sink.dsn)
    out.dead_lettered = sum(dead.values())
    for table in KEYED_TABLES:
        src = _rows(source_dsn, table)
        dst = _rows(sink.dsn, table)
        name = table.split(".")[1]
        expected_dead = {k for k in src if k >= POISON_BASE} if poison else set()
        for key in expected_dead:
            src.pop(key)
            count = dead.get((table, key), 0)
            if count == 0:
                out.lost += 1
                out.details.append(f"{name} {key}: poison row neither in sink nor dead letters")
            out.poison_dead_lettered += min(count, 1)
            out.duplicated += max(count - 1, 0)
        for key, row in src.items():
            got = dst.get(key)
            if got != row:
                out.lost += 1
                if len(out.details) < 10:
                    why = "missing" if got is None else f"stale {got[:2]} != {row[:2]}"
                    out.details.append(f"{name} {key}: {why}")
        for key in dst.keys() - src.keys():
            if key in expected_dead:
                continue
            out.lost += 1  # a delete that never arrived
            if len(out.details) < 10:
                out.details.append(f"{name} {key}: deleted at the source, still in the sink")
        unexpected_dead = sum(
            n for (t, k), n in dead.items() if t == table and k not in expected_dead
        )
        if unexpected_dead:
            out.details.append(f"{name}: {unexpected_dead} unexpected dead letters")
    with psycopg.connect(sink.dsn, connect_timeout=5) as conn:
        reapplied = conn.execute(
            "SELECT count(*) FILTER (WHERE op <> 'D')"
            " - count(DISTINCT (tbl, id, version)) FILTER (WHERE op <> 'D'),"
            " count(*) FILTER (WHERE op = 'R'), count(*)"
            " FROM chaos_audit.applied"
        ).fetchone()
        assert reapplied is not None
        for table in KEYED_TABLES:
            dup_keys = conn.execute(
                f"SELECT count(*) FROM (SELECT id FROM {table} GROUP BY id HAVING count(*) > 1) d"
            ).fetchone()
            assert dup_keys is not None
            out.duplicated += int(dup_keys[0])
    out.duplicated += int(reapplied[0])
    out.regressions = int(reapplied[1])
    out.audited = int(reapplied[2])
    if reapplied[0]:
        out.details.append(f"{reapplied[0]} changes applied more than once")
    if out.regressions:
        out.details.append(f"{out.regressions} updates lowered a row's version")
    return out


def dead_letter_keys(sink_dsn: str) -> dict[tuple[str, int], int]:
    """{(source table, key): dead letters} of the sink's dead-letter table."""
    with psycopg.connect(sink_dsn, connect_timeout=5) as conn:
        try:
            rows = conn.execute(
                "SELECT table_name, (row->>'id')::bigint, count(*)"
                " FROM public._cdc_dead_letters GROUP BY 1, 2"
            ).fetchall()
        except psycopg.errors.UndefinedTable:
            return {}
    return {(str(t), int(k) if k is not None else -1): int(n) for t, k, n in rows}


def converged(source_dsn: str, sinks: Sequence[Sink], poison: bool = False) -> bool:
    where = f"WHERE id < {POISON_BASE}" if poison else ""
    for table in KEYED_TABLES:
        src = _rows(source_dsn, table, where)
        for sink in sinks:
            if _rows(sink.dsn, table, where) != src:
                return False
    if poison:
        expected = len(_rows(source_dsn, "public.accounts", f"WHERE id >= {POISON_BASE}"))
        for sink in sinks:
            if sum(dead_letter_keys(sink.dsn).values()) < expected:
                return False
    return True


class Marks:
    """Recovery markers: a row committed at the source when the fault is cleared; the time
    until every sink has it is the recovery time."""

    def __init__(self, source_dsn: str, sinks: Sequence[Sink]) -> None:
        self.source_dsn = source_dsn
        self.sinks = sinks
        self.next_id = 1

    def mark(self) -> int:
        mark_id = self.next_id
        self.next_id += 1
        deadline = time.monotonic() + 30
        while True:  # the source may be coming back
            try:
                with psycopg.connect(self.source_dsn, autocommit=True, connect_timeout=3) as c:
                    c.execute(f"INSERT INTO {MARK_TABLE} VALUES (%s, now())", (mark_id,))
                return mark_id
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def seen(self, mark_id: int) -> bool:
        for sink in self.sinks:
            try:
                with psycopg.connect(sink.dsn, connect_timeout=2) as conn:
                    row = conn.execute(
                        f"SELECT 1 FROM {MARK_TABLE} WHERE id = %s", (mark_id,)
                    ).fetchone()
            except (psycopg.OperationalError, psycopg.errors.UndefinedTable):
                return False
            if row is None:
                return False
        return True

    def wait(self, mark_id: int, since: float, timeout: float) -> float | None:
        """Seconds from `since` until every sink has the mark; None if not within timeout."""
        deadline = since + timeout
        while time.monotonic() < deadline:
            if self.seen(mark_id):
                return time.monotonic() - since
            time.sleep(0.05)
        return None


# --------------------------------------------------------------------------- processes


def _env() -> dict[str, str]:
    return dict(os.environ, CDC_LOG_LEVEL="INFO", PYTHONPATH=str(REPO))


class CdcRun:
    """`cdc run` as a process, with its children found through /proc."""

    def __init__(self, files: PipelineFiles, log_dir: Path, name: str = "run") -> None:
        self.files = files
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> CdcRun:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.files.argv("run"), stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=_env()
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def children(self, marker: str = "") -> list[int]:
        return [pid for pid, args in child_processes(self.pid) if marker in args]

    def wait_ready(self, timeout: float = 60) -> None:
        wait_until(
            lambda: http_status(self.files.health_port, "/readyz") == 200,
            timeout,
            "pipeline ready\n" + self.log_tail(),
        )

    def stop(self, timeout: float = 60) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_tree(self.pid)
            return None

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def child_processes(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the live children of `pid`."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
            args = Path(f"/proc/{entry.name}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if fields[1] == str(pid) and fields[0] not in ("Z", "X"):
            out.append((int(entry.name), args.decode(errors="replace")))
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] not in ("Z", "X")


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and its descendants (processes this test started), by pid."""
    for child, _ in child_processes(pid):
        kill_tree(child)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def workload(dsn: str, **kwargs: Any) -> Iterator[Workload]:
    load = Workload(dsn, **kwargs).start()
    try:
        yield load
    finally:
        load.stop()


# --------------------------------------------------------------------------- one scenario


def skipped_replays(health_port: int) -> int | None:
    """Changes the sinks skipped as already applied (replays), as the running ingest counts
    them (`cdc_ingest_events_acked_total{outcome="skipped"}`); None if unreadable."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/metrics", timeout=3) as r:
            text = r.read().decode()
    except OSError:
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith("cdc_ingest_events_acked_total{") and 'outcome="skipped"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


@dataclass
class Outcome:
    changes: int
    recovery_s: float | None
    converge_s: float | None
    checks: list[SinkCheck]
    skipped: int | None = None
    slot_problems: list[str] = field(default_factory=list)
    slot_samples: int = 0

    @property
    def lost(self) -> int:
        return sum(c.lost for c in self.checks)

    @property
    def duplicated(self) -> int:
        return sum(c.duplicated for c in self.checks)

    @property
    def dead_lettered(self) -> int:
        return sum(c.dead_lettered for c in self.checks)

    @property
    def audited(self) -> int:
        return sum(c.audited for c in self.checks)

    def problems(self, poison: bool = False) -> list[str]:
        out = []
        for check in self.checks:
            out += [f"{check.sink_id}: {d}" for d in check.details[:3]]
        if self.lost:
            out.append(f"{self.lost} rows lost")
        if self.duplicated:
            out.append(f"{self.duplicated} changes duplicated")
        if any(c.regressions for c in self.checks):
            out.append("older changes applied over newer ones")
        if not poison and self.dead_lettered:
            out.append(f"{self.dead_lettered} dead letters")
        out += [f"slot audit: {p}" for p in self.slot_problems]
        if self.recovery_s is None:
            out.append("the sinks did not catch up with the source in time")
        if self.converge_s is None:
            out.append("the sinks did not converge in time")
        return out


class SlotAudit:
    """The delivery guarantee while the faults happen: the slot's confirmed flush LSN must
    never pass a transaction that some sink has not applied (else a crash right then would
    lose it). Uses tests.support.pipeline.CommitAudit (a second slot on the publication
    records every transaction) with samples of (confirmed flush LSN, lowest applied position
    over the sinks) taken every 50 ms on a thread. Create it once the pipeline is ready (the
    ingest has created the publication)."""

    def __init__(self, source_dsn: str, files: PipelineFiles, sinks: Sequence[Sink]) -> None:
        self.files = files
        self.sinks = sinks
        self.audit = CommitAudit(source_dsn, files.publication, files.slot, files.slot + "_a")
        self.audit.create()
        self.initial = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="slot-audit")

    def start(self) -> None:
        with psycopg.connect(self.audit.source_dsn) as conn:
            row = conn.execute(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name=%s",
                (self.files.slot,),
            ).fetchone()
        assert row is not None and row[0] is not None, "the pipeline's slot is not there"
        self.initial = parse_lsn(row[0])
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psycopg.Error, OSError):
                self._sample()
            self._stop.wait(0.05)

    def _sample(self) -> None:
        with psycopg.connect(self.audit.source_dsn, connect_timeout=2) as src:
            row = src.execute(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name=%s",
                (self.files.slot,),
            ).fetchone()
        if row is None or row[0] is None:
            return
        confirmed = parse_lsn(row[0])
        applied = []
        for sink in self.sinks:
            with psycopg.connect(sink.dsn, connect_timeout=2) as dst:
                got = dst.execute(
                    "SELECT max(major) FROM public._cdc_offsets WHERE pipeline_id = %s",
                    (self.files.pipeline_id,),
                ).fetchone()
            applied.append(int(got[0]) if got and got[0] is not None else 0)
        self.audit.samples.append((confirmed, min(applied)))

    def finish(self) -> list[str]:
        """Stop sampling; the violations found (and the audit slot dropped)."""
        self._stop.set()
        self._thread.join(10)
        problems = self.audit.violations(self.initial)
        if len(self.audit.samples) < 20:
            problems.append(f"only {len(self.audit.samples)} slot samples")
        return problems[:3]


def run_scenario(
    source_dsn: str,
    sinks: Sequence[Sink],
    inject: Any,
    clear: Any,
    *,
    rate: int = 800,
    before: float = 4.0,
    after: float = 3.0,
    recovery_timeout: float = 60.0,
    converge_timeout: float = 45.0,
    poison_every: int = 0,
    health_port: int | None = None,
    slot_audit: SlotAudit | None = None,
) -> Outcome:
    """With the pipeline running and caught up: workload for `before` s, `inject()`, then
    `clear()` (returns the monotonic time the fault counts as cleared from), the recovery
    marker, `after` s more of workload, then wait for convergence and compare."""
    poison = poison_every > 0
    wait_until(lambda: converged(source_dsn, sinks), 60, "initial snapshot in every sink")
    marks = Marks(source_dsn, sinks)
    if slot_audit is not None:
        slot_audit.start()
    with workload(source_dsn, rate=rate, poison_every=poison_every) as load:
        time.sleep(before)
        inject()
        cleared = clear()
        recovery = marks.wait(marks.mark(), cleared, recovery_timeout)
        time.sleep(after)
    start = time.monotonic()
    converge: float | None = None
    while time.monotonic() - start < converge_timeout:
        with contextlib.suppress(psycopg.OperationalError):
            if converged(source_dsn, sinks, poison):
                converge = time.monotonic() - start
                break
        time.sleep(0.25)
    checks = [check_sink(source_dsn, sink, poison) for sink in sinks]
    skipped = None if health_port is None else skipped_replays(health_port)
    outcome = Outcome(load.changes, recovery, converge, checks, skipped)
    if slot_audit is not None:
        time.sleep(1.5)  # the last confirmations
        outcome.slot_problems = slot_audit.finish()
        outcome.slot_samples = len(slot_audit.audit.samples)
    return outcome
