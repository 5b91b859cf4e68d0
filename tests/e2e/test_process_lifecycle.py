"""How `cdc run` and its stages start, stop and die: orphans, the pipeline lock, the shutdown
budget and exit codes, startup errors, undeploy next to a running pipeline, log format."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from tests.support.pipeline import (
    REPO,
    PipelineFiles,
    Stage,
    cdc_run_stage,
    child_processes,
    free_port,
    http_json,
    http_status,
    new_pipeline,
    pid_alive,
    port_open,
    stage_logs,
    tables_equal,
    wait_until,
)
from tests.support.workload import TABLES


def _ready(files: PipelineFiles, *stages: Stage, timeout: float = 90) -> None:
    wait_until(
        lambda: (
            not all(s.alive() for s in stages) or http_status(files.health_port, "/readyz") == 200
        ),
        timeout,
        "pipeline ready",
    )
    assert all(s.alive() for s in stages), stage_logs(*stages)


def _stage_ports(children: dict[int, str], files: PipelineFiles) -> list[int]:
    """The ports the stages of one `cdc run` listen on: health, ingest gRPC, sink gRPC."""
    ports = [files.health_port]
    for args in children.values():
        words = args.split()
        for flag in ("--grpc-port", "--port", "--http-port"):
            if flag in words:
                ports.append(int(words[words.index(flag) + 1]))
    return ports


def _cdc(files: PipelineFiles, command: str, *args: str, env: dict[str, str] | None = None) -> Any:
    return subprocess.run(
        files.argv(command, *args),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env=None if env is None else {**os.environ, **env},
    )


def _slot(source_dsn: str, slot: str) -> tuple[bool, int | None] | None:
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT active, active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchone()
    return None if row is None else (bool(row[0]), row[1])


# ------------------------------------------------------------------- orphans and the lock


def test_kill_9_of_cdc_run_stops_its_stages_and_a_new_run_starts_cleanly(
    pg: Any, tmp_path: Path
) -> None:
    source_dsn, replica_dsn, files = new_pipeline(pg, tmp_path, seed_rows=50)
    run = cdc_run_stage(files, tmp_path).start()
    assert run.process is not None
    try:
        _ready(files, run)
        children = child_processes(run.process.pid)
        assert len(children) == 2, children
        ports = _stage_ports(children, files)
        assert len(ports) >= 3 and all(port_open(p) for p in ports), ports
        killed_at = time.monotonic()
        run.kill9()
        wait_until(
            lambda: not any(pid_alive(pid) for pid in children),
            10,
            "the stages exit with their supervisor\n" + run.log_tail(),
        )
        stopped_in = time.monotonic() - killed_at
        assert not [p for p in ports if port_open(p)], "a port is still listening"
        log = run.log_path.read_text()
        # They stopped as on SIGTERM (drained, final position confirmed), not vanished.
        # Which of the two mechanisms stops them first is a race (PDEATHSIG's SIGTERM
        # usually, `*.orphaned` when the pipe's EOF is seen first); the pipe alone has its
        # own test below.
        assert "ingest.draining" in log and "ingest.stopped" in log, run.log_tail()
        assert "sink.stopped" in log, run.log_tail()
        print(f"stages gone {stopped_in:.2f} s after kill -9 of cdc run")

        again = cdc_run_stage(files, tmp_path, "run-again").start()
        try:
            _ready(files, again)
            with psycopg.connect(source_dsn, autocommit=True) as conn:
                conn.execute("INSERT INTO public.orders (id, amount) VALUES (90001, 1.00)")
            wait_until(lambda: tables_equal(source_dsn, replica_dsn, TABLES), 60, "replicated")
        finally:
            code = again.terminate(60)
        assert code == 0, again.log_tail()
        assert "Address already in use" not in again.log_path.read_text()
    finally:
        if run.alive():
            run.terminate()


def test_an_orphaned_stage_stops_when_the_supervisor_pipe_closes(pg: Any, tmp_path: Path) -> None:
    """The fallback for systems without PR_SET_PDEATHSIG: EOF on the inherited pipe."""
    _source, _replica, files = new_pipeline(pg, tmp_path)
    read_end, write_end = os.pipe()
    argv = files.argv("ingest", "--sink-endpoint", f"replica=127.0.0.1:{free_port()}")
    env = dict(os.environ, PYTHONPATH=str(REPO), CDC_PARENT_PIPE_FD=str(read_end))
    log_path = tmp_path / "ingest.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, pass_fds=(read_end,)
        )
    os.close(read_end)
    try:
        wait_until(lambda: http_status(files.health_port, "/healthz") == 200, 60, "ingest up")
        assert process.poll() is None
        os.close(write_end)
        write_end = -1
        code = process.wait(15)
    finally:
        if write_end >= 0:
            os.close(write_end)
        if process.poll() is None:
            process.kill()
            process.wait()
    log_text = log_path.read_text()
    assert "ingest.orphaned" in log_text, log_text[-3000:]
    assert code in (0, 3), log_text[-3000:]  # stopped as on SIGTERM (3: a sink never came up)


def test_a_second_cdc_run_of_a_running_pipeline_exits_2_naming_it(pg: Any, tmp_path: Path) -> None:
    _source, _replica, files = new_pipeline(pg, tmp_path)
    run = cdc_run_stage(files, tmp_path).start()
    assert run.process is not None
    try:
        _ready(files, run)
        second = _cdc(files, "run")
        assert second.returncode == 2, second.stderr
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, second.stderr
        assert f"pipeline '{files.pipeline_id}' is already running" in lines[0]
        assert f"pid {run.process.pid}" in lines[0], lines[0]
        assert "Traceback" not in second.stderr
        assert run.alive() and http_status(files.health_port, "/readyz") == 200
    finally:
        code = run.terminate(60)
    assert code == 0, run.log_tail()


# ------------------------------------------------------------------------- startup errors


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_health_port_in_use_is_one_clear_error_and_no_restart_loop(pg: Any, tmp_path: Path) -> None:
    _source, _replica, files = new_pipeline(pg, tmp_path)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", files.health_port))
        blocker.listen()
        ingest = _cdc(files, "ingest", "--sink-endpoint", f"replica=127.0.0.1:{free_port()}")
        assert ingest.returncode == 2, ingest.stderr
        assert "Traceback" not in ingest.stderr, ingest.stderr
        [line] = _json_lines(ingest.stderr)
        assert line["event"] == "startup.failed", line
        assert f"health_port {files.health_port}" in line["error"], line

        started = time.monotonic()
        run = _cdc(files, "run")
        took = time.monotonic() - started
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    events = _json_lines(run.stderr)
    names = [e["event"] for e in events]
    assert names.count("child.started") == 2, names  # the ingest was not restarted
    failed = [e for e in events if e["event"] == "startup.failed"]
    assert len(failed) == 1 and f"health_port {files.health_port}" in failed[0]["error"]
    assert any(e["event"] == "child.startup_failed" and e["child"] == "ingest" for e in events)
    assert took < 30, took


def test_grpc_ports_in_use_exit_2_with_json_only_stderr(pg: Any, tmp_path: Path) -> None:
    """gRPC's C core would print its own plain-text bind error: stderr stays JSON."""
    _source, _replica, files = new_pipeline(pg, tmp_path)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        sink = _cdc(files, "sink", "--sink-id", "replica", "--port", str(port))
        endpoint = "replica=127.0.0.1:1"
        ingest = _cdc(files, "ingest", "--sink-endpoint", endpoint, "--grpc-port", str(port))
    for result, setting in ((sink, f"--port {port}"), (ingest, f"--grpc-port {port}")):
        assert result.returncode == 2, result.stderr
        events = _json_lines(result.stderr)  # every line parses
        failed = [e for e in events if e["event"] == "startup.failed"]
        assert len(failed) == 1 and setting in failed[0]["error"], result.stderr


