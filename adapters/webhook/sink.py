"""The webhook sink: changes as signed JSON batches to an HTTP endpoint (docs/webhooks.md).

Guarantee: at least once, with a stable idempotency key per change (`id`). The sink keeps no
position: a batch the ingest resends after a restart is sent again, with the same ids.

Flow: `write()` turns a batch into events, queues them and sends every full request
(`batch_size` events); a request that is not full waits `linger_ms` for more (or `flush()`).
At most `max_in_flight_requests` requests are out at once, and never two that hold changes
of the same key (a truncate or a keyless table holds the whole table), so per-key order is
the source's. `write()` returns once what it sent is delivered or dead-lettered.

A request is retried (same `webhook-id`, new timestamp and signatures) on connection errors,
timeouts and `retry_on_status`, with exponential backoff and jitter (platform.yaml `retry`),
waiting at least `Retry-After`. Any other 4xx is the receiver refusing some change: the
request is halved until the refused changes are alone, those are dead-lettered (the
transport's ErrorRouter) and the rest delivered. 410 Gone stops the sink. When retries run
out, or a dead letter cannot be stored, the batch is not acknowledged (the ingest sends it
again later): nothing is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import structlog

from adapters.config.pipeline import WebhookSinkConfig
from adapters.config.platform import RetryConfig
from adapters.webhook.payload import (
    body_bytes,
    event_id,
    event_json,
    order_key,
    request_id,
)
from adapters.webhook.signing import parse_secrets, sign
from domain.errors import CdcError, SinkHaltedError, SinkUnavailableError
from domain.events import Operation, Position, SourceEvent
from domain.health import ComponentHealth, Status
from domain.ports import DeadLetter, ErrorRouter, Guarantee, SinkBatch, WriteResult

log = structlog.get_logger(__name__)

_MAX_RETRY_AFTER_SECONDS = 3600.0
_MAX_ERROR_CHARS = 500


class WebhookGoneError(SinkHaltedError):
    """The receiver answered 410 Gone: the endpoint no longer exists. The sink stops
    (exit 2, `sink.halted`) until its url is fixed; the position is held."""


class RejectedError(CdcError):
    """The receiver refused a change (a 4xx other than 410 and retry_on_status)."""


@dataclass(slots=True)
class _Segment:
    """The changes of one write(), for the durable position of its lane."""

    lane: str
    last: Position | None
    remaining: int


@dataclass(slots=True)
class _Change:
    id: str
    doc: dict[str, Any]
    event: SourceEvent
    lane: str
    table: str
    orders: tuple[str, ...]  # its key, and the old key when an update changed the key
    table_wide: bool
    segment: _Segment
    attempts: int = 0


@dataclass(slots=True)
class _Outcome:
    delivered: int = 0
    dead_lettered: int = 0
    requests: int = 0


@dataclass(slots=True)
class _Attempt:
    ok: bool
    status: int | None = None
    error_class: str = ""
    error: str = ""
    retry_after: float | None = None
    retryable: bool = False


def _lanes_of(batch: SinkBatch) -> list[str]:
    """The lane of each event of the batch, in batch order."""
    if not batch.has_blocks or len(batch.lanes) == 1:
        return [batch.lanes[0]] * len(batch)
    by_index: dict[int, str] = {}
    for block in batch.blocks:
        rb = block.records
        for index, lane in zip(rb.column(0).to_pylist(), rb.column(6).to_pylist(), strict=True):
            by_index[int(index)] = batch.lanes[int(lane or 0)]
    return [by_index[i] for i in sorted(by_index)]


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """`Retry-After`: delay-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), _MAX_RETRY_AFTER_SECONDS)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    wait = moment.timestamp() - (time.time() if now is None else now)
    return min(max(wait, 0.0), _MAX_RETRY_AFTER_SECONDS)


