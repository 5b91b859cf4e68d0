"""The replication slot's health: how far it lags, how much WAL it holds back, whether it is
still usable. One query (`read_slot`), one judgement (`judge_slot`); `cdc health` and the
ingest's periodic `PostgresSlotMonitor` (a `SourceMonitor`) both use them.

Statuses:
- ERROR: the database is unreachable, the slot is gone although the source created it, or
  `wal_status` is 'lost' (PostgreSQL removed WAL the slot still needed: it cannot stream).
- DEGRADED: lag behind the current WAL above `slot_lag_degraded_bytes`, or `wal_status`
  'unreserved' (the slot is past `max_slot_wal_keep_size`; its WAL goes at the next
  checkpoint unless it catches up). 'extended' (past `max_wal_size` but still kept) is
  normal for a slot that lags at all and is covered by the lag threshold.
- OK otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import psycopg
import structlog

from domain.health import ComponentHealth, Status

log = structlog.get_logger(__name__)

# On a standby (logical decoding from a standby, PostgreSQL 16+) pg_current_wal_lsn() fails;
# the position replayed so far is the one the slot is measured against there.
_QUERY = """
SELECT active, active_pid, wal_status, safe_wal_size,
       pg_wal_lsn_diff(cur.lsn, confirmed_flush_lsn)::bigint,
       pg_wal_lsn_diff(cur.lsn, restart_lsn)::bigint,
       confirmed_flush_lsn::text, restart_lsn::text, cur.lsn::text
FROM pg_replication_slots,
     (SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
                  ELSE pg_current_wal_lsn() END AS lsn) AS cur
WHERE slot_name = %s
"""

_WAL_STATUS_ERROR = frozenset({"lost"})
_WAL_STATUS_DEGRADED = frozenset({"unreserved"})


@dataclass(frozen=True, slots=True)
class SlotState:
    """One reading of pg_replication_slots for a slot that exists."""

    slot: str
    active: bool
    active_pid: int | None
    wal_status: str | None
    safe_wal_size: int | None  # bytes left before 'unreserved'; None without a size limit
    lag_bytes: int | None  # None for a slot that never confirmed anything
    retained_wal_bytes: int | None
    confirmed_flush_lsn: str | None
    restart_lsn: str | None
    current_lsn: str | None


async def read_slot(conn: psycopg.AsyncConnection[Any], slot: str) -> SlotState | None:
    """The slot's state, or None when no slot of that name exists. Raises psycopg.Error."""
    row = await (await conn.execute(_QUERY, (slot,))).fetchone()
    if row is None:
        return None
    return SlotState(
        slot=slot,
        active=bool(row[0]),
        active_pid=row[1],
        wal_status=row[2],
        safe_wal_size=None if row[3] is None else int(row[3]),
        lag_bytes=None if row[4] is None else int(row[4]),
        retained_wal_bytes=None if row[5] is None else int(row[5]),
        confirmed_flush_lsn=row[6],
        restart_lsn=row[7],
        current_lsn=row[8],
    )


def judge_slot(
    state: SlotState | None,
    *,
    slot: str,
    lag_degraded_bytes: int,
    missing: Status,
    name: str,
) -> ComponentHealth:
    """The health of a slot reading; `missing` is the status of a slot that does not exist
    (ERROR where the source has created it, DEGRADED for a pipeline maybe not deployed)."""
    if state is None:
        return ComponentHealth(
            name,
            missing,
            {
                "slot": slot,
                "exists": False,
                "lag_degraded_bytes": lag_degraded_bytes,
                "reason": "replication slot does not exist",
            },
        )
    detail: dict[str, Any] = {
        **asdict(state),
        "exists": True,
        "lag_degraded_bytes": lag_degraded_bytes,
    }
    status = Status.OK
    reasons: list[str] = []
    if state.wal_status in _WAL_STATUS_ERROR:
        status = Status.ERROR
        reasons.append(f"wal_status is '{state.wal_status}': the slot lost WAL it needs")
    elif state.wal_status in _WAL_STATUS_DEGRADED:
        status = Status.DEGRADED
        reasons.append(
            f"wal_status is '{state.wal_status}': its WAL is removed at the next checkpoint"
        )
    if state.lag_bytes is not None and state.lag_bytes > lag_degraded_bytes:
        if status is Status.OK:
            status = Status.DEGRADED
        reasons.append(f"lag {state.lag_bytes} bytes > {lag_degraded_bytes}")
    if reasons:
        detail["reason"] = "; ".join(reasons)
    return ComponentHealth(name, status, detail)


