"""What the response cache may do with one request and one answer. Pure: no I/O, no clock.

Only the signer decides that an answer may be cached: the signed ``pw_cache=<ttl>`` parameter,
or the credential's ``[credentials.cache] ttl``. The browser can only narrow that with
``Cache-Control`` (RFC 9111 §5.2.1): ``no-cache`` skips the stored answer (and refreshes it),
``no-store`` neither reads nor writes, ``only-if-cached`` turns a miss into 504.

The key is a SHA-256 over everything that makes two requests the same call on the same account:
the credential (or an operator's shared namespace), method, upstream URL, the exact body bytes,
the credential's injected header values, the request headers that select a representation
(``key_headers``) and, with ``per_user``, the signed end user. Every part is length-prefixed, so
no two different requests can produce the same input to the hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..errors import BadRequest

REPLAY_MODES = ("instant", "paced")
CACHE_BACKENDS = ("memory", "redis")

# Request headers that select what the upstream answers (content negotiation, API versions and
# accounts a client may name itself). Anything else the browser sends (User-Agent, Origin,
# Referer...) would split the cache for no reason.
DEFAULT_KEY_HEADERS = (
    "accept",
    "accept-encoding",
    "accept-language",
    "authorization",
    "content-type",
    "openai-beta",
    "openai-organization",
    "openai-project",
    "anthropic-beta",
    "anthropic-version",
)

Headers = Sequence[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class CacheRules:
    """A credential's ``[credentials.cache]`` table: its default and how its entries are kept."""

    ttl: int = 0  # seconds; 0 = only URLs signed with the cache parameter are cached
    namespace: str = ""  # credentials naming the same namespace share entries
    per_user: bool = False  # the signed end user is part of the key
    replay: str = "instant"  # instant | paced (a hit streams with the original's timing)
    honour_upstream_no_store: bool = True  # upstream Cache-Control no-store / private wins
    max_entry_bytes: int | None = None  # None = [cache] max_entry_bytes

    def __post_init__(self) -> None:
        if self.replay not in REPLAY_MODES:
            raise ValueError(f"replay must be one of {', '.join(REPLAY_MODES)}")


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The ``[cache]`` section: where entries live and the bounds of the cache as a whole."""

    backend: str = "memory"  # memory | redis
    url: str = ""  # Redis URL; "" = the [state] url
    key_prefix: str = "parkway:cache:"
    max_bytes: int = 64 * 1024 * 1024  # memory backend: total size of all entries (LRU beyond)
    max_entry_bytes: int = 4 * 1024 * 1024  # a larger answer is relayed but not stored
    max_ttl: int = 30 * 86400  # a longer signed ttl is cut to this
    max_followers: int = 1000  # identical requests waiting on one upstream call; beyond, they go alone
    follower_lag_bytes: int = 1024 * 1024  # how far a follower of an unstored answer may fall behind
    max_body_bytes: int = 1024 * 1024  # an unsigned request body read to compute the key
    param: str = "pw_cache"  # the signed query parameter holding a ttl in seconds
    key_headers: tuple[str, ...] = DEFAULT_KEY_HEADERS
    timeout: float = 0.25  # seconds for one Redis operation
    retry_interval: float = 1.0  # while Redis is down, try it again at most this often
    # Redis only: collapsing across processes.
    lock_timeout: float = 2.0  # a leader silent this long (its process died) is replaced
    stream_readers: int = 16  # connections blocked reading shared recordings, per process

    def __post_init__(self) -> None:
        if self.backend not in CACHE_BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(CACHE_BACKENDS)}")


class CacheUnavailable(Exception):
    """The entry store cannot be used right now (Redis down): the request goes on uncached.
    Never answered to a client, so not a :class:`~proxy.errors.ParkwayError`."""


class NotShared(Exception):
    """The answer another process is fetching is not one to share: make the call yourself."""


# --- who decides: the signer, narrowed by the browser ------------------------------------------


@dataclass(frozen=True, slots=True)
class Directives:
    """The request's cache directives that Parkway obeys (RFC 9111 §5.2.1)."""

    no_cache: bool = False
    no_store: bool = False
    only_if_cached: bool = False


NO_DIRECTIVES = Directives()


def request_directives(cache_control: str | None, pragma: str | None = None) -> Directives:
    """Parse ``Cache-Control`` (names case-insensitive, arguments ignored); ``Pragma: no-cache``
    counts only without a Cache-Control header (RFC 9111 §5.4)."""
    if cache_control is None:
        if pragma is not None and "no-cache" in _tokens(pragma):
            return Directives(no_cache=True)
        return NO_DIRECTIVES
    names = _tokens(cache_control)
    if not names:
        return NO_DIRECTIVES
    return Directives("no-cache" in names, "no-store" in names, "only-if-cached" in names)


