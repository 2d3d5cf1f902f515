"""proxy.signing: golden vectors, URLs from every real signer accepted, every refusal explained.

URLs come from the real Python ``signway_sdk`` or from small emulations of the other signers
(Signway's Rust server, the Ruby and JS SDKs) written below from their published sources.
The signatures in the emulations are computed here with hashlib/hmac, not with proxy.signing.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, timezone
from urllib.parse import quote, quote_plus, urlsplit

import pytest
import signway_sdk
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import BadRequest, Forbidden, ParkwayError
from proxy.query import parse_query
from proxy.signing import (
    QUERY_ENCODINGS,
    REQUIRED_PARAMS,
    canonical_query,
    canonical_request,
    sign_url,
    signature,
    signing_key,
)
from proxy.verify import check_validity, parse_signed_request, signed_header_values, verify_signature

ID = "app-id"
SECRET = "super-secure-string"
OLD_SECRET = "the-0ld-rotated-secret"
DT = datetime(2026, 11, 20, 12, 0, 0)  # naive UTC, as the SDK takes it
SIGNED_AT = DT.replace(tzinfo=UTC)
NOW = SIGNED_AT + timedelta(seconds=30)
HOST = "http://127.0.0.1:8080"
CHAT = "https://api.openai.com/v1/chat/completions"
CHAT_BODY = '{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Say this is a test"}]}'
UNICODE_BODY = '{"messages":[{"role":"user","content":"¿Qué tal? こんにちは 😀"}]}'  # 60 chars, 75 bytes, 61 UTF-16

# --- golden vectors (SIGNING.md) ----------------------------------------------------------------

_Q = "X-Sw-Algorithm=SW1-HMAC-SHA256&X-Sw-Credential=app-id%2F20261120&X-Sw-Date=20261120T120000Z"
_CHAT_Q = "X-Sw-Proxy=https%3A%2F%2Fapi.openai.com%2Fv1%2Fchat%2Fcompletions"
GOLDEN = {
    "post": (
        dict(method="POST", expiry=300, proxy_url=CHAT),
        f"http://127.0.0.1:8080/?{_Q}&X-Sw-Expires=300&{_CHAT_Q}&X-Sw-SignedHeaders=&X-Sw-Body=false"
        "&X-Sw-Signature=fa823ddfab21ccc049097df8543ec5e9f199b979caeb15700af67d416d9bc4fc",
    ),
    "get, proxy with query": (
        dict(method="GET", expiry=60, proxy_url="https://api.openai.com/v1/models?limit=2&order=desc"),
        f"http://127.0.0.1:8080/?{_Q}&X-Sw-Expires=60"
        "&X-Sw-Proxy=https%3A%2F%2Fapi.openai.com%2Fv1%2Fmodels%3Flimit%3D2%26order%3Ddesc&X-Sw-SignedHeaders="
        "&X-Sw-Body=false&X-Sw-Signature=69fe4cddb3010db59f29ea85e17a66661fe13ba2a2810b5304be918a31e39540",
    ),
    "signed header and body": (
        dict(method="POST", expiry=300, proxy_url=CHAT, headers={"Content-Type": "application/json"}, body=CHAT_BODY),
        f"http://127.0.0.1:8080/?{_Q}&X-Sw-Expires=300&{_CHAT_Q}&X-Sw-SignedHeaders=content-type%3Bcontent-length"
        "&X-Sw-Body=true&X-Sw-Signature=074a09a715d734c60444a1dc962016001b69e8695a491b19657bdb4ce0621a70",
    ),
    "signer host with a path": (
        dict(method="POST", expiry=300, proxy_url=CHAT, host="https://example.com/ai"),
        f"https://example.com/ai/?{_Q}&X-Sw-Expires=300&{_CHAT_Q}&X-Sw-SignedHeaders=&X-Sw-Body=false"
        "&X-Sw-Signature=c587e7327b50ba598ab0a436e0bceb8033a001cd2dddc6bc62f2f5552554a36b",
    ),
}
EPOCH_ARGS = dict(
    id="foo",
    secret="secret",
    host="http://localhost:3000",
    proxy_url="https://github.com/",
    expiry=600,
    method="POST",
    datetime_override=datetime(1970, 1, 1),
)
EPOCH_SIGNATURE = "ed15db76d806155fd5119e093a0f030063c90d943dfdd27e011a9044a77a90a6"


def sdk_args(**kwargs) -> dict:
    """Arguments for either signer; headers copied because signway_sdk adds Content-Length to them."""
    args = dict(id=ID, secret=SECRET, host=HOST, expiry=300, method="POST", datetime_override=DT) | kwargs
    if "headers" in args:
        args["headers"] = dict(args["headers"])
    return args


@pytest.mark.parametrize("kwargs, expected", GOLDEN.values(), ids=GOLDEN.keys())
def test_golden_vector_ours(kwargs, expected):
    assert sign_url(**sdk_args(**kwargs)) == expected


@pytest.mark.parametrize("kwargs, expected", GOLDEN.values(), ids=GOLDEN.keys())
def test_golden_vector_real_sdk(kwargs, expected):
    assert signway_sdk.sign_url(**sdk_args(**kwargs)) == expected


@pytest.mark.parametrize("signer", [sign_url, signway_sdk.sign_url], ids=["ours", "real sdk"])
def test_signway_epoch_vector(signer):
    assert signer(**EPOCH_ARGS).endswith(f"&X-Sw-Signature={EPOCH_SIGNATURE}")


@pytest.mark.parametrize("dt", [SIGNED_AT, datetime(2026, 11, 20, 14, 0, tzinfo=timezone(timedelta(hours=2)))])
def test_aware_datetimes_are_converted_to_utc(dt):
    assert sign_url(**sdk_args(proxy_url=CHAT, datetime_override=dt)) == GOLDEN["post"][1]


# --- verification round trip ----------------------------------------------------------------------


def verify_url(url, *, method, headers=None, body=None, secrets=(SECRET,), now=NOW):
    """What the proxy does with a request on ``url``; returns the verified request."""
    parts = urlsplit(url)
    req = parse_signed_request(parts.query)
    check_validity(req, now, clock_skew=60, max_expiry=604800)
    verify_signature(
        req,
        method=method,
        secrets=list(secrets),
        paths=[parts.path or "/", "/"],
        headers={k.lower(): v for k, v in (headers or {}).items()},
        body=body if req.body_signed else None,
    )
    return req


def send_headers(signed: dict | None, body: bytes | None) -> dict:
    """Headers a client sends: the signed ones (minus the SDK's Content-Length), its real length, noise."""
    out = {k: v.strip() for k, v in (signed or {}).items() if k.lower() != "content-length"}
    out["User-Agent"] = "pytest"
    if body is not None:
        out["Content-Length"] = str(len(body))
    return out


SDK_ACCEPTS = {  # sign_url arguments, normalised proxy URL Parkway must forward
    "GET": (dict(method="GET", proxy_url=CHAT), CHAT),
    "POST": (dict(proxy_url=CHAT), CHAT),
    "proxy with its own query": (
        dict(method="GET", proxy_url="https://api.openai.com/v1/models?limit=2&order=desc"),
        "https://api.openai.com/v1/models?limit=2&order=desc",
    ),
    "several signed headers, caller order": (
        dict(
            proxy_url=CHAT,
            headers={"X-Request-Id": "r-42", "Content-Type": "application/json", "Accept": "text/event-stream"},
        ),
        CHAT,
    ),
    "ascii body": (dict(proxy_url=CHAT, headers={"Content-Type": "application/json"}, body=CHAT_BODY), CHAT),
    "non-ascii body, Content-Length in characters": (dict(proxy_url=CHAT, body=UNICODE_BODY), CHAT),
    "empty body": (dict(proxy_url=CHAT, body=""), CHAT),
    "values with spaces": (
        dict(
            id="team one",
            proxy_url="https://api.example.com/search?q=hello world&lang=en",
            headers={"X-Title": "  My App  "},
        ),
        "https://api.example.com/search?q=hello%20world&lang=en",
    ),
    "proxy without a path": (dict(proxy_url="https://api.example.com"), "https://api.example.com/"),
    "proxy with dot segments": (dict(proxy_url="https://a.example.com/x/../v1/chat"), "https://a.example.com/v1/chat"),
    "proxy with raw space, quote, non-ascii": (
        dict(proxy_url='https://api.example.com/files/my "report" café.txt?q=naïve "x"'),
        "https://api.example.com/files/my%20%22report%22%20caf%C3%A9.txt?q=na%C3%AFve%20%22x%22",
    ),
    "proxy with upper-case host and default port": (
        dict(proxy_url="HTTPS://API.OpenAI.com:443/v1/models"),
        "https://api.openai.com/v1/models",
    ),
    "signer host with a path": (dict(proxy_url=CHAT, host="https://example.com/ai"), CHAT),
}


@pytest.mark.parametrize("kwargs, forwarded", SDK_ACCEPTS.values(), ids=SDK_ACCEPTS.keys())
def test_accepts_real_sdk_urls(kwargs, forwarded):
    args = sdk_args(**kwargs)
    body = args["body"].encode() if args.get("body") is not None else None
    url = signway_sdk.sign_url(**args)
    req = verify_url(url, method=args["method"], headers=send_headers(kwargs.get("headers"), body), body=body)
    assert req.proxy_url == forwarded
    assert req.credential_id == args["id"]
    assert req.body_signed is (body is not None)
    # the SDK lists names in the caller's order and appends content-length; verification sorts
    assert req.signed_headers == tuple(
        [k.lower() for k in kwargs.get("headers", {})] + ["content-length"] * (body is not None)
    )


@pytest.mark.parametrize(
    "signed_with, secrets",
    [
        (SECRET, [OLD_SECRET, SECRET]),
        (SECRET, [SECRET, OLD_SECRET]),
        (OLD_SECRET, [OLD_SECRET, SECRET]),
        (OLD_SECRET, [SECRET, OLD_SECRET]),
    ],
)
def test_rotation_either_secret_verifies(signed_with, secrets):
    url = signway_sdk.sign_url(**sdk_args(proxy_url=CHAT, secret=signed_with))
    verify_url(url, method="POST", secrets=secrets)


@pytest.mark.parametrize("kwargs, forwarded", SDK_ACCEPTS.values(), ids=SDK_ACCEPTS.keys())
def test_accepts_our_own_urls(kwargs, forwarded):
    args = sdk_args(**kwargs, params={"end_user": "Jane Doe (QA)"})
    body = args["body"].encode() if args.get("body") is not None else None
    url = sign_url(**args)
    req = verify_url(url, method=args["method"], headers=send_headers(kwargs.get("headers"), body), body=body)
    assert req.proxy_text == req.proxy_url == forwarded  # ours signs the normal form
    assert req.extra_params() == {"end_user": "Jane Doe (QA)"}


def test_our_signer_signs_normal_form_and_byte_length():
    # Where ours differs from signway_sdk: proxy URL normalised, Content-Length in UTF-8 bytes.
    ours = sign_url(**sdk_args(proxy_url="HTTPS://API.OpenAI.com:443/v1/x/../chat/completions", body=UNICODE_BODY))
    expected = emulate(
        encode=form_encode,
        canonical_path="/",
        proxy_sent=CHAT,
        proxy_signed=CHAT,
        host=HOST + "/",
        headers=[("Content-Length", "75")],
        header_names=["content-length"],
        body=UNICODE_BODY.encode(),
    )
    assert ours == expected


# --- emulations of the other signers ------------------------------------------------------------


def hmac_signature(secret: str, date_text: str, canonical: bytes) -> str:
    """SIGNING.md's signature, written independently of proxy.signing."""
    day = date_text[:8]
    key = hmac.new(f"SW1-HMAC-SHA256{secret}".encode(), day.encode(), hashlib.sha256).digest()
    to_sign = f"SW1-HMAC-SHA256\n{date_text}\n{day}\n{hashlib.sha256(canonical).hexdigest()}"
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def form_encode(s: str) -> str:  # Python quote_plus and Ruby CGI.escape: space as "+"
    return quote_plus(s, safe="")


def rfc3986_encode(s: str) -> str:  # Signway's Rust server: space as "%20"
    return quote(s, safe="")


def uri_component(s: str) -> str:  # JS encodeURIComponent: also keeps ! ' ( ) *
    return quote(s, safe="!'()*")


def emulate(
    *,
    encode,
    canonical_path,
    proxy_sent,
    proxy_signed,
    headers,
    header_names,
    body,
    host,
    id=ID,
    method="POST",
    expiry=300,
    extra=(),
) -> str:
    """A signed URL whose canonical request uses ``encode``, ``canonical_path`` and ``proxy_signed``,
    while the URL itself carries ``proxy_sent``; ``headers`` include any Content-Length."""
    params = [
        ("X-Sw-Algorithm", "SW1-HMAC-SHA256"),
        ("X-Sw-Credential", f"{id}/20261120"),
        ("X-Sw-Date", "20261120T120000Z"),
        ("X-Sw-Expires", str(expiry)),
        ("X-Sw-Proxy", proxy_sent),
        ("X-Sw-SignedHeaders", ";".join(header_names)),
        ("X-Sw-Body", "false" if body is None else "true"),
        *extra,
    ]
    signed = [(k, proxy_signed if k == "X-Sw-Proxy" else v) for k, v in params]
    query = "&".join(sorted(f"{encode(k)}={encode(v)}" for k, v in signed))
    pairs = sorted((n.lower(), v.strip()) for n, v in headers)
    head = "\n".join(f"{n}:{v}" for n, v in pairs) + "\n\n" + ";".join(n for n, _ in pairs)
    canonical = f"{method}\n{canonical_path}\n{query}\n{head}\n".encode() + (body or b"")
    sent = "&".join(f"{encode(k)}={encode(v)}" for k, v in params)
    return f"{host}?{sent}&X-Sw-Signature={hmac_signature(SECRET, '20261120T120000Z', canonical)}"


def sign_like_signway_server(*, proxy_written, proxy_whatwg, headers=(), body=None, extra=(), host=HOST + "/"):
    """What Signway's Rust server accepts: canonical query over the WHATWG-normalised proxy URL,
    RFC 3986 encoding (space as %20), canonical path always "/", Content-Length in bytes."""
    headers = list(headers) + ([("Content-Length", str(len(body)))] if body is not None else [])
    return emulate(
        encode=rfc3986_encode,
        canonical_path="/",
        proxy_sent=proxy_written,
        proxy_signed=proxy_whatwg,
        headers=headers,
        header_names=[n.lower() for n, _ in headers],
        body=body,
        host=host,
        extra=extra,
    )


def sign_like_ruby(*, proxy_after_uri, headers=(), body="", id=ID, host=HOST + "/"):
    """Ruby SDK: proxy as ``URI(proxy).to_s`` (escapes space, quotes, <>; keeps host case and ..),
    CGI.escape (form encoding), header names sorted, Content-Length = bytesize, path = URI(host).path;
    an empty body means no body."""
    raw = body.encode() if body else None
    headers = list(headers) + ([("Content-Length", str(len(raw)))] if raw else [])
    return emulate(
        encode=form_encode,
        canonical_path=urlsplit(host).path,
        proxy_sent=proxy_after_uri,
        proxy_signed=proxy_after_uri,
        headers=headers,
        header_names=sorted(n.lower() for n, _ in headers),
        body=raw,
        host=host,
        id=id,
    )


def sign_like_js(*, proxy_after_new_url, headers=(), body=None, id=ID, host=HOST + "/"):
    """JS SDK: proxy as ``new URL(proxy).toString()``, encodeURIComponent, caller's header order,
    Content-Length = ``body.length`` (UTF-16 code units), path = ``new URL(host).pathname``."""
    raw = body.encode() if body is not None else None
    if body is not None:
        headers = list(headers) + [("Content-Length", str(len(body.encode("utf-16-le")) // 2))]
    return emulate(
        encode=uri_component,
        canonical_path=urlsplit(host).path,
        proxy_sent=proxy_after_new_url,
        proxy_signed=proxy_after_new_url,
        headers=list(headers),
        header_names=[n.lower() for n, _ in headers],
        body=raw,
        host=host,
        id=id,
    )


JSON = [("Content-Type", "application/json")]
EMULATED = {  # url factory, signed headers the client sends, body sent, URL Parkway must forward
    "signway server: normalised proxy, %20, path /": (
        lambda: sign_like_signway_server(
            proxy_written="HTTPS://API.Example.com:443/v1/../chat/completions?user=Jane Doe",
            proxy_whatwg="https://api.example.com/chat/completions?user=Jane%20Doe",
            extra=[("end_user", "Jane Doe")],
            host="https://example.com/ai/",
        ),
        [],
        None,
        "https://api.example.com/chat/completions?user=Jane%20Doe",
    ),
    "signway server: proxy without path, utf-8 body": (
        lambda: sign_like_signway_server(
            proxy_written="https://api.example.com",
            proxy_whatwg="https://api.example.com/",
            headers=JSON,
            body=UNICODE_BODY.encode(),
        ),
        JSON,
        UNICODE_BODY,
        "https://api.example.com/",
    ),
    "ruby: URI() proxy, sorted names, bytesize, host path": (
        lambda: sign_like_ruby(
            proxy_after_uri="https://API.Example.com/v1/../files/a%20b%22%3Cx%3E.txt?q=%22hi%22",
            headers=[("X-Title", "My App"), *JSON],
            body=UNICODE_BODY,
            id="team one",
            host="https://example.com/ai/",
        ),
        [("X-Title", "My App"), *JSON],
        UNICODE_BODY,
        "https://api.example.com/files/a%20b%22%3Cx%3E.txt?q=%22hi%22",
    ),
    "ruby: no body": (
        lambda: sign_like_ruby(proxy_after_uri="https://api.example.com/v1/models?q=a%20b"),
        [],
        None,
        "https://api.example.com/v1/models?q=a%20b",
    ),
    "js: encodeURIComponent keeps ' ( )": (
        lambda: sign_like_js(
            proxy_after_new_url="https://api.example.com/v1/report(1)'s.txt?name=it%27s%20(final)",
            headers=[("X-Title", "My App (beta)"), *JSON],
            body=CHAT_BODY,
            id="app (web)",
        ),
        [("X-Title", "My App (beta)"), *JSON],
        CHAT_BODY,
        "https://api.example.com/v1/report(1)'s.txt?name=it%27s%20(final)",
    ),
    "js: accented body, UTF-16 length = characters": (
        lambda: sign_like_js(proxy_after_new_url=CHAT, body='{"content":"¿Qué tal?"}', host="https://example.com/ai/"),
        [],
        '{"content":"¿Qué tal?"}',
        CHAT,
    ),
    "js: emoji body, UTF-16 length differs": (
        lambda: sign_like_js(proxy_after_new_url=CHAT, headers=JSON, body=UNICODE_BODY),
        JSON,
        UNICODE_BODY,
        CHAT,
    ),
}


@pytest.mark.parametrize("make_url, headers, body, forwarded", EMULATED.values(), ids=EMULATED.keys())
def test_accepts_other_signers(make_url, headers, body, forwarded):
    raw = body.encode() if body is not None else None
    req = verify_url(make_url(), method="POST", headers=send_headers(dict(headers), raw), body=raw)
    assert req.proxy_url == forwarded


@pytest.mark.parametrize("kwargs, expected", GOLDEN.values(), ids=GOLDEN.keys())
def test_emulation_reproduces_golden_vectors(kwargs, expected):
    # Proves the emulator is faithful: with the Python SDK's choices it yields the SDK's URLs.
    args = sdk_args(**kwargs)
    headers = list(args.get("headers", {}).items())
    body = args["body"].encode() if "body" in args else None
    if body is not None:
        headers.append(("Content-Length", str(len(body))))
    host = args["host"].rstrip("/") + "/"
    url = emulate(
        encode=form_encode,
        canonical_path=urlsplit(host).path,
        proxy_sent=args["proxy_url"],
        proxy_signed=args["proxy_url"],
        headers=headers,
        header_names=[n.lower() for n, _ in headers],
        body=body,
        host=host,
        method=args["method"],
        expiry=args["expiry"],
    )
    assert url == expected


# --- refusals -------------------------------------------------------------------------------------

BASE_BODY = '{"a":1}'


def base_url(**kwargs) -> str:
    return signway_sdk.sign_url(
        **sdk_args(proxy_url=CHAT, headers={"X-Foo": "foo", "Content-Type": "application/json"}, body=BASE_BODY)
        | kwargs
    )


BASE_URL = base_url()
BASE_SIGNATURE = BASE_URL.rsplit("=", 1)[1]
EXPIRES_AT = SIGNED_AT + timedelta(seconds=300)


@dataclass(frozen=True)
class Attempt:
    url: str = BASE_URL
    method: str = "POST"
    headers: tuple = (("x-foo", "foo"), ("content-type", "application/json"), ("content-length", "7"))
    body: bytes = BASE_BODY.encode()
    secrets: tuple = (SECRET,)
    now: datetime = NOW

    def run(self):
        return verify_url(
            self.url, method=self.method, headers=dict(self.headers), body=self.body, secrets=self.secrets, now=self.now
        )


def set_param(url: str, name: str, value: str | None) -> str:
    """Replace (or, with None, drop) parameter ``name`` in the URL's query, keeping the rest verbatim."""
    base, query = url.split("?", 1)
    pairs = [
        p if p.split("=", 1)[0] != name else (None if value is None else f"{name}={form_encode(value)}")
        for p in query.split("&")
    ]
    return base + "?" + "&".join(p for p in pairs if p is not None)


def param(name, value):
    return lambda a: replace(a, url=set_param(a.url, name, value))


def appended(raw):
    return lambda a: replace(a, url=a.url + "&" + raw)


def change(**fields):
    return lambda a: replace(a, **fields)


def malformed(needle):
    return BadRequest, 400, "malformed_signed_url", needle


MISMATCH = (Forbidden, 403, "signature_mismatch", "signature does not match")
REFUSALS = {
    **{f"missing {n}": (param(n, None), *malformed(f"missing parameter {n}")) for n in REQUIRED_PARAMS},
    "no X-Sw parameters": (
        change(url=HOST + "/?model=gpt"),
        BadRequest,
        400,
        "missing_signature_params",
        "not a signed URL",
    ),
    "empty query": (change(url=HOST + "/"), BadRequest, 400, "missing_signature_params", "not a signed URL"),
    "bad algorithm": (param("X-Sw-Algorithm", "AWS4-HMAC-SHA256"), *malformed("X-Sw-Algorithm")),
    "credential without id": (param("X-Sw-Credential", "/20261120"), *malformed("X-Sw-Credential")),
    "date with dashes": (param("X-Sw-Date", "2026-11-20T12:00:00Z"), *malformed("X-Sw-Date")),
    "date month 13": (param("X-Sw-Date", "20261320T120000Z"), *malformed("X-Sw-Date")),
    "date without Z": (param("X-Sw-Date", "20261120T120000"), *malformed("X-Sw-Date")),
    "expires not numeric": (param("X-Sw-Expires", "300s"), *malformed("X-Sw-Expires")),
    "expires negative": (param("X-Sw-Expires", "-1"), *malformed("X-Sw-Expires")),
    "expires empty": (param("X-Sw-Expires", ""), *malformed("X-Sw-Expires")),
    "expires non-ascii digits": (param("X-Sw-Expires", "٣٠٠"), *malformed("X-Sw-Expires")),
    "body not a boolean": (param("X-Sw-Body", "yes"), *malformed("X-Sw-Body")),
    "signature 63 hex": (param("X-Sw-Signature", "a" * 63), *malformed("X-Sw-Signature")),
    "signature 65 hex": (param("X-Sw-Signature", "a" * 65), *malformed("X-Sw-Signature")),
    "signature not hex": (param("X-Sw-Signature", "g" * 64), *malformed("X-Sw-Signature")),
    "proxy ftp": (param("X-Sw-Proxy", "ftp://files.example.com/x"), *malformed("X-Sw-Proxy")),
    "proxy without host": (param("X-Sw-Proxy", "https:///v1/chat"), *malformed("X-Sw-Proxy")),
    "proxy bad port": (param("X-Sw-Proxy", "https://api.openai.com:99999/"), *malformed("X-Sw-Proxy")),
    "proxy not a url": (param("X-Sw-Proxy", "not a url"), *malformed("X-Sw-Proxy")),
    "signed headers not names": (param("X-Sw-SignedHeaders", "x foo;content-type"), *malformed("X-Sw-SignedHeaders")),
    "duplicate X-Sw-Proxy": (
        appended("X-Sw-Proxy=https%3A%2F%2Fevil.example%2F"),
        *malformed("X-Sw-Proxy appears more"),
    ),
    "duplicate X-Sw-Signature": (appended("X-Sw-Signature=" + "0" * 64), *malformed("X-Sw-Signature appears more")),
    "duplicate X-Sw-Expires, same value": (appended("X-Sw-Expires=300"), *malformed("X-Sw-Expires appears more")),
    "query not utf-8": (appended("note=%FF"), *malformed("UTF-8")),
    "expired": (change(now=EXPIRES_AT + timedelta(seconds=61)), Forbidden, 403, "expired", "2026-11-20T12:05:00Z"),
    "date in the future beyond skew": (
        change(now=SIGNED_AT - timedelta(seconds=61)),
        Forbidden,
        403,
        "date_in_future",
        "2026-11-20T12:00:00Z",
    ),
    "expiry above maximum": (change(url=base_url(expiry=604801)), Forbidden, 403, "expiry_too_long", "604801"),
    "signed header missing": (
        change(headers=(("content-type", "application/json"),)),
        Forbidden,
        403,
        "signed_header_missing",
        "x-foo",
    ),
    "signed header with another value": (
        change(headers=(("x-foo", "bar"), ("content-type", "application/json"))),
        *MISMATCH,
    ),
    "proxy path tampered": (param("X-Sw-Proxy", "https://api.openai.com/v1/files"), *MISMATCH),
    "proxy host tampered": (param("X-Sw-Proxy", "https://evil.example/v1/chat/completions"), *MISMATCH),
    "proxy respelled to another path": (param("X-Sw-Proxy", CHAT + "/../../files"), *MISMATCH),
    "proxy respelled to another port": (
        param("X-Sw-Proxy", "https://api.openai.com:8443/v1/chat/completions"),
        *MISMATCH,
    ),
    "proxy respelled to http": (param("X-Sw-Proxy", "http://api.openai.com/v1/chat/completions"), *MISMATCH),
    "expiry tampered": (param("X-Sw-Expires", "3000"), *MISMATCH),
    "date tampered": (param("X-Sw-Date", "20261120T120010Z"), *MISMATCH),
    "credential tampered": (param("X-Sw-Credential", "other-id/20261120"), *MISMATCH),
    "signed header list tampered": (param("X-Sw-SignedHeaders", "content-type;content-length"), *MISMATCH),
    "body flag tampered": (param("X-Sw-Body", "false"), *MISMATCH),
    "method tampered": (change(method="PUT"), *MISMATCH),
    "body tampered": (change(body=b'{"a":2}'), *MISMATCH),
    "body one byte longer": (change(body=BASE_BODY.encode() + b" "), *MISMATCH),
    "body one byte flipped": (change(body=b'{"a":1]'), *MISMATCH),
    "wrong secret": (change(secrets=("not-the-secret",)), *MISMATCH),
    "unsigned parameter added": (appended("debug=1"), *MISMATCH),
    "lower-case x-sw-proxy smuggled": (appended("x-sw-proxy=https%3A%2F%2Fevil.example%2F"), *MISMATCH),
    "request on another path": (change(url=base_url(host="https://example.com/ai").replace("/ai/", "/v2/")), *MISMATCH),
}


def test_base_attempt_is_accepted():
    # Every refusal below changes exactly one thing of this request.
    assert Attempt().run().proxy_url == CHAT


@pytest.mark.parametrize("mutate, exc, status, code, needle", REFUSALS.values(), ids=REFUSALS.keys())
def test_refused(mutate, exc, status, code, needle):
    with pytest.raises(ParkwayError) as info:
        mutate(Attempt()).run()
    assert (type(info.value), info.value.status, info.value.code) == (exc, status, code)
    assert needle in str(info.value)


@pytest.mark.parametrize("mutate", [r[0] for r in REFUSALS.values()], ids=REFUSALS.keys())
def test_refusal_never_reveals_secret_or_signature(mutate):
    with pytest.raises(ParkwayError) as info:
        mutate(Attempt()).run()
    for text in (str(info.value), info.value.message):
        assert SECRET not in text
        assert BASE_SIGNATURE not in text


# --- validity window ------------------------------------------------------------------------------

VALIDITY = {  # now, clock_skew, max_expiry -> refusal code or None
    "just signed": (SIGNED_AT, 60, 604800, None),
    "signer clock ahead, within skew": (SIGNED_AT - timedelta(seconds=60), 60, 604800, None),
    "signer clock ahead, beyond skew": (SIGNED_AT - timedelta(seconds=61), 60, 604800, "date_in_future"),
    "last valid second": (EXPIRES_AT, 0, 604800, None),
    "one second late": (EXPIRES_AT + timedelta(seconds=1), 0, 604800, "expired"),
    "late within skew": (EXPIRES_AT + timedelta(seconds=60), 60, 604800, None),
    "late beyond skew": (EXPIRES_AT + timedelta(seconds=61), 60, 604800, "expired"),
    "expiry at maximum": (NOW, 60, 300, None),
    "expiry above maximum": (NOW, 60, 299, "expiry_too_long"),
}


@pytest.mark.parametrize("now, skew, max_expiry, code", VALIDITY.values(), ids=VALIDITY.keys())
def test_check_validity(now, skew, max_expiry, code):
    req = parse_signed_request(urlsplit(BASE_URL).query)
    if code is None:
        check_validity(req, now, clock_skew=skew, max_expiry=max_expiry)
    else:
        with pytest.raises(Forbidden) as info:
            check_validity(req, now, clock_skew=skew, max_expiry=max_expiry)
        assert (info.value.status, info.value.code) == (403, code)


# --- security properties and helpers --------------------------------------------------------------

RESPELLINGS = [
    "HTTPS://API.OPENAI.COM:443/v1/chat/completions",
    "https://api.openai.com/v1/./chat/completions",
    "https://api.openai.com/v1/x/../chat/completions",
    "https://api.openai.com/v1/chat/%2e/completions",
]


@pytest.mark.parametrize("text", RESPELLINGS)
def test_respelled_proxy_only_ever_forwards_the_normal_form(text):
    req = replace(Attempt(), url=set_param(BASE_URL, "X-Sw-Proxy", text)).run()
    assert (req.proxy_text, req.proxy_url) == (text, CHAT)


def test_extra_params_are_the_non_signway_ones():
    url = sign_url(**sdk_args(proxy_url=CHAT, params={"end_user": "u-42", "note": "a b&c"}))
    req = verify_url(url, method="POST")
    assert req.extra_params() == {"end_user": "u-42", "note": "a b&c"}
    assert "X-Sw-Signature" not in dict(req.params)


CANONICAL_PARAMS = [("b", "1"), ("X-Sw-Signature", "f" * 64), ("a", "it's (x)"), ("X-Sw-Proxy", "https://x/?q=a b")]
CANONICAL_FORM = "X-Sw-Proxy=https%3A%2F%2Fx%2F%3Fq%3Da+b&a=it%27s+%28x%29&b=1"  # Python, Ruby
CANONICAL_RFC3986 = "X-Sw-Proxy=https%3A%2F%2Fx%2F%3Fq%3Da%20b&a=it%27s%20%28x%29&b=1"  # Signway server
CANONICAL_JS = "X-Sw-Proxy=https%3A%2F%2Fx%2F%3Fq%3Da%20b&a=it's%20(x)&b=1"  # encodeURIComponent


def test_canonical_query_sorts_encodes_and_excludes_signature():
    assert canonical_query(CANONICAL_PARAMS) == CANONICAL_FORM
    assert [canonical_query(CANONICAL_PARAMS, e) for e in QUERY_ENCODINGS] == [
        CANONICAL_FORM,
        CANONICAL_RFC3986,
        CANONICAL_JS,
    ]


def test_canonical_query_of_golden_vector():
    req = parse_signed_request(urlsplit(GOLDEN["post"][1]).query)
    assert canonical_query(req.params) == (
        "X-Sw-Algorithm=SW1-HMAC-SHA256&X-Sw-Body=false&X-Sw-Credential=app-id%2F20261120&X-Sw-Date=20261120T120000Z"
        "&X-Sw-Expires=300&X-Sw-Proxy=https%3A%2F%2Fapi.openai.com%2Fv1%2Fchat%2Fcompletions&X-Sw-SignedHeaders="
    )


def test_signing_key_cache_does_not_mix_secrets():
    def expected(secret, day):
        return hmac.new(f"SW1-HMAC-SHA256{secret}".encode(), day.encode(), hashlib.sha256).digest()

    calls = [
        ("alpha", "20261120"),
        ("beta", "20261120"),
        ("alpha", "20261121"),
        ("alpha", "20261120"),
        ("SW1", "20261120"),
        ("", "20261120"),
    ]
    keys = [signing_key(s, d) for s, d in calls] + [signing_key(s, d) for s, d in reversed(calls)]
    assert keys == [expected(s, d) for s, d in calls + calls[::-1]]
    assert len(set(keys)) == 5


def test_wrong_secret_refused_after_right_one_cached():
    url = signway_sdk.sign_url(**sdk_args(proxy_url=CHAT))
    verify_url(url, method="POST", secrets=[SECRET])
    with pytest.raises(Forbidden) as info:
        verify_url(url, method="POST", secrets=[SECRET + "x"])
    assert info.value.code == "signature_mismatch"


# --- the hand-split query is parse_qsl ----------------------------------------------------------

_QUERY_ALPHABET = st.sampled_from(
    ["&", "=", "+", "%", "%2", "%26", "%3D", "%2B", "%C3%A9", "%FF", "%zz", "a", "X-Sw-", "é", " ", "~"]
)


@given(st.lists(_QUERY_ALPHABET, max_size=40).map("".join))
@settings(max_examples=500, deadline=None)
def test_parse_query_is_parse_qsl(query: str) -> None:
    from urllib.parse import parse_qsl

    try:
        expected: list[tuple[str, str]] | None = parse_qsl(
            query, keep_blank_values=True, errors="strict", max_num_fields=200
        )
    except (UnicodeDecodeError, ValueError):
        expected = None
    try:
        got: list[tuple[str, str]] | None = parse_query(query)
    except BadRequest:
        got = None
    assert got == expected


@pytest.mark.parametrize("fields", [199, 200, 201])
def test_parse_query_allows_200_fields_like_parse_qsl(fields: int) -> None:
    query = "&".join(["a=1"] * fields)
    if fields <= 200:
        assert len(parse_query(query)) == fields
    else:
        with pytest.raises(BadRequest, match="too many parameters"):
            parse_query(query)


# --- the one-pass signed-query parser reads the query as parse_qsl does --------------------------

_USER = "a b+c/é~ü&="  # a space, a plus, a slash, non-ASCII, an ampersand and an equals sign
_SIGNED_FIELDS = urlsplit(
    sign_url(**sdk_args(proxy_url=CHAT + "?x=1&y=a b", params={"pw_user": _USER, "empty": ""}))
).query.split("&")
_EXTRA_FIELDS = [
    "",  # an empty field (&&)
    "=",
    "empty=",
    "novalue",
    "pw_user=a+b",  # a repeated non-Signway parameter is kept, in order
    "pw_user=a%20b",
    "k=%C3%A9",
    "k=%c3%a9",  # lower-case escapes
    "k=%FF",  # not UTF-8
    "k=%zz",  # not an escape: kept as text
    "k+x=1",
    "X-Sw-Date=20261120T120000Z",  # repeated Signway parameters
    "X-Sw-Body=true",
    "X-Sw-Proxy=https%3a%2f%2fapi.openai.com%2fv1",
    "X-Sw-Sig%6Eature=" + "0" * 64,  # an encoded name
]


def _respell(field: str, how: int) -> str:
    """The same decoded name and value, spelled as another signer would (or as sent)."""
    from urllib.parse import unquote_plus

    name, eq, value = field.partition("=")
    plain = [unquote_plus(name), unquote_plus(value)]
    if how == 1:  # RFC 3986 (%20), upper-case escapes
        return "=".join(quote(p, safe="") for p in plain) if eq else field
    if how == 2:  # lower-case escapes
        import re

        return re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), field)
    if how == 3:  # encodeURIComponent
        return "=".join(quote(p, safe="!'()*") for p in plain) if eq else field
    return field


@st.composite
def _signed_query_variants(draw: st.DrawFn) -> str:
    fields = [_respell(f, draw(st.integers(0, 3))) for f in _SIGNED_FIELDS]
    for extra in draw(st.lists(st.sampled_from(_EXTRA_FIELDS), max_size=4)):
        fields.insert(draw(st.integers(0, len(fields))), extra)
    if draw(st.booleans()):
        fields = draw(st.permutations(fields))
    return "&".join(fields)


@given(_signed_query_variants())
@settings(max_examples=400, deadline=None)
def test_parse_signed_request_reads_the_query_as_parse_qsl(query: str) -> None:
    from urllib.parse import parse_qsl

    try:
        pairs = parse_qsl(query, keep_blank_values=True, errors="strict", max_num_fields=200)
    except UnicodeDecodeError:
        with pytest.raises(BadRequest, match="not valid UTF-8"):
            parse_signed_request(query)
        return
    signway = [k for k, _ in pairs if k.startswith("X-Sw-")]
    repeated = next((k for i, k in enumerate(signway) if k in signway[:i]), None)
    if repeated is not None:
        with pytest.raises(BadRequest, match=f"parameter {repeated} appears more than once"):
            parse_signed_request(query)
        return
    found = dict(pairs)
    respelled = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs)
    try:
        req = parse_signed_request(query)
    except BadRequest as exc:  # refused for what the values say, whatever their spelling
        with pytest.raises(BadRequest) as again:
            parse_signed_request(respelled)
        assert again.value.message == exc.message
        return
    assert req == parse_signed_request(respelled)
    assert req.params == tuple((k, v) for k, v in pairs if k != "X-Sw-Signature")
    assert req.extra_params()["pw_user"] == found["pw_user"]
    assert (req.date_text, req.proxy_text, req.signature) == (
        found["X-Sw-Date"],
        found["X-Sw-Proxy"],
        found["X-Sw-Signature"].lower(),
    )
    assert req.credential_id == found["X-Sw-Credential"].split("/", 1)[0]
    assert req.body_signed is (found["X-Sw-Body"] == "true")


@pytest.mark.parametrize("how", [0, 1, 2, 3])
def test_signed_url_verifies_however_its_query_is_spelled(how: int) -> None:
    """An intermediary may re-escape the query (lower-case hex, %20 for +): the decoded values are
    what was signed, so the URL still verifies, and its extra parameters read the same."""
    url = sign_url(**sdk_args(proxy_url=CHAT + "?x=1&y=a b", params={"pw_user": _USER, "empty": ""}))
    base, _, query = url.partition("?")
    respelled = base + "?" + "&".join(_respell(f, how) for f in query.split("&"))
    assert (respelled != url) is (how != 0)
    req = verify_url(respelled, method="POST")
    assert req.extra_params() == {"pw_user": _USER, "empty": ""}


def test_repeated_signway_parameter_named_after_a_bad_escape() -> None:
    """Errors come in the order they always did: the query must decode before a repeat is named."""
    query = urlsplit(sign_url(**sdk_args(proxy_url=CHAT))).query
    with pytest.raises(BadRequest, match="not valid UTF-8"):
        parse_signed_request(f"X-Sw-Body=true&{query}&k=%FF")
    with pytest.raises(BadRequest, match="X-Sw-Body appears more than once"):
        parse_signed_request(f"X-Sw-Body=true&{query}")


@given(
    st.one_of(
        st.from_regex(r"[0-9]{8}T[0-9]{6}Z", fullmatch=True),
        st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31)).map(
            lambda d: f"{d.year:04d}{d.month:02d}{d.day:02d}T{d.hour:02d}{d.minute:02d}{d.second:02d}Z"
        ),
        st.sampled_from(["20261207T240000Z", "20261207T235960Z", "00000101T000000Z", "20230229T120000Z"]),
        st.from_regex(r"[0-9٣]{8}T[0-9]{6}[Zz+]|[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{6}Z", fullmatch=True),
    )
)
def test_x_sw_date_is_read_field_by_field(text: str) -> None:
    """The date is the calendar date and time its digits say, in UTC, or refused: the one C call
    that reads it agrees with reading each field with int() and building the datetime."""
    query = "&".join(f"X-Sw-Date={quote_plus(text)}" if f.startswith("X-Sw-Date=") else f for f in _SIGNED_FIELDS)
    try:  # as the date was read before: the pattern, then each field with int()
        d = text
        assert re.fullmatch(r"[0-9]{8}T[0-9]{6}Z", d)
        expected = datetime(
            int(d[0:4]), int(d[4:6]), int(d[6:8]), int(d[9:11]), int(d[11:13]), int(d[13:15]), tzinfo=UTC
        )
    except (AssertionError, ValueError):
        with pytest.raises(BadRequest, match="invalid X-Sw-Date"):
            parse_signed_request(query)
        return
    parsed = parse_signed_request(query)
    assert parsed.date == expected and parsed.date.tzinfo is UTC and parsed.date_text == text


