"""listen_host / CDC_LISTEN_HOST resolution, grpc_tls validation and TLS file errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from adapters.config import ConfigError, GrpcTlsConfig, PlatformConfig, loads_platform
from services import security


def test_listen_host_defaults_to_loopback_and_config_beats_the_environment() -> None:
    assert security.listen_host(PlatformConfig(), env={}) == "127.0.0.1"
    assert security.listen_host(PlatformConfig(), env={"CDC_LISTEN_HOST": "0.0.0.0"}) == "0.0.0.0"
    configured = loads_platform("listen_host: 10.1.2.3\n")
    assert security.listen_host(configured, env={"CDC_LISTEN_HOST": "0.0.0.0"}) == "10.1.2.3"


def test_a_bad_listen_host_names_its_origin() -> None:
    with pytest.raises(ConfigError, match="listen_host: '::' is not an IPv4 address"):
        loads_platform('listen_host: "::"\n')
    with pytest.raises(security.StartupSecurityError, match="CDC_LISTEN_HOST: 'a b'"):
        security.listen_host(PlatformConfig(), env={"CDC_LISTEN_HOST": "a b"})


def test_connect_host() -> None:
    assert security.connect_host("0.0.0.0") == "127.0.0.1"
    assert security.connect_host("127.0.0.2") == "127.0.0.2"


def test_grpc_tls_rules() -> None:
    with pytest.raises(ConfigError) as info:
        loads_platform("grpc_tls: {enabled: true, require_client_cert: true}\n")
    text = str(info.value)
    for message in (
        "grpc_tls.cert_file: grpc_tls.enabled requires cert_file",
        "grpc_tls.key_file: grpc_tls.enabled requires key_file",
        "grpc_tls.ca_file: require_client_cert requires ca_file",
    ):
        assert message in text
    with pytest.raises(ConfigError, match=re.escape("require_client_cert needs grpc_tls.enabled")):
        loads_platform("grpc_tls: {require_client_cert: true}\n")
    assert security.server_credentials(GrpcTlsConfig()) is None
    assert security.channel_credentials(GrpcTlsConfig()) is None
    assert security.channel_options(GrpcTlsConfig(server_name="x")) == []


def test_unreadable_tls_files_name_the_setting_and_the_path(tmp_path: Path) -> None:
    cert, key, ca = tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "ca.crt"
    tls = GrpcTlsConfig(enabled=True, cert_file=str(cert), key_file=str(key), ca_file=str(ca))
    with pytest.raises(
        security.StartupSecurityError,
        match=re.escape(f"grpc_tls.cert_file: cannot read {cert}: No such"),
    ):
        security.server_credentials(tls)
    cert.write_text("not a certificate\n")
    with pytest.raises(
        security.StartupSecurityError, match=re.escape(f"cert_file: {cert} is not a PEM")
    ):
        security.server_credentials(tls)
    cert.write_text("")
    with pytest.raises(
        security.StartupSecurityError, match=re.escape(f"cert_file: {cert} is empty")
    ):
        security.server_credentials(tls)


def test_settings_holding_a_conninfo_do_not_print_it() -> None:
    from adapters.postgres.source.reader import WalReaderSettings

    settings = WalReaderSettings(
        conninfo="host=db user=cdc password=hunter2-secret",
        database="shop",
        tables=("public.orders",),
        slot_name="s",
        publication_name="p",
    )
    assert "hunter2-secret" not in repr(settings) and "slot_name='s'" in repr(settings)


def test_a_key_of_another_certificate_or_a_bad_ca_file_is_named(tmp_path: Path) -> None:
    from tests.support.tls import make_pki

    a, b = make_pki(tmp_path / "a"), make_pki(tmp_path / "b")
    good = GrpcTlsConfig(enabled=True, cert_file=a["cert"], key_file=a["key"], ca_file=a["ca"])
    assert security.server_credentials(good) is not None
    assert security.channel_credentials(good) is not None
    mixed = good.model_copy(update={"key_file": b["key"]})
    for build in (security.server_credentials, security.channel_credentials):
        with pytest.raises(security.StartupSecurityError) as info:
            build(mixed)
        assert f"the key_file {b['key']} and the cert_file {a['cert']}" in str(info.value)
    bad_ca = tmp_path / "ca.crt"
    bad_ca.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    with pytest.raises(security.StartupSecurityError, match=re.escape(f"ca_file: {bad_ca}")):
        security.channel_credentials(good.model_copy(update={"ca_file": str(bad_ca)}))
