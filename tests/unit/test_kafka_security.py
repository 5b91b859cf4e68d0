"""adapters/kafka/security.py: the settings each security_protocol x auth_mechanism gives the
consumer, producer and admin client (librdkafka) and the connector (Java clients, Avro
converters). librdkafka itself checks ours: each combination builds a real confluent-kafka
client (no broker needed to construct one; unknown or invalid keys fail there)."""

from __future__ import annotations

import base64
import datetime
import json
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.schema_registry import SchemaRegistryClient

from adapters.config import ConfigError, KafkaConfig, loads_platform
from adapters.kafka import security
from tests.support.tls import make_pki

# Every valid (security_protocol, auth_mechanism) pair and the SASL mechanism it speaks.
COMBINATIONS = [
    ("PLAINTEXT", "none", None),
    ("SSL", "none", None),
    ("SASL_PLAINTEXT", "sasl_plain", "PLAIN"),
    ("SASL_PLAINTEXT", "sasl_scram_256", "SCRAM-SHA-256"),
    ("SASL_PLAINTEXT", "sasl_scram_512", "SCRAM-SHA-512"),
    ("SASL_SSL", "sasl_plain", "PLAIN"),
    ("SASL_SSL", "sasl_scram_256", "SCRAM-SHA-256"),
    ("SASL_SSL", "sasl_scram_512", "SCRAM-SHA-512"),
    ("SASL_SSL", "sasl_iam", "OAUTHBEARER"),
    ("SASL_SSL", "sasl_oauthbearer", "OAUTHBEARER"),
]
JAVA_MECHANISM = {"sasl_iam": "AWS_MSK_IAM"}


def kafka_config(protocol: str, mechanism: str, **extra: Any) -> KafkaConfig:
    fields: dict[str, Any] = {
        "bootstrap_servers": "b1:9092,b2:9092",
        "security_protocol": protocol,
        "auth_mechanism": mechanism,
    }
    if mechanism in ("sasl_plain", "sasl_scram_256", "sasl_scram_512"):
        fields |= {"sasl_username": "cdc", "sasl_password": 'p"w\\d'}
    if mechanism == "sasl_iam":
        fields["aws_region"] = "eu-west-1"
    if mechanism == "sasl_oauthbearer":
        fields["gcp_project_id"] = "proj"
    return KafkaConfig(**fields, **extra)


def fake_token() -> tuple[str, float]:
    return "header.payload.sig", 4_102_444_800.0


@pytest.mark.parametrize(("protocol", "mechanism", "sasl"), COMBINATIONS)
@pytest.mark.parametrize("role", ["consumer", "producer", "admin"])
def test_librdkafka_settings_per_combination(
    protocol: str, mechanism: str, sasl: str | None, role: security.ClientRole
) -> None:
    kafka = kafka_config(protocol, mechanism)
    conf = security.client_settings(kafka, role, token_source=fake_token)
    assert conf["bootstrap.servers"] == "b1:9092,b2:9092"
    assert conf["security.protocol"] == protocol
    assert conf.get("sasl.mechanism") == sasl
    if mechanism.startswith("sasl_scram") or mechanism == "sasl_plain":
        assert (conf["sasl.username"], conf["sasl.password"]) == ("cdc", 'p"w\\d')
        assert "oauth_cb" not in conf
    elif sasl == "OAUTHBEARER":
        assert conf["oauth_cb"]("ignored") == fake_token()
        assert "sasl.username" not in conf
    else:
        assert not any(k.startswith("sasl.") for k in conf)
    if role == "consumer":
        assert conf["enable.auto.commit"] is False
        assert conf["auto.offset.reset"] == "earliest"
    if role == "producer":
        assert (conf["acks"], conf["enable.idempotence"]) == ("all", True)
    # librdkafka accepts every key and value (it raises KafkaException on the first bad one).
    conf.setdefault("group.id", "g")
    client = {"consumer": Consumer, "producer": Producer, "admin": AdminClient}[role]
    if role != "consumer":
        conf.pop("group.id")
    made = client(conf)
    if role == "consumer":
        made.close()


