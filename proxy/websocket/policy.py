"""WebSocket decisions, without I/O: which requests are handshakes, what goes upstream, how sessions end.

The shell (:mod:`proxy.websocket.session`) runs the sockets; everything it has to decide is here as
pure functions over plain values, tested table by table:

* whether a request is a WebSocket handshake, and whether it is one wsproto will accept;
* the upstream URL in WebSocket form (a signer may write ``https://`` for ``wss://``);
* the upstream handshake headers (the credential's injected ones, no browser cookies) and
  the client's subprotocols minus those that carry a key (``openai-insecure-api-key.*``);
* the Origin check against ``[cors] allow_origins``;
* how the end of one side becomes the close sent to the other (codes pass through both
  ways; an upstream that vanishes becomes 1011 for the client);
* usage read on the side from realtime ``response.done`` events.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from .. import forwarding
from ..errors import BadRequest, Forbidden
from ..relay.usage import Usage

Headers = list[tuple[bytes, bytes]]

MIB = 1 << 20


@dataclass(frozen=True, slots=True)
class WebSocketConfig:
    """The ``[websocket]`` table: limits and timeouts of proxied sessions (seconds, bytes)."""

    # Largest message either side may send, reassembled from its fragments. Realtime audio
    # frames are large; trio-websocket's own default (1 MiB) cuts real sessions.
    max_message_size: int = 16 * MIB
    # Frames one message may arrive in. Each frame costs parsing time whatever its size (an
    # empty continuation frame carries nothing), so their number is bounded too; past it: 1009.
    max_message_frames: int = 1024
    # Whole messages buffered per direction before the reader stops reading that side (back
    # pressure): memory per direction is at most (queue + 2) x max_message_size.
    message_queue_size: int = 4
    # No message either way for this long ends the session (0 = none); below the shipped nginx
    # snippet's proxy_read_timeout (300 s), so Parkway closes first and says why.
    idle_timeout: float = 240.0
    max_session_duration: float = 3600.0  # 0 = none
    handshake_timeout: float = 10.0  # upstream DNS, TCP, TLS and WebSocket handshake together
    close_timeout: float = 5.0  # how long to wait for a peer to answer our close frame


# --- which requests are handshakes ------------------------------------------------------------


def _tokens(value: str | None) -> set[str]:
    return {t.strip().lower() for t in (value or "").split(",") if t.strip()}


def is_websocket_request(method: str, headers: Mapping[str, str]) -> bool:
    """A ``GET`` asking to upgrade to ``websocket``; ``headers`` maps lower-case names to values."""
    upgrade = headers.get("upgrade")
    return upgrade is not None and method == "GET" and "websocket" in _tokens(upgrade)


def check_handshake(http_version: str, headers: Mapping[str, str]) -> None:
    """Refuse (400) a handshake that wsproto would refuse, saying which header is wrong.

    Checked before anything is forwarded, so a bad handshake is an ordinary HTTP refusal
    and never a half-open upgrade (RFC 6455 4.2.1).
    """

    def bad(message: str) -> BadRequest:
        return BadRequest(f"invalid WebSocket handshake: {message}", code="bad_websocket_handshake")

    if http_version != "1.1":
        raise bad(f"needs HTTP/1.1, got HTTP/{http_version}")
    if headers.get("upgrade", "").strip().lower() != "websocket":
        raise bad("Upgrade must be exactly 'websocket'")
    if "upgrade" not in _tokens(headers.get("connection")):
        raise bad("Connection must include 'upgrade'")
    if headers.get("sec-websocket-version", "").strip() != "13":
        raise bad("Sec-WebSocket-Version must be 13")
    if not headers.get("sec-websocket-key", "").strip():
        raise bad("Sec-WebSocket-Key is missing")
    if "transfer-encoding" in headers or headers.get("content-length", "0").strip() != "0":
        raise bad("a handshake has no body")
    parse_subprotocols(headers.get("sec-websocket-protocol"))


def handshake_request(target: str, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The request head as bytes again, for a WebSocket server that parses the handshake itself.

    The head was already parsed and validated by h11, so joining its parts is exact enough
    for wsproto (which does the same in ``initiate_upgrade_connection``).
    """
    lines = [b"GET " + target.encode("latin-1") + b" HTTP/1.1"]
    lines.extend(name + b": " + value for name, value in headers)
    return b"\r\n".join(lines) + b"\r\n\r\n"


