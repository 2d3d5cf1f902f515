"""Issue 10, the pure layer: each defect found by attacking Parkway, and the class it belongs to.

Tables over the pure modules (signing, urls, forwarding, errors, logs); the same classes are
driven end to end, through real sockets and an upstream that records everything, in
``test_hardening.py``, and with generated input in ``test_properties.py``.
"""

from __future__ import annotations

import io
import json
import sys
import unicodedata
import warnings
from datetime import UTC, datetime
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
import structlog

from proxy import logs
from proxy.errors import BadRequest, Forbidden, ParkwayError, client_text, error_body
from proxy.forwarding import check_connection_header
from proxy.signing import sign_url
from proxy.urls import InvalidURL, check_unambiguous_path, normalize_url, path_ambiguity
from proxy.verify import check_validity, parse_signed_request

SECRET = "s3cret"
NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
UPSTREAM = "https://api.example.com/v1/chat/completions"


SIGNED_PARAMS = dict(
    parse_qsl(
        urlsplit(
            sign_url(
                id="app",
                secret=SECRET,
                host="http://proxy.example",
                proxy_url=UPSTREAM,
                expiry=60,
                method="POST",
                datetime_override=NOW,
            )
        ).query,
        keep_blank_values=True,
    )
)


def signed_query(**replace: str) -> str:
    """The query of a valid signed URL, with some parameters replaced by raw values."""
    return urlencode({**SIGNED_PARAMS, **replace})


def refusal(exc_info: pytest.ExceptionInfo[ParkwayError]) -> tuple[int, str]:
    return exc_info.value.status, exc_info.value.code


# --- item 4: dates at the edges of the calendar never raise anything but a refusal ---------------

CALENDAR_EDGES = {
    # X-Sw-Date, X-Sw-Expires -> (status, code), from parsing or the validity check
    "year 1 (the reported case)": ("00010101T000000Z", "60", (403, "expired")),
    "year 1, zero expiry": ("00010101T000000Z", "0", (403, "expired")),
    "year 1, longest expiry": ("00010101T000000Z", "604800", (403, "expired")),
    "year 1, ten-digit expiry": ("00010101T000000Z", "9999999999", (403, "expiry_too_long")),
    "year 9999, zero expiry": ("99991231T235959Z", "0", (403, "date_in_future")),
    "year 9999, one second past the calendar": ("99991231T235959Z", "1", (400, "malformed_signed_url")),
    "year 9999, ten-digit expiry": ("99990101T000000Z", "9999999999", (400, "malformed_signed_url")),
    "year 0": ("00000101T000000Z", "60", (400, "malformed_signed_url")),
    "month 13": ("20261301T000000Z", "60", (400, "malformed_signed_url")),
    "day 0": ("20261100T000000Z", "60", (400, "malformed_signed_url")),
    "hour 24": ("20261129T240000Z", "60", (400, "malformed_signed_url")),
    "leap second": ("20261129T235960Z", "60", (400, "malformed_signed_url")),
    "29 February of a common year": ("20270229T000000Z", "60", (400, "malformed_signed_url")),
}


@pytest.mark.parametrize("date, expires, expected", CALENDAR_EDGES.values(), ids=CALENDAR_EDGES.keys())
def test_calendar_edges_are_refused_not_raised(date, expires, expected):
    with pytest.raises(ParkwayError) as caught:
        req = parse_signed_request(signed_query(**{"X-Sw-Date": date, "X-Sw-Expires": expires}))
        check_validity(req, NOW, clock_skew=60, max_expiry=604800)
    assert refusal(caught) == expected


@pytest.mark.parametrize("date, expires, expected", CALENDAR_EDGES.values(), ids=CALENDAR_EDGES.keys())
@pytest.mark.parametrize(
    "now",
    [datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC)],
    ids=["now in year 1", "now in year 9999"],
)
def test_calendar_edges_at_odd_server_times(date, expires, expected, now):
    # A server clock at either end of the calendar: valid or refused, never another exception.
    try:
        req = parse_signed_request(signed_query(**{"X-Sw-Date": date, "X-Sw-Expires": expires}))
        check_validity(req, now, clock_skew=60, max_expiry=604800)
    except ParkwayError:
        pass


