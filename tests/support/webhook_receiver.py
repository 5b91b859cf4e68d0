"""A local webhook receiver for tests: a real HTTP server (stdlib, its own thread) that
verifies every request with the verifier of docs/webhooks.md and can inject faults:
500s, 429 with Retry-After, answers slower than the sender's timeout, and 400 for any
request holding a change of a poisoned key.

`events` keeps what it accepted, in arrival order, duplicates included (a slow answer is
accepted before it is slow: the sender times out and sends it again, as with a receiver
that committed and then stalled).
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parents[2] / "docs" / "webhooks.md"


def docs_verifier() -> Callable[[str, dict[str, str], bytes], bool]:
    """The `verify` function exactly as docs/webhooks.md shows it."""
    text = DOCS.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    code = next(b for b in blocks if "def verify(" in b)
    namespace: dict[str, Any] = {}
    exec(compile(code, str(DOCS), "exec"), namespace)
    return namespace["verify"]  # type: ignore[no-any-return]


@dataclass
class Faults:
    """Request numbers (1-based, counted over all requests) that get a fault."""

    every_500: int = 0  # every n-th request answers 500
    every_429: int = 0  # every n-th answers 429 with Retry-After: retry_after
    retry_after: str = "1"
    every_slow: int = 0  # every n-th is accepted, then answered after slow_seconds
    slow_seconds: float = 0.0
    poisoned_keys: set[str] = field(default_factory=set)  # json.dumps(key, sort_keys=True)
    gone: bool = False
    refuse_null_keys: bool = False  # 400 for a change whose key has a null (a bad change)


@dataclass
class Received:
    webhook_id: str
    timestamp: float
    events: list[dict[str, Any]]


class WebhookReceiver:
    def __init__(
        self,
        secret: str | None = None,
        faults: Faults | None = None,
        expect_headers: dict[str, str] | None = None,
    ) -> None:
        self.secret = secret
        # Headers every request must carry (lower-case names); others get 401.
        self.expect_headers = expect_headers or {}
        self.faults = faults or Faults()
        self.verify = docs_verifier()
        self.lock = threading.Lock()
        self.requests = 0
        self.accepted: list[Received] = []
        self.statuses: list[int] = []
        self.bad_signatures: list[str] = []
        self.retry_gaps: list[float] = []  # seconds between a 429 and the next try of it
        self._last_429: dict[str, float] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        # Keys of the requests being handled now, and keys seen in two at once (a sender
        # that keeps per-key order never does that, short of a timed-out request).
        self._keys_in_flight: dict[str, int] = {}
        self.key_overlaps: list[str] = []
        self.overlap_times: list[float] = []  # time.monotonic() of each
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                return

            def do_POST(self) -> None:
                # The sender may go away (killed, or timed out).
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    receiver._handle(self)

            do_PUT = do_POST

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def start(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ results

    @property
    def events(self) -> list[dict[str, Any]]:
        with self.lock:
            return [e for r in self.accepted for e in r.events]

    def unique_events(self) -> list[dict[str, Any]]:
        """Accepted events, each id once (its first arrival)."""
        seen: set[str] = set()
        out = []
        for e in self.events:
            if e["id"] not in seen:
                seen.add(e["id"])
                out.append(e)
        return out

    def state(self) -> dict[str, dict[str, dict[str, Any]]]:
        """The tables as a receiver applying each change once, in arrival order, has them:
        {table: {key json: row}}."""
        tables: dict[str, dict[str, dict[str, Any]]] = {}
        for e in self.unique_events():
            rows = tables.setdefault(e["table"], {})
            key = json.dumps(e["key"], sort_keys=True)
            if e["op"] == "t":
                rows.clear()
            elif e["op"] == "d":
                rows.pop(key, None)
            else:
                rows[key] = {**rows.get(key, {}), **e["after"]}
        return tables

    # ------------------------------------------------------------------ handling

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        length = int(request.headers.get("content-length", "0"))
        body = request.rfile.read(length)
        headers = {k.lower(): v for k, v in request.headers.items()}
        with self.lock:
            self.requests += 1
            n = self.requests
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        status = 0
        keys = self._enter_keys(body)
        try:
            status, extra, slow = self._decide(n, headers, body)
            if slow:
                time.sleep(slow)
            payload = b"" if status < 300 else f"refused ({status})".encode()
            request.send_response(status)
            for name, value in extra.items():
                request.send_header(name, value)
            request.send_header("content-length", str(len(payload)))
            request.end_headers()
            request.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the sender timed out and closed the connection
        finally:
            with self.lock:
                self.in_flight -= 1
                self.statuses.append(status)
                for key in keys:
                    self._keys_in_flight[key] -= 1

    def _enter_keys(self, body: bytes) -> set[str]:
        try:
            events = json.loads(body)["events"]
        except (ValueError, KeyError, TypeError):
            return set()
        keys = {e["table"] + json.dumps(e["key"], sort_keys=True) for e in events}
        for e in events:  # an update that changed the key also holds the old key
            if e.get("before") and e.get("after") and e["key"]:
                old = {name: e["before"].get(name) for name in e["key"]}
                keys.add(e["table"] + json.dumps(old, sort_keys=True))
            if e["op"] == "t" or not e["key"]:
                keys.add(e["table"])
        with self.lock:
            for key in keys:
                if self._keys_in_flight.get(key, 0) > 0:
                    self.key_overlaps.append(key)
                    self.overlap_times.append(time.monotonic())
                self._keys_in_flight[key] = self._keys_in_flight.get(key, 0) + 1
        return keys

    def _decide(
        self, n: int, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], float]:
        f = self.faults
        msg_id = headers.get("webhook-id", "")
        if self.secret is not None and not (
            "webhook-signature" in headers and self.verify(self.secret, headers, body)
        ):
            with self.lock:
                self.bad_signatures.append(msg_id)
            return 401, {}, 0.0
        if any(headers.get(k) != v for k, v in self.expect_headers.items()):
            with self.lock:
                self.bad_signatures.append(f"{msg_id} (headers)")
            return 401, {}, 0.0
        if f.gone:
            return 410, {}, 0.0
        with self.lock:
            if msg_id in self._last_429:
                self.retry_gaps.append(time.monotonic() - self._last_429.pop(msg_id))
        if f.every_500 and n % f.every_500 == 0:
            return 500, {}, 0.0
        if f.every_429 and n % f.every_429 == 0:
            with self.lock:
                self._last_429[msg_id] = time.monotonic()
            return 429, {"retry-after": f.retry_after}, 0.0
        doc = json.loads(body)
        for e in doc["events"]:
            if json.dumps(e["key"], sort_keys=True) in f.poisoned_keys:
                return 400, {}, 0.0
            if f.refuse_null_keys and any(v is None for v in e["key"].values()):
                return 400, {}, 0.0
        with self.lock:
            self.accepted.append(Received(msg_id, time.time(), doc["events"]))
        if f.every_slow and n % f.every_slow == 0:
            return 200, {}, f.slow_seconds
        return 200, {}, 0.0
