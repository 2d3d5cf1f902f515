"""proxy.errors: each class knows its status and code; one function turns them into responses."""

from __future__ import annotations

import json

import pytest

from proxy import errors
from proxy.errors import (
    BadRequest,
    BodyTooLarge,
    CacheMiss,
    CacheUserRequired,
    ConfigError,
    ConfigProblem,
    Forbidden,
    HeadersTooLarge,
    InternalError,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    ParkwayError,
    Refused,
    RequestTimeout,
    TooManyRequests,
    UnknownCredential,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    error_body,
    error_response,
)

# class: (status, type, code, outcome)
MAPPING = {
    ParkwayError: (500, "server_error", "internal_error", "refused:internal_error"),
    InternalError: (500, "server_error", "internal_error", "internal_error"),
    Refused: (400, "invalid_request_error", "bad_request", "refused:bad_request"),
    BadRequest: (400, "invalid_request_error", "bad_request", "refused:bad_request"),
    UnknownCredential: (401, "authentication_error", "unknown_credential", "refused:unknown_credential"),
    Forbidden: (403, "permission_error", "forbidden", "refused:forbidden"),
    NotFound: (404, "invalid_request_error", "not_found", "refused:not_found"),
    MethodNotAllowed: (405, "invalid_request_error", "job_method_not_allowed", "refused:job_method_not_allowed"),
    RequestTimeout: (408, "invalid_request_error", "client_timeout", "refused:client_timeout"),
    BodyTooLarge: (413, "invalid_request_error", "body_too_large", "refused:body_too_large"),
    HeadersTooLarge: (431, "invalid_request_error", "headers_too_large", "refused:headers_too_large"),
    Overloaded: (503, "server_error", "overloaded", "refused:overloaded"),
    CacheMiss: (504, "invalid_request_error", "cache_miss", "refused:cache_miss"),
    CacheUserRequired: (400, "invalid_request_error", "cache_user_required", "refused:cache_user_required"),
    TooManyRequests: (429, "rate_limit_error", "rate_limited", "refused:rate_limited"),
    UpstreamError: (502, "upstream_error", "upstream_error", "upstream_error"),
    UpstreamConnectError: (502, "upstream_error", "upstream_connect_failed", "upstream_error"),
    UpstreamTimeout: (504, "upstream_error", "upstream_timeout", "upstream_error"),
    UpstreamProtocolError: (502, "upstream_error", "upstream_protocol_error", "upstream_error"),
}


def all_subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        if sub.__module__ == errors.__name__:
            found |= {sub, *all_subclasses(sub)}
    return found


def test_the_table_covers_every_error_class():
    assert all_subclasses(ParkwayError) | {ParkwayError} == set(MAPPING)


@pytest.mark.parametrize("cls, expected", MAPPING.items(), ids=[c.__name__ for c in MAPPING])
def test_each_class_maps_to_its_status_type_code_and_outcome(cls, expected):
    exc = cls("why it happened")
    assert (exc.status, exc.type, exc.code, exc.outcome) == expected
    assert exc.message == str(exc) == "why it happened"
    assert exc.retry_after is None


def test_internal_error_says_nothing_of_the_bug_by_default():
    assert InternalError().message.startswith("internal error:")
    assert json.loads(error_body(InternalError()))["error"]["code"] == "internal_error"


@pytest.mark.parametrize(
    "exc, outcome",
    [
        (Forbidden("signed URL expired at 2026-11-20T12:05:00Z", code="expired"), "refused:expired"),
        (BadRequest("missing parameter X-Sw-Date", code="malformed_signed_url"), "refused:malformed_signed_url"),
        (UpstreamTimeout("over the overall limit", code="request_timeout"), "upstream_error"),
    ],
)
def test_code_given_to_one_instance(exc, outcome):
    assert exc.outcome == outcome
    assert exc.status == MAPPING[type(exc)][0]


def test_code_given_to_an_instance_leaves_the_class_alone():
    Forbidden("x", code="expired")
    assert Forbidden.code == "forbidden" and Forbidden("y").code == "forbidden"


@pytest.mark.parametrize("cls", MAPPING, ids=[c.__name__ for c in MAPPING])
def test_error_response(cls):
    exc = cls("signature does not match: the méthod, URL must be sent exactly as signed")
    status, headers, body = error_response(exc)

    assert status == exc.status
    assert json.loads(body) == {
        "error": {
            "type": exc.type,
            "code": exc.code,
            "message": "signature does not match: the méthod, URL must be sent exactly as signed",
        }
    }
    assert headers == [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),  # bytes, not characters
        (b"cache-control", b"no-store"),
    ]
    assert body == error_body(exc)


def test_error_response_with_retry_after():
    status, headers, body = error_response(Overloaded("too many open connections", retry_after=1))
    assert status == 503
    assert (b"retry-after", b"1") in headers
    assert dict(headers)[b"content-length"] == str(len(body)).encode()


def test_error_body_is_compact_utf8_json():
    assert error_body(Forbidden('naïve "quote"', code="expired")) == (
        '{"error":{"type":"permission_error","code":"expired","message":"naïve \\"quote\\""}}'.encode()
    )


def test_refusals_and_upstream_failures_are_separate_families():
    for cls in MAPPING:
        if cls in (ParkwayError, Refused, UpstreamError):
            continue
        if cls is InternalError:  # a bug: neither the client's fault nor the upstream's
            assert not issubclass(cls, (Refused, UpstreamError))
            continue
        assert issubclass(cls, Refused) != issubclass(cls, UpstreamError), cls
    assert not issubclass(ConfigError, ParkwayError)  # never answered to a client


@pytest.mark.parametrize(
    "problem, text",
    [
        (ConfigProblem("credentials[1].secret", "must not be empty"), "credentials[1].secret: must not be empty"),
        (ConfigProblem("", "invalid TOML: bad"), "invalid TOML: bad"),
    ],
)
def test_config_problem_names_its_key_path(problem, text):
    assert str(problem) == text


def test_config_error_keeps_every_problem():
    problems = [ConfigProblem("server.listen", "must not be empty"), ConfigProblem("log.level", "bad")]
    exc = ConfigError(problems)
    assert exc.problems == tuple(problems)
    assert str(exc) == "server.listen: must not be empty; log.level: bad"