def test_ingest_without_a_sink_endpoint_exits_2_naming_it(pg: Any, tmp_path: Path) -> None:
    _source, _replica, files = new_pipeline(pg, tmp_path)
    result = _cdc(files, "ingest", env={"CDC_SINK_ENDPOINTS": ""})
    assert result.returncode == 2, result.stderr
    [line] = _json_lines(result.stderr)
    assert "--sink-endpoint" in line["error"] and "replica" in line["error"], line


# ------------------------------------------------------- shutdown budget and stale health


def _assert_no_error_text_while_ready(files: PipelineFiles, seconds: float = 3.0) -> None:
    """Every ready (200) /readyz body for `seconds` is free of error text."""
    deadline = time.monotonic() + seconds
    samples = 0
    while time.monotonic() < deadline:
        body = http_json(files.health_port, "/readyz")
        if body.get("ready"):
            samples += 1
            assert "error" not in json.dumps(body), body
        time.sleep(0.2)
    assert samples > 0


@pytest.mark.slow
def test_sigterm_with_the_sink_database_down_exits_3_within_the_budget(
    pg: Any, pg_server_factory: Any, tmp_path: Path
) -> None:
    source_dsn, _replica, files = new_pipeline(
        pg, tmp_path, seed_rows=20, extra_platform={"shutdown_timeout_seconds": 10}
    )
    sink_server = pg_server_factory()
    sink_server.create_database("replica")
    replica_dsn = sink_server.dsn("replica")
    pipeline = yaml.safe_load(files.pipeline.read_text())
    pipeline["sinks"][0]["postgres"].update(
        host=sink_server.host, port=sink_server.port, database="replica"
    )
    files.pipeline.write_text(yaml.safe_dump(pipeline))

    run = cdc_run_stage(files, tmp_path).start()
    try:
        _ready(files, run)
        wait_until(lambda: tables_equal(source_dsn, replica_dsn, TABLES), 60, "snapshot")
        assert run.process is not None
        # The sink process dies and is restarted: its stream broke, it is back, and
        # /readyz must not keep reporting the broken stream.
        [sink_pid] = [p for p, a in child_processes(run.process.pid).items() if "--sink-id" in a]
        os.kill(sink_pid, signal.SIGKILL)
        wait_until(lambda: "sink.stream_lost" in run.log_path.read_text(), 30, "stream lost")
        wait_until(lambda: http_status(files.health_port, "/readyz") == 200, 30, "sink back")
        _assert_no_error_text_while_ready(files)
        # The sink database goes down: /readyz says so, naming the sink.
        sink_server.stop("immediate")
        with psycopg.connect(source_dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO public.orders (id, amount) VALUES (91001, 1.00)")
        wait_until(lambda: http_status(files.health_port, "/readyz") == 503, 30, "503")
        down = http_json(files.health_port, "/readyz")
        assert down["components"]["sink:replica"]["status"] == "error", down
        assert "error" in json.dumps(down["components"]["sink:replica"]), down
        # Back up: the row arrives, /readyz is 200 and carries no old error text.
        sink_server.start()
        wait_until(lambda: tables_equal(source_dsn, replica_dsn, TABLES), 60, "caught up")
        wait_until(lambda: http_status(files.health_port, "/readyz") == 200, 30, "ready again")
        _assert_no_error_text_while_ready(files)
        # Down again with changes in flight, then SIGTERM.
        sink_server.stop("immediate")
        with psycopg.connect(source_dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO public.orders (id, amount) VALUES (91002, 2.00)")
        wait_until(
            lambda: (
                http_json(files.health_port, "/readyz")["components"]["sink:replica"][
                    "unacked_batches"
                ]
                > 0
            ),
            30,
            "a batch in flight",
        )
        started = time.monotonic()
        code = run.terminate(60)
        took = time.monotonic() - started
    finally:
        if run.alive():
            run.kill9()
    log = run.log_path.read_text()
    print(f"SIGTERM with the sink database down: exit {code} after {took:.2f} s (budget 10 s)")
    assert code == 3, log[-4000:]
    assert took < 10 + 1.5, took
    [incomplete] = [e for e in _json_lines(log) if e["event"] == "ingest.drain_incomplete"]
    assert incomplete["unacked_batches"] >= 1, incomplete
    # Every line of every process (psycopg's pool warnings included) is JSON.
    assert any(e.get("logger", "").startswith("psycopg") for e in _json_lines(log)), log[-3000:]


# ---------------------------------------------------------------------------- undeploy


@pytest.mark.slow
def test_undeploy_refuses_a_running_pipeline_and_works_once_it_stopped(
    pg: Any, tmp_path: Path
) -> None:
    source_dsn, _replica, files = new_pipeline(pg, tmp_path)
    run = cdc_run_stage(files, tmp_path).start()
    assert run.process is not None
    try:
        _ready(files, run)
        # On this machine: the lock says the pipeline runs.
        local = _cdc(files, "undeploy", "--yes")
        assert local.returncode == 1, local.stdout + local.stderr
        assert f"pid {run.process.pid}" in local.stderr and "stop it first" in local.stderr
        # From another machine (another lock directory): the active slot says it.
        elsewhere = {"CDC_RUNTIME_DIR": str(tmp_path / "elsewhere")}
        remote = _cdc(files, "undeploy", "--yes", env=elsewhere)
        assert remote.returncode == 1, remote.stdout + remote.stderr
        assert "Traceback" not in remote.stderr
        slot = _slot(source_dsn, files.slot)
        assert slot is not None and slot[0], slot
        assert f"walsender pid {slot[1]}" in remote.stderr, remote.stderr
        assert "stop the pipeline first" in remote.stderr
        # --force terminates the walsender, but the running ingest re-creates the slot:
        # that is reported as a failure, never as success.
        forced = _cdc(files, "undeploy", "--yes", "--force", env=elsewhere)
        assert forced.returncode == 1, forced.stdout + forced.stderr
        assert "Traceback" not in forced.stderr, forced.stderr
        assert "re-created" in forced.stderr or "in use" in forced.stderr, forced.stderr
        assert _slot(source_dsn, files.slot) is not None
        assert run.alive()
    finally:
        code = run.terminate(60)
    assert code == 0, run.log_tail()
    done = _cdc(files, "undeploy", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"dropped replication slot {files.slot}" in done.stdout
    assert _slot(source_dsn, files.slot) is None
