"""Upstream URL normalisation: one canonical text for every spelling of the same URL.

Signers write the upstream URL in different ways (the Python SDK almost verbatim, Ruby after
``URI()``, Signway after WHATWG parsing). Parkway verifies the text as signed, but always
*forwards* the normalised form, so two spellings that verify can never reach different places,
and prefix checks (``allowed_upstreams``) compare like with like.
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache
from urllib.parse import SplitResult, urlsplit

import idna

from .errors import Forbidden, client_text

DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}

# WHATWG percent-encode sets (URL Standard, 1.3): the path set and the special-query set,
# plus everything outside printable ASCII. Existing %XX escapes are kept as they are.
_PATH_UNSAFE = frozenset(' "#<>?`{}')
_QUERY_UNSAFE = frozenset(" \"#<>'")
_FRAGMENT_UNSAFE = frozenset(' "<>`')
_PCT = re.compile(r"%[0-9A-Fa-f]{2}")
# What most upstream servers take in a request line (nginx's large_client_header_buffers is 8 KB);
# client libraries refuse longer URLs with their own exception, after a request was planned.
MAX_URL_LENGTH = 8192
# WHATWG URL Standard 3.3 "ends in a number": such a host is parsed as an IPv4 address, where
# 0177, 0x7f and 127.1 all mean 127.0.0.1 to a browser, a bare host name to a resolver, and
# an error to some HTTP clients. Parkway accepts only the one spelling everyone reads alike.
_NUMERIC_LABEL = re.compile(r"(?:[0-9]+|0[xX][0-9A-Fa-f]*)\Z")
_DOTTED_QUAD_PART = re.compile(r"(?:0|[1-9][0-9]{0,2})\Z")


class InvalidURL(ValueError):
    """The text is not an absolute http(s) URL Parkway can forward to."""


def _escape(text: str, unsafe: frozenset[str]) -> str:
    out: list[str] = []
    for ch in text:
        if ch in unsafe or ord(ch) <= 0x20 or ord(ch) >= 0x7F:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8"))
        else:
            out.append(ch)
    return "".join(out)


def _is_dot(segment: str, dots: int) -> bool:
    return segment.lower().replace("%2e", ".") == "." * dots


def remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 on whole segments; ``%2e`` counts as a dot, as browsers treat it."""
    segments = path.split("/")
    out: list[str] = []
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if _is_dot(seg, 1):
            if last:
                out.append("")
        elif _is_dot(seg, 2):
            if len(out) > 1:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(seg)
    result = "/".join(out)
    return result if result.startswith("/") else "/" + result


def _host(parts: SplitResult, text: str) -> str:
    try:
        host = parts.hostname
    except ValueError as exc:  # e.g. "[::1" with no closing bracket
        raise InvalidURL(f"invalid host in {client_text(text)}") from exc
    if not host:
        raise InvalidURL(f"no host in {client_text(text)}")
    if ":" in host:  # IPv6 literal; hostname drops the brackets
        return f"[{host}]"
    if "[" in parts.netloc.rpartition("@")[2]:  # "[v1.x]": brackets hold IPv6 addresses only
        raise InvalidURL(f"invalid host in {client_text(text)}: only an IPv6 address may be written in brackets")
    if any(ch.isspace() or ch in '<>"^`{|}%\x7f' or ord(ch) < 0x20 for ch in host):
        raise InvalidURL(f"invalid character in the host of {client_text(text)}")
    if host.isascii():
        host = host.lower()
    else:
        try:  # UTS 46 non-transitional, as WHATWG URL parsers do (faß.de stays distinct from fass.de)
            host = idna.encode(host, uts46=True, transitional=False).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError) as exc:
            raise InvalidURL(f"invalid host name in {client_text(text)}") from exc
    _check_ipv4_spelling(host, text)
    return host


def _check_ipv4_spelling(host: str, text: str) -> None:
    """Refuse a host that WHATWG parsers read as an IPv4 address unless it is plain dotted decimal.

    ``127.0.0.1`` passes; ``0177.0.0.1``, ``127.0.0.01``, ``010.0.0.1``, ``0x7f.0.0.1``, ``127.1``,
    ``2130706433`` and ``127.0.0.1.`` do not (a browser reads some as 127.0.0.1, a resolver as a
    name, an HTTP client as an error): one signed URL must name one address for everyone.
    """
    labels = host.split(".")
    last = labels[-1] if labels[-1] or len(labels) == 1 else labels[-2]
    if not _NUMERIC_LABEL.match(last):
        return
    if len(labels) == 4 and all(_DOTTED_QUAD_PART.match(p) and int(p) <= 255 for p in labels):
        return
    raise InvalidURL(
        f"ambiguous host {client_text(host)} in {client_text(text)}: it ends in a number, so browsers read it as "
        "an IPv4 address; write an address as four decimal numbers without leading zeros (like 127.0.0.1)"
    )