@pytest.mark.parametrize("skew", [0.0, 60.0, 1e12])
def test_validity_check_takes_any_configured_skew(skew):
    req = parse_signed_request(signed_query(**{"X-Sw-Date": "00010101T000000Z"}))
    try:
        check_validity(req, NOW, clock_skew=skew, max_expiry=604800)
    except Forbidden as exc:
        assert exc.code == "expired"


def test_expiry_message_names_the_time_in_four_digit_years():
    req = parse_signed_request(signed_query(**{"X-Sw-Date": "00010101T000000Z"}))
    with pytest.raises(Forbidden, match=r"expired at 0001-01-01T00:01:00Z"):
        check_validity(req, NOW, clock_skew=60, max_expiry=604800)


# --- item 6: X-Sw-Date and X-Sw-Expires take ASCII digits only --------------------------------------


# Every character Python calls numeric outside ASCII: each script's decimal digits (Nd, which
# int() and \\d take), superscripts and circled digits (which str.isdigit() takes), fractions,
# Roman and CJK numerals.
NON_ASCII_DIGITS = [chr(cp) for cp in range(0x80, sys.maxunicode + 1) if chr(cp).isnumeric()]


def test_every_script_is_covered():
    assert len({unicodedata.name(ch).split(" DIGIT")[0] for ch in NON_ASCII_DIGITS if ch.isdecimal()}) > 60
    assert {"\u0663", "\u0969", "\uff13", "\U0001d7d1", "\u00b3", "\u2462"} <= set(NON_ASCII_DIGITS)


@pytest.mark.parametrize("position", [0, 3, 7, 9, 14])
def test_date_with_a_non_ascii_digit_is_refused(position):
    date = "20261129T120000Z"
    for digit in NON_ASCII_DIGITS:
        spelled = date[:position] + digit + date[position + 1 :]
        with pytest.raises(BadRequest, match="X-Sw-Date") as caught:
            parse_signed_request(signed_query(**{"X-Sw-Date": spelled}))
        assert caught.value.code == "malformed_signed_url", repr(digit)


@pytest.mark.parametrize("template", ["{}", "6{}", "{}0", "30{}"])
def test_expires_with_a_non_ascii_digit_is_refused(template):
    for digit in NON_ASCII_DIGITS:
        with pytest.raises(BadRequest, match="X-Sw-Expires") as caught:
            parse_signed_request(signed_query(**{"X-Sw-Expires": template.format(digit)}))
        assert caught.value.code == "malformed_signed_url", repr(digit)


@pytest.mark.parametrize("expires", ["+60", "-0", " 60", "60 ", "6_0", "0x3c", "60.0", "", "12345678901"])
def test_expires_is_plain_ascii_digits(expires):
    with pytest.raises(BadRequest, match="X-Sw-Expires"):
        parse_signed_request(signed_query(**{"X-Sw-Expires": expires}))


# --- item 4: upstream hosts every parser reads alike ------------------------------------------------

AMBIGUOUS_HOSTS = {
    "octal first part (the reported case)": "0177.0.0.1",
    "leading zero last part": "127.0.0.01",
    "octal private address": "010.0.0.1",
    "all parts padded": "127.000.000.001",
    "hex part": "0x7f.0.0.1",
    "upper-case hex part": "0X7F.0.0.1",
    "whole address in hex": "0x7f000001",
    "whole address in decimal": "2130706433",
    "two parts": "127.1",
    "three parts": "127.0.1",
    "five parts": "1.2.3.4.5",
    "part over 255": "256.0.0.1",
    "trailing dot": "127.0.0.1.",
    "name ending in a number": "localhost.1",
    "name ending in hex": "metadata.0x1",
    "bare 0x": "a.0x",
    "fullwidth octal": "\uff10\uff11\uff17\uff17.0.0.1",
    "zero alone": "0",
}


@pytest.mark.parametrize("host", AMBIGUOUS_HOSTS.values(), ids=AMBIGUOUS_HOSTS.keys())
@pytest.mark.parametrize("port", ["", ":8080"])
def test_ambiguous_ipv4_hosts_are_refused(host, port):
    with pytest.raises(InvalidURL, match="four decimal numbers"):
        normalize_url(f"http://{host}{port}/v1")


