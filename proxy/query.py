"""A query string form-decoded as ``parse_qsl`` does it, with caches a client cannot fill. No I/O.

Split by hand, not by ``parse_qsl``: a signed query's parameters are mostly plain text, so only
those with ``%`` or ``+`` are decoded, and most of a signed URL's fields repeat from one request
to the next (only the date and the signature change), so a field is one cache lookup. Any
client can send a query, though: only the texts of queries up to :data:`MAX_CACHED_QUERY`
characters are kept, by these caches and by those of :mod:`proxy.verify` and
:mod:`proxy.signing` that depend on them (``SignedRequest.cacheable``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from urllib.parse import unquote

from .errors import BadRequest

MAX_QUERY_FIELDS = 200

# Unbounded, 5,000 refused requests with a 12 KB parameter each kept 330 MB; bounded so, the
# caches hold at most a few MB in all (tests/unit/test_verify_caches.py). A normal signed query
# is 300-600 characters.
MAX_CACHED_QUERY = 1024


@lru_cache(maxsize=256)
def _form_decode(text: str) -> str:
    """One form-encoded name or value, decoded (``+`` is a space; UnicodeDecodeError when the
    bytes are not UTF-8). Cached: the encoded texts of a signed URL (its upstream URL, its
    credential) come back request after request, and ``unquote`` is the dearest step of parsing."""
    if "+" in text:
        text = text.replace("+", " ")
    return unquote(text, errors="strict") if "%" in text else text


_plain_decode = _form_decode.__wrapped__  # the same, never cached


def _decoded_field(field: str, decode: Callable[[str], str] = _form_decode) -> tuple[str, str]:
    """One ``name=value`` field of a query, form-decoded."""
    name, _, value = field.partition("=")
    if "%" in name or "+" in name:
        name = decode(name)
    if "%" in value or "+" in value:
        value = decode(value)
    return name, value


def plain_field(field: str) -> tuple[str, str]:
    """:func:`cached_field` for a query too long to keep: nothing of it is cached."""
    return _decoded_field(field, _plain_decode)


# A field found here is one lookup, where splitting and testing it took four calls.
cached_field = lru_cache(maxsize=1024)(_decoded_field)


def not_utf8() -> BadRequest:
    return BadRequest("query string is not valid UTF-8 after percent-decoding", code="malformed_signed_url")


def too_many_fields() -> BadRequest:
    return BadRequest("query string has too many parameters", code="malformed_signed_url")


def parse_query(raw_query: str) -> list[tuple[str, str]]:
    """Form-decode a query string (``+`` is a space), refusing bytes that are not UTF-8.

    Exactly ``parse_qsl(raw_query, keep_blank_values=True, errors="strict", max_num_fields=200)``
    (a property test holds it to that).
    """
    if not raw_query:
        return []
    if raw_query.count("&") >= MAX_QUERY_FIELDS:
        raise too_many_fields()
    decode = cached_field if len(raw_query) <= MAX_CACHED_QUERY else plain_field
    try:
        return [decode(field) for field in raw_query.split("&") if field]
    except UnicodeDecodeError:
        raise not_utf8() from None