@pytest.mark.parametrize(("protocol", "mechanism", "sasl"), COMBINATIONS)
def test_connector_java_settings_per_combination(
    protocol: str, mechanism: str, sasl: str | None
) -> None:
    kafka = kafka_config(protocol, mechanism)
    conf = security.java_client_settings(kafka)
    assert conf["security.protocol"] == protocol
    assert conf.get("sasl.mechanism") == JAVA_MECHANISM.get(mechanism, sasl)
    if mechanism in ("sasl_plain", "sasl_scram_256", "sasl_scram_512"):
        module = "plain.PlainLoginModule" if mechanism == "sasl_plain" else "scram.ScramLoginModule"
        # The password's quote and backslash are escaped for the JAAS parser.
        assert conf["sasl.jaas.config"] == (
            f"org.apache.kafka.common.security.{module}"
            f' required username="cdc" password="p\\"w\\\\d";'
        )
    if mechanism == "sasl_iam":
        assert conf == {"security.protocol": "SASL_SSL", **security.MSK_IAM_JAVA}
    if mechanism == "sasl_oauthbearer":
        assert conf == {"security.protocol": "SASL_SSL", **security.GCP_OAUTH_JAVA}
    if mechanism == "none":
        assert conf == {"security.protocol": protocol}

    history = security.schema_history_settings(kafka, "_cdc-schema-history.p")
    assert history["schema.history.internal.kafka.bootstrap.servers"] == "b1:9092,b2:9092"
    assert history["schema.history.internal.kafka.topic"] == "_cdc-schema-history.p"
    for key, value in conf.items():
        assert history[f"schema.history.internal.producer.{key}"] == value
        assert history[f"schema.history.internal.consumer.{key}"] == value
    assert len(history) == 2 + 2 * len(conf)


def test_tls_files_go_to_librdkafka_by_path_and_to_the_connector_by_content(
    tmp_path: Path,
) -> None:
    pki = make_pki(tmp_path)
    kafka = kafka_config(
        "SSL", "none", ssl_ca_file=pki["ca"], ssl_cert_file=pki["cert"], ssl_key_file=pki["key"]
    )
    conf = security.client_settings(kafka, "producer")
    assert conf["ssl.ca.location"] == pki["ca"]
    assert conf["ssl.certificate.location"] == pki["cert"]
    assert conf["ssl.key.location"] == pki["key"]
    Producer(conf)  # librdkafka loads and checks the files here
    java = security.java_client_settings(kafka)
    assert java["ssl.truststore.type"] == "PEM"
    assert java["ssl.truststore.certificates"] == Path(pki["ca"]).read_text()
    assert java["ssl.keystore.type"] == "PEM"
    assert java["ssl.keystore.certificate.chain"] == Path(pki["cert"]).read_text()
    assert java["ssl.keystore.key"] == Path(pki["key"]).read_text()
    assert "BEGIN CERTIFICATE" in java["ssl.truststore.certificates"]


