"""CORS decisions (pure): preflight answers and the headers every response carries.

Errors carry them too, so a browser can read Parkway's JSON error body instead of seeing an
opaque network failure.
"""

from __future__ import annotations

from .config import CorsConfig
from .forwarding import Headers


def _allowed_origin(cors: CorsConfig, origin: str | None) -> str | None:
    if "*" in cors.allow_origins:
        # A credentialed request needs the exact origin echoed; config forbids "*" with credentials.
        return "*"
    if origin is not None and origin in cors.allow_origins:
        return origin
    return None


def response_headers(cors: CorsConfig, origin: str | None) -> Headers:
    """CORS headers for an actual (non-preflight) response to a request from ``origin``."""
    headers: Headers
    if "*" in cors.allow_origins:  # (as _allowed_origin decides, written out: one call a response)
        headers = [(b"access-control-allow-origin", b"*")]
    elif origin is not None and origin in cors.allow_origins:
        headers = [(b"vary", b"Origin"), (b"access-control-allow-origin", origin.encode("latin-1"))]
    else:
        return [(b"vary", b"Origin")]
    if cors.allow_credentials:
        headers.append((b"access-control-allow-credentials", b"true"))
    if cors.expose_headers:
        headers.append((b"access-control-expose-headers", ", ".join(cors.expose_headers).encode("latin-1")))
    return headers


def is_preflight(method: str, origin: str | None, request_method: str | None) -> bool:
    return method == "OPTIONS" and origin is not None and request_method is not None


def preflight_headers(cors: CorsConfig, origin: str | None, request_headers: str | None) -> Headers:
    """Headers answering a preflight ``OPTIONS``; no allow-* headers for a disallowed origin."""
    headers = response_headers(cors, origin)
    if _allowed_origin(cors, origin) is None:
        return headers
    headers.append((b"access-control-allow-methods", ", ".join(cors.allow_methods).encode("latin-1")))
    if "*" in cors.allow_headers:
        # Echo what was asked: "*" is not a wildcard for credentialed requests (Fetch standard).
        allow = request_headers or "*"
    else:
        allow = ", ".join(cors.allow_headers)
    if allow:
        headers.append((b"access-control-allow-headers", allow.encode("latin-1")))
    headers.append((b"access-control-max-age", str(cors.max_age).encode()))
    return headers
