"""Kafka client settings from platform.yaml's ``kafka`` section: the one place that turns
``security_protocol`` x ``auth_mechanism`` (and TLS files, registry basic auth) into settings.

Four kinds of client need them:

* librdkafka clients of this process (confluent-kafka consumer, producer, admin):
  :func:`client_settings`;
* Java clients inside Kafka Connect that a connector config configures (the schema history
  producer and consumer of the MySQL and SQL Server connectors): :func:`java_client_settings`
  and :func:`schema_history_settings` (with the ``schema.history.internal.producer.`` /
  ``.consumer.`` prefixes);
* the Avro converters of a connector: :func:`converter_settings`;
* Schema Registry clients of this process: :func:`registry_settings`.

The connector may run on another machine than the pipeline, so TLS files are passed to it
by content (PEM), not by path. Managed Kafka tokens: Amazon MSK IAM through
``aws-msk-iam-sasl-signer-python`` (the ``kafka-msk`` extra) and Google Managed Kafka through
``google-auth`` (the ``kafka-gcp`` extra); without the package the setting is refused with a
:class:`KafkaSecurityError` naming the extra to install.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from adapters.config import KafkaConfig

ClientRole = Literal["consumer", "producer", "admin"]

# auth_mechanism -> the SASL mechanism librdkafka / the Java client speaks.
_LIBRDKAFKA_MECHANISM = {
    "sasl_plain": "PLAIN",
    "sasl_scram_256": "SCRAM-SHA-256",
    "sasl_scram_512": "SCRAM-SHA-512",
    # Both managed-Kafka flavours are OAUTHBEARER tokens made by a callback in Python.
    "sasl_iam": "OAUTHBEARER",
    "sasl_oauthbearer": "OAUTHBEARER",
}
_JAVA_LOGIN_MODULE = {
    "sasl_plain": "org.apache.kafka.common.security.plain.PlainLoginModule",
    "sasl_scram_256": "org.apache.kafka.common.security.scram.ScramLoginModule",
    "sasl_scram_512": "org.apache.kafka.common.security.scram.ScramLoginModule",
}
# Amazon's aws-msk-iam-auth and Google's managed-kafka-auth-login-handler jars must be on
# the Connect worker's classpath for these (docs/kafka.md#security).
MSK_IAM_JAVA = {
    "sasl.mechanism": "AWS_MSK_IAM",
    "sasl.jaas.config": "software.amazon.msk.auth.iam.IAMLoginModule required;",
    "sasl.client.callback.handler.class": "software.amazon.msk.auth.iam.IAMClientCallbackHandler",
}
GCP_OAUTH_JAVA = {
    "sasl.mechanism": "OAUTHBEARER",
    "sasl.login.callback.handler.class": (
        "com.google.cloud.hosted.kafka.auth.GcpLoginCallbackHandler"
    ),
    "sasl.jaas.config": (
        "org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule required;"
    ),
}
SCHEMA_HISTORY_PRODUCER = "schema.history.internal.producer."
SCHEMA_HISTORY_CONSUMER = "schema.history.internal.consumer."


class KafkaSecurityError(Exception):
    """A security setting that cannot be honoured here (a missing package, an unreadable
    file); the message names the setting and what to do."""


# ------------------------------------------------------------------ librdkafka clients


def client_settings(
    kafka: KafkaConfig,
    role: ClientRole,
    *,
    token_source: Callable[[], tuple[str, float]] | None = None,
) -> dict[str, Any]:
    """confluent-kafka settings for a consumer, producer or admin client.

    The consumer gets no automatic commits (offsets are committed only for what the sinks
    made durable); the producer gets ``acks`` and idempotence from the file. For
    ``sasl_iam`` / ``sasl_oauthbearer`` an ``oauth_cb`` is set; ``token_source`` replaces the
    cloud token maker (tests)."""
    conf: dict[str, Any] = {
        "bootstrap.servers": kafka.bootstrap_servers,
        "security.protocol": kafka.security_protocol,
    }
    mech = kafka.auth_mechanism
    if mech != "none":
        conf["sasl.mechanism"] = _LIBRDKAFKA_MECHANISM[mech]
        if mech in _JAVA_LOGIN_MODULE:
            conf["sasl.username"] = kafka.sasl_username
            conf["sasl.password"] = kafka.sasl_password
        else:
            source = token_source or cloud_token_source(kafka)
            conf["oauth_cb"] = lambda _config_string: source()
    if kafka.ssl_ca_file:
        conf["ssl.ca.location"] = kafka.ssl_ca_file
    if kafka.ssl_cert_file:
        conf["ssl.certificate.location"] = kafka.ssl_cert_file
        conf["ssl.key.location"] = kafka.ssl_key_file
    if kafka.ssl_key_password:
        conf["ssl.key.password"] = kafka.ssl_key_password
    if role == "consumer":
        conf["auto.offset.reset"] = kafka.auto_offset_reset
        conf["enable.auto.commit"] = False
    elif role == "producer":
        conf["acks"] = kafka.acks
        conf["enable.idempotence"] = kafka.enable_idempotence
    return conf


def cloud_token_source(kafka: KafkaConfig) -> Callable[[], tuple[str, float]]:
    """The OAUTHBEARER token maker of ``sasl_iam`` (MSK) or ``sasl_oauthbearer`` (Google):
    a callable returning (token, expiry as epoch seconds)."""
    if kafka.auth_mechanism == "sasl_iam":
        return msk_token_source(kafka.aws_region or "")
    if kafka.auth_mechanism == "sasl_oauthbearer":
        return gcp_token_source()
    raise ValueError(f"auth_mechanism {kafka.auth_mechanism} uses no token")


def msk_token_source(region: str) -> Callable[[], tuple[str, float]]:
    try:
        from aws_msk_iam_sasl_signer import MSKAuthTokenProvider  # type: ignore[import-untyped]
    except ImportError as exc:
        raise KafkaSecurityError(
            "kafka.auth_mechanism sasl_iam needs the aws-msk-iam-sasl-signer-python package:"
            " pip install 'cdc-platform[kafka-msk]'"
        ) from exc

    def token() -> tuple[str, float]:
        # Signs with the default AWS credential chain; no network call.
        value, expiry_ms = MSKAuthTokenProvider.generate_auth_token(region)
        return value, expiry_ms / 1000

    return token


def gcp_token_source(credentials: Any = None) -> Callable[[], tuple[str, float]]:
    """Google Managed Kafka accepts an OAuth access token wrapped as an unsigned JWT-shaped
    string (header ``alg: GOOG_OAUTH2_TOKEN``, payload with the principal, the access token
    as the third segment). ``credentials``: a google-auth Credentials (default: ADC)."""
    try:
        import google.auth
        from google.auth.transport.requests import Request
    except ImportError as exc:
        raise KafkaSecurityError(
            "kafka.auth_mechanism sasl_oauthbearer needs the google-auth package:"
            " pip install 'cdc-platform[kafka-gcp]'"
        ) from exc
    if credentials is None:
        credentials, _project = google.auth.default(
            scopes=["https://www.googleapis.com/auth/cloud-platform"]
        )

    def token() -> tuple[str, float]:
        if not credentials.valid:
            credentials.refresh(Request())
        expiry = credentials.expiry.timestamp() if credentials.expiry else time.time() + 3600
        principal = getattr(credentials, "service_account_email", None) or getattr(
            credentials, "signer_email", None
        )
        header = {"typ": "JWT", "alg": "GOOG_OAUTH2_TOKEN"}
        payload = {
            "exp": int(expiry),
            "iat": int(time.time()),
            "iss": "Google",
            "sub": principal or "",
            "scope": "kafka",
        }
        parts = (json.dumps(header), json.dumps(payload), credentials.token)
        return ".".join(_b64url(p) for p in parts), expiry

    return token


def _b64url(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


# ------------------------------------------------------------ Java clients (Kafka Connect)


def _jaas_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _read_pem(path: str, setting: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise KafkaSecurityError(f"kafka.{setting}: cannot read {path}: {exc.strerror}") from exc


def java_client_settings(kafka: KafkaConfig) -> dict[str, str]:
    """Security settings of a Java Kafka client (unprefixed; TLS material inline as PEM)."""
    conf: dict[str, str] = {"security.protocol": kafka.security_protocol}
    mech = kafka.auth_mechanism
    if mech in _JAVA_LOGIN_MODULE:
        conf["sasl.mechanism"] = _LIBRDKAFKA_MECHANISM[mech]
        conf["sasl.jaas.config"] = (
            f"{_JAVA_LOGIN_MODULE[mech]} required"
            f" username={_jaas_quote(kafka.sasl_username or '')}"
            f" password={_jaas_quote(kafka.sasl_password or '')};"
        )
    elif mech == "sasl_iam":
        conf.update(MSK_IAM_JAVA)
    elif mech == "sasl_oauthbearer":
        conf.update(GCP_OAUTH_JAVA)
    if kafka.ssl_ca_file:
        conf["ssl.truststore.type"] = "PEM"
        conf["ssl.truststore.certificates"] = _read_pem(kafka.ssl_ca_file, "ssl_ca_file")
    if kafka.ssl_cert_file and kafka.ssl_key_file:
        conf["ssl.keystore.type"] = "PEM"
        conf["ssl.keystore.certificate.chain"] = _read_pem(kafka.ssl_cert_file, "ssl_cert_file")
        conf["ssl.keystore.key"] = _read_pem(kafka.ssl_key_file, "ssl_key_file")
        if kafka.ssl_key_password:
            conf["ssl.key.password"] = kafka.ssl_key_password
    return conf


def schema_history_settings(kafka: KafkaConfig, topic: str) -> dict[str, str]:
    """The schema history of the MySQL and SQL Server connectors: its topic, brokers and its
    own producer and consumer, which do not inherit the worker's security settings."""
    conf = {
        "schema.history.internal.kafka.bootstrap.servers": kafka.bootstrap_servers,
        "schema.history.internal.kafka.topic": topic,
    }
    for key, value in java_client_settings(kafka).items():
        conf[SCHEMA_HISTORY_PRODUCER + key] = value
        conf[SCHEMA_HISTORY_CONSUMER + key] = value
    return conf


