"""What steps 1-6 of the gateway decide about a request (:class:`Plan`), the one object every
later step takes (:class:`Request`), and the small pure helpers steps 1-6 use: the header map
the signature check wants, the paths a signer may have signed, the credential's request rules
and address policy.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping
from functools import lru_cache
from typing import NamedTuple

from .. import forwarding, policy
from ..cache.policy import CacheRequest
from ..config import Config, Credential
from ..errors import BadRequest, Forbidden
from ..http.connection import HTTPConnection, RequestHead
from ..jobs.background import BackgroundAsk
from ..limits import BudgetTicket
from ..record import RequestRecord
from ..upstream import ssrf
from ..urls import check_unambiguous_path, url_allowed
from ..websocket import policy as ws_policy


class Plan(NamedTuple):
    """Everything decided about a request before admission: what steps 1-6 produced.

    Only what admission and forwarding need: a parked stream keeps its plan as long as it
    lasts, while the parsed signed URL and the header map go once it is made (with the
    target kept once in RequestHead, 3.5 KB less per parked stream).

    Immutable, as a frozen dataclass would be, but built per request for a fifth of the cost
    (0.9 against 4.3 µs: a frozen dataclass sets each of its 18 fields through
    ``object.__setattr__``). A changed plan is a new one (``plan._replace``).
    """

    request_id: str
    upstream_url: str  # the normalised X-Sw-Proxy, without fragment
    signature: str  # for single use
    expires_at: float  # POSIX seconds: the signed URL's date plus its X-Sw-Expires
    credential: Credential
    ctx: forwarding.ForwardContext
    origin: str | None
    body: bytes | None  # a verified signed body, or None when the body streams (or is empty)
    declared_length: int | None
    body_follows: bool  # the head announced a body (has_body): it streams unless ``body`` holds it
    rules: policy.RequestPolicy
    user: str | None
    single_use: bool
    websocket: bool = False  # a WebSocket handshake: step 7 opens a session
    background: BackgroundAsk | None = None  # run as a job (proxy.jobs.background)
    prefix: str = ""  # the public path prefix this client reached Parkway under
    cache: CacheRequest | None = None  # the signer made it cacheable (pw_cache or the credential's ttl)
    budget: BudgetTicket | None = None  # admitted under budgets (gateway.budget): its hold and headers


class Request(NamedTuple):
    """One planned request as admission and step 7 take it: one argument instead of five.

    Immutable (a tuple: cheaper to build than a frozen dataclass, see :class:`Plan`): a step
    cannot swap the connection or the config under a later one. What a step learns goes into
    ``record`` (mutable by design: it becomes the log line and the metrics).
    """

    head: RequestHead
    conn: HTTPConnection
    config: Config  # read once per request: a reload mid-way does not change it
    record: RequestRecord
    plan: Plan


Step = Callable[[Request], Awaitable[None]]
"""Step 7 in any of its forms (forward, store a job, open a WebSocket session), as admission runs it."""


class HeaderText(Mapping[str, str]):
    """A head's headers as the signature check and the policies read them: lower-case name →
    value as text (repeats joined with ``, ``), each value decoded only when asked for. Signers
    sign header values as UTF-8 text; a value that is not UTF-8 is read as Latin-1."""

    __slots__ = ("_head",)

    def __init__(self, head: RequestHead):
        self._head = head

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        # Without an exception for a missing header: most asked for (Upgrade) are not there.
        try:
            key = name.encode("latin-1")
        except UnicodeEncodeError:
            return default
        value = self._head.fields.get(key)
        if value is None:
            return default
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:  # each of the repeated values decoded on its own, as it was signed
            return ", ".join(_text(v) for n, v in self._head.headers if n == key)

    def __contains__(self, name: object) -> bool:
        try:
            return isinstance(name, str) and name.encode("latin-1") in self._head.fields
        except UnicodeEncodeError:
            return False

    def __iter__(self) -> Iterator[str]:
        return (name.decode("latin-1") for name in self._head.fields)

    def __len__(self) -> int:
        return len(self._head.fields)


def _text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def header_map(head: RequestHead) -> Mapping[str, str]:
    """Lower-case name → value (repeats joined), as the signature check wants them."""
    return HeaderText(head)


def canonical_paths(path: str, *prefixes: str) -> tuple[str, ...]:
    """Paths a signer may have signed: as received, ``/`` (Signway's server), and with the
    public prefix put back when a proxy in front (nginx at ``/ai``) stripped it."""
    paths = [path, "/"]
    for prefix in prefixes:
        if prefix and not path.startswith(prefix + "/"):
            paths.append(prefix + path)
    return tuple(paths)


@lru_cache(maxsize=256)
def request_policy(credential: Credential, inspect_bytes: int, overflow: str) -> policy.RequestPolicy:
    """The credential's rules as the policy module takes them (cached: credentials are frozen)."""
    return policy.RequestPolicy(
        allowed_methods=credential.allowed_methods,
        allowed_path_prefixes=credential.allowed_paths,
        max_body_bytes=credential.max_body_bytes,
        allowed_models=credential.allowed_models,
        max_tokens_cap=credential.max_tokens,
        max_n=credential.max_n,
        inspect_bytes=inspect_bytes,
        overflow=overflow,
    )


@lru_cache(maxsize=256)
def address_policy(credential: Credential, allow_private: bool) -> ssrf.AddressPolicy:
    return ssrf.policy_for(
        allow_private=allow_private or credential.allow_private_upstreams,
        allowed_upstreams=credential.allowed_upstreams,
    )


def check_upstream(
    head: RequestHead,
    headers: Mapping[str, str],
    config: Config,
    credential: Credential,
    proxy_url: str,
    origin: str | None,
    named: str,
) -> bool:
    """Step 6a: the credential may reach this upstream (``named``: its host and path, for the
    refusal); True when the request is a WebSocket handshake.

    A WebSocket handshake (valid, from an allowed origin) for a WebSocket URL, and a WebSocket
    URL only with a handshake; allowed_upstreams match it in its http(s) form.
    """
    # (Upgrade first: is_websocket_request asks the header map, which decodes; most requests have none.)
    websocket = b"upgrade" in head.fields and ws_policy.is_websocket_request(head.method, headers)
    if websocket:
        ws_policy.check_handshake(head.http_version, headers)
        ws_policy.check_origin(config.cors.allow_origins, origin)
    elif proxy_url.startswith(("ws:", "wss:")):  # ws_policy.is_websocket_url of a normalised (lower-case) scheme
        raise BadRequest(
            "X-Sw-Proxy is a WebSocket URL: open it with a WebSocket handshake (GET, Upgrade: websocket)",
            code="websocket_required",
        )
    prefixes = credential.allowed_upstreams
    allowed = url_allowed(proxy_url, prefixes)
    if websocket and not allowed:  # an https:// prefix (as the config stores wss://) covers wss://
        allowed = url_allowed(ws_policy.http_form(proxy_url), prefixes)
    if not allowed:
        raise Forbidden(
            f"upstream {named} is not allowed for credential {credential.id!r}",
            code="upstream_not_allowed",
        )
    if prefixes or credential.allowed_paths:
        check_unambiguous_path(proxy_url)  # what was checked is what the upstream reads
    return websocket


def has_body(head: RequestHead) -> bool:
    """A body follows the head: Transfer-Encoding, or a Content-Length other than 0 (two lookups)."""
    fields = head.fields  # a Content-Length is digits by now (h11's check, or framing.content_length)
    return b"transfer-encoding" in fields or fields.get(b"content-length", b"0") != b"0"