def _tokens(value: str) -> set[str]:
    return {part.split("=", 1)[0].strip().lower() for part in value.split(",") if part.strip()}


def signed_ttl(value: str | None, default: int, max_ttl: int, param: str = "pw_cache") -> int:
    """The ttl a request asks for: the signed parameter if present (``0`` turns a credential's
    default off for this URL), else the credential's default; capped at ``max_ttl``."""
    if value is None:
        ttl = default
    elif value.isascii() and value.isdigit() and len(value) <= 10:
        ttl = int(value)
    else:
        raise BadRequest(
            f"signed parameter {param} must be a number of seconds, e.g. {param}=86400", code="invalid_cache_param"
        )
    return min(ttl, max_ttl)


@dataclass(frozen=True, slots=True)
class CachePlan:
    """What the cache does for one request that the signer made cacheable."""

    ttl: int
    lookup: bool  # serve a stored answer if there is one
    store: bool  # record and store the upstream's answer
    only_if_cached: bool  # a miss is 504 cache_miss instead of an upstream call

    @property
    def bypass(self) -> bool:
        return not (self.lookup or self.store)


def cache_plan(ttl: int, directives: Directives, method: str) -> CachePlan | None:
    """None when the request is not cacheable at all (no ttl, or a method whose answers change
    something: only GET, HEAD and POST calls are cached, POST being how LLM APIs are called)."""
    if ttl <= 0 or method not in ("GET", "HEAD", "POST"):
        return None
    if directives.no_store:
        return CachePlan(ttl, lookup=False, store=False, only_if_cached=directives.only_if_cached)
    return CachePlan(ttl, lookup=not directives.no_cache, store=True, only_if_cached=directives.only_if_cached)


@dataclass(frozen=True, slots=True)
class CacheRequest:
    """The cache's part of a request's plan: its key, what the cache may do, the credential's rules."""

    key: str  # "" when the request bypasses the cache before a key is computed
    plan: CachePlan
    rules: CacheRules
    max_entry_bytes: int
    bypass_reason: str | None = None  # why the cache is skipped although the signer allowed it
    # The client's headers an upstream call for this key may carry: exactly those the key covers.
    keyed_headers: tuple[tuple[bytes, bytes], ...] = ()

    @property
    def bypass(self) -> bool:
        return self.bypass_reason is not None or self.plan.bypass


# --- the key ------------------------------------------------------------------------------------


def keyed_request_headers(forwarded: Headers, names: Iterable[str]) -> list[tuple[bytes, bytes]]:
    """Of the client headers that would reach the upstream (``forwarded``: after hop-by-hop and
    ``Connection``-named ones are removed), those in ``names``: on a request whose answer may be
    stored or shared, these and nothing else of the client's reach the upstream, and the key
    covers each of them. What the key does not cover, the upstream does not see."""
    wanted = {n.lower().encode("latin-1") for n in names}
    return [(name, value) for name, value in forwarded if name.lower() in wanted]


def key_header_values(headers: Headers, names: Iterable[str], injected: Iterable[str] = ()) -> tuple[bytes, ...]:
    """``name: value`` of the request headers in ``names``, sorted by name; repeated fields joined.
    Headers the credential injects replace the client's, so those are left out."""
    wanted = {n.lower().encode("latin-1") for n in names} - {n.lower().encode("latin-1") for n in injected}
    found: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        lower = name.lower()
        if lower in wanted:
            found.setdefault(lower, []).append(value.strip())
    return tuple(name + b": " + b", ".join(values) for name, values in sorted(found.items()))


def cache_scope(credential_id: str, namespace: str) -> str:
    """Entries never cross credentials unless the operator names a shared namespace."""
    return f"ns:{namespace}" if namespace else f"cred:{credential_id}"


def cache_key(
    *,
    scope: str,
    method: str,
    url: str,
    body: bytes,
    injected: Sequence[tuple[str, str]],
    key_headers: Sequence[bytes] = (),
    user: str | None = None,
) -> str:
    """The entry's key: 64 hex digits. Injected values (API keys) go into the hash, never into logs."""
    digest = hashlib.sha256(b"parkway-cache-v1")

    def part(data: bytes) -> None:
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)

    for text in (scope, method.upper(), url):
        part(text.encode("utf-8"))
    part(body)
    part(str(len(injected)).encode())
    for name, value in injected:
        part(name.lower().encode("latin-1"))
        part(value.encode("latin-1"))
    part(str(len(key_headers)).encode())
    for header in key_headers:
        part(header)
    part(b"" if user is None else b"u:" + user.encode("utf-8"))
    return digest.hexdigest()


