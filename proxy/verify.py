"""Parse, check and verify a Signway ``SW1-HMAC-SHA256`` presigned URL. No I/O, no clock.

The canonical request (docs/signing.md, :mod:`proxy.signing`) is rebuilt from what the client
sent. Real signers disagree on a few encodings, so verification tries each spelling a real signer
produces (never anything looser) and accepts when one of them matches in constant time:

* query encoding: form style (space as ``+``: Python and Ruby SDKs), RFC 3986 style (``%20``:
  Signway's server) and JavaScript ``encodeURIComponent`` (keeps ``!'()*``);
* path: the path the request arrived on, plus any the caller adds (``/`` for Signway's
  server, public path prefixes behind nginx);
* ``X-Sw-Proxy``: the text as signed, and its normalised form (what Signway's server signs).

Every spelling encodes the same decoded values injectively, so accepting several cannot let
two different requests share a signature; and Parkway always forwards the *normalised* URL.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from functools import lru_cache
from typing import NamedTuple

from .errors import BadRequest, Forbidden, client_text
from .query import MAX_CACHED_QUERY, MAX_QUERY_FIELDS, cached_field, not_utf8, plain_field, too_many_fields
from .signing import (
    ALGORITHM,
    PAIR_ENCODINGS,
    PROXY_SCHEMES,
    REQUIRED_PARAMS,
    UNCACHED_PAIRS,
    X_ALGORITHM,
    X_BODY,
    X_CREDENTIAL,
    X_DATE,
    X_EXPIRES,
    X_PROXY,
    X_SIGNATURE,
    X_SIGNED_HEADERS,
    canonical_request,
    form_pair,
    signed_by,
    signed_query,
)
from .urls import InvalidURL, normalize_url

# Every ``X-Sw-`` name is Signway's; these (all of a normal query) are known without a prefix test.
_SIGNWAY_PARAMS = frozenset(REQUIRED_PARAMS)

# ASCII digits only: \d and int() also take other scripts' digits, which no signer writes.
_DATE_RE = re.compile(r"[0-9]{8}T(?:[01][0-9]|2[0-3])[0-9]{4}Z\Z")
_EXPIRES_RE = re.compile(r"[0-9]{1,10}\Z")
_SIGNATURE_RE = re.compile(r"[0-9a-fA-F]{64}\Z")
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+\Z")


# --- parsing ----------------------------------------------------------------------------------


class SignedRequest(NamedTuple):
    """The signed-URL parameters of one request, parsed but not yet verified.

    Immutable; a tuple because one is built per request (a frozen dataclass sets each of its
    ten fields through ``object.__setattr__``: the parse took 1.3 µs longer)."""

    credential_id: str
    date: datetime
    signed_at: float  # the date as POSIX seconds, as the validity check and single use compare it
    date_text: str
    expires: int
    proxy_text: str
    proxy_url: str  # normalised: the only form ever forwarded
    signed_headers: tuple[str, ...]  # lower-case, in the order listed
    body_signed: bool
    signature: str
    params: tuple[tuple[str, str], ...]  # every decoded parameter except the signature
    extras: dict[str, str]  # the signer's own parameters (not X-Sw-*): read, never changed
    cacheable: bool = True  # a query short enough for its texts to be kept (MAX_CACHED_QUERY)

    @property
    def expires_at(self) -> datetime:
        return self.date + timedelta(seconds=self.expires)

    def extra_params(self) -> dict[str, str]:
        """Signed parameters beyond Signway's own (e.g. an end-user id added by the signer).

        Collected by :func:`parse_signed_request` as it goes: the same dict each call, to read."""
        return self.extras


def _invalid(name: str, why: str) -> BadRequest:
    return BadRequest(f"invalid {name}: {why}", code="malformed_signed_url")


@lru_cache(maxsize=256)
def _signed_header_names(text: str) -> tuple[str, ...]:
    """``X-Sw-SignedHeaders`` as lower-case names in the order listed (cached: a signer signs
    the same headers request after request)."""
    names = tuple([n.strip().lower() for n in text.split(";") if n.strip()])
    for n in names:
        if not _HEADER_NAME_RE.match(n):
            raise _invalid(X_SIGNED_HEADERS, f"{client_text(n)} is not a header name")
    return names


@lru_cache(maxsize=512)
def _proxy_url(text: str) -> str:
    """``X-Sw-Proxy`` normalised (cached: a lookup by one positional argument, where
    ``normalize_url``'s own cache first builds a key with its keyword)."""
    return normalize_url(text, schemes=PROXY_SCHEMES)


def parse_signed_request(raw_query: str) -> SignedRequest:
    """Parse the ``X-Sw-*`` parameters; a :class:`BadRequest` names the first missing or invalid one.

    One pass over the query (as :func:`proxy.query.parse_query` decodes it): the parameters are decoded,
    checked for repeats and collected as they come, the signer's extra ones apart.
    """
    if raw_query and raw_query.count("&") >= MAX_QUERY_FIELDS:  # parse_query's limit, checked inline
        raise too_many_fields()
    cacheable = len(raw_query) <= MAX_CACHED_QUERY
    decode = cached_field if cacheable else plain_field
    found: dict[str, str] = {}  # Signway's parameters
    extras: dict[str, str] = {}  # the others (last one wins)
    params: list[tuple[str, str]] = []  # every parameter but the signature, in order
    repeated: str | None = None
    try:
        for field in raw_query.split("&") if raw_query else ():
            if not field:
                continue
            key, value = pair = decode(field)
            if key in _SIGNWAY_PARAMS or key.startswith("X-Sw-"):
                if key in found and repeated is None:
                    repeated = key  # refused once the whole query decoded (a bad escape is named first)
                found[key] = value
            else:
                extras[key] = value
            if key != X_SIGNATURE:
                params.append(pair)
    except UnicodeDecodeError:
        raise not_utf8() from None
    if repeated is not None:
        raise BadRequest(
            f"parameter {client_text(repeated, quoted=False)} appears more than once", code="malformed_signed_url"
        )
    if not found:
        raise BadRequest("not a signed URL: the X-Sw-* query parameters are missing", code="missing_signature_params")
    if not found.keys() >= _SIGNWAY_PARAMS:
        missing = next(name for name in REQUIRED_PARAMS if name not in found)
        raise BadRequest(f"missing parameter {missing}", code="malformed_signed_url")

    if found[X_ALGORITHM] != ALGORITHM:
        raise _invalid(X_ALGORITHM, f"only {ALGORITHM} is supported")
    credential_id = found[X_CREDENTIAL].split("/", 1)[0]
    if not credential_id:
        raise _invalid(X_CREDENTIAL, "expected <id>/<YYYYMMDD>")
    date_text = found[X_DATE]
    try:
        if not _DATE_RE.match(date_text):
            raise ValueError
        # YYYYMMDDTHHMMSSZ, ISO 8601's basic format, which fromisoformat reads in C since 3.11 (one
        # call: 0.2 us, where six int() and datetime() took 1.7); an hour of 24 is refused by the
        # pattern, whatever a later fromisoformat makes of it.
        date = datetime.fromisoformat(date_text)
    except ValueError:
        raise _invalid(X_DATE, "expected YYYYMMDDTHHMMSSZ in UTC") from None
    expires_text = found[X_EXPIRES]
    if not _EXPIRES_RE.match(expires_text):
        raise _invalid(X_EXPIRES, "expected a whole number of seconds (ASCII digits, at most 10)")
    expires = int(expires_text)
    # The validity check adds them: year 9999 plus an expiry leaves the calendar. (Ten digits
    # of seconds are under 317 years: only a date after 9682 can get there.)
    if date.year > 9682:
        try:
            date + timedelta(seconds=expires)
        except OverflowError:
            raise _invalid(X_EXPIRES, "the URL would expire after the year 9999") from None
    body_text = found[X_BODY]
    if body_text not in ("true", "false"):
        raise _invalid(X_BODY, "expected true or false")
    sig = found[X_SIGNATURE]
    if not _SIGNATURE_RE.match(sig):
        raise _invalid(X_SIGNATURE, "expected 64 hex digits")
    signed_names = found[X_SIGNED_HEADERS]
    if not signed_names:
        names: tuple[str, ...] = ()
    else:
        names = _signed_header_names(signed_names) if cacheable else _signed_header_names.__wrapped__(signed_names)
    proxy_text = found[X_PROXY]
    try:
        proxy_url = (
            _proxy_url(proxy_text) if cacheable else normalize_url.__wrapped__(proxy_text, schemes=PROXY_SCHEMES)
        )
    except InvalidURL as exc:
        raise _invalid(X_PROXY, str(exc)) from None
    # Positional, in the order of the fields: half the cost of keywords (1.1 against 0.6 µs).
    return SignedRequest(
        credential_id,
        date,
        date.timestamp(),
        date_text,
        expires,
        proxy_text,
        proxy_url,
        names,
        body_text == "true",
        sig.lower(),
        tuple(params),
        extras,
        cacheable,
    )


# --- checks -----------------------------------------------------------------------------------


def _iso(dt: datetime) -> str:
    return dt.replace(tzinfo=None).isoformat(timespec="seconds") + "Z"  # year 1 as 0001, unlike strftime


def check_validity(req: SignedRequest, now: datetime, *, clock_skew: float, max_expiry: int) -> None:
    """Refuse an expired URL, a date in the future beyond the skew, or an over-long expiry.

    Compared as POSIX seconds: datetime arithmetic with the skew overflows for a date in the
    year 1 or 9999, which any client knowing a credential id could send.
    """
    if req.expires > max_expiry:
        raise Forbidden(
            f"X-Sw-Expires is {req.expires} s, above this server's maximum of {max_expiry} s",
            code="expiry_too_long",
        )
    date, current = req.signed_at, now.timestamp()
    if date - clock_skew > current:
        raise Forbidden(
            f"X-Sw-Date {_iso(req.date)} is in the future (server time {_iso(now)}); check the signer's clock",
            code="date_in_future",
        )
    if current > date + req.expires + clock_skew:
        raise Forbidden(f"signed URL expired at {_iso(req.expires_at)}", code="expired")


def signed_header_values(
    req: SignedRequest, headers: Mapping[str, str], body: bytes | None
) -> list[list[tuple[str, str]]]:
    """The header lists to try for the canonical request, refusing a missing signed header.

    ``headers`` maps lower-case names to values (repeated headers joined by ``, ``). With a
    signed body, ``content-length`` is the length of the body actually read, in each unit an
    SDK counts it in (the Python and JS SDKs sign the length of the body *string*).
    """
    base: list[tuple[str, str]] = []
    length_variants: list[str] = []
    for name in req.signed_headers:
        if name == "content-length" and body is not None:
            length_variants = _content_length_variants(body)
            continue
        if name not in headers:
            raise Forbidden(f"signed header {name} is missing from the request", code="signed_header_missing")
        base.append((name, headers[name]))
    if not length_variants:
        return [base]
    return [base + [("content-length", v)] for v in length_variants]


def _content_length_variants(body: bytes) -> list[str]:
    """Byte length (Ruby SDK, HTTP), code points (Python ``len(str)``), UTF-16 units (JS ``.length``)."""
    variants = [len(body)]
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return [str(len(body))]
    variants += [len(text), len(text.encode("utf-16-le")) // 2]
    return [str(n) for n in dict.fromkeys(variants)]


def candidate_requests(
    req: SignedRequest, method: str, paths: Sequence[str], header_lists: list[list[tuple[str, str]]], body: bytes
) -> Iterator[bytes]:
    """Every canonical request a real signer could have produced, most likely first, each once.

    Lazy: the request's own path, the proxy text as signed and form encoding (the SDKs) come
    first, so a normal request is verified by the first candidate and the rest is never built.
    """
    proxies = [req.proxy_text] if req.proxy_text == req.proxy_url else [req.proxy_text, req.proxy_url]
    seen: set[bytes] = set()
    for path in dict.fromkeys(paths):
        for proxy in proxies:
            params = (
                req.params if proxy is req.proxy_text else [(k, proxy if k == X_PROXY else v) for k, v in req.params]
            )
            for pair in PAIR_ENCODINGS.values():
                query = signed_query(params, pair if req.cacheable else UNCACHED_PAIRS[pair])
                for headers in header_lists:
                    canonical = canonical_request(method, path, query, headers, body)
                    if canonical not in seen:
                        seen.add(canonical)
                        yield canonical


def verify_signature(
    req: SignedRequest,
    *,
    method: str,
    secrets: Sequence[str],
    paths: Sequence[str],
    headers: Mapping[str, str],
    body: bytes | None,
) -> None:
    """Raise :class:`Forbidden` unless one secret signed one of the candidate canonical requests.

    ``body`` must be given exactly when ``req.body_signed``; ``paths`` are the canonical paths
    to accept (the request's own first). Each comparison is constant-time; stopping at the
    first match reveals only which spelling the client itself sent.
    """
    header_lists = signed_header_values(req, headers, body) if req.signed_headers else [[]]
    expected = req.signature  # 64 hex digits (parse_signed_request): ASCII, as compare_digest needs
    body = body or b""
    # The first candidate, built without the generator: what every SDK signs (their own path,
    # the proxy text as signed, form encoding), so a normal request stops here.
    pair = form_pair if req.cacheable else UNCACHED_PAIRS[form_pair]
    first = canonical_request(method, paths[0], signed_query(req.params, pair), header_lists[0], body)
    if signed_by(first, secrets, req.date_text, expected):
        return
    candidates = candidate_requests(req, method, paths, header_lists, body)
    next(candidates)  # the first, tried above
    for canonical in candidates:
        if signed_by(canonical, secrets, req.date_text, expected):
            return
    what = "the method, URL"
    if req.signed_headers:
        what += ", signed headers (" + ", ".join(req.signed_headers) + ")"
    if req.body_signed:
        what += ", body"
    raise Forbidden(
        f"signature does not match: {what} must be sent exactly as signed, with the credential's secret",
        code="signature_mismatch",
    )