# --- the fast paths give the answers of the code they replaced -----------------------------------
# The references below are the previous implementations, kept here verbatim: the canonical query
# formatted pair by pair, the one-shot HMAC, and verification as a loop over every candidate.

_TEXT = st.text(
    st.sampled_from(["a", "Z", "0", " ", "+", "%", "&", "=", "/", "~", "!", "*", "(", "é", "😀"]), max_size=6
)
_PARAMS = st.lists(st.tuples(st.sampled_from(["X-Sw-Date", "X-Sw-Proxy", "pw_user", "k"]) | _TEXT, _TEXT), max_size=6)


def _old_canonical_query(params, encode) -> str:
    return "&".join(sorted([f"{encode(k)}={encode(v)}" for k, v in params if k != "X-Sw-Signature"]))


def _old_signature(secret: str, date_text: str, canonical: bytes) -> str:
    day = date_text[:8]
    to_sign = f"SW1-HMAC-SHA256\n{date_text}\n{day}\n{hashlib.sha256(canonical).hexdigest()}"
    return hmac.digest(signing_key(secret, day), to_sign.encode(), "sha256").hex()


@given(_PARAMS | _PARAMS.map(lambda p: [*p, ("X-Sw-Signature", "0" * 64)]))
@settings(max_examples=300, deadline=None)
def test_canonical_query_is_the_pairwise_format(params) -> None:
    for encode in QUERY_ENCODINGS:
        assert canonical_query(params, encode) == _old_canonical_query(params, encode)
    assert canonical_query(params, str.upper) == _old_canonical_query(params, str.upper)  # any other encoding


