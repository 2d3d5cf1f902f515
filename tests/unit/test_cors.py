"""proxy.cors: the headers of actual responses and of preflight answers, table-driven."""

from __future__ import annotations

import pytest

from proxy.config import CorsConfig
from proxy.cors import is_preflight, preflight_headers, response_headers

APP = "https://app.example"
OTHER = "https://evil.example"
LISTED = CorsConfig(allow_origins=(APP, "http://localhost:5173"))
VARY = (b"vary", b"Origin")

# name: (config, request Origin, headers on the response)
RESPONSE_CASES = {
    "wildcard, with origin": (CorsConfig(), APP, [(b"access-control-allow-origin", b"*")]),
    "wildcard, no vary needed": (CorsConfig(), OTHER, [(b"access-control-allow-origin", b"*")]),
    "wildcard, no origin": (CorsConfig(), None, [(b"access-control-allow-origin", b"*")]),
    "list, allowed origin echoed": (LISTED, APP, [VARY, (b"access-control-allow-origin", APP.encode())]),
    "list, second allowed origin": (
        LISTED,
        "http://localhost:5173",
        [VARY, (b"access-control-allow-origin", b"http://localhost:5173")],
    ),
    "list, other origin gets no allow-origin": (LISTED, OTHER, [VARY]),
    "list, no origin": (LISTED, None, [VARY]),
    "list, prefix of an allowed origin is not allowed": (LISTED, "https://app.example.evil", [VARY]),
    "credentials": (
        CorsConfig(allow_origins=(APP,), allow_credentials=True),
        APP,
        [VARY, (b"access-control-allow-origin", APP.encode()), (b"access-control-allow-credentials", b"true")],
    ),
    "credentials, other origin": (CorsConfig(allow_origins=(APP,), allow_credentials=True), OTHER, [VARY]),
    "expose headers": (
        CorsConfig(expose_headers=("x-request-id", "x-ratelimit-remaining")),
        APP,
        [
            (b"access-control-allow-origin", b"*"),
            (b"access-control-expose-headers", b"x-request-id, x-ratelimit-remaining"),
        ],
    ),
}


@pytest.mark.parametrize("cors, origin, expected", RESPONSE_CASES.values(), ids=RESPONSE_CASES.keys())
def test_response_headers(cors, origin, expected):
    assert response_headers(cors, origin) == expected


METHODS = b"GET, POST, PUT, PATCH, DELETE, OPTIONS"

# name: (config, Origin, Access-Control-Request-Headers, preflight answer headers)
PREFLIGHT_CASES = {
    "wildcard headers echo what was asked": (
        CorsConfig(),
        APP,
        "content-type, authorization, x-stainless-os",
        [
            (b"access-control-allow-origin", b"*"),
            (b"access-control-allow-methods", METHODS),
            (b"access-control-allow-headers", b"content-type, authorization, x-stainless-os"),
            (b"access-control-max-age", b"600"),
        ],
    ),
    "wildcard headers, none asked": (
        CorsConfig(),
        APP,
        None,
        [
            (b"access-control-allow-origin", b"*"),
            (b"access-control-allow-methods", METHODS),
            (b"access-control-allow-headers", b"*"),
            (b"access-control-max-age", b"600"),
        ],
    ),
    "listed headers, whatever was asked": (
        CorsConfig(allow_methods=("POST",), allow_headers=("content-type", "x-user"), max_age=86400),
        APP,
        "authorization",
        [
            (b"access-control-allow-origin", b"*"),
            (b"access-control-allow-methods", b"POST"),
            (b"access-control-allow-headers", b"content-type, x-user"),
            (b"access-control-max-age", b"86400"),
        ],
    ),
    "listed origin with credentials": (
        CorsConfig(allow_origins=(APP,), allow_credentials=True),
        APP,
        "content-type",
        [
            VARY,
            (b"access-control-allow-origin", APP.encode()),
            (b"access-control-allow-credentials", b"true"),
            (b"access-control-allow-methods", METHODS),
            (b"access-control-allow-headers", b"content-type"),
            (b"access-control-max-age", b"600"),
        ],
    ),
    "disallowed origin gets no allow-* headers": (LISTED, OTHER, "content-type", [VARY]),
}


@pytest.mark.parametrize(
    "cors, origin, request_headers, expected", PREFLIGHT_CASES.values(), ids=PREFLIGHT_CASES.keys()
)
def test_preflight_headers(cors, origin, request_headers, expected):
    assert preflight_headers(cors, origin, request_headers) == expected


@pytest.mark.parametrize(
    "method, origin, request_method, expected",
    [
        ("OPTIONS", APP, "POST", True),
        ("OPTIONS", None, "POST", False),  # not from a browser page
        ("OPTIONS", APP, None, False),  # a plain OPTIONS request, forwarded like any other
        ("POST", APP, "POST", False),
        ("options", APP, "POST", False),  # methods are case-sensitive (RFC 9110 9.1)
    ],
)
def test_is_preflight(method, origin, request_method, expected):
    assert is_preflight(method, origin, request_method) is expected
