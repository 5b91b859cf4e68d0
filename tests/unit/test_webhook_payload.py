"""The webhook body's values by type (docs/types.md "JSON values"), the idempotency key,
Standard Webhooks signatures and Retry-After."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from adapters.webhook.payload import event_id, event_json, request_id, value_json
from adapters.webhook.signing import SecretError, parse_secrets, secret_key, sign, verify
from adapters.webhook.sink import retry_after_seconds
from domain.blocks import events_of
from domain.events import UNCHANGED, Column, Operation, Position, SourceEvent, TableSchema
from tests.support.arrow_blocks import COMMIT_TIME_US, TypedChange, arrow_block, kafka_column
from tests.support.webhook_receiver import docs_verifier

# (type oid, type name, PostgreSQL text, JSON value)
VALUES = [
    (20, "bigint", "-9223372036854775808", -9223372036854775808),
    (23, "integer", "42", 42),
    (1700, "numeric(12,2)", "12.50", "12.50"),
    (1700, "numeric", "NaN", "NaN"),
    (
        1700,
        "numeric",
        "123456789012345678901234567890.000000001",
        "123456789012345678901234567890.000000001",
    ),
    (790, "money", "$1,234.56", "1234.56"),
    (701, "double precision", "1.5", 1.5),
    (701, "double precision", "NaN", "NaN"),
    (700, "real", "-Infinity", "-Infinity"),
    (16, "boolean", "t", True),
    (16, "boolean", "f", False),
    (25, "text", "ab \u00e9", "ab \u00e9"),
    (
        1184,
        "timestamp with time zone",
        "2024-02-29 13:45:07.5+05:30",
        "2024-02-29T08:15:07.500000Z",
    ),
    (1114, "timestamp without time zone", "2024-02-29 13:45:07.5", "2024-02-29T13:45:07.500000"),
    (1114, "timestamp without time zone", "infinity", "infinity"),
    (1082, "date", "2024-02-29", "2024-02-29"),
    (1083, "time without time zone", "13:45:07.25", "13:45:07.250000"),
    (1186, "interval", "3 days 04:05:06.789", "P3DT14706.789S"),
    (1186, "interval", "1 year 2 mons", "1 year 2 mons"),
    (2950, "uuid", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
    (3802, "jsonb", '{"a": [1, 2.5, null]}', {"a": [1, 2.5, None]}),
    (114, "json", '"just a string"', "just a string"),
    (17, "bytea", "\\x00ff10", base64.b64encode(b"\x00\xff\x10").decode()),
    (1007, "integer[]", "{1,NULL,3}", [1, None, 3]),
    (1231, "numeric[]", "{1.10,2}", ["1.10", "2"]),
]


@pytest.mark.parametrize(("oid", "type_name", "text", "expected"), VALUES)
def test_values_as_json_by_type(oid: int, type_name: str, text: str, expected: object) -> None:
    table = TableSchema("public", "t", (Column("v", oid, type_name),))
    event = SourceEvent(Operation.CREATE, table, Position(1, 1), after=(text,))
    got = event_json("evt_x", event)["after"]["v"]
    assert got == expected and type(got) is type(expected)
    assert value_json(oid, type_name, "", text) == expected  # the general path agrees
    json.dumps(got)  # and it is JSON


def test_values_of_a_source_without_type_oids_go_by_logical_type() -> None:
    assert value_json(0, "INT UNSIGNED", "uint32", "7") == 7
    assert value_json(0, "DOUBLE", "float64", "2.5") == 2.5
    assert value_json(0, "TINYINT(1)", "bool", "true") is True
    assert value_json(0, "JSON", "json", "[1]") == [1]
    assert value_json(0, "DECIMAL(5,2)", "decimal(5,2)", "1.20") == "1.20"


def test_a_kafka_sources_values_read_as_their_postgresql_type() -> None:
    # A Kafka source's column: no OID, `type_name` is the PostgreSQL type of its logical type,
    # and the sinks see the PostgreSQL text of its typed Arrow value (domain/block_text.py).
    stamp = value_json(0, "timestamp with time zone", "timestamptz", "2024-02-29 13:45:07.5+00")
    assert stamp == "2024-02-29T13:45:07.500000Z"
    assert value_json(0, "bytea", "bytes", "\\x00ff") == base64.b64encode(b"\x00\xff").decode()
    assert value_json(0, "integer[]", "list<int32>", "{1,NULL,3}") == [1, None, 3]
    assert value_json(0, "numeric(12,2)", "decimal(12,2)", "12.50") == "12.50"
    assert value_json(0, "date", "date", "2024-02-29") == "2024-02-29"
    assert value_json(0, "interval", "interval", "1 day 02:00:00") == "P1DT7200S"
    assert value_json(0, "jsonb", "json", '{"a": 1}') == {"a": 1}


ITEMS = TableSchema(
    "public",
    "items",
    (
        Column("id", 20, "bigint", is_key=True),
        Column("name", 25, "text"),
        Column("doc", 25, "text"),
    ),
)


def test_event_fields_unchanged_and_key() -> None:
    update = SourceEvent(
        Operation.UPDATE,
        ITEMS,
        Position(23861184, 3),
        after=("42", None, UNCHANGED),
        commit_time_us=1_767_607_201_002_000,
        transaction_id=771,
    )
    doc = event_json("evt_1", update)
    assert doc == {
        "id": "evt_1",
        "op": "u",
        "table": "public.items",
        "key": {"id": 42},
        "before": None,
        "after": {"id": 42, "name": None},
        "unchanged": ["doc"],
        "position": "23861184:3",
        "commit_time": "2026-01-05T10:00:01.002000Z",
        "transaction_id": 771,
    }
    delete = SourceEvent(Operation.DELETE, ITEMS, Position(5, 1), before=("42", None, None))
    doc = event_json("evt_2", delete)
    assert (doc["key"], doc["after"], doc["op"], doc["commit_time"]) == (
        {"id": 42},
        None,
        "d",
        None,
    )
    assert "unchanged" not in doc


def test_the_idempotency_key_is_stable_and_distinct() -> None:
    a = SourceEvent(Operation.CREATE, ITEMS, Position(10, 1), after=("1", "a", "b"))
    same_place = SourceEvent(Operation.CREATE, ITEMS, Position(10, 1), after=("1", "a", "b"))
    assert event_id("p", "slot", a) == event_id("p", "slot", same_place)
    others = {
        event_id("p", "slot", SourceEvent(Operation.CREATE, ITEMS, Position(10, 2))),
        event_id("p", "slot", SourceEvent(Operation.CREATE, ITEMS, Position(11, 1))),
        event_id("q", "slot", a),
        event_id("p", "other", a),
    }
    assert event_id("p", "slot", a) not in others and len(others) == 4
    assert event_id("p", "slot", a).startswith("evt_") and len(event_id("p", "slot", a)) == 36
    assert request_id(["evt_a", "evt_b"]) == request_id(["evt_a", "evt_b"])
    assert request_id(["evt_a"]) != request_id(["evt_a", "evt_b"])


def test_standard_webhooks_reference_signature() -> None:
    """The example of the Standard Webhooks specification."""
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    header = sign([secret_key(secret)], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
    assert header == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_rotation_signs_with_each_secret_and_the_docs_verifier_accepts_either() -> None:
    old, new = "whsec_" + base64.b64encode(b"old key").decode(), "plain-new-secret"
    keys = parse_secrets(f"{old} {new}")
    assert keys == [b"old key", b"plain-new-secret"]
    body, ts = b'{"events":[]}', 1_767_607_201
    header = sign(keys, "msg_1", ts, body)
    assert len(header.split()) == 2
    for secret in (old, new):
        assert verify(secret, "msg_1", str(ts), body, header)
    assert not verify(
        "whsec_" + base64.b64encode(b"other").decode(), "msg_1", str(ts), body, header
    )
    docs = docs_verifier()
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(ts), "webhook-signature": header}
    # The docs' verifier also checks the timestamp's age: recent here.
    import time

    now = int(time.time())
    headers["webhook-timestamp"] = str(now)
    headers["webhook-signature"] = sign(keys, "msg_1", now, body)
    assert docs(new, headers, body) and docs(old, headers, body)
    assert not docs(new, headers, body + b" ")
    headers["webhook-timestamp"] = str(now - 3600)
    headers["webhook-signature"] = sign(keys, "msg_1", now - 3600, body)
    assert not docs(new, headers, body)


def test_a_whsec_secret_must_be_base64() -> None:
    with pytest.raises(SecretError, match="not valid base64"):
        secret_key("whsec_not*base64")
    from adapters.config import ConfigError  # noqa: F401
    from adapters.config.pipeline import WebhookSinkConfig

    with pytest.raises(ValueError, match="hmac_secret"):
        WebhookSinkConfig.model_validate({"url": "http://h", "hmac_secret": "whsec_%%%"})
    assert "whsec" not in repr(
        WebhookSinkConfig.model_validate(
            {"url": "http://h", "hmac_secret": "whsec_AAAA", "bearer_token": "tok"}
        )
    ) and "tok" not in repr(
        WebhookSinkConfig.model_validate({"url": "http://h", "bearer_token": "tok"})
    )


def test_retry_after_seconds_or_http_date() -> None:
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert retry_after_seconds("999999") == 3600.0


KAFKA_ITEMS = TableSchema(
    "inventory",
    "items",
    (
        kafka_column("id", "int64", "bigint", key=True),
        kafka_column("ok", "bool", "boolean"),
        kafka_column("price", "decimal(8,2)", "numeric(8,2)"),
        kafka_column("ratio", "float64", "double precision"),
        kafka_column("at", "timestamptz", "timestamp with time zone"),
        kafka_column("span", "interval", "interval"),
        kafka_column("tags", "list<string>", "text[]"),
        kafka_column("doc", "json", "jsonb"),
    ),
)


def test_events_of_an_arrow_block_give_the_payload_of_their_text_form() -> None:
    at = datetime(2024, 2, 29, 13, 45, 7, 500000, tzinfo=UTC)
    typed = arrow_block(
        KAFKA_ITEMS,
        [
            TypedChange(
                Operation.CREATE,
                Position(9, 1),
                (1, True, Decimal("9.90"), float("nan"), at, timedelta(days=2), ["a b"], "[1]"),
            ),
            TypedChange(
                Operation.UPDATE,
                Position(9, 2),
                (1, False, None, 0.5, at, -timedelta(seconds=1), [], None),
                unchanged=(7,),
            ),
        ],
    )
    text = [
        SourceEvent(
            Operation.CREATE,
            KAFKA_ITEMS,
            Position(9, 1),
            after=(
                "1",
                "t",
                "9.90",
                "NaN",
                "2024-02-29 13:45:07.5+00",
                "2 days",
                '{"a b"}',
                "[1]",
            ),
            commit_time_us=COMMIT_TIME_US,
        ),
        SourceEvent(
            Operation.UPDATE,
            KAFKA_ITEMS,
            Position(9, 2),
            after=("1", "f", None, "0.5", "2024-02-29 13:45:07.5+00", "-00:00:01", "{}", UNCHANGED),
            commit_time_us=COMMIT_TIME_US,
        ),
    ]
    from_arrow = [event_json("evt", ev) for _, ev in events_of(typed)]
    assert from_arrow == [event_json("evt", ev) for ev in text]
    assert from_arrow[0]["after"]["ratio"] == "NaN" and from_arrow[0]["after"]["doc"] == [1]
    assert from_arrow[1]["unchanged"] == ["doc"]