@pytest.mark.parametrize("host", AMBIGUOUS_HOSTS.values(), ids=AMBIGUOUS_HOSTS.keys())
def test_ambiguous_ipv4_host_in_a_signed_url_is_a_400(host):
    with pytest.raises(BadRequest, match="X-Sw-Proxy") as caught:
        parse_signed_request(signed_query(**{"X-Sw-Proxy": f"http://{host}:8080/"}))
    assert refusal(caught) == (400, "malformed_signed_url")


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "0.0.0.0", "10.0.0.1", "255.255.255.255", "1.a", "v1.example", "a1", "1a.example", "x-1"]
)
def test_plain_addresses_and_names_pass(host):
    assert normalize_url(f"http://{host}/") == f"http://{host}/"


@pytest.mark.parametrize("url", ["http://[v1.x]/", "http://[example.com]/", "http://[127.0.0.1]/"])
def test_brackets_hold_ipv6_only(url):
    with pytest.raises(InvalidURL):
        normalize_url(url)


def test_overlong_url_is_refused_in_the_url_layer():
    with pytest.raises(InvalidURL, match="longer than"):
        normalize_url("https://api.example.com/" + "a" * 9000)


# --- item 7: encoded separators and dots in a prefix-checked path ------------------------------------

AMBIGUOUS_PATHS = {
    "encoded slashes (the reported case)": "/v1/..%2F..%2Fadmin",
    "lower-case %2f": "/v1/..%2f..%2fadmin",
    "encoded backslash": "/v1/..%5Cadmin",
    "lower-case %5c": "/v1/..%5cadmin",
    "encoded dots then slash": "/v1/%2E%2E%2Fadmin",
    "encoded dot inside a name": "/v1/a%2Eb",
    "lower-case encoded dot": "/v1/a%2eb",
    "double-encoded slash": "/v1/..%252F..%252Fadmin",
    "double-encoded dot segment": "/v1/%252e%252e/admin",
    "double-encoded, mixed case": "/v1/%252E%252e/admin",
    "double-encoded backslash": "/v1/..%255Cadmin",
    "triple-encoded slash": "/v1/..%25252F..%25252Fadmin",
    "percent-encoded beyond any depth": "/v1/%2525252525252F",
    "mixed case encoded percent": "/v1/%252f",
}


@pytest.mark.parametrize("path", AMBIGUOUS_PATHS.values(), ids=AMBIGUOUS_PATHS.keys())
def test_ambiguous_paths_are_refused(path):
    assert path_ambiguity(path) is not None
    url = normalize_url("https://api.example.com" + path)
    with pytest.raises(Forbidden) as caught:
        check_unambiguous_path(url)
    assert refusal(caught) == (403, "ambiguous_path")


@pytest.mark.parametrize(
    "path",
    [
        "/v1/chat/completions",
        "/v1/models/gemini-1.5-pro:generateContent",
        "/v1/a%20b",
        "/v1/%25",
        "/v1/100%25",
        "/v1/%2",
        "/v1/caf%C3%A9",
        "/",
        "/v1/.well-known/x",
    ],
)
def test_plain_paths_pass(path):
    assert path_ambiguity(path) is None
    check_unambiguous_path(normalize_url("https://api.example.com" + path))


@pytest.mark.parametrize("spelling", ["/v1/../admin", "/v1/%2e%2e/admin", "/v1/.%2E/admin", "/v1/..\\admin"])
def test_dot_segments_are_resolved_before_any_check(spelling):
    # What is checked is what is forwarded: the resolved path, which leaves /v1/.
    url = normalize_url("https://api.example.com" + spelling)
    assert urlsplit(url).path == "/admin"
    check_unambiguous_path(url)


# --- item 2: a Connection header cannot strip a signed or injected header ------------------------------

SIGNED = ("x-model", "content-type")
INJECTED = (("Authorization", "Bearer sk-upstream"),)
CONNECTION_SPELLINGS = {
    "as reported": [(b"connection", b"keep-alive, x-model, content-type")],
    "one signed header": [(b"connection", b"x-model")],
    "upper case": [(b"connection", b"X-MODEL")],
    "mixed case, no spaces": [(b"connection", b"close,Content-Type")],
    "extra spaces and tabs": [(b"connection", b"keep-alive ,\t x-model \t, ")],
    "empty list elements": [(b"connection", b",,x-model,,")],
    "repeated Connection headers": [(b"connection", b"keep-alive"), (b"connection", b"content-type")],
    "injected header": [(b"connection", b"authorization")],
    "injected header, other case": [(b"connection", b"keep-alive, AUTHORIZATION")],
}