def short_key(key: str) -> str:
    """The form of a key that may appear in logs."""
    return key[:12]


# --- the answer -----------------------------------------------------------------------------------


# RFC 9111 §1.2.2: a delta-seconds too large to represent is taken as 2^31.
MAX_DELTA_SECONDS = 2**31
MAX_LENGTH = 2**62  # a Content-Length beyond any store's bound; more digits count as this


def delta_seconds(value: bytes | str | None) -> int | None:
    """An upstream's ``Age`` (or ``max-age``-style) number of seconds, bounded: None unless it is
    plain ASCII digits; anything above 2^31 (a 5,000-digit value too) is 2^31. Never raises."""
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    text = text.strip()
    if not text or not (text.isascii() and text.isdigit()):
        return None
    if len(text) > 10:
        return MAX_DELTA_SECONDS
    return min(int(text), MAX_DELTA_SECONDS)


def content_length(value: bytes | str | None) -> int | None:
    """A ``Content-Length`` as the cache reads it: None unless plain ASCII digits; bounded."""
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    text = text.strip()
    if not text or not (text.isascii() and text.isdigit()):
        return None
    return MAX_LENGTH if len(text) > 18 else min(int(text), MAX_LENGTH)


def _header(headers: Headers, name: bytes) -> bytes | None:
    values = [v for n, v in headers if n.lower() == name]
    return b", ".join(values) if values else None


def unstorable_reason(
    status: int,
    headers: Headers,
    rules: CacheRules,
    *,
    max_entry_bytes: int,
    key_headers: Iterable[str],
    close_delimited: bool = False,
) -> str | None:
    """None when an answer with this head may be stored (once its body is complete), else why not.
    ``close_delimited``: neither a length nor chunked framing says where the body ends, so a
    crash mid-body would look like its end; such an answer is never stored."""
    if status != 200:
        return f"status {status}"
    if close_delimited:
        return "answer ends at the connection's close (no length, not chunked)"
    control = _header(headers, b"cache-control")
    if control is not None and rules.honour_upstream_no_store:
        names = _tokens(control.decode("latin-1"))
        for directive in ("no-store", "private"):
            if directive in names:
                return f"upstream Cache-Control: {directive}"
    vary = _header(headers, b"vary")
    if vary is not None:
        keyed = {n.lower() for n in key_headers}
        for name in _tokens(vary.decode("latin-1")):
            if name == "*" or name not in keyed:
                return f"upstream Vary: {name} (not part of the cache key)"
    length = content_length(_header(headers, b"content-length"))
    if length is not None and length > max_entry_bytes:
        return f"{length} bytes is over max_entry_bytes ({max_entry_bytes})"
    return None


def cache_status(
    result: str, *, ttl: float | None = None, stored: bool = False, detail: str | None = None
) -> tuple[bytes, bytes]:
    """The ``Cache-Status`` field (RFC 9211) for one of: ``hit``, ``miss``, ``refresh`` (the
    client's no-cache), ``collapsed`` (waited on an identical request), ``bypass``."""
    if result == "hit":
        parts = ["parkway", "hit"]
        if ttl is not None:
            parts.append(f"ttl={max(0, int(ttl))}")
    elif result == "bypass":
        parts = ["parkway", "fwd=bypass"]
    else:
        fwd = "request" if result == "refresh" else "uri-miss"
        parts = ["parkway", f"fwd={fwd}"]
        if result == "collapsed":
            parts.append("collapsed")
        if stored:
            parts.append("stored")
    if detail:
        parts.append('detail="' + detail.replace("\\", "").replace('"', "") + '"')
    return b"cache-status", "; ".join(parts).encode("latin-1")


def replay_headers(stored: Headers, age: float) -> list[tuple[bytes, bytes]]:
    """A stored answer's headers for a hit: as stored, with ``Age`` (RFC 9111 §5.1) added to any
    age the upstream reported."""
    upstream_age = 0
    out: list[tuple[bytes, bytes]] = []
    for name, value in stored:
        if name == b"age":
            upstream_age = delta_seconds(value) or 0
        else:
            out.append((name, value))
    out.append((b"age", str(min(upstream_age + max(0, int(age)), MAX_DELTA_SECONDS)).encode()))
    return out
