"""The copy-both replication protocol, through libpq.

psycopg 3 has no replication API, but libpq's copy-both protocol works through
`conn.pgconn`: START_REPLICATION, then XLogData and keepalive frames read with
`get_copy_data`, answered with standby status updates carrying the flush LSN (everything
up to it is durable in every sink).
"""

from __future__ import annotations

import asyncio
import time
from struct import Struct
from typing import Any

import psycopg
from psycopg import sql

from adapters.postgres.source.pgoutput import PG_EPOCH_OFFSET_US

XLOG_DATA = 119  # 'w'
KEEPALIVE = 107  # 'k'
XLOG_HEADER = Struct("!QQq")  # wal start, wal end, send time
XLOG_PAYLOAD_AT = 1 + XLOG_HEADER.size
KEEPALIVE_BODY = Struct("!QqB")  # wal end, send time, reply requested
_STATUS = Struct("!cQQQqB")


async def connect_replication(conninfo: str) -> psycopg.AsyncConnection[Any]:
    """A connection in logical replication mode (commands such as CREATE_REPLICATION_SLOT,
    START_REPLICATION)."""
    return await psycopg.AsyncConnection.connect(
        conninfo, autocommit=True, replication="database", connect_timeout=10
    )


async def start_replication(
    conn: psycopg.AsyncConnection[Any], slot_name: str, publication_name: str
) -> None:
    """Stream the slot with pgoutput v1 (messages included) from its confirmed flush LSN."""
    await conn.execute(
        sql.SQL(
            "START_REPLICATION SLOT {} LOGICAL 0/0"
            " (proto_version '1', publication_names {}, messages 'true')"
        ).format(sql.Identifier(slot_name), sql.Literal(publication_name))
    )


def send_status(pgconn: Any, received_lsn: int, flushed_lsn: int) -> None:
    """A standby status update: written and flushed up to `flushed_lsn`, received up to
    `received_lsn` (never less than flushed)."""
    now_us = int(time.time() * 1_000_000) - PG_EPOCH_OFFSET_US
    received = max(received_lsn, flushed_lsn)
    pgconn.put_copy_data(_STATUS.pack(b"r", received, flushed_lsn, flushed_lsn, now_us, 0))
    pgconn.flush()


async def wait_readable(pgconn: Any, timeout: float) -> None:
    """Wait until the socket has data (or `timeout`), then let libpq consume it."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    fd = pgconn.socket

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns normally when the
    # socket turns readable in the loop iteration that cancels this task (CPython
    # gh-86296), so a cancelled read loop would carry on (and block on a gone sink).
    try:
        async with asyncio.timeout(timeout):
            await ready
    except TimeoutError:
        pass
    finally:
        loop.remove_reader(fd)
    pgconn.consume_input()