def unreachable(slot: str, exc: BaseException, name: str) -> ComponentHealth:
    return ComponentHealth(
        name, Status.ERROR, {"slot": slot, "error": f"database unreachable: {_describe(exc)}"}
    )


async def check_slot(
    conninfo: str,
    slot: str,
    *,
    lag_degraded_bytes: int,
    missing: Status = Status.DEGRADED,
    name: str = "source",
    connect_timeout: int = 5,
) -> ComponentHealth:
    """One look at the slot on a connection of its own (what `cdc health` does)."""
    try:
        async with await psycopg.AsyncConnection.connect(
            conninfo, connect_timeout=connect_timeout, autocommit=True
        ) as conn:
            state = await read_slot(conn, slot)
    except (psycopg.Error, OSError) as exc:
        return unreachable(slot, exc, name)
    return judge_slot(
        state, slot=slot, lag_degraded_bytes=lag_degraded_bytes, missing=missing, name=name
    )


class PostgresSlotMonitor:
    """Polls the slot every `interval_seconds` on one connection of its own, exports the
    gauges, logs `slot.health`, and keeps the latest `ComponentHealth` for /readyz.

    Start it once the source has created the slot: from then on a missing slot is an ERROR.
    It never raises out of its loop: an unreachable database is an ERROR and is retried
    with backoff (0.5 s doubling, up to the poll interval but at least 5 s), so it notices
    a database that came back within about one interval.
    """

    def __init__(
        self,
        conninfo: str,
        slot: str,
        *,
        interval_seconds: float,
        lag_degraded_bytes: int,
        name: str = "slot",
        connect_timeout: int = 5,
    ) -> None:
        self.conninfo = conninfo
        self.slot = slot
        self.interval_seconds = interval_seconds
        self.lag_degraded_bytes = lag_degraded_bytes
        self.name = name
        self.connect_timeout = connect_timeout
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._health = ComponentHealth(name, Status.OK, {"slot": slot, "checked": False})
        self._last_status: Status | None = None
        self.polls = 0

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"slot-monitor-{self.slot}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._close()

    async def health(self) -> ComponentHealth:
        return self._health

    async def lag(self) -> dict[str, Any]:
        """The latest reading (the SourceMonitor port): status plus the slot's fields."""
        return self._health.as_dict()

    async def poll(self) -> ComponentHealth:
        """One reading: updates health and the log (the ingest exports the reading as
        `cdc_source_slot_*` gauges, services/metrics.py). Never raises psycopg errors."""
        try:
            conn = await self._connection()
            state = await read_slot(conn, self.slot)
        except (psycopg.Error, OSError) as exc:
            await self._close()
            health = unreachable(self.slot, exc, self.name)
        else:
            health = judge_slot(
                state,
                slot=self.slot,
                lag_degraded_bytes=self.lag_degraded_bytes,
                missing=Status.ERROR,
                name=self.name,
            )
        self.polls += 1
        self._health = health
        self._log(health)
        return health

    async def _run(self) -> None:
        backoff = 0.5
        while True:
            try:
                health = await self.poll()
            except Exception as exc:  # never let the monitor take the process down
                log.exception("slot.monitor_failed", slot=self.slot)
                health = unreachable(self.slot, exc, self.name)
                self._health = health
                await self._close()
            if "error" in health.detail:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, max(self.interval_seconds, 5.0))
            else:
                backoff = 0.5
                await asyncio.sleep(self.interval_seconds)

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(
                self.conninfo,
                connect_timeout=self.connect_timeout,
                autocommit=True,
                application_name=f"cdc-slot-monitor-{self.slot}"[:63],
            )
        return self._conn

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    def _log(self, health: ComponentHealth) -> None:
        fields = _log_fields(health.detail)
        if health.status is Status.OK:
            log.info("slot.health", status=health.status.value, **fields)
        else:
            log.warning("slot.health", status=health.status.value, **fields)
        if self._last_status is not None and health.status is not self._last_status:
            log.warning(
                "slot.status_changed",
                slot=self.slot,
                previous=self._last_status.value,
                status=health.status.value,
                reason=health.detail.get("reason") or health.detail.get("error"),
            )
        self._last_status = health.status


_LOGGED = (
    "slot",
    "exists",
    "active",
    "active_pid",
    "wal_status",
    "lag_bytes",
    "retained_wal_bytes",
    "safe_wal_size",
    "confirmed_flush_lsn",
    "reason",
    "error",
)


def _log_fields(detail: Mapping[str, Any]) -> dict[str, Any]:
    return {k: detail[k] for k in _LOGGED if k in detail}


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
