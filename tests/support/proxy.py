"""A TCP proxy on 127.0.0.1 that can cut every connection through it and refuse new ones.

Put between the ingest's ``--sink-endpoint`` and a sink's port: ``partition()`` resets every
open connection (RST, so both ends notice at once) and stops listening, so new connections
are refused; ``heal()`` listens on the same port again. Threads, one pair per connection:
the traffic is one gRPC stream, so there are few.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time

HOST = "127.0.0.1"


class TcpProxy:
    def __init__(self, target_port: int, listen_port: int = 0) -> None:
        self.target_port = target_port
        self.port = listen_port
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._frozen: set[socket.socket] = set()  # kept open, never read or written again
        self.accepted = 0
        self.cut = 0

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> TcpProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 10
        while True:  # after a partition the port may sit in TIME_WAIT for a moment
            try:
                listener.bind((HOST, self.port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    listener.close()
                    raise
                time.sleep(0.1)
        listener.listen(16)
        self.port = int(listener.getsockname()[1])
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def partition(self) -> None:
        """Reset every connection and stop listening: connects are refused until heal()."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for conn in conns:
            self.cut += 1
            _reset(conn)

    def heal(self) -> None:
        self.start()

    def freeze(self) -> None:
        """Make every open connection half-open: nothing passes through it any more, in
        either direction, and it is never closed (a peer that vanished without a FIN or RST,
        a route that now drops its packets). New connections are forwarded as before."""
        with self._lock:
            frozen, self._conns = self._conns, set()
            self._frozen |= frozen

    def reset_frozen(self) -> int:
        """RST the frozen connections (what the peer's host would answer once back)."""
        with self._lock:
            frozen, self._frozen = self._frozen, set()
        for conn in frozen:
            _reset(conn)
        return len(frozen)

    def stop(self) -> None:
        self.partition()
        self.reset_frozen()

    # -- plumbing ------------------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # partitioned or stopped
            try:
                upstream = socket.create_connection((HOST, self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                if self._listener is not listener:  # partitioned meanwhile
                    _reset(client)
                    _reset(upstream)
                    return
                self._conns |= {client, upstream}
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if src in self._frozen:
                    self._hold(src)
                    return
                dst.sendall(data)
        except OSError:
            pass
        with self._lock:
            known = src in self._conns
            self._conns.discard(src)
            self._conns.discard(dst)
        if known:  # one side closed: close the other (a partition already reset both)
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def _hold(self, sock: socket.socket) -> None:
        """A frozen connection: stop reading (the sender's window fills up) until stop()."""
        while sock in self._frozen:
            time.sleep(0.2)


def _reset(sock: socket.socket) -> None:
    """Close with RST rather than FIN, as a dropped route would look to a retrying peer."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)  # wakes a thread blocked in recv(); sends nothing
    sock.close()