# --- the upstream -------------------------------------------------------------------------------

_WS_SCHEMES = {"ws": "ws", "wss": "wss", "http": "ws", "https": "wss"}
_HTTP_SCHEMES = {"ws": "http", "wss": "https", "http": "http", "https": "https"}


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """Where a session connects: from a normalised signed URL, in WebSocket terms."""

    url: str  # ws:// or wss://, without fragment (for logs)
    tls: bool
    host: str  # name or address to resolve (IPv6 without brackets)
    port: int
    host_header: str  # what the Host header says: host[:port]
    resource: str  # path and query


def upstream_target(proxy_url: str) -> UpstreamTarget:
    """The WebSocket target of a normalised ``X-Sw-Proxy``: ``https://`` means ``wss://``,
    ``http://`` means ``ws://`` (SDKs sign the URL they are given). User info is not sent."""
    parts = urlsplit(proxy_url.split("#", 1)[0])
    scheme = _WS_SCHEMES.get(parts.scheme)
    if scheme is None or not parts.hostname:
        raise BadRequest(f"X-Sw-Proxy {proxy_url!r} is not a WebSocket URL", code="malformed_signed_url")
    tls = scheme == "wss"
    port = parts.port or (443 if tls else 80)
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if port == (443 if tls else 80) else f"{shown}:{port}"
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return UpstreamTarget(f"{scheme}://{host_header}{resource}", tls, host, port, host_header, resource)


def http_form(url: str) -> str:
    """``wss://h/p`` as ``https://h/p`` (and ``ws`` as ``http``): how ``allowed_upstreams``
    prefixes are written, so one prefix covers a host's HTTP and WebSocket endpoints."""
    scheme, sep, rest = url.partition("://")
    return _HTTP_SCHEMES.get(scheme.lower(), scheme) + sep + rest if sep else url


def is_websocket_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in ("ws", "wss")


# Per-hop WebSocket headers are the upstream client's own; Origin is the browser's page,
# which Parkway has checked: the upstream talks to Parkway, not to the page.
_NOT_FORWARDED = frozenset({b"origin", b"content-length"})


def upstream_headers(
    client: Iterable[tuple[bytes, bytes]], injected: Iterable[tuple[str, str]], ctx: forwarding.ForwardContext
) -> Headers:
    """Extra headers of the upstream handshake: as for HTTP (credential headers injected,
    hop-by-hop and cookies dropped, X-Forwarded-* set), minus ``Sec-WebSocket-*`` and Origin."""
    out = forwarding.request_headers(client, injected, ctx)
    return [(n, v) for n, v in out if n not in _NOT_FORWARDED and not n.startswith(b"sec-websocket-")]


# --- subprotocols ---------------------------------------------------------------------------------

# Subprotocols that carry a credential: OpenAI's browser example puts the API key in one.
KEY_SUBPROTOCOL_PREFIXES = ("openai-insecure-api-key.",)
# RFC 9110 5.6.2: token = 1*tchar.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def parse_subprotocols(value: str | None) -> tuple[str, ...]:
    """``Sec-WebSocket-Protocol`` (repeats joined with ``,``) as a tuple, in the client's order.

    The header is ``1#token`` (RFC 6455 11.3.4, RFC 9110 5.6.1): elements separated by commas
    with optional spaces or tabs around them, empty elements ignored. Anything else (a space or
    ``;`` inside an element, a quoted string) is refused with 400 rather than guessed at: a
    lenient split could read ``realtime openai-insecure-api-key.sk-…`` as one harmless-looking
    element and forward the key inside it.
    """
    protocols: list[str] = []
    for element in (value or "").split(","):
        element = element.strip(" \t")
        if not element:
            continue
        if not _TOKEN.fullmatch(element):
            # Never the element itself: it may hold a key.
            raise BadRequest(
                "invalid WebSocket handshake: Sec-WebSocket-Protocol must be a comma-separated list of tokens"
                f" (element {len(protocols) + 1} is not a token)",
                code="bad_websocket_handshake",
            )
        protocols.append(element)
    return tuple(protocols)


