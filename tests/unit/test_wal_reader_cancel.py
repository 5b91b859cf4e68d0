"""A cancelled WAL read loop stops, even when its socket turns readable at that moment.

On Python 3.11 `asyncio.wait_for` returns normally when the awaited future completes in the
loop iteration that cancels the waiting task (CPython gh-86296): the cancel is lost. The
reader's wait for its replication socket used it, so a read loop cancelled by a stop could
carry on and then block for good sending to a sink that is gone (the orphaned ingest of
chaos scenario 3 that never logged `ingest.draining`).
"""

from __future__ import annotations

import asyncio
import os
import socket

from adapters.postgres.source.replication import wait_readable


class _PgConn:
    """What `wait_readable` uses of a psycopg PGconn: its socket and consume_input()."""

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock.fileno()
        self.consumed = 0

    def consume_input(self) -> None:
        self.consumed += 1


def test_cancel_in_the_iteration_the_socket_turns_readable_is_not_lost() -> None:
    async def scenario() -> tuple[bool, int]:
        loop = asyncio.get_running_loop()
        ours, peer = socket.socketpair()
        pgconn = _PgConn(ours)
        # A second descriptor of the same socket: its reader callback runs in the same
        # loop iteration as the reader's own wake-up, and cancels the waiting task there.
        twin = os.dup(ours.fileno())
        try:
            waiting = asyncio.create_task(wait_readable(pgconn, 30.0))
            await asyncio.sleep(0.05)  # the task now waits on the socket
            loop.add_reader(twin, waiting.cancel)
            peer.send(b"x")
            try:
                await asyncio.wait_for(asyncio.shield(waiting), 5)
                cancelled = False
            except asyncio.CancelledError:
                cancelled = waiting.cancelled()
            loop.remove_reader(twin)
            return cancelled, pgconn.consumed
        finally:
            os.close(twin)
            ours.close()
            peer.close()

    cancelled, consumed = asyncio.run(scenario())
    assert cancelled, "the cancel was swallowed: the read loop would go on reading"
    assert consumed == 0
