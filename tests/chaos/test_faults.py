"""Fault-injection scenarios: a steady keyed workload, one fault, recovery, then every sink
compared with the source row by row (see harness.py for what lost / duplicated mean).

Each scenario records its row of the results table (conftest.py) before asserting.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from services.net import find_free_port as free_port
from services.stack.postgres import PostgresServer
from tests.chaos.harness import (
    CdcRun,
    Outcome,
    Sink,
    SlotAudit,
    alive,
    big_transaction,
    check_sink,
    converged,
    prepare_sink,
    prepare_source,
    run_scenario,
    write_chaos_configs,
)
from tests.chaos.results import ChaosResult
from tests.support.pipeline import (
    PipelineFiles,
    http_status,
    ingest_stage,
    sink_stage,
    wait_until,
)
from tests.support.proxy import TcpProxy

pytestmark = pytest.mark.timeout(120)  # the longest (sink down 30 s, 6b) take about 50 s

Record = Callable[[str], ChaosResult]


def _finish(result: ChaosResult, outcome: Outcome, *extra: str, poison: bool = False) -> None:
    """Fill in the result row, then assert: nothing lost, nothing applied twice (poison:
    no outage, so no recovery time; the poison rows are in the dead letters)."""
    problems = [*extra, *outcome.problems(poison)]
    result.changes = outcome.changes
    result.lost = outcome.lost
    result.duplicated = outcome.duplicated
    result.dead_lettered = outcome.dead_lettered
    result.recovery_s = None if poison else outcome.recovery_s
    notes = [f"{outcome.audited} sink row writes audited"]
    if outcome.slot_samples and not outcome.slot_problems:
        notes.append(f"slot never confirmed past the sinks ({outcome.slot_samples} samples)")
    if outcome.skipped:
        notes.append(f"{outcome.skipped} replayed changes skipped as already applied")
    if outcome.converge_s is not None:
        notes.append(f"converged {outcome.converge_s:.1f} s after the workload stopped")
    result.notes = "; ".join([*([result.notes] if result.notes else []), *notes, *problems])
    result.ok = not problems
    assert not problems, problems


def _pipeline(
    tmp_path: Path,
    source: PostgresServer,
    sink_server: PostgresServer,
    name: str,
    **sink_kwargs: Any,
) -> tuple[str, Sink, PipelineFiles]:
    source_dsn = prepare_source(source, f"{name}_src")
    sink = prepare_sink(sink_server, f"{name}_sink", **sink_kwargs)
    files = write_chaos_configs(tmp_path, source, f"{name}_src", [sink], pipeline_id=name)
    return source_dsn, sink, files


def _kill_child(
    run: CdcRun, marker: str, source_dsn: str = "", big: int = 0
) -> tuple[Callable[[], None], Callable[[], float]]:
    """inject/clear for a `kill -9` of one of `cdc run`'s children, `big` rows into a single
    transaction before; the supervisor restarts it, so recovery counts from the kill."""
    state: dict[str, Any] = {}

    def inject() -> None:
        [pid] = run.children(marker)
        if big:  # killed while the sink applies a transaction the slot cannot confirm yet
            big_transaction(source_dsn, big)
            time.sleep(0.3)
        state["pid"], state["at"] = pid, time.monotonic()
        os.kill(pid, signal.SIGKILL)

    def clear() -> float:
        wait_until(
            lambda: any(p != state["pid"] for p in run.children(marker)),
            30,
            f"supervisor restarted {marker.strip()}\n" + run.log_tail(),
        )
        return float(state["at"])

    return inject, clear


@pytest.mark.parametrize(
    ("marker", "label"),
    [(" ingest ", "1. kill -9 ingest"), ("--sink-id", "2. kill -9 sink")],
    ids=["ingest", "sink"],
)
def test_kill_9_stage_under_cdc_run(
    pg_server: PostgresServer, tmp_path: Path, chaos_result: Record, marker: str, label: str
) -> None:
    result = chaos_result(label)
    name = "kill_ingest" if "ingest" in marker else "kill_sink"
    source_dsn, sink, files = _pipeline(tmp_path, pg_server, pg_server, name)
    run = CdcRun(files, tmp_path).start()
    try:
        run.wait_ready()
        audit = SlotAudit(source_dsn, files, [sink])
        inject, clear = _kill_child(run, marker, source_dsn, big=20_000)
        outcome = run_scenario(
            source_dsn, [sink], inject, clear, health_port=files.health_port, slot_audit=audit
        )
        outcome.changes += 20_000
        result.notes = "killed 0.3 s after a 20k-row transaction committed"
    finally:
        code = run.stop()
    _finish(result, outcome, *([] if code == 0 else [f"cdc run exited {code} on SIGTERM"]))


def test_sink_database_down_30s(
    pg_server: PostgresServer,
    pg_server_factory: Callable[..., PostgresServer],
    tmp_path: Path,
    chaos_result: Record,
) -> None:
    result = chaos_result("5. sink database down 30 s")
    sink_server = pg_server_factory()
    source_dsn, sink, files = _pipeline(tmp_path, pg_server, sink_server, "sink_down")
    run = CdcRun(files, tmp_path).start()

    def clear() -> float:
        time.sleep(30)
        sink_server.start()
        return time.monotonic()

    try:
        run.wait_ready()
        audit = SlotAudit(source_dsn, files, [sink])
        outcome = run_scenario(
            source_dsn,
            [sink],
            lambda: sink_server.stop("fast"),
            clear,
            health_port=files.health_port,
            slot_audit=audit,
        )
    finally:
        code = run.stop()
    _finish(result, outcome, *([] if code == 0 else [f"cdc run exited {code} on SIGTERM"]))


def test_network_partition_between_ingest_and_one_sink(
    pg_server: PostgresServer, tmp_path: Path, chaos_result: Record
) -> None:
    """Two sinks; the ingest reaches `replica` through a proxy that cuts every connection and
    refuses new ones for 10 s, and `mirror` directly."""
    result = chaos_result("6. network partition ingest -> sink, 10 s")
    source_dsn = prepare_source(pg_server, "partition_src")
    sinks = [
        prepare_sink(pg_server, "partition_replica", "replica"),
        prepare_sink(pg_server, "partition_mirror", "mirror"),
    ]
    files = write_chaos_configs(tmp_path, pg_server, "partition_src", sinks, "partition")
    ports = {s.sink_id: free_port() for s in sinks}
    stages = [sink_stage(files, tmp_path, ports[s.sink_id], s.sink_id).start() for s in sinks]
    proxy = TcpProxy(ports["replica"]).start()
    ingest = ingest_stage(files, tmp_path, {"replica": proxy.port, "mirror": ports["mirror"]})
    stages.append(ingest.start())

    def clear() -> float:
        time.sleep(10)
        proxy.heal()
        return time.monotonic()

    codes: dict[str, int] = {}
    try:
        wait_until(lambda: http_status(files.health_port, "/readyz") == 200, 60, "ready")
        audit = SlotAudit(source_dsn, files, sinks)
        outcome = run_scenario(
            source_dsn,
            sinks,
            proxy.partition,
            clear,
            health_port=files.health_port,
            slot_audit=audit,
        )
    finally:
        for stage in stages:
            if stage.alive():
                codes[stage.name] = stage.terminate()
        proxy.stop()
    bad = [f"{name} exited {code} on SIGTERM" for name, code in codes.items() if code != 0]
    bad += [] if proxy.cut else ["the partition cut no connection"]
    _finish(result, outcome, *bad)


def test_poison_rows_go_to_dead_letters_and_nothing_else_is_lost(
    pg_server: PostgresServer, tmp_path: Path, chaos_result: Record
) -> None:
    """The sink's accounts table has an operator's CHECK the source does not: about 1 in 50
    account changes inserts a row that violates it (a poison row, never changed again)."""
    result = chaos_result("8. poison rows (sink CHECK)")
    source_dsn, sink, files = _pipeline(
        tmp_path,
        pg_server,
        pg_server,
        "poison",
        constraints={"public.accounts": "CHECK (balance < 10000000)"},
    )
    run = CdcRun(files, tmp_path).start()
    try:
        run.wait_ready()
        audit = SlotAudit(source_dsn, files, [sink])
        outcome = run_scenario(
            source_dsn,
            [sink],
            lambda: None,
            time.monotonic,
            poison_every=50,
            before=6.0,
            health_port=files.health_port,
            slot_audit=audit,
        )
    finally:
        code = run.stop()
    poison = sum(c.poison_dead_lettered for c in outcome.checks)
    extra = [] if code == 0 else [f"cdc run exited {code} on SIGTERM"]
    extra += [] if poison else ["no poison row was written"]
    result.notes = f"{poison} poison rows, each dead-lettered once"
    _finish(result, outcome, *extra, poison=True)


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_source_restart(
    pg_server_factory: Callable[..., PostgresServer],
    tmp_path: Path,
    chaos_result: Record,
    mode: str,
) -> None:
    """The source server stops (`fast`: a clean shutdown; `immediate`: a crash, recovered
    from the WAL on start) for 3 s while the workload runs; the sink is on another server."""
    label = "4. source restart (fast stop)" if mode == "fast" else "4. source crash (immediate)"
    result = chaos_result(label)
    source, sink_server = pg_server_factory(), pg_server_factory()
    source_dsn, sink, files = _pipeline(tmp_path, source, sink_server, f"source_{mode}")
    run = CdcRun(files, tmp_path).start()

    def clear() -> float:
        time.sleep(3)
        source.start()
        return time.monotonic()

    try:
        run.wait_ready()
        audit = SlotAudit(source_dsn, files, [sink])
        outcome = run_scenario(
            source_dsn,
            [sink],
            lambda: source.stop(mode),
            clear,
            health_port=files.health_port,
            slot_audit=audit,
        )
    finally:
        code = run.stop()
    _finish(result, outcome, *([] if code == 0 else [f"cdc run exited {code} on SIGTERM"]))


def test_sink_privileges_revoked_10s(
    pg_server: PostgresServer, tmp_path: Path, chaos_result: Record
) -> None:
    """An operator revokes INSERT/UPDATE/DELETE on the target tables from the sink's role (no
    superuser) for 10 s, then grants them back: the sink must retry, not dead-letter."""
    result = chaos_result("7. sink write errors: privileges revoked 10 s")
    source_dsn, sink, files = _pipeline(
        tmp_path, pg_server, pg_server, "revoke", username="chaos_sink"
    )
    tables = "public.accounts, public.transfers"
    run = CdcRun(files, tmp_path).start()

    def sink_sql(statement: str) -> None:
        with psycopg.connect(sink.dsn, autocommit=True) as conn:
            conn.execute(statement)

    def clear() -> float:
        time.sleep(10)
        sink_sql(f"GRANT INSERT, UPDATE, DELETE ON {tables} TO chaos_sink")
        return time.monotonic()

    try:
        run.wait_ready()
        audit = SlotAudit(source_dsn, files, [sink])
        outcome = run_scenario(
            source_dsn,
            [sink],
            lambda: sink_sql(f"REVOKE INSERT, UPDATE, DELETE ON {tables} FROM chaos_sink"),
            clear,
            health_port=files.health_port,
            slot_audit=audit,
        )
    finally:
        code = run.stop()
    retries = run.log_path.read_text(errors="replace").count("InsufficientPrivilege")
    extra = [] if code == 0 else [f"cdc run exited {code} on SIGTERM"]
    extra += [] if retries else ["the sink never hit the revoked privileges"]
    _finish(result, outcome, *extra)


def test_sink_disk_full_10s(
    pg_server: PostgresServer,
    pg_server_factory: Callable[..., PostgresServer],
    tmp_path: Path,
    chaos_result: Record,
) -> None:
    """The sink's tables live in a tablespace on a 32 MB tmpfs; a filler table fills it
    (PostgreSQL: `could not extend file ...: No space left on device`, SQLSTATE 53100) for
    10 s, then the tmpfs is grown to 256 MB. Needs root (mount); skipped otherwise."""
    result = chaos_result("7. sink write errors: disk full 10 s (tmpfs tablespace)")
    # Not under tmp_path: the server's OS user must be able to reach the directory.
    mount_dir = Path(tempfile.mkdtemp(prefix="cdc-chaos-tmpfs-"))
    mount_dir.chmod(0o755)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m,mode=0755", "tmpfs", str(mount_dir)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        result.notes = f"cannot mount a tmpfs here: {mounted.stderr.strip()}"
        mount_dir.rmdir()
        pytest.skip(result.notes)
    sink_server = pg_server_factory()
    try:
        owner = sink_server.data_dir.stat()
        location = mount_dir / "ts"
        location.mkdir()
        os.chown(location, owner.st_uid, owner.st_gid)
        with sink_server.connect() as conn:
            conn.execute(f"CREATE TABLESPACE chaos_small LOCATION '{location}'")
        sink_server.create_database("disk_sink")
        with psycopg.connect(sink_server.dsn("disk_sink"), autocommit=True) as conn:
            conn.execute("ALTER DATABASE disk_sink SET default_tablespace = chaos_small")
        source_dsn = prepare_source(pg_server, "disk_src")
        sink = prepare_sink(sink_server, "disk_sink")  # its tables land in chaos_small
        files = write_chaos_configs(tmp_path, pg_server, "disk_src", [sink], "disk")
        run = CdcRun(files, tmp_path).start()

        def fill() -> None:
            with psycopg.connect(sink.dsn, autocommit=True) as conn:
                conn.execute("CREATE TABLE chaos_filler (pad text) TABLESPACE chaos_small")
                with contextlib.suppress(psycopg.errors.DiskFull):
                    for _ in range(200):
                        conn.execute(
                            "INSERT INTO chaos_filler SELECT repeat(md5(g::text), 30)"
                            " FROM generate_series(1, 2000) g"
                        )
                    raise AssertionError("the tablespace never filled up")

        def clear() -> float:
            time.sleep(10)
            grown = subprocess.run(
                ["mount", "-o", "remount,size=256m", str(mount_dir)], capture_output=True
            )
            assert grown.returncode == 0, grown.stderr
            return time.monotonic()

        try:
            run.wait_ready()
            audit = SlotAudit(source_dsn, files, [sink])
            outcome = run_scenario(
                source_dsn, [sink], fill, clear, health_port=files.health_port, slot_audit=audit
            )
        finally:
            code = run.stop()
        full = run.log_path.read_text(errors="replace").count("DiskFull")
        extra = [] if code == 0 else [f"cdc run exited {code} on SIGTERM"]
        extra += [] if full else ["the sink never hit the full disk"]
        result.notes = f"{full} write retries on DiskFull"
        _finish(result, outcome, *extra)
    finally:
        sink_server.stop("immediate")
        subprocess.run(["umount", "--lazy", str(mount_dir)], capture_output=True)
        with contextlib.suppress(OSError):
            mount_dir.rmdir()


def test_kill_9_cdc_run_then_run_again(
    pg_server: PostgresServer, tmp_path: Path, chaos_result: Record
) -> None:
    """`kill -9` of the supervisor. Its children must go too (they drain and stop); once they
    are gone a new `cdc run` takes over. Children still running 30 s after the supervisor died
    are reported as orphans (a failure), then stopped by pid so the data can still be checked."""
    result = chaos_result("3. kill -9 cdc run, run again")
    source_dsn, sink, files = _pipeline(tmp_path, pg_server, pg_server, "kill_run")
    first = CdcRun(files, tmp_path, "run-1").start()
    second = CdcRun(files, tmp_path, "run-2")
    problems: list[str] = []
    gone_after: list[float] = []

    def inject() -> None:
        children = first.children()
        assert children, "cdc run has no children"
        assert first.process is not None
        os.kill(first.pid, signal.SIGKILL)
        first.process.wait(10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(alive(pid) for pid in children):
            time.sleep(0.1)
        orphans = [pid for pid in children if alive(pid)]
        gone_after.append(30 - (deadline - time.monotonic()))
        if orphans:
            problems.append(
                f"{len(orphans)} children of the killed cdc run still running 30 s later"
                f" (orphans: pids {orphans}); stopped by the test"
            )
            for pid in orphans:
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline and any(alive(p) for p in orphans):
                time.sleep(0.2)
            stuck = [pid for pid in orphans if alive(pid)]
            if stuck:
                problems.append(f"orphans {stuck} ignored SIGTERM for 40 s; killed (-9)")
                for pid in stuck:
                    os.kill(pid, signal.SIGKILL)

    def clear() -> float:
        second.start()
        return time.monotonic()

    try:
        first.wait_ready()
        audit = SlotAudit(source_dsn, files, [sink])
        outcome = run_scenario(
            source_dsn, [sink], inject, clear, health_port=files.health_port, slot_audit=audit
        )
        if second.process is not None and second.process.poll() is not None:
            problems.append(f"the second cdc run exited {second.process.returncode}")
    finally:
        for run in (first, second):
            if run.process is not None and run.process.poll() is None:
                code = run.stop()
                if code != 0:
                    problems.append(f"{run.log_path.stem} exited {code} on SIGTERM")
    if gone_after and not any("orphans" in p for p in problems):
        result.notes = f"children gone {gone_after[0]:.1f} s after the supervisor died"
    if any("second cdc run" in p for p in problems):
        result.notes = "its log: " + second.log_tail(3).replace("\n", " / ")[-400:]
    _finish(result, outcome, *problems)


def test_control_duplicates_are_seen_when_the_sink_forgets_its_position(
    pg_server: PostgresServer, tmp_path: Path, chaos_result: Record
) -> None:
    """A control, not a fault the platform should survive: the ingest is killed (0.3 s after
    a 20k-row transaction, as in scenario 1, so the restart replays into the sink) and the
    sink's stored positions are deleted (what a sink without them would be) before the
    restarted ingest replays from the slot. The audit must count re-applied changes here,
    or its zeros in the other scenarios would mean nothing. Passes when duplicates are seen
    and nothing is lost."""
    result = chaos_result("control: kill -9 ingest, sink positions wiped")
    source_dsn, sink, files = _pipeline(tmp_path, pg_server, pg_server, "control")
    run = CdcRun(files, tmp_path).start()
    kill, restarted = _kill_child(run, " ingest ", source_dsn, big=20_000)

    def inject() -> None:
        kill()  # then, before the supervisor restarts it (0.5 s), the sink forgets:
        with psycopg.connect(sink.dsn, autocommit=True) as conn:
            conn.execute("DELETE FROM public._cdc_offsets")

    try:
        run.wait_ready()
        outcome = run_scenario(source_dsn, [sink], inject, restarted, health_port=files.health_port)
    finally:
        code = run.stop()
    result.changes = outcome.changes + 20_000
    result.lost = outcome.lost
    result.duplicated = outcome.duplicated
    result.dead_lettered = outcome.dead_lettered
    result.recovery_s = outcome.recovery_s
    result.notes = (
        f"{outcome.audited} sink row writes audited, {outcome.skipped} replays skipped;"
        " duplicates expected here"
    )
    assert outcome.duplicated > 0, "the audit saw no re-applied change"
    assert outcome.lost == 0 and code == 0, (outcome.problems(), code)


def test_half_open_connection_to_the_sink(
    pg_server: PostgresServer, tmp_path: Path, chaos_result: Record
) -> None:
    """The connection between the ingest and its sink goes half-open: nothing passes any
    more and nobody closes it (the sink's host vanished, a route drops the packets, a hung
    peer whose kernel still holds the socket), while a new connection would reach the sink
    at once. The ingest has to notice on its own; the bound is 30 s. Afterwards the frozen
    connection is reset (RST) to show whether what was missing is recoverable."""
    result = chaos_result("6b. half-open connection ingest -> sink")
    source_dsn, sink, files = _pipeline(tmp_path, pg_server, pg_server, "half_open")
    sink_port = free_port()
    stages = [sink_stage(files, tmp_path, sink_port).start()]
    proxy = TcpProxy(sink_port).start()
    stages.append(ingest_stage(files, tmp_path, {"replica": proxy.port}).start())
    after: list[str] = []
    try:
        wait_until(lambda: http_status(files.health_port, "/readyz") == 200, 60, "ready")
        audit = SlotAudit(source_dsn, files, [sink])
        outcome = run_scenario(
            source_dsn,
            [sink],
            proxy.freeze,
            time.monotonic,
            recovery_timeout=30,
            converge_timeout=5,
            health_port=files.health_port,
            slot_audit=audit,
        )
        if outcome.recovery_s is None:
            ready = http_status(files.health_port, "/readyz")
            reset_at = time.monotonic()
            proxy.reset_frozen()
            try:
                wait_until(lambda: converged(source_dsn, [sink]), 30, "converged after RST")
                final = check_sink(source_dsn, sink)
                after.append(
                    "not lost for good: the slot kept them;"
                    f" stalled (/readyz {ready}) until the frozen connection was reset by the"
                    f" test, then converged in {time.monotonic() - reset_at:.1f} s with"
                    f" {final.lost} lost, {final.duplicated} duplicated"
                )
            except AssertionError:
                after.append("did not converge even after the frozen connection was reset")
    finally:
        proxy.stop()
        for stage in stages:
            if stage.alive():
                stage.terminate()
    result.notes = "; ".join(after)
    _finish(result, outcome)
