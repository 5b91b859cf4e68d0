"""Standard Webhooks 1.0 signatures (https://www.standardwebhooks.com/).

`webhook-signature` is ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``; with
several secrets (rotation) one such signature per secret, space-separated. A secret of the
form ``whsec_<base64>`` is the base64-decoded key; any other value is its UTF-8 bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Sequence

SECRET_PREFIX = "whsec_"


class SecretError(ValueError):
    """A `whsec_` secret whose rest is not base64 (the message never contains the secret)."""


def secret_key(secret: str) -> bytes:
    if secret.startswith(SECRET_PREFIX):
        try:
            return base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
        except (binascii.Error, ValueError):
            raise SecretError(
                "hmac_secret starts with 'whsec_' but the rest is not valid base64"
            ) from None
    return secret.encode()


def parse_secrets(value: str | None) -> list[bytes]:
    """`hmac_secret`: one secret, or several separated by spaces (rotation)."""
    if not value:
        return []
    return [secret_key(part) for part in value.split()]


def sign(keys: Sequence[bytes], message_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{message_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        for key in keys
    )


def verify(secret: str, message_id: str, timestamp: str, body: bytes, header: str) -> bool:
    """Whether any `v1` signature of `header` was made with `secret` (receivers also check
    that `timestamp` is recent)."""
    expected = sign([secret_key(secret)], message_id, int(timestamp), body).split(",", 1)[1]
    return any(
        version == "v1" and hmac.compare_digest(sig, expected)
        for version, _, sig in (part.partition(",") for part in header.split())
    )
