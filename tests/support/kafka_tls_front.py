"""A Kafka broker reached over TLS where no Apache Kafka is to be had: Tansu (whose own TLS
listener librdkafka cannot handshake with) behind a TLS terminator of the standard library
(OpenSSL), with Tansu advertising the terminator's port so that every connection the clients
open, bootstrap and partition leader alike, goes through TLS.

It tests the client side of ``security_protocol: SSL`` live (CA verification, the server name
check against the certificate, a clear failure with another CA); it has no SASL. The real
Apache Kafka broker of tests/support/apache_kafka.py covers SASL where its jars can be had.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

from services.net import find_free_port
from services.stack.process import HOST, ManagedProcess, launch
from services.stack.tansu import find_tansu_binary, kafka_api_versions_ok
from tests.support.tls import make_pki

_CHUNK = 65536


class TlsTerminator:
    """Accepts TLS on 127.0.0.1:``port`` and pipes the plaintext to ``target_port``; runs
    its own event loop on a daemon thread."""

    def __init__(self, port: int, target_port: int, cert_file: str, key_file: str) -> None:
        self.port = port
        self.target_port = target_port
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert_file, key_file)
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> TlsTerminator:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, HOST, self.port, ssl=self.context), self._loop
        ).result(10)
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            broker_r, broker_w = await asyncio.open_connection(HOST, self.target_port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(_pipe(client_r, broker_w), _pipe(broker_r, client_w))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
    except (OSError, ssl.SSLError):
        pass
    finally:
        with contextlib.suppress(OSError, ssl.SSLError, RuntimeError):
            writer.close()


@dataclass
class TlsBroker:
    """``bootstrap_servers`` speaks TLS only (certificate for 127.0.0.1 signed by
    ``ca_file``)."""

    port: int
    ca_file: str
    terminator: TlsTerminator
    tansu: ManagedProcess

    @property
    def bootstrap_servers(self) -> str:
        return f"{HOST}:{self.port}"

    def stop(self) -> None:
        self.terminator.stop()
        self.tansu.stop()


def start(workdir: Path) -> TlsBroker:
    pki = make_pki(workdir / "pki")
    tls_port, plain_port = find_free_port(), find_free_port()
    terminator = TlsTerminator(tls_port, plain_port, pki["cert"], pki["key"]).start()
    try:
        tansu = launch(
            "tansu",
            [
                str(find_tansu_binary()),
                "broker",
                "--cluster-id",
                "cdc-tls",
                "--listener-url",
                f"tcp://{HOST}:{plain_port}",
                "--advertised-listener-url",
                f"tcp://{HOST}:{tls_port}",
                "--storage-engine",
                "memory://tansu/",
            ],
            workdir=workdir,
            ports=[plain_port],
            healthy=lambda: kafka_api_versions_ok(HOST, plain_port),
            timeout=20.0,
            env={**os.environ, "RUST_LOG": "warn"},
        )
    except BaseException:
        terminator.stop()
        raise
    return TlsBroker(tls_port, pki["ca"], terminator, tansu)