def split_subprotocols(proposed: Iterable[str]) -> tuple[tuple[str, ...], int]:
    """(subprotocols to offer upstream, how many were dropped for carrying a key).

    Only the count comes back: the dropped values are keys and must not reach a log.
    """
    kept, dropped = [], 0
    for protocol in proposed:
        if protocol.lower().startswith(KEY_SUBPROTOCOL_PREFIXES):
            dropped += 1
        else:
            kept.append(protocol)
    return tuple(kept), dropped


# --- origin -------------------------------------------------------------------------------------------


def check_origin(allow_origins: tuple[str, ...], origin: str | None) -> None:
    """Browsers send Origin on every WebSocket handshake and apply no CORS to the answer, so
    Parkway checks it itself. A request without Origin is not from a browser page."""
    if origin is None or "*" in allow_origins or origin in allow_origins:
        return
    raise Forbidden(f"origin {origin!r} is not in [cors] allow_origins", code="origin_not_allowed")


# --- how a session ends -----------------------------------------------------------------------------

CLIENT = "client"
UPSTREAM = "upstream"

NORMAL = 1000
GOING_AWAY = 1001
NO_STATUS = 1005  # received without a code; never sent
ABNORMAL = 1006  # the TCP connection ended without a close frame; never sent
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011
TLS_FAILURE = 1015  # never sent
# Codes an upstream sends when it failed (internal error, restart, try again later, bad gateway).
UPSTREAM_FAILURE_CODES = frozenset({1011, 1012, 1013, 1014})

# Outcomes of a session (the ``outcome`` of its log line and metrics).
OK = "ok"
CLIENT_GONE = "client_gone"
UPSTREAM_ERROR = "upstream_error"
TOO_BIG = "message_too_big"
IDLE = "idle_timeout"
MAX_DURATION = "max_duration"
CANCELLED = "cancelled"
BUDGET_SPENT = "budget_exhausted"  # the session used up what its budget held for it


@dataclass(frozen=True, slots=True)
class Ending:
    """What ended a session: one side's close (``side`` + its code), or Parkway (``why``)."""

    side: str | None = None  # CLIENT | UPSTREAM when that side ended it
    code: int = ABNORMAL
    reason: str | None = None
    overflow: bool = False  # Parkway closed that side with 1009 for a message over its limits (reason: which)
    why: str | None = None  # IDLE | MAX_DURATION | CANCELLED | BUDGET_SPENT when Parkway ended it


@dataclass(frozen=True, slots=True)
class Closing:
    """The close frames to send (None: that side is closed already) and the session's outcome."""

    to_client: tuple[int, str | None] | None
    to_upstream: tuple[int, str | None] | None
    outcome: str
    closed_by: str  # client | upstream | parkway
    level: str = "info"  # of the session's log line


def sendable(code: int, reason: str | None) -> tuple[int, str | None]:
    """A received close as one that may be sent on: codes that exist only locally become
    1000 (no status) or 1011 (the connection failed), so 4000-range codes pass untouched."""
    if code == NO_STATUS:
        return NORMAL, None
    if code in (ABNORMAL, TLS_FAILURE):
        return INTERNAL_ERROR, reason
    return code, reason


def decide_close(
    ending: Ending, *, idle_timeout: float = 0.0, max_duration: float = 0.0, max_message_size: int = 0
) -> Closing:
    """Turn how a session ended into the closes Parkway sends and the outcome it logs."""
    if ending.why == BUDGET_SPENT:
        # 1008: the client broke a policy (its budget), which retrying at once will not mend.
        return Closing((POLICY_VIOLATION, ending.reason), (NORMAL, ending.reason), BUDGET_SPENT, "parkway")
    if ending.why is not None:
        reason = {
            IDLE: f"no message for {idle_timeout:g} s",
            MAX_DURATION: f"session reached its maximum of {max_duration:g} s",
            CANCELLED: "server shutting down",
        }[ending.why]
        level = "warning" if ending.why == CANCELLED else "info"
        return Closing((GOING_AWAY, reason), (GOING_AWAY, reason), ending.why, "parkway", level)
    if ending.side == CLIENT:
        if ending.overflow:
            why = f"client sent a {ending.reason or f'message above {max_message_size} bytes'}"
            return Closing(None, (GOING_AWAY, why), TOO_BIG, "parkway", "warning")
        if ending.code == ABNORMAL:
            return Closing(None, (GOING_AWAY, "client went away"), CLIENT_GONE, CLIENT, "info")
        return Closing(None, sendable(ending.code, ending.reason), OK, CLIENT)
    if ending.overflow:
        # Parkway's own limit: said in Parkway's words. An upstream's own 1009 (its limit, for a
        # message the client sent) is not an overflow and passes through below, code and reason.
        why = f"upstream sent a {ending.reason or f'message above {max_message_size} bytes'}"
        return Closing((MESSAGE_TOO_BIG, why), None, TOO_BIG, "parkway", "warning")
    if ending.code in (ABNORMAL, TLS_FAILURE):
        # Never a success: the client must learn that the session broke, not that it ended.
        return Closing((INTERNAL_ERROR, "upstream connection lost"), None, UPSTREAM_ERROR, UPSTREAM, "error")
    outcome = UPSTREAM_ERROR if ending.code in UPSTREAM_FAILURE_CODES else OK
    return Closing(
        sendable(ending.code, ending.reason), None, outcome, UPSTREAM, "error" if outcome == UPSTREAM_ERROR else "info"
    )


