"""Standard Webhooks signing (proxy.jobs.webhooks), checked against the real ``standardwebhooks`` package."""

from __future__ import annotations

import base64
import json
import time

import pytest
from standardwebhooks.webhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError as LibraryRefused

from proxy.jobs import webhooks
from proxy.jobs.webhooks import InvalidWebhookSecret, WebhookVerificationError

# The Standard Webhooks specification's own example (its README and test suites).
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TIMESTAMP = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

KEY_A = bytes(range(32))
KEY_B = bytes(range(100, 132))


def test_golden_vector_of_the_specification() -> None:
    key = webhooks.parse_secret(SPEC_SECRET)
    assert webhooks.sign([key], SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY) == SPEC_SIGNATURE


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("whsec_", "decodes to 0 bytes"),
        ("whsec_!!!notbase64", "is not whsec_ followed by base64"),
        ("whsec_" + base64.b64encode(b"short").decode(), "decodes to 5 bytes"),
        ("whsec_" + base64.b64encode(bytes(65)).decode(), "decodes to 65 bytes"),
    ],
)
def test_bad_secrets_are_refused_without_echoing_them(text: str, message: str) -> None:
    with pytest.raises(InvalidWebhookSecret) as caught:
        webhooks.parse_secret(text)
    assert message in str(caught.value)
    assert text[6:] not in str(caught.value) or not text[6:]


def test_secret_round_trip_and_optional_prefix() -> None:
    text = webhooks.format_secret(KEY_A)
    assert text.startswith("whsec_")
    assert webhooks.parse_secret(text) == KEY_A == webhooks.parse_secret(text[6:])
    # unpadded base64, as some dashboards show it
    assert webhooks.parse_secret(text.rstrip("=")) == KEY_A


def test_the_library_verifies_what_parkway_signs_with_each_rotated_secret() -> None:
    body = json.dumps({"type": "job.completed", "data": {"id": "job_x", "status": "completed"}}).encode()
    now = int(time.time())
    headers = dict(webhooks.headers([KEY_A, KEY_B], "msg_1", now, body))
    assert headers["webhook-signature"].count("v1,") == 2
    for key in (KEY_A, KEY_B):  # the receiver holds either the old or the new secret
        assert Webhook(webhooks.format_secret(key)).verify(body, headers) == json.loads(body)
    with pytest.raises(LibraryRefused):
        Webhook(webhooks.format_secret(bytes(32))).verify(body, headers)


def test_parkway_verifies_what_the_library_signs() -> None:
    from datetime import UTC, datetime

    now = int(time.time())
    body = '{"a":"é"}'
    sig = Webhook(webhooks.format_secret(KEY_A)).sign("msg_2", datetime.fromtimestamp(now, UTC), body)
    received = {"Webhook-Id": "msg_2", "Webhook-Timestamp": str(now), "Webhook-Signature": f"v0,xx {sig}"}
    assert webhooks.verify(body.encode(), received, [KEY_A], now=now) == "msg_2"


NOW = 1_800_000_000


def signed(body: bytes = b'{"x":1}', ts: int = NOW, keys: tuple[bytes, ...] = (KEY_A,)) -> dict[str, str]:
    return dict(webhooks.headers(list(keys), "msg_3", ts, body))


@pytest.mark.parametrize(
    ("body", "headers", "reason"),
    [
        (b'{"x":2}', signed(), "no webhook-signature matches"),  # tampered body
        (b'{"x":1}', signed(ts=NOW - 301), "more than 300 s old"),  # replayed later
        (b'{"x":1}', signed(ts=NOW + 301), "in the future"),
        (b'{"x":1}', {**signed(), "webhook-id": "msg_other"}, "no webhook-signature matches"),
        (b'{"x":1}', signed(keys=(KEY_B,)), "no webhook-signature matches"),  # another secret
        (b'{"x":1}', {k: v for k, v in signed().items() if k != "webhook-id"}, "missing"),
        (b'{"x":1}', {**signed(), "webhook-timestamp": "1e9"}, "not a UNIX time"),
        (b'{"x":1}', {**signed(), "webhook-signature": "v2," + signed()["webhook-signature"][3:]}, "no webhook-sig"),
    ],
    ids=["tampered", "old", "future", "other-id", "other-key", "no-id", "bad-timestamp", "unknown-version"],
)
def test_receiver_refusals(body: bytes, headers: dict[str, str], reason: str) -> None:
    with pytest.raises(WebhookVerificationError, match=reason):
        webhooks.verify(body, headers, [KEY_A], now=NOW)


@pytest.mark.parametrize("case", ["tampered-body", "old-timestamp", "other-secret"])
def test_the_library_refuses_the_same_deliveries(case: str) -> None:
    now = int(time.time())
    body = b'{"type":"job.completed"}'
    headers = dict(webhooks.headers([KEY_A], "msg_4", now - 600 if case == "old-timestamp" else now, body))
    secret = webhooks.format_secret(KEY_B if case == "other-secret" else KEY_A)
    sent = body.replace(b"completed", b"failed") if case == "tampered-body" else body
    with pytest.raises(LibraryRefused):
        Webhook(secret).verify(sent, headers)
    with pytest.raises(WebhookVerificationError):
        webhooks.verify(sent, headers, [webhooks.parse_secret(secret)], now=now)