def test_sasl_ssl_with_ca_file_combines_both(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    kafka = kafka_config("SASL_SSL", "sasl_scram_512", ssl_ca_file=pki["ca"])
    conf = security.client_settings(kafka, "admin")
    assert (conf["sasl.mechanism"], conf["ssl.ca.location"]) == ("SCRAM-SHA-512", pki["ca"])
    AdminClient(conf)
    java = security.java_client_settings(kafka)
    assert java["sasl.mechanism"] == "SCRAM-SHA-512"
    assert "BEGIN CERTIFICATE" in java["ssl.truststore.certificates"]


def test_unreadable_tls_file_names_the_setting(tmp_path: Path) -> None:
    kafka = kafka_config("SSL", "none", ssl_ca_file=str(tmp_path / "missing.pem"))
    with pytest.raises(security.KafkaSecurityError, match=r"kafka\.ssl_ca_file: cannot read"):
        security.java_client_settings(kafka)


@pytest.mark.parametrize(
    ("fields", "where", "message"),
    [
        ({"ssl_ca_file": "/ca.pem"}, "ssl_ca_file", "only with security_protocol SSL or SASL_SSL"),
        (
            {"security_protocol": "SSL", "ssl_cert_file": "/c.pem"},
            "ssl_key_file",
            "needs both ssl_cert_file and ssl_key_file",
        ),
        (
            {"schema_registry_username": "u"},
            "schema_registry_password",
            "needs both schema_registry_username and schema_registry_password",
        ),
        (
            {"security_protocol": "SASL_SSL", "auth_mechanism": "none"},
            "auth_mechanism",
            "needs an auth_mechanism",
        ),
        (
            {
                "security_protocol": "SASL_PLAINTEXT",
                "auth_mechanism": "sasl_iam",
                "aws_region": "x",
            },
            "security_protocol",
            "needs security_protocol SASL_SSL",
        ),
    ],
)
def test_invalid_combinations_are_refused_with_the_key(
    fields: dict[str, Any], where: str, message: str
) -> None:
    body = "transport_mode: kafka\nkafka:\n" + "".join(
        f"  {k}: {json.dumps(v)}\n" for k, v in fields.items()
    )
    with pytest.raises(ConfigError) as info:
        loads_platform(body)
    assert f"kafka.{where}" in str(info.value)
    assert message in str(info.value)


def test_registry_basic_auth_for_clients_and_converters() -> None:
    plain = kafka_config("PLAINTEXT", "none", schema_registry_url="https://sr.example:8081")
    assert security.registry_settings(plain) == {"url": "https://sr.example:8081"}
    assert security.registry_auth(plain) is None
    assert "key.converter.basic.auth.user.info" not in security.converter_settings(plain)

    auth = kafka_config(
        "PLAINTEXT",
        "none",
        schema_registry_url="https://sr.example:8081",
        schema_registry_username="sr-user",
        schema_registry_password="sr:pass",
    )
    conf = security.registry_settings(auth)
    assert conf == {"url": "https://sr.example:8081", "basic.auth.user.info": "sr-user:sr:pass"}
    SchemaRegistryClient(conf)  # confluent-kafka accepts the settings
    assert security.registry_auth(auth) == ("sr-user", "sr:pass")
    converters = security.converter_settings(auth)
    for side in ("key", "value"):
        assert converters[f"{side}.converter"] == "io.confluent.connect.avro.AvroConverter"
        assert converters[f"{side}.converter.schema.registry.url"] == "https://sr.example:8081"
        assert converters[f"{side}.converter.basic.auth.credentials.source"] == "USER_INFO"
        assert converters[f"{side}.converter.basic.auth.user.info"] == "sr-user:sr:pass"
    assert "sr:pass" not in json.dumps(security.redact(converters))


def test_msk_iam_token_is_signed_by_amazons_signer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real aws-msk-iam-sasl-signer-python signs locally with static credentials (no
    network): the token is a base64url presigned kafka-cluster:Connect URL."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret/example")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    kafka = kafka_config("SASL_SSL", "sasl_iam")
    conf = security.client_settings(kafka, "consumer")
    token, expiry = conf["oauth_cb"]("")
    url = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    assert url.startswith("https://kafka.eu-west-1.amazonaws.com/")
    assert "Action=kafka-cluster%3AConnect" in url
    assert "X-Amz-Credential=AKIAEXAMPLEEXAMPLE" in url
    now = datetime.datetime.now(datetime.UTC).timestamp()
    assert now < expiry < now + 3600


def test_missing_msk_signer_is_a_clear_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "aws_msk_iam_sasl_signer", None)
    with pytest.raises(security.KafkaSecurityError, match=r"cdc-platform\[kafka-msk\]"):
        security.client_settings(kafka_config("SASL_SSL", "sasl_iam"), "admin")


def test_google_token_wraps_the_access_token() -> None:
    """Google Managed Kafka's OAUTHBEARER token around an access token. The credentials
    object stands in for Application Default Credentials (no Google endpoint here)."""

    class Credentials:
        valid = True
        token = "ya29.access-token"
        expiry = datetime.datetime(2100, 1, 1)
        service_account_email = "cdc@proj.iam.gserviceaccount.com"

        def refresh(self, request: object) -> None:
            raise AssertionError("valid credentials are not refreshed")

    token, expiry = security.gcp_token_source(Credentials())()
    header, payload, access = (
        base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)).decode() for p in token.split(".")
    )
    assert json.loads(header) == {"typ": "JWT", "alg": "GOOG_OAUTH2_TOKEN"}
    claims = json.loads(payload)
    assert claims["sub"] == "cdc@proj.iam.gserviceaccount.com"
    assert claims["exp"] == int(expiry)
    assert access == "ya29.access-token"


def test_missing_google_auth_is_a_clear_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "google.auth", None)
    with pytest.raises(security.KafkaSecurityError, match=r"cdc-platform\[kafka-gcp\]"):
        security.gcp_token_source()


def test_redact_hides_secrets() -> None:
    kafka = kafka_config("SASL_SSL", "sasl_plain")
    shown = security.redact(
        {**security.client_settings(kafka, "producer"), **security.java_client_settings(kafka)}
    )
    assert 'p"w' not in json.dumps(shown)
    assert shown["sasl.password"] == shown["sasl.jaas.config"] == "***"
