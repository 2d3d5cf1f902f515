"""The JSON log line: every field, the bound request fields, the level, a UTC timestamp, secrets redacted."""

from __future__ import annotations

import io
import json
import time
from datetime import UTC, datetime

import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import logs


def _line(**fields: object) -> dict[str, object]:
    out = io.StringIO()
    logs.configure("info", "json", out)
    try:
        with structlog.contextvars.bound_contextvars(request_id="r1", credential="c1", user=None):
            structlog.get_logger("test").warning("request", **fields)
    finally:
        structlog.reset_defaults()
    text = out.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1
    return json.loads(text)


def test_a_line_has_its_fields_the_bound_ones_the_level_and_a_utc_timestamp() -> None:
    before = time.time()
    line = _line(method="POST", status=200, duration_ms=0.6, thing=object())
    assert line["event"] == "request" and line["level"] == "warning"
    assert (line["method"], line["status"], line["duration_ms"]) == ("POST", 200, 0.6)
    assert (line["request_id"], line["credential"], line["user"]) == ("r1", "c1", None)
    assert str(line["thing"]).startswith("<object object")  # repr of what JSON cannot carry
    stamp = str(line["timestamp"])
    assert stamp.endswith("Z") and len(stamp) == len("2026-12-07T00:37:23.618191Z")
    when = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert when.tzinfo is not None and when.utcoffset() == UTC.utcoffset(None)
    assert before - 1 <= when.timestamp() <= time.time() + 1


def test_secret_keys_are_redacted_whatever_their_case() -> None:
    line = _line(
        api_key="sk-1",
        Authorization="Bearer sk-2",
        headers={"authorization": "x"},
        refresh_token="t",
        webhook_secret="w",
        signature="0123456789abcdef",
        password="p",
        secretive="kept",
    )
    for key in ("api_key", "Authorization", "headers", "refresh_token", "webhook_secret", "password"):
        assert line[key] == "[redacted]", key
    assert line["signature"] == "01234567…"
    assert line["secretive"] == "kept"
    assert "sk-1" not in json.dumps(line) and "sk-2" not in json.dumps(line)


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


class _Repr:
    def __repr__(self) -> str:
        return "<repr \u00e9>"


class _Structlog:
    def __structlog__(self) -> str:
        return "structlog form"


@given(st.dictionaries(st.text(max_size=8), _JSON_VALUES | st.sampled_from([_Repr(), _Structlog()]), max_size=6))
@settings(max_examples=300, deadline=None)
def test_json_lines_are_what_the_json_encoder_writes(event_dict) -> None:
    """The encoder made once (logs._json_encoder) writes what json.JSONEncoder writes, line for line."""
    assert logs._render_json(None, "info", event_dict) == json.JSONEncoder(default=logs._json_default).encode(
        event_dict
    )
