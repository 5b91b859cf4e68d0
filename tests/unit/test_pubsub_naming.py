"""Pub/Sub resource names (adapters/pubsub/naming.py): accepted by Pub/Sub's rule, and
reversible, so two different inputs never share a name."""

from __future__ import annotations

import re

import pytest

from adapters.pubsub.naming import PipelineNames, PubSubNameError, decode_part, resource_name

PUBSUB_NAME = re.compile(r"[A-Za-z][A-Za-z0-9\-_.~+%]{2,254}")


@pytest.mark.parametrize(
    "text",
    [
        "orders",
        "public.orders",
        "Ünïcode tábla",
        "a/b:c d",
        "%41",
        "9lives",
        "goog-x",
        "x",
        "z%-tricky",
        "emoji 🐘",
    ],
)
def test_names_are_valid_and_reversible(text: str) -> None:
    name = resource_name(text)
    assert PUBSUB_NAME.fullmatch(name), name
    assert not name.lower().startswith("goog")
    assert decode_part(name) == text or len(text) < 3


def test_different_inputs_never_share_a_name() -> None:
    inputs = ["a b", "a%20b", "a_b", "a+b", "a.b", "a/b", "A b"]
    assert len({resource_name(t) for t in inputs}) == len(inputs)


def test_pipeline_names_and_paths() -> None:
    n = PipelineNames.of("proj", "cdc", "orders-eu", "dlq")
    assert n.topic_path == "projects/proj/topics/cdc-orders-eu"
    assert n.subscription_path == "projects/proj/subscriptions/cdc-orders-eu-ingest"
    assert n.dlq_topic_path == "projects/proj/topics/cdc-orders-eu-dlq"
    assert n.dlq_subscription_path == "projects/proj/subscriptions/cdc-orders-eu-dlq-keep"


def test_a_name_over_the_limit_is_refused() -> None:
    with pytest.raises(PubSubNameError, match="over 255"):
        resource_name("x" * 300)
