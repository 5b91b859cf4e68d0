"""Pub/Sub resource names of a pipeline, built reversibly from configuration values.

Pub/Sub allows ``[A-Za-z][A-Za-z0-9-_.~+%]{2,254}``, not starting with ``goog``. A character
outside that set (and ``%`` itself) becomes ``%XX`` per UTF-8 byte, so two different inputs
never give one name and :func:`decode_part` gives the input back. A name that would not start
with a letter (or would start with ``goog``) is prefixed with ``z%-``, which the encoder
never produces otherwise (``%-`` is no escape).
"""

from __future__ import annotations

from dataclasses import dataclass

_ALLOWED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~+")
_GUARD = "z%-"
MAX_NAME = 255


class PubSubNameError(ValueError):
    """A name Pub/Sub would refuse even after escaping (too long)."""


def encode_part(text: str) -> str:
    out: list[str] = []
    for ch in text:
        if ch in _ALLOWED:
            out.append(ch)
        else:
            out += [f"%{b:02X}" for b in ch.encode("utf-8")]
    return "".join(out)


def decode_part(name: str) -> str:
    if name.startswith(_GUARD):
        name = name[len(_GUARD) :]
    data = bytearray()
    i = 0
    while i < len(name):
        if name[i] == "%":
            data.append(int(name[i + 1 : i + 3], 16))
            i += 3
        else:
            data += name[i].encode()
            i += 1
    return data.decode("utf-8")


def resource_name(*parts: str) -> str:
    """The parts (each escaped) joined by ``-``, guarded so that Pub/Sub accepts it."""
    name = "-".join(encode_part(p) for p in parts)
    if not name[:1].isalpha() or not name[:1].isascii() or name.lower().startswith("goog"):
        name = _GUARD + name
    if len(name) < 3:
        name = name + "-" * (3 - len(name))
    if len(name) > MAX_NAME:
        raise PubSubNameError(
            f"Pub/Sub name {name[:40]}... is {len(name)} characters, over {MAX_NAME}"
        )
    return name


@dataclass(frozen=True)
class PipelineNames:
    """One topic per pipeline (every table; the table is in each message's attributes and
    blocks), its subscription, a dead-letter topic and a subscription that keeps what is
    dead-lettered."""

    project: str
    topic: str
    subscription: str
    dlq_topic: str
    dlq_subscription: str

    @classmethod
    def of(
        cls, project: str, topic_prefix: str, pipeline_id: str, dlq_suffix: str
    ) -> PipelineNames:
        topic = resource_name(topic_prefix, pipeline_id)
        dlq = resource_name(topic_prefix, pipeline_id, dlq_suffix)
        return cls(
            project=project,
            topic=topic,
            subscription=resource_name(topic_prefix, pipeline_id, "ingest"),
            dlq_topic=dlq,
            dlq_subscription=resource_name(topic_prefix, pipeline_id, dlq_suffix, "keep"),
        )

    @property
    def topic_path(self) -> str:
        return f"projects/{self.project}/topics/{self.topic}"

    @property
    def subscription_path(self) -> str:
        return f"projects/{self.project}/subscriptions/{self.subscription}"

    @property
    def dlq_topic_path(self) -> str:
        return f"projects/{self.project}/topics/{self.dlq_topic}"

    @property
    def dlq_subscription_path(self) -> str:
        return f"projects/{self.project}/subscriptions/{self.dlq_subscription}"