def message_size(message: str | bytes) -> int:
    """Bytes on the wire of a message's payload: UTF-8 for text (``isascii`` is O(1) in CPython)."""
    if isinstance(message, bytes) or message.isascii():
        return len(message)
    return len(message.encode("utf-8"))


class MessageBudget:
    """The bounds of one message as its frames arrive: payload bytes (UTF-8 for text) and frames.

    Fed each frame's payload size before it is buffered, so nothing past the bound is ever
    held: :meth:`add` returns why the message is refused (the close reason), or None. An
    empty frame adds no bytes but counts as a frame. ``peak`` is the most bytes one message
    held at once (a structural check of the memory bound).
    """

    __slots__ = ("bytes", "frames", "max_bytes", "max_frames", "peak")

    def __init__(self, max_bytes: int, max_frames: int):
        self.max_bytes, self.max_frames = max_bytes, max_frames
        self.bytes = self.frames = self.peak = 0

    def add(self, size: int, *, frame_finished: bool = True) -> str | None:
        if self.bytes + size > self.max_bytes:
            return f"message above {self.max_bytes} bytes"
        if frame_finished and self.frames >= self.max_frames:
            return f"message in more than {self.max_frames} frames"
        self.bytes += size
        self.frames += frame_finished
        self.peak = max(self.peak, self.bytes)
        return None

    def reset(self) -> None:
        """The message was passed on whole (or refused): the next one starts empty."""
        self.bytes = self.frames = 0


# --- usage from realtime events ----------------------------------------------------------------------

# Realtime events put "type" first (after an optional "event_id"): looking only at the head
# keeps a large audio delta from being scanned or parsed at all.
_TYPE_WINDOW = 256
_RESPONSE_DONE = '"response.done"'
_RESPONSE_CREATED = '"response.created"'


class RealtimeUsage:
    """Feed the text messages an upstream sent; sums ``usage`` of every ``response.done``.

    Only a message whose head names ``response.done`` is parsed, once per model response;
    ``open`` counts responses created and not done (one cut short is billed, but never reported).
    """

    __slots__ = ("input_tokens", "open", "output_tokens", "responses", "total_tokens")

    def __init__(self) -> None:
        self.input_tokens = self.output_tokens = self.total_tokens = self.responses = self.open = 0

    def feed(self, message: str) -> None:
        if message.find(_RESPONSE_DONE, 0, _TYPE_WINDOW) < 0:
            if message.find(_RESPONSE_CREATED, 0, _TYPE_WINDOW) >= 0:
                self.open += 1
            return
        self.open = max(0, self.open - 1)
        try:
            event = json.loads(message)
        except ValueError:
            return
        if not isinstance(event, dict) or event.get("type") != "response.done":
            return
        response = event.get("response")
        usage = response.get("usage") if isinstance(response, dict) else None
        if not isinstance(usage, dict):
            return
        prompt, completion = usage.get("input_tokens"), usage.get("output_tokens")
        if not isinstance(prompt, int) or not isinstance(completion, int):
            return
        total = usage.get("total_tokens")
        self.input_tokens += prompt
        self.output_tokens += completion
        self.total_tokens += total if isinstance(total, int) else prompt + completion
        self.responses += 1

    @property
    def usage(self) -> Usage | None:
        if not self.responses:
            return None
        return Usage(self.input_tokens, self.output_tokens, self.total_tokens)