class WebhookSinkWriter:
    guarantee = Guarantee.AT_LEAST_ONCE_IDEMPOTENCY_KEY

    def __init__(
        self,
        settings: WebhookSinkConfig,
        pipeline_id: str,
        sink_id: str,
        *,
        router: ErrorRouter | None,
        retry: RetryConfig | None = None,
        dlq_enabled: bool = True,
        dlq_max_retries: int = 3,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self.settings = settings
        self.pipeline_id = pipeline_id
        self.sink_id = sink_id
        self._router = router
        self._retry = retry or RetryConfig()
        self._dlq_enabled = dlq_enabled and router is not None
        self._dlq_attempts = dlq_max_retries + 1
        self._keys = parse_secrets(settings.hmac_secret)
        self._transport = transport
        self._sleep = sleep
        self._client: httpx.AsyncClient | None = None
        self._url = str(settings.url)
        self._headers = {"content-type": "application/json", **settings.headers}
        if settings.bearer_token:
            self._headers["authorization"] = f"Bearer {settings.bearer_token}"
        self._pending: deque[_Change] = deque()
        self._segments: deque[_Segment] = deque()
        self._durable: dict[str, Position] = {}
        self._in_flight: set[asyncio.Task[_Outcome]] = set()
        self._busy_keys: Counter[str] = Counter()
        self._busy_tables: Counter[str] = Counter()  # any change of the table in flight
        self._busy_table_wide: Counter[str] = Counter()  # a table-wide change in flight
        self._barrier = 0  # requests holding a truncate in flight
        self._changed = asyncio.Event()
        self._failure: BaseException | None = None
        self._gone: str | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._outcome = _Outcome()
        self.retries = 0
        self.delivered = 0
        self.dead_lettered = 0
        self._last_error: str | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        limits = httpx.Limits(
            max_connections=self.settings.max_in_flight_requests,
            max_keepalive_connections=self.settings.max_in_flight_requests,
        )
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.settings.timeout_seconds),
            limits=limits,
            transport=self._transport,
            follow_redirects=False,
        )
        log.info(
            "webhook_sink.started",
            sink_id=self.sink_id,
            url=_redacted(self._url),
            signed=bool(self._keys),
            batch_size=self.settings.batch_size,
            max_in_flight_requests=self.settings.max_in_flight_requests,
        )

    async def stop(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
        for task in list(self._in_flight):
            task.cancel()
        for task in list(self._in_flight):
            with contextlib.suppress(BaseException):
                await task
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        close = getattr(self._router, "close", None)
        if close is not None:
            await close()

    async def health(self) -> ComponentHealth:
        name = f"webhook:{self.sink_id}"
        if self._gone is not None:
            return ComponentHealth(name, Status.ERROR, {"error": self._gone})
        detail: dict[str, Any] = {
            "delivered": self.delivered,
            "dead_lettered": self.dead_lettered,
            "retries": self.retries,
            "in_flight_requests": len(self._in_flight),
        }
        if self._last_error:
            detail["last_error"] = self._last_error
            return ComponentHealth(name, Status.DEGRADED, detail)
        return ComponentHealth(name, Status.OK, detail)

    # ---------------------------------------------------------------------- writes

    async def write(self, batch: SinkBatch) -> WriteResult:
        self._raise_if_failed()
        events = batch.events
        if not events:
            return WriteResult(durable=not self._pending and not self._in_flight)
        lanes = _lanes_of(batch)
        docs, unsendable = self._documents(events, lanes)
        for change, problem in unsendable:
            # Stored before anything of the batch is queued: a dead letter that cannot be
            # stored (or dlq disabled) refuses the whole batch, which then comes again.
            await self._dead_letter(change, problem)
        segments: dict[str, _Segment] = {}
        for event, lane, doc in zip(events, lanes, docs, strict=True):
            seg = segments.get(lane)
            if seg is None:
                seg = segments[lane] = _Segment(lane, None, 0)
                self._segments.append(seg)
            seg.last = event.position if seg.last is None else max(seg.last, event.position)
            if doc is not None:
                seg.remaining += 1
                self._pending.append(self._change(event, lane, seg, doc))
        self._advance()  # a lane whose changes were all dead-lettered here
        self._outcome = _Outcome(dead_lettered=len(unsendable))
        await self._drain(include_partial=self.settings.linger_ms == 0)
        self._raise_if_failed()
        if self._pending and self._linger is None:
            loop = asyncio.get_running_loop()
            self._linger = loop.call_later(self.settings.linger_ms / 1000, self._linger_expired)
        done = self._outcome
        return WriteResult(
            written=done.delivered,
            dead_lettered=done.dead_lettered,
            durable=not self._pending and not self._in_flight,
        )

    async def flush(self) -> Mapping[str, Position]:
        self._raise_if_failed()
        await self._drain(include_partial=True)
        self._raise_if_failed()
        return dict(self._durable)

    def _documents(
        self, events: Sequence[SourceEvent], lanes: Sequence[str]
    ) -> tuple[list[dict[str, Any] | None], list[tuple[_Change, _Attempt]]]:
        """Each change's JSON event, or None for one whose values have no JSON form (a
        text that does not parse as its type): those come back with the reason, to be
        dead-lettered instead of failing the batch on every delivery."""
        docs: list[dict[str, Any] | None] = []
        unsendable: list[tuple[_Change, _Attempt]] = []
        for event, lane in zip(events, lanes, strict=True):
            cid = event_id(self.pipeline_id, lane, event)
            try:
                docs.append(event_json(cid, event))
            except ValueError as exc:
                docs.append(None)
                table = event.table.qualified_name
                seg = _Segment(lane, None, 0)
                change = _Change(cid, {"key": {}}, event, lane, table, (table,), True, seg)
                problem = f"a value has no JSON form: {type(exc).__name__}: {exc}"
                unsendable.append((change, _Attempt(False, None, "payload", problem)))
        return docs, unsendable

    def _change(
        self, event: SourceEvent, lane: str, segment: _Segment, doc: dict[str, Any]
    ) -> _Change:
        cid = doc["id"]
        table = event.table.qualified_name
        order = order_key(event, doc["key"])
        orders: tuple[str, ...] = (order,)
        before = doc["before"]
        if doc["after"] is not None and before and order != table:
            old = {name: before.get(name) for name in event.table.key_columns}
            if old != doc["key"] and all(v is not None for v in old.values()):
                orders = (order, order_key(event, old))
        return _Change(cid, doc, event, lane, table, orders, order == table, segment)

    def _linger_expired(self) -> None:
        self._linger = None
        if self._pending and self._failure is None and self._gone is None:
            self._dispatch(include_partial=True)

    def _raise_if_failed(self) -> None:
        if self._gone is not None:
            raise WebhookGoneError(self._gone)
        if self._failure is not None:
            failure, self._failure = self._failure, None
            self._forget()
            if isinstance(failure, CdcError):
                raise failure
            raise SinkUnavailableError(f"{type(failure).__name__}: {failure}") from failure

    def _forget(self) -> None:
        """After a failure: what is not delivered comes again (the ingest resends every
        batch not acknowledged as durable), so drop it here."""
        self._pending.clear()
        self._segments.clear()

    async def _drain(self, include_partial: bool) -> None:
        """Send what may go and wait until nothing of it is in flight."""
        while True:
            if self._failure is not None or self._gone is not None:
                break
            self._dispatch(include_partial)
            if not self._in_flight:
                break
            self._changed.clear()
            await self._changed.wait()
        if self._failure is not None or self._gone is not None:
            # Let the requests in flight end before the failure is reported: their changes
            # are resent with the batch, and order per key needs them out of the way.
            while self._in_flight:
                self._changed.clear()
                await self._changed.wait()

    def _conflicts(self, change: _Change) -> bool:
        if self._barrier:
            return True
        if change.event.operation is Operation.TRUNCATE:
            return bool(self._in_flight)
        if change.table_wide:
            return self._busy_tables[change.table] > 0
        return (
            any(self._busy_keys[o] > 0 for o in change.orders)
            or self._busy_table_wide[change.table] > 0
        )

    def _dispatch(self, include_partial: bool) -> None:
        size = self.settings.batch_size
        while self._pending and len(self._in_flight) < self.settings.max_in_flight_requests:
            if len(self._pending) < size and not include_partial:
                break
            group: list[_Change] = []
            while self._pending and len(group) < size:
                change = self._pending[0]
                truncate = change.event.operation is Operation.TRUNCATE
                if truncate and group:
                    break  # a truncate goes alone
                if self._conflicts(change):
                    break  # a request in flight holds its key (or table)
                group.append(self._pending.popleft())
                if truncate:
                    break
            if not group:
                break  # the head waits for a request of its key to end
            self._start(group)

    def _start(self, group: list[_Change]) -> None:
        for c in group:
            for o in c.orders:
                self._busy_keys[o] += 1
            self._busy_tables[c.table] += 1
            if c.table_wide:
                self._busy_table_wide[c.table] += 1
        if any(c.event.operation is Operation.TRUNCATE for c in group):
            self._barrier += 1
        task = asyncio.create_task(self._deliver(group))
        self._in_flight.add(task)
        task.add_done_callback(lambda t, g=group: self._finished(t, g))  # type: ignore[misc]

    def _finished(self, task: asyncio.Task[_Outcome], group: list[_Change]) -> None:
        self._in_flight.discard(task)
        for c in group:
            for o in c.orders:
                _release(self._busy_keys, o)
            _release(self._busy_tables, c.table)
            if c.table_wide:
                _release(self._busy_table_wide, c.table)
        if any(c.event.operation is Operation.TRUNCATE for c in group):
            self._barrier -= 1
        if task.cancelled():
            pass
        elif task.exception() is not None:
            exc = task.exception()
            if isinstance(exc, WebhookGoneError):
                self._gone = str(exc)
            elif self._failure is None:
                self._failure = exc
        else:
            outcome = task.result()
            self._outcome.delivered += outcome.delivered
            self._outcome.dead_lettered += outcome.dead_lettered
            for c in group:
                c.segment.remaining -= 1
            self._advance()
        self._changed.set()

    def _advance(self) -> None:
        while self._segments and self._segments[0].remaining == 0:
            seg = self._segments.popleft()
            if seg.last is not None:
                old = self._durable.get(seg.lane)
                self._durable[seg.lane] = seg.last if old is None else max(old, seg.last)

    # -------------------------------------------------------------------- delivery

    async def _deliver(self, group: list[_Change]) -> _Outcome:
        """Deliver `group`; a refused request is halved until the refused changes are
        alone (halves in order, so a key's changes stay in order)."""
        outcome = _Outcome()
        attempt = await self._send(group)
        outcome.requests += 1
        if attempt.ok:
            outcome.delivered += len(group)
            self.delivered += len(group)
            return outcome
        if len(group) == 1:
            await self._dead_letter(group[0], attempt)
            outcome.dead_lettered += 1
            return outcome
        middle = len(group) // 2
        for half in (group[:middle], group[middle:]):
            part = await self._deliver(half)
            outcome.delivered += part.delivered
            outcome.dead_lettered += part.dead_lettered
            outcome.requests += part.requests
        return outcome

    async def _send(self, group: list[_Change]) -> _Attempt:
        """One request with its retries: ok, or refused (permanent). Raises when retries
        run out (SinkUnavailableError) or on 410 (WebhookGoneError)."""
        assert self._client is not None, "start() first"
        body = body_bytes(self.pipeline_id, self.sink_id, [c.doc for c in group])
        message_id = request_id([c.id for c in group])
        retries = 0
        while True:
            for c in group:
                c.attempts += 1
            attempt = await self._attempt(message_id, body)
            if attempt.ok:
                self._last_error = None
                return attempt
            if attempt.status == 410:
                message = (
                    f"sink '{self.sink_id}': {_redacted(self._url)} answered 410 Gone: the"
                    " endpoint no longer exists; the sink stops, and the position is held"
                    " until the webhook url is fixed and the sink started again"
                )
                log.error("webhook_sink.gone", sink_id=self.sink_id, url=_redacted(self._url))
                raise WebhookGoneError(message)
            if not attempt.retryable:
                return attempt
            self._last_error = attempt.error
            if retries >= self.settings.max_retries:
                log.error(
                    "webhook_sink.retries_exhausted",
                    sink_id=self.sink_id,
                    attempts=retries + 1,
                    error=attempt.error,
                )
                raise SinkUnavailableError(
                    f"sink '{self.sink_id}': {attempt.error} after {retries + 1} attempts"
                    " (webhook max_retries); the batch is sent again later"
                )
            wait = self._backoff(retries)
            if attempt.retry_after is not None:
                wait = max(wait, attempt.retry_after)
            retries += 1
            self.retries += 1
            log.warning(
                "webhook_sink.retry",
                sink_id=self.sink_id,
                attempt=retries,
                wait_seconds=round(wait, 3),
                error=attempt.error,
            )
            await self._sleep(wait)

    def _backoff(self, retries: int) -> float:
        r = self._retry
        wait = min(r.initial_wait_seconds * r.multiplier**retries, r.max_wait_seconds)
        if r.jitter:
            wait = random.uniform(wait / 2, wait)
        return float(wait)

    async def _attempt(self, message_id: str, body: bytes) -> _Attempt:
        assert self._client is not None
        timestamp = int(time.time())
        headers = dict(self._headers)
        headers["webhook-id"] = message_id
        headers["webhook-timestamp"] = str(timestamp)
        if self._keys:
            headers["webhook-signature"] = sign(self._keys, message_id, timestamp, body)
        try:
            response = await self._client.request(
                self.settings.method, self._url, content=body, headers=headers
            )
        except httpx.TimeoutException as exc:
            return _Attempt(
                False,
                None,
                type(exc).__name__,
                f"timeout after {self.settings.timeout_seconds:g} s ({type(exc).__name__})",
                retryable=True,
            )
        except httpx.TransportError as exc:
            return _Attempt(
                False, None, type(exc).__name__, f"{type(exc).__name__}: {exc}", retryable=True
            )
        status = response.status_code
        if 200 <= status < 300:
            return _Attempt(True, status)
        text = response.text[:_MAX_ERROR_CHARS]
        error = f"HTTP {status}: {text}" if text else f"HTTP {status}"
        retryable = status in self.settings.retry_on_status
        if not retryable and not 400 <= status < 500:
            # A redirect or an unlisted 5xx: not about the changes; hold and resend later.
            retryable = True
        return _Attempt(
            False,
            status,
            f"HTTP {status}",
            error,
            retry_after_seconds(response.headers.get("retry-after")),
            retryable,
        )

    async def _dead_letter(self, change: _Change, attempt: _Attempt) -> None:
        if not self._dlq_enabled or self._router is None:
            raise RejectedError(
                f"sink '{self.sink_id}': the receiver refused change {change.id}"
                f" ({change.table} {change.doc['key']}): {attempt.error}; dlq.enabled is"
                " false, so the sink holds the position instead of dead-lettering it"
            )
        letter = DeadLetter(
            change.event,
            attempt.error,
            "sink",
            attributes={"event_id": change.id},
            pipeline_id=self.pipeline_id,
            sink_id=self.sink_id,
            lane=change.lane,
            error_class=attempt.error_class,
            attempts=change.attempts,
        )
        for tried in range(1, self._dlq_attempts + 1):
            try:
                await self._router.dead_letter([letter])
                break
            except Exception as exc:
                log.warning(
                    "webhook_sink.dead_letter_failed",
                    sink_id=self.sink_id,
                    attempt=tried,
                    error=f"{type(exc).__name__}: {exc}",
                )
                if tried == self._dlq_attempts:
                    raise SinkUnavailableError(
                        f"sink '{self.sink_id}': cannot store dead letter {change.id}"
                        f" after {tried} attempts (dlq.max_retries): {exc}; the batch is"
                        " held back and sent again later"
                    ) from exc
                await self._sleep(self._backoff(tried - 1))
        self.dead_lettered += 1
        log.warning(
            "webhook_sink.dead_lettered",
            sink_id=self.sink_id,
            event_id=change.id,
            table=change.table,
            error=attempt.error,
        )


def _release(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


def _redacted(url: str) -> str:
    """The URL without user info or query (either may carry a token)."""
    parsed = httpx.URL(url)
    return str(parsed.copy_with(username=None, password=None, query=None))
