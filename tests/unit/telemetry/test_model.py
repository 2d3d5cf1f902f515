"""proxy.telemetry.model: W3C trace context, what a span shows of a URL, GenAI operations (pure)."""

from __future__ import annotations

import pytest

from proxy.telemetry.model import (
    TraceParent,
    format_traceparent,
    model_in_prefix,
    operation_name,
    parse_traceparent,
    provider_name,
    redacted_query,
    request_model,
)

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (VALID, TraceParent(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, True)),
        (VALID[:-2] + "00", TraceParent(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, False)),
        (" " + VALID + " ", TraceParent(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, True)),
        # A later version may add fields after ours (W3C Trace Context 4.3).
        (
            "01" + VALID[2:] + "-what-comes-next",
            TraceParent(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0xF067AA0BA902B7, True),
        ),
        (VALID + "-extra", None),  # version 00 has exactly four fields
        ("ff" + VALID[2:], None),  # version ff is invalid
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", None),  # all-zero trace id
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", None),  # all-zero span id
        ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", None),  # upper case hex
        ("00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01", None),  # short trace id
        ("", None),
        (None, None),
        ("x" * 600, None),
    ],
)
def test_parse_traceparent(text, expected):
    assert parse_traceparent(text) == expected


def test_format_is_the_inverse_of_parse():
    parsed = parse_traceparent(VALID)
    assert parsed is not None
    assert parsed.header() == VALID
    assert format_traceparent(1, 2, False) == "00-00000000000000000000000000000001-0000000000000002-00"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", ""),
        ("X-Sw-Signature=abc&X-Sw-Date=20250101T000000Z", "X-Sw-Signature=REDACTED&X-Sw-Date=20250101T000000Z"),
        ("x-sw-credential=app%2F20250101&a=1", "x-sw-credential=REDACTED&a=1"),
        ("pw_user=alice&X-Sw-Expires=60", "X-Sw-Expires=60"),
        ("flag&X-Sw-Signature", "flag&X-Sw-Signature"),  # no value: nothing to hide
        ("X-Sw-%53ignature=abc", "X-Sw-%53ignature=REDACTED"),  # an encoded name is still the name
    ],
)
def test_redacted_query(query, expected):
    assert redacted_query(query, {"x-sw-signature", "x-sw-credential"}, {"pw_user"}) == expected


@pytest.mark.parametrize(
    ("path", "operation"),
    [
        ("/v1/chat/completions", "chat"),
        ("/openai/deployments/x/chat/completions/", "chat"),
        ("/v1/completions", "text_completion"),
        ("/v1/embeddings", "embeddings"),
        ("/v1/responses", "chat"),
        ("/v1/messages", "chat"),
        ("/v1beta/models/gemini-2.0-flash:streamGenerateContent", "generate_content"),
        ("/v1/models", None),
        ("/v1/audio/speech", None),
    ],
)
def test_operation_name(path, operation):
    assert operation_name(path) == operation


@pytest.mark.parametrize(
    ("host", "provider"),
    [
        ("api.openai.com", "openai"),
        ("myres.openai.azure.com", "azure.ai.openai"),
        ("api.anthropic.com", "anthropic"),
        ("generativelanguage.googleapis.com", "gcp.gemini"),
        ("llm.internal.example", "llm.internal.example"),
        ("notapi.openai.com.evil.example", "notapi.openai.com.evil.example"),
    ],
)
def test_provider_name(host, provider):
    assert provider_name(host) == provider


@pytest.mark.parametrize(
    ("body", "model"),
    [
        (b'{"model": "gpt-4o-mini", "messages": []}', "gpt-4o-mini"),
        (b'{"messages": []}', None),
        (b'{"model": 5}', None),
        (b'not json but "model"', None),
        (b'["model"]', None),
        (None, None),
    ],
)
def test_request_model(body, model):
    assert request_model(body) == model


@pytest.mark.parametrize(
    ("prefix", "model"),
    [
        (b'{"model":"gpt-4o-mini","messages":[', "gpt-4o-mini"),
        (b'{"stream": true, "model" : "claude-sonnet-4", "max_tokens"', "claude-sonnet-4"),
        (b'{"messages":[{"role":"user","content":"say \\"model\\": \\"x\\""}],"model":"m2"}', "m2"),
        (b'{"model":"gpt-4o-mi', None),  # not all there yet
        (b'{"messages":[{"content":"model"}]', None),  # a value, not a key
        (b"", None),
    ],
)
def test_model_in_prefix(prefix, model):
    assert model_in_prefix(prefix) == model