# ------------------------------------------------------------------------ Schema Registry


def registry_settings(kafka: KafkaConfig) -> dict[str, str]:
    """confluent-kafka ``SchemaRegistryClient`` settings."""
    conf = {"url": kafka.schema_registry_url}
    if kafka.schema_registry_username is not None:
        conf["basic.auth.user.info"] = (
            f"{kafka.schema_registry_username}:{kafka.schema_registry_password}"
        )
    return conf


def registry_auth(kafka: KafkaConfig) -> tuple[str, str] | None:
    """(user, password) for plain HTTP clients of the registry, or None."""
    if kafka.schema_registry_username is None:
        return None
    return kafka.schema_registry_username, kafka.schema_registry_password or ""


def converter_settings(kafka: KafkaConfig) -> dict[str, str]:
    """Avro key and value converters of a connector, with the registry URL and basic auth."""
    conf: dict[str, str] = {}
    for side in ("key", "value"):
        prefix = f"{side}.converter"
        conf[prefix] = "io.confluent.connect.avro.AvroConverter"
        conf[f"{prefix}.schema.registry.url"] = kafka.schema_registry_url
        if kafka.schema_registry_username is not None:
            conf[f"{prefix}.basic.auth.credentials.source"] = "USER_INFO"
            conf[f"{prefix}.basic.auth.user.info"] = (
                f"{kafka.schema_registry_username}:{kafka.schema_registry_password}"
            )
    return conf


def redact(conf: Mapping[str, Any]) -> dict[str, Any]:
    """A copy fit for logs and error messages: secrets and callbacks replaced."""
    hidden = ("password", "jaas.config", "user.info", "keystore.key", "oauth_cb")
    return {k: ("***" if any(h in k for h in hidden) else v) for k, v in conf.items()}
