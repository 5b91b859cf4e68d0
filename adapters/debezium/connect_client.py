"""A small Kafka Connect REST client (the endpoints the provisioner and health checks use).

Requests that did not reach Connect, or that Connect answered with 5xx or 409 (a worker
rebalance in progress), are retried ``connector.retry_max_attempts`` times,
``connector.retry_wait_seconds`` apart; every request has ``connector.timeout_seconds``.
4xx answers are not retried: :class:`ConnectError` carries Connect's message.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from adapters.config import ConnectorConfig

RUNNING = "RUNNING"
FAILED = "FAILED"


class ConnectError(Exception):
    """Connect refused a request or could not be reached; ``status`` is the HTTP status
    (0 when no answer came)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class TaskState:
    id: int
    state: str
    worker_id: str = ""
    trace: str = ""


@dataclass(frozen=True)
class ConnectorStatus:
    name: str
    state: str
    worker_id: str = ""
    trace: str = ""
    tasks: tuple[TaskState, ...] = field(default_factory=tuple)

    @property
    def failed(self) -> bool:
        return self.state == FAILED or any(t.state == FAILED for t in self.tasks)

    @property
    def running(self) -> bool:
        """The connector and at least one task run, and no task failed."""
        return (
            self.state == RUNNING
            and bool(self.tasks)
            and all(t.state == RUNNING for t in self.tasks)
        )

    def error(self) -> str:
        """Connect's failure text: the connector's trace, else each failed task's, with the
        exception line first (a Java trace starts with it)."""
        parts = []
        if self.state == FAILED:
            parts.append(f"connector {self.name} FAILED: {self.trace.strip()}")
        for task in self.tasks:
            if task.state == FAILED:
                parts.append(f"task {task.id} FAILED: {task.trace.strip()}")
        return "\n".join(parts)

    def summary(self) -> str:
        """The first line of each failure (for one-line logs and tables)."""
        lines = []
        if self.state == FAILED:
            lines.append(f"connector FAILED: {first_line(self.trace)}")
        lines += [
            f"task {t.id} FAILED: {first_line(t.trace)}" for t in self.tasks if t.state == FAILED
        ]
        return "; ".join(lines)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> ConnectorStatus:
        connector = body.get("connector", {})
        return cls(
            name=body.get("name", ""),
            state=connector.get("state", "UNKNOWN"),
            worker_id=connector.get("worker_id", ""),
            trace=connector.get("trace", ""),
            tasks=tuple(
                TaskState(
                    id=int(t.get("id", 0)),
                    state=t.get("state", "UNKNOWN"),
                    worker_id=t.get("worker_id", ""),
                    trace=t.get("trace", ""),
                )
                for t in body.get("tasks", [])
            ),
        )


def first_line(trace: str) -> str:
    for line in trace.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


class ConnectClient:
    def __init__(self, config: ConnectorConfig) -> None:
        self.base = config.connect_url.rstrip("/")
        self.timeout = config.timeout_seconds
        self.attempts = config.retry_max_attempts
        self.wait = config.retry_wait_seconds

    # -- the blocking core, run in a thread ------------------------------------------------

    def _once(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                payload = json.loads(raw) if raw else None
            except ValueError:
                payload = raw.decode(errors="replace")
            return exc.code, payload

    def _request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        last = ""
        for attempt in range(1, self.attempts + 1):
            try:
                status, payload = self._once(method, path, body)
            except (OSError, urllib.error.URLError) as exc:
                reason = getattr(exc, "reason", exc)
                last = f"Kafka Connect at {self.base} is not reachable: {reason}"
            else:
                if status < 500 and status != 409:
                    return status, payload
                last = f"Kafka Connect {method} {path}: HTTP {status}: {_message(payload)}"
            if attempt < self.attempts:
                time.sleep(self.wait)
        raise ConnectError(last)

    async def _call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return await asyncio.to_thread(self._request, method, path, body)

    # -- the API ---------------------------------------------------------------------------

    async def server_info(self) -> dict[str, Any]:
        status, payload = await self._call("GET", "/")
        _raise_for(status, payload, "GET /")
        return dict(payload or {})

    async def plugins(self) -> list[str]:
        status, payload = await self._call("GET", "/connector-plugins")
        _raise_for(status, payload, "GET /connector-plugins")
        return [p["class"] for p in payload or []]

    async def get_config(self, name: str) -> dict[str, str] | None:
        status, payload = await self._call("GET", f"/connectors/{_seg(name)}/config")
        if status == 404:
            return None
        _raise_for(status, payload, f"GET /connectors/{name}/config")
        return dict(payload or {})

    async def put_config(self, name: str, config: dict[str, str]) -> bool:
        """Create or update the connector (idempotent); True when it was created."""
        status, payload = await self._call("PUT", f"/connectors/{_seg(name)}/config", config)
        _raise_for(status, payload, f"PUT /connectors/{name}/config")
        return status == 201

    async def status(self, name: str) -> ConnectorStatus | None:
        status, payload = await self._call("GET", f"/connectors/{_seg(name)}/status")
        if status == 404:
            return None
        _raise_for(status, payload, f"GET /connectors/{name}/status")
        return ConnectorStatus.from_json(payload or {})

    async def restart(self, name: str) -> None:
        """Restart the connector and its failed tasks."""
        path = f"/connectors/{_seg(name)}/restart?includeTasks=true&onlyFailed=true"
        status, payload = await self._call("POST", path)
        _raise_for(status, payload, f"POST /connectors/{name}/restart")

    async def delete(self, name: str) -> bool:
        """Delete the connector; False when there was none."""
        status, payload = await self._call("DELETE", f"/connectors/{_seg(name)}")
        if status == 404:
            return False
        _raise_for(status, payload, f"DELETE /connectors/{name}")
        return True


def _seg(name: str) -> str:
    return quote(name, safe="")


def _message(payload: Any) -> str:
    if isinstance(payload, dict):
        return str(payload.get("message") or payload)
    return str(payload)


def _raise_for(status: int, payload: Any, what: str) -> None:
    if status >= 400:
        raise ConnectError(f"Kafka Connect {what}: HTTP {status}: {_message(payload)}", status)
