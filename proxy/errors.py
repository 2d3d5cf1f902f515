"""The one exception hierarchy of Parkway, and the one place it becomes an HTTP response.

Each class knows its HTTP status, its OpenAI-style error ``type`` and a stable ``code``,
so client SDKs (which read ``error.message``) show the reason, and logs and metrics can
count refusals by ``code``. Messages never contain secrets, full signatures or injected
header values: they are built from request data the client already has.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


class ParkwayError(Exception):
    """Base of every error that is answered to a client."""

    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"
    headers: tuple[tuple[bytes, bytes], ...] = ()  # more response headers (RateLimit of a budget refusal)

    def __init__(self, message: str, *, code: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.retry_after = retry_after

    @property
    def outcome(self) -> str:
        """The ``outcome`` field of the request log line."""
        return f"refused:{self.code}"


class InternalError(ParkwayError):
    """A bug met while handling a request (500). The message never says more: the traceback,
    which may hold request data, goes only to the log, under the same request id."""

    def __init__(self, message: str = "internal error: Parkway failed to handle this request; its log has the details"):
        super().__init__(message)

    @property
    def outcome(self) -> str:
        return "internal_error"


def client_text(value: str | bytes, limit: int = 100, *, quoted: bool = True) -> str:
    """Text the client sent, fit for an error message and a log line.

    At most ``limit`` characters of it are shown, with control and other non-printable
    characters escaped, so a terminal or log viewer never interprets them and a 16 KB header
    line is not echoed back whole. ``quoted`` shows it as a Python literal (``'x-a\\x01'``);
    without, printable characters are kept as they are (for text that is quoted already).
    """
    text = bytes(value).decode("latin-1") if isinstance(value, (bytes, bytearray)) else value
    cut = text[:limit]
    shown = repr(cut) if quoted else "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in cut)
    if len(text) > limit:
        shown += f"… ({len(text) - limit} more characters)"
    return shown


# --- client refusals: nothing is forwarded -------------------------------------------------


class Refused(ParkwayError):
    """The request was refused before anything reached the upstream."""

    status = 400
    type = "invalid_request_error"
    code = "bad_request"


class BadRequest(Refused):
    """Malformed HTTP or a malformed signed URL (400)."""


class UnknownCredential(Refused):
    status = 401
    type = "authentication_error"
    code = "unknown_credential"


class Forbidden(Refused):
    """Signature, expiry or policy refusals (403); ``code`` says which."""

    status = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(Refused):
    status = 404
    code = "not_found"


class MethodNotAllowed(Refused):
    status = 405
    code = "job_method_not_allowed"


class RequestTimeout(Refused):
    status = 408
    code = "client_timeout"


class BodyTooLarge(Refused):
    status = 413
    code = "body_too_large"


class HeadersTooLarge(Refused):
    status = 431
    code = "headers_too_large"


class TooManyRequests(Refused):
    """A per-credential or per-user limit was hit (429); ``code`` says which, e.g. ``user_rate_limit``."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limited"


class CacheMiss(Refused):
    """``Cache-Control: only-if-cached`` and no stored answer: 504, the upstream is not called
    (RFC 9111 §5.2.1.7)."""

    status = 504
    code = "cache_miss"


class CacheUserRequired(Refused):
    """A credential whose cache is per user got a URL signed without the end user: sharing its
    entry with every other such URL would serve one user's answer to another (400, never shared)."""

    status = 400
    code = "cache_user_required"


class Overloaded(Refused):
    status = 503
    type = "server_error"
    code = "overloaded"


# --- upstream failures ----------------------------------------------------------------------


class UpstreamError(ParkwayError):
    """The upstream could not be reached or misbehaved."""

    status = 502
    type = "upstream_error"
    code = "upstream_error"

    @property
    def outcome(self) -> str:
        return "upstream_error"


class UpstreamConnectError(UpstreamError):
    code = "upstream_connect_failed"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class UpstreamProtocolError(UpstreamError):
    code = "upstream_protocol_error"


# --- configuration --------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in a configuration, located by its TOML key path (``credentials[1].secret``)."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(Exception):
    """A configuration was refused; ``problems`` lists every problem found, not just the first."""

    def __init__(self, problems: list[ConfigProblem] | tuple[ConfigProblem, ...]):
        self.problems = tuple(problems)
        super().__init__("; ".join(str(p) for p in self.problems))


# --- the one mapping to HTTP ----------------------------------------------------------------


def error_body(exc: ParkwayError) -> bytes:
    """OpenAI-shaped JSON error body: ``{"error": {"type", "code", "message"}}``."""
    return json.dumps(
        {"error": {"type": exc.type, "code": exc.code, "message": exc.message}},
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode()


def error_response(exc: ParkwayError) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and body for ``exc``; CORS headers are added by the caller."""
    body = error_body(exc)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    if exc.retry_after is not None:
        headers.append((b"retry-after", str(exc.retry_after).encode()))
    headers += exc.headers
    return exc.status, headers, body