@given(st.text(max_size=20), st.sampled_from(["20261120T120000Z", "00010101T000000Z"]), st.binary(max_size=300))
@settings(max_examples=200, deadline=None)
def test_signature_is_the_one_shot_hmac(secret: str, date_text: str, canonical: bytes) -> None:
    assert signature(secret, date_text, canonical) == _old_signature(secret, date_text, canonical)
    assert signature(secret, date_text, canonical) == _old_signature(secret, date_text, canonical)  # keyed, cached


@st.composite
def _verification(draw: st.DrawFn):
    """A signed request, the paths and secrets it is checked with, and a signature made from one of
    the spellings a signer may use (or from none)."""
    proxy_text = draw(st.sampled_from([CHAT, "HTTPS://api.openai.com:443/v1/a b", "https://h/x?q=a+b"]))
    params = [("X-Sw-Date", "20261120T120000Z"), ("X-Sw-Proxy", proxy_text)] + draw(_PARAMS)
    headers = draw(st.sampled_from([{}, {"content-type": "application/json"}]))
    body = draw(st.sampled_from([None, b"{}", "é".encode()]))
    req = parse_signed_request(
        "&".join(f"{quote_plus(k)}={quote_plus(v)}" for k, v in params if not k.startswith("X-Sw-"))
        + f"&{_Q}&X-Sw-Expires=300&X-Sw-Proxy={quote_plus(proxy_text)}"
        + f"&X-Sw-SignedHeaders={quote_plus(';'.join([*headers, *(['content-length'] if body else [])]))}"
        + f"&X-Sw-Body={'true' if body is not None else 'false'}&X-Sw-Signature={'0' * 64}"
    )
    paths = draw(st.lists(st.sampled_from(["/", "/ai/", "/x"]), min_size=1, max_size=3))
    secrets = draw(st.lists(st.sampled_from([SECRET, OLD_SECRET, "other"]), min_size=1, max_size=2))
    method = draw(st.sampled_from(["GET", "POST"]))
    header_lists = signed_header_values(req, headers, body)
    proxies = dict.fromkeys([req.proxy_text, req.proxy_url])
    spellings = [
        canonical_request(
            method, path, _old_canonical_query([(k, p if k == "X-Sw-Proxy" else v) for k, v in req.params], enc), h,
            body or b"",
        )
        for path in paths for p in proxies for enc in QUERY_ENCODINGS for h in header_lists
    ]  # fmt: skip
    signed = draw(st.sampled_from(spellings + [b"not one of them"]))
    sig = _old_signature(draw(st.sampled_from([SECRET, OLD_SECRET, "other", "nobody"])), req.date_text, signed)
    return req._replace(signature=sig), method, paths, secrets, headers, body, spellings


@given(_verification())
@settings(max_examples=300, deadline=None)
def test_verify_signature_accepts_what_the_loop_over_every_candidate_accepted(case) -> None:
    req, method, paths, secrets, headers, body, spellings = case
    expected = any(
        hmac.compare_digest(_old_signature(s, req.date_text, c), req.signature) for c in spellings for s in secrets
    )
    try:
        verify_signature(req, method=method, secrets=secrets, paths=paths, headers=headers, body=body)
    except Forbidden as exc:
        assert exc.code == "signature_mismatch"
        assert not expected
    else:
        assert expected