@pytest.mark.parametrize("headers", CONNECTION_SPELLINGS.values(), ids=CONNECTION_SPELLINGS.keys())
def test_connection_naming_a_protected_header_is_refused(headers):
    with pytest.raises(BadRequest) as caught:
        check_connection_header([(b"host", b"x"), *headers], SIGNED, INJECTED)
    assert refusal(caught) == (400, "signed_header_in_connection")
    assert "Connection" in caught.value.message


@pytest.mark.parametrize("name", ["content-length", "accept", "x-title", "user-agent", "origin"])
def test_any_signed_name_is_protected(name):
    with pytest.raises(BadRequest):
        check_connection_header([(b"connection", name.upper().encode())], (name,), ())


@pytest.mark.parametrize(
    "headers",
    [[], [(b"connection", b"keep-alive")], [(b"connection", b"close, x-other")], [(b"x-model", b"connection")]],
)
def test_connection_naming_other_headers_passes(headers):
    check_connection_header(headers, SIGNED, INJECTED)


def test_refusal_names_the_headers_not_their_values():
    with pytest.raises(BadRequest) as caught:
        check_connection_header([(b"connection", b"authorization, x-model")], SIGNED, INJECTED)
    assert "authorization, x-model" in caught.value.message
    assert "sk-upstream" not in caught.value.message


# --- item 8: what the client sent is shown capped and escaped ----------------------------------------

CLIENT_TEXTS = {
    "control characters": "X-Bad\x01\x1b[31m: v\r\n",
    "DEL and C1": "a\x7fb\x85c\x9b",
    "bidi override": "ab\u202ecd",
    "very long line": "A" * 20000,
    "long line of control characters": "\x00" * 20000,
    "bytes": b"X-Bad\xff\x00: v",
}


@pytest.mark.parametrize("value", CLIENT_TEXTS.values(), ids=CLIENT_TEXTS.keys())
@pytest.mark.parametrize("quoted", [True, False])
def test_client_text_is_capped_and_printable(value, quoted):
    shown = client_text(value, 100, quoted=quoted)
    assert shown.isprintable()
    assert len(shown) <= 100 * 6 + 40  # every character escaped at most to \\xNN or \\uNNNN


def test_client_text_says_how_much_was_cut():
    assert client_text("A" * 150, 100, quoted=False) == "A" * 100 + "… (50 more characters)"
    assert client_text("short") == "'short'"


@pytest.mark.parametrize(
    "query",
    [
        "X-Sw-Algorithm=1&X-Sw-Algorithm=2&X-Sw-Date=" + "9" * 5000,
        "X-Sw-Date=1&X-Sw-Date=2%1B%5B31m" + "%00" * 3000,
    ],
)
def test_signed_url_errors_do_not_echo_long_or_raw_input(query):
    with pytest.raises(BadRequest) as caught:
        parse_signed_request(query)
    message = caught.value.message
    assert message.isprintable() and len(message) < 600


@pytest.mark.parametrize("field", ["X-Sw-Proxy", "X-Sw-SignedHeaders"])
def test_signed_url_errors_cap_echoed_values(field):
    value = ("http://a\x1b[31m" if field == "X-Sw-Proxy" else "x\x01;") + "b" * 8000
    with pytest.raises(BadRequest) as caught:
        parse_signed_request(signed_query(**{field: value}))
    assert caught.value.message.isprintable() and len(caught.value.message) < 600
    body = json.loads(error_body(caught.value))
    assert len(body["error"]["message"]) < 600


# --- item 4: the JSON log carries the traceback -------------------------------------------------------


def test_json_log_renders_the_traceback():
    out = io.StringIO()
    logs.configure("info", "json", out)
    try:
        try:
            raise OverflowError("date value out of range")
        except OverflowError:
            structlog.get_logger("test").exception("connection_failed", client="127.0.0.1")
        line = json.loads(out.getvalue())
    finally:
        structlog.reset_defaults()
    assert line["event"] == "connection_failed" and line["level"] == "error"
    assert line["exception"].startswith("Traceback (most recent call last):")
    assert "OverflowError: date value out of range" in line["exception"]
    assert "test_json_log_renders_the_traceback" in line["exception"]


def test_console_log_renders_the_traceback_without_warnings():
    out = io.StringIO()
    logs.configure("info", "console", out)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                raise OverflowError("date value out of range")
            except OverflowError:
                structlog.get_logger("test").exception("connection_failed")
    finally:
        structlog.reset_defaults()
    assert "OverflowError: date value out of range" in out.getvalue()
