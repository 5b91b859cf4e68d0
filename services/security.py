"""Where the processes listen, and the gRPC TLS credentials between ingest and sinks.

Everything here runs at process start: a certificate file that is missing or unreadable is a
:class:`StartupSecurityError` naming the setting and the path, which the CLI turns into exit
code 2 without a traceback.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # grpc is imported where credentials are built: `cdc validate` needs none
    import grpc

    from adapters.config import GrpcTlsConfig, PlatformConfig


class StartupSecurityError(Exception):
    """A bind address or TLS file the process cannot use; the message says which setting."""


def listen_host(platform: PlatformConfig, env: Mapping[str, str] | None = None) -> str:
    """``listen_host`` of platform.yaml, else CDC_LISTEN_HOST, else 127.0.0.1."""
    try:
        return platform.effective_listen_host(os.environ if env is None else env)
    except ValueError as exc:
        raise StartupSecurityError(f"CDC_LISTEN_HOST: {exc}") from None


def grpc_address(host: str, port: int) -> str:
    """``host:port`` as gRPC's add_*_port expects it."""
    return f"{host}:{port}"


def connect_host(host: str) -> str:
    """Where a process on this machine reaches a server listening on ``host``."""
    return "127.0.0.1" if host == "0.0.0.0" else host


def check_startup(platform: PlatformConfig) -> None:
    """Everything this module would refuse at a stage's start, checked at once (`cdc run`
    calls it before starting any stage)."""
    listen_host(platform)
    server_credentials(platform.grpc_tls)
    channel_credentials(platform.grpc_tls)


def _read(setting: str, path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise StartupSecurityError(f"grpc_tls.{setting}: cannot read {path}: {reason}") from None
    if not data.strip():
        raise StartupSecurityError(f"grpc_tls.{setting}: {path} is empty")
    if b"-----BEGIN " not in data:
        raise StartupSecurityError(f"grpc_tls.{setting}: {path} is not a PEM file")
    return data


def _check_pem(tls: GrpcTlsConfig) -> None:
    """The key must belong to the certificate and the CA file must parse: gRPC would only
    say "Failed to bind" (server) or fail every handshake (client)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if tls.cert_file is not None and tls.key_file is not None:
        try:
            context.load_cert_chain(tls.cert_file, tls.key_file)
        except ssl.SSLError as exc:
            raise StartupSecurityError(
                f"grpc_tls: the key_file {tls.key_file} and the cert_file {tls.cert_file} "
                f"are not a certificate and its private key ({exc.reason or exc})"
            ) from None
    if tls.ca_file is not None:
        try:
            context.load_verify_locations(cafile=tls.ca_file)
        except ssl.SSLError as exc:
            raise StartupSecurityError(
                f"grpc_tls.ca_file: {tls.ca_file} holds no usable CA certificate "
                f"({exc.reason or exc})"
            ) from None


def server_credentials(tls: GrpcTlsConfig) -> grpc.ServerCredentials | None:
    """The sink's TLS credentials (client certificates required with require_client_cert);
    None when TLS is off."""
    if not tls.enabled:
        return None
    cert = _read("cert_file", tls.cert_file)
    key = _read("key_file", tls.key_file)
    ca = _read("ca_file", tls.ca_file)
    assert cert is not None and key is not None  # guaranteed by GrpcTlsConfig
    _check_pem(tls)
    import grpc

    try:
        return grpc.ssl_server_credentials(
            [(key, cert)],
            root_certificates=ca if tls.require_client_cert else None,
            require_client_auth=tls.require_client_cert,
        )
    except (RuntimeError, ValueError) as exc:
        raise StartupSecurityError(
            f"grpc_tls: the certificate {tls.cert_file} and key {tls.key_file} are not usable: "
            f"{exc}"
        ) from None


def channel_credentials(tls: GrpcTlsConfig) -> grpc.ChannelCredentials | None:
    """The ingest's credentials towards the sinks: their certificates checked against
    ca_file (system roots when unset), cert_file/key_file as its client certificate; None
    when TLS is off."""
    if not tls.enabled:
        return None
    ca = _read("ca_file", tls.ca_file)
    key = _read("key_file", tls.key_file)
    cert = _read("cert_file", tls.cert_file)
    _check_pem(tls)
    import grpc

    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def channel_options(tls: GrpcTlsConfig) -> list[tuple[str, str]]:
    """``grpc.ssl_target_name_override`` when ``server_name`` is set: the name checked in the
    sink's certificate instead of the host of its endpoint."""
    if tls.enabled and tls.server_name:
        return [("grpc.ssl_target_name_override", tls.server_name)]
    return []