@lru_cache(maxsize=512)  # pure, and the same upstream URLs come back request after request
def normalize_url(text: str, *, schemes: frozenset[str] = frozenset({"http", "https"})) -> str:
    """Return the canonical form of an absolute URL, or raise :class:`InvalidURL`.

    Lower-case scheme and host, default port dropped, empty path becomes ``/``, dot segments
    resolved, unsafe and non-ASCII characters percent-encoded (what Signway's WHATWG parser
    produces, which is what it signs).
    """
    text = text.strip()
    if len(text) > MAX_URL_LENGTH:
        raise InvalidURL(f"URL of {len(text)} characters is longer than {MAX_URL_LENGTH}")
    head, mark, rest = text.partition("?")
    # WHATWG: in http(s) URLs a backslash before the query is a path separator, as browsers
    # and Signway's parser read it; urlsplit would leave it in the host or path.
    text = head.replace("\\", "/") + mark + rest
    try:
        parts = urlsplit(text)
    except ValueError as exc:
        raise InvalidURL(f"cannot parse URL {client_text(text)}") from exc
    scheme = parts.scheme.lower()
    if scheme not in schemes:
        allowed = ", ".join(sorted(schemes))
        raise InvalidURL(f"scheme of {client_text(text)} is not one of {allowed}")
    host = _host(parts, text)
    try:
        port = parts.port
    except ValueError as exc:
        raise InvalidURL(f"invalid port in {client_text(text)}") from exc
    netloc = host if port is None or port == DEFAULT_PORTS.get(scheme) else f"{host}:{port}"
    if parts.username is not None:
        userinfo = _escape(parts.username, frozenset(" @/:"))
        if parts.password is not None:
            userinfo += ":" + _escape(parts.password, frozenset(" @/:"))
        netloc = f"{userinfo}@{netloc}"
    path = remove_dot_segments(_escape(parts.path, _PATH_UNSAFE) or "/")
    url = f"{scheme}://{netloc}{path}"
    if "?" in text.split("#", 1)[0]:
        url += "?" + _escape(parts.query, _QUERY_UNSAFE)
    # The fragment never reaches a server; it is dropped when forwarding, kept for matching.
    if parts.fragment:
        url += "#" + _escape(parts.fragment, _FRAGMENT_UNSAFE)
    return url


@lru_cache(maxsize=512)  # pure, and called with the same normalised upstream URLs request after request
def origin_and_target(url: str) -> tuple[str, str, str]:
    """Split a normalised URL into (scheme, host[:port], request-target without fragment)."""
    parts = urlsplit(url)
    target = parts.path or "/"
    if "?" in url.split("#", 1)[0]:
        target += "?" + parts.query
    return parts.scheme, parts.netloc.rsplit("@", 1)[-1], target


def normalize_prefix(prefix: str) -> str:
    """Normalise an ``allowed_upstreams`` prefix; an origin alone means its whole tree (``/``)."""
    return normalize_url(prefix)


def url_allowed(url: str, prefixes: tuple[str, ...]) -> bool:
    """True when ``url`` (normalised) starts with one of the normalised ``prefixes``.

    An empty tuple allows any URL. Prefixes end at a path boundary as written: the operator
    who writes ``https://api.openai.com/v1`` allows ``/v1beta`` too, and ``/v1/`` does not.
    """
    return not prefixes or url.startswith(prefixes)


def split_host_port(address: str) -> tuple[str, int]:
    """Split ``host:port`` or ``[v6]:port`` into a host (brackets removed) and a port.

    Raises ValueError saying what is wrong; config checks ``listen`` entries with it and the
    server binds them.
    """
    host, colon, port = address.rpartition(":")
    if not colon:
        raise ValueError(f"{address!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    elif ":" in host or "[" in host or "]" in host:
        raise ValueError(f"{address!r}: write an IPv6 address in brackets, as in [::1]:3000")
    if not host:
        raise ValueError(f"{address!r} has an empty host")
    if not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"{address!r}: the port must be a number from 0 to 65535")
    return host, int(port)


# An encoded '.', '/' or '\', and '%25' (an encoded '%', which hides any of them one decoding deeper).
_ENCODED_PATH_CHAR = re.compile(r"%(2e|2f|5c)", re.IGNORECASE)
_ENCODED_PERCENT = re.compile(r"%25", re.IGNORECASE)
_MAX_ENCODING_DEPTH = 3


def path_ambiguity(path: str) -> str | None:
    """Why an upstream could read the normalised ``path`` otherwise than a prefix check did, or None.

    Dot segments are resolved by :func:`normalize_url` before any check, and the resolved URL is
    what is forwarded. What is left is encoding: an upstream (or a proxy in front of it) that
    decodes ``%2F`` turns ``/v1/..%2F..%2Fadmin`` into ``/admin``, one that decodes twice does the
    same with ``%252F``. So an encoded ``/``, ``\\`` or ``.`` is refused at any depth of encoding.
    """
    if "%" not in path:  # nothing encoded (the common path): nothing either pattern could find
        return None
    text = path
    for _ in range(_MAX_ENCODING_DEPTH + 1):
        found = _ENCODED_PATH_CHAR.search(text)
        if found is not None:
            char = {"2e": ".", "2f": "/", "5c": "\\"}[found.group(1).lower()]
            depth = "" if text == path else " (encoded more than once)"
            return f"the path has an encoded {char!r}{depth}"
        if not _ENCODED_PERCENT.search(text):
            return None
        text = _ENCODED_PERCENT.sub("%", text)
    return f"the path is percent-encoded more than {_MAX_ENCODING_DEPTH} times over"


def check_unambiguous_path(url: str) -> None:
    """Refuse (403 ``ambiguous_path``) a normalised URL whose path an upstream could read two ways;
    called when the path is checked against a prefix (``allowed_upstreams``, ``allowed_paths``)."""
    if "%" not in url:  # nothing encoded anywhere in it (the common case): nothing to read two ways
        return
    path = urlsplit(url).path
    reason = path_ambiguity(path)
    if reason is not None:
        raise Forbidden(
            f"upstream path {client_text(path)} is refused: {reason}, which an upstream may decode into "
            "another path than the one allowed",
            code="ambiguous_path",
        )
