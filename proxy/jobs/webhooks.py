"""Standard Webhooks signatures (standardwebhooks.com), pure: no clock, no I/O.

A delivery carries three headers: ``webhook-id`` (the same on every attempt, so receivers
dedupe), ``webhook-timestamp`` (UNIX seconds of this attempt) and ``webhook-signature``:
space-separated ``v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>``, one per secret, so
an operator can rotate a receiver's secret with both the old and the new one signing for a
while. Secrets are written ``whsec_<base64 key>``, the form receivers' libraries take.

:func:`verify` is the receiver's side; Parkway itself does not need it, the tests and
documentation do (it is what ``clients/ruby/parkway_webhook.rb`` restates).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable, Mapping, Sequence

SECRET_PREFIX = "whsec_"
MIN_KEY_BYTES = 24  # the spec asks for 24 to 64 random bytes
MAX_KEY_BYTES = 64
DEFAULT_TOLERANCE = 300  # seconds a receiver accepts between the timestamp and its clock


class InvalidWebhookSecret(ValueError):
    """A ``whsec_`` secret that cannot be used; the message never contains the secret."""


class WebhookVerificationError(Exception):
    """A delivery that must be refused: missing header, stale timestamp or no matching signature."""


def parse_secret(text: str) -> bytes:
    """The HMAC key of ``whsec_<base64>`` (the prefix is optional, as receivers' libraries allow)."""
    encoded = text.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidWebhookSecret("is not whsec_ followed by base64") from None
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise InvalidWebhookSecret(
            f"decodes to {len(key)} bytes; Standard Webhooks keys are {MIN_KEY_BYTES} to {MAX_KEY_BYTES} random bytes"
        )
    return key


def format_secret(key: bytes) -> str:
    """``whsec_<base64>`` for a key (e.g. ``secrets.token_bytes(32)``), as operators configure it."""
    return SECRET_PREFIX + base64.b64encode(key).decode()


def signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """One ``v1,<base64>`` signature of ``body`` for ``msg_id`` at ``timestamp``."""
    signed = b"%s.%d.%s" % (msg_id.encode(), timestamp, body)
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def sign(keys: Sequence[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: one signature per key, space-separated."""
    if not keys:
        raise ValueError("at least one webhook key is needed to sign")
    return " ".join(signature(key, msg_id, timestamp, body) for key in keys)


def headers(keys: Sequence[bytes], msg_id: str, timestamp: int, body: bytes) -> list[tuple[str, str]]:
    """The three Standard Webhooks headers of one delivery attempt."""
    return [
        ("webhook-id", msg_id),
        ("webhook-timestamp", str(timestamp)),
        ("webhook-signature", sign(keys, msg_id, timestamp, body)),
    ]


def verify(
    body: bytes,
    received: Mapping[str, str] | Iterable[tuple[str, str]],
    keys: Sequence[bytes],
    *,
    now: float,
    tolerance: float = DEFAULT_TOLERANCE,
) -> str:
    """Check a delivery as a receiver must; return its ``webhook-id`` or raise WebhookVerificationError.

    The timestamp must lie within ``tolerance`` seconds of ``now`` (a replayed old delivery is
    refused), and one ``v1`` signature must match one of ``keys`` (compared in constant time).
    """
    pairs = received.items() if isinstance(received, Mapping) else received
    found = {name.lower(): value for name, value in pairs}
    msg_id, stamp, signatures = (found.get(n) for n in ("webhook-id", "webhook-timestamp", "webhook-signature"))
    if not (msg_id and stamp and signatures):
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature")
    if not stamp.isascii() or not stamp.isdigit():
        raise WebhookVerificationError("webhook-timestamp is not a UNIX time in seconds")
    timestamp = int(stamp)
    if timestamp < now - tolerance:
        raise WebhookVerificationError(f"webhook-timestamp is more than {tolerance:g} s old")
    if timestamp > now + tolerance:
        raise WebhookVerificationError(f"webhook-timestamp is more than {tolerance:g} s in the future")
    expected = [signature(key, msg_id, timestamp, body).encode() for key in keys]
    for candidate in signatures.split(" "):
        version, _, value = candidate.partition(",")
        if version != "v1" or not value:
            continue
        if any(hmac.compare_digest(value.encode(), e[3:]) for e in expected):
            return msg_id
    raise WebhookVerificationError("no webhook-signature matches the body")
