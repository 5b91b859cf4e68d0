"""adapters/debezium/connect_client.py against a scripted HTTP server on 127.0.0.1 (a
stand-in for Kafka Connect's REST API: the retry rules are what is tested here; the real
Connect is in tests/integration/test_kafka_provisioner.py)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from adapters.config import ConnectorConfig
from adapters.debezium.connect_client import ConnectClient, ConnectError, ConnectorStatus
from services.net import find_free_port


class Script:
    def __init__(self) -> None:
        self.answers: list[tuple[int, Any]] = []
        self.requests: list[tuple[str, str, Any]] = []


@pytest.fixture
def connect() -> Iterator[tuple[str, Script]]:
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            script.requests.append((self.command, self.path, body))
            status, payload = script.answers.pop(0)
            data = json.dumps(payload).encode() if payload is not None else b""
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = _answer

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", find_free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", script
    finally:
        server.shutdown()
        server.server_close()


def client(url: str, attempts: int = 3) -> ConnectClient:
    return ConnectClient(
        ConnectorConfig(connect_url=url, retry_max_attempts=attempts, retry_wait_seconds=0.01)
    )


def test_rebalance_and_server_errors_are_retried(connect: tuple[str, Script]) -> None:
    url, script = connect
    script.answers = [(409, {"message": "rebalance"}), (500, {"message": "boom"}), (201, {})]
    assert asyncio.run(client(url).put_config("cdc-p", {"a": "1"})) is True
    assert [r[:2] for r in script.requests] == [("PUT", "/connectors/cdc-p/config")] * 3
    assert script.requests[0][2] == {"a": "1"}


def test_a_4xx_answer_is_final_and_carries_connects_message(connect: tuple[str, Script]) -> None:
    url, script = connect
    script.answers = [(400, {"message": "Connector configuration is invalid: password"})]
    with pytest.raises(ConnectError, match="HTTP 400: Connector configuration is invalid") as e:
        asyncio.run(client(url).put_config("cdc-p", {}))
    assert e.value.status == 400
    assert len(script.requests) == 1


def test_attempts_run_out(connect: tuple[str, Script]) -> None:
    url, script = connect
    script.answers = [(503, {"message": "starting"})] * 2
    with pytest.raises(ConnectError, match="HTTP 503: starting"):
        asyncio.run(client(url, attempts=2).plugins())


def test_unreachable_connect_names_the_url() -> None:
    url = f"http://127.0.0.1:{find_free_port()}"
    with pytest.raises(ConnectError, match=f"Kafka Connect at {url} is not reachable"):
        asyncio.run(client(url, attempts=1).server_info())


def test_missing_connector_is_none_and_delete_false(connect: tuple[str, Script]) -> None:
    url, script = connect
    script.answers = [(404, {"message": "not found"})] * 3
    c = client(url)
    assert asyncio.run(c.status("x")) is None
    assert asyncio.run(c.get_config("x")) is None
    assert asyncio.run(c.delete("x")) is False


def test_status_parsing_and_failure_text() -> None:
    status = ConnectorStatus.from_json(
        {
            "name": "cdc-p",
            "connector": {"state": "RUNNING", "worker_id": "w:8083"},
            "tasks": [
                {
                    "id": 0,
                    "state": "FAILED",
                    "worker_id": "w:8083",
                    "trace": "org.x.ConnectException: password authentication failed\n\tat a.b",
                },
                {"id": 1, "state": "RUNNING", "worker_id": "w:8083"},
            ],
        }
    )
    assert status.failed and not status.running
    assert (
        status.summary() == "task 0 FAILED: org.x.ConnectException: password authentication failed"
    )
    assert status.error().startswith("task 0 FAILED: org.x.ConnectException: password")
    running = ConnectorStatus.from_json(
        {"name": "c", "connector": {"state": "RUNNING"}, "tasks": [{"id": 0, "state": "RUNNING"}]}
    )
    assert running.running and not running.failed and running.error() == ""
    no_tasks = ConnectorStatus.from_json({"name": "c", "connector": {"state": "RUNNING"}})
    assert not no_tasks.running  # a connector without a running task captures nothing


def test_health_table_shows_each_component_and_the_error() -> None:
    from services.kafka_ops import health_table

    table = health_table(
        {
            "status": "error",
            "transport_mode": "kafka",
            "components": {
                "broker": {"status": "ok", "brokers": 1},
                "connector": {"status": "error", "error": "task 0 FAILED: boom", "trace": "x\ny"},
            },
        }
    )
    lines = table.splitlines()
    assert lines[0].split() == ["COMPONENT", "STATUS", "DETAIL"]
    assert lines[1].split() == ["broker", "OK", "brokers=1"]
    assert lines[2].startswith("connector") and "ERROR" in lines[2]
    assert lines[2].endswith("error: task 0 FAILED: boom")
    assert "x\ny" not in table  # the full trace is for --json
    assert lines[-1] == "overall: ERROR (transport_mode kafka)"
