"""proxy.urls: one canonical text per upstream URL (WHATWG-like), prefix checks, request targets.

Expected values are written by hand from the URL Standard (what ``new URL(x).href`` and
Signway's Rust ``url`` crate give), not computed, so a change in behaviour shows up here.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import Forbidden
from proxy.urls import (
    InvalidURL,
    check_unambiguous_path,
    normalize_prefix,
    normalize_url,
    origin_and_target,
    path_ambiguity,
    split_host_port,
    url_allowed,
)

NORMALIZE = {
    # scheme and host case, default ports
    "lower-case scheme and host": ("HTTPS://API.Example.COM/V1/Chat", "https://api.example.com/V1/Chat"),
    "https default port, no path": ("HTTPS://X:443", "https://x/"),
    "https default port": ("https://x:443/a", "https://x/a"),
    "http default port": ("http://x:80/a", "http://x/a"),
    "443 is not http's default": ("http://x:443/a", "http://x:443/a"),
    "80 is not https's default": ("https://x:80/a", "https://x:80/a"),
    "non-default port kept": ("https://x:8443/a", "https://x:8443/a"),
    "empty port": ("https://x:/a", "https://x/a"),
    "ip address and port": ("http://127.0.0.1:8080", "http://127.0.0.1:8080/"),
    # paths
    "empty path": ("https://api.example.com", "https://api.example.com/"),
    "empty path before query": ("https://x?q=1", "https://x/?q=1"),
    "already canonical": ("https://x/v1/chat/completions", "https://x/v1/chat/completions"),
    "dot-dot": ("https://x/a/b/../c", "https://x/a/c"),
    "single dots": ("https://x/a/./b/.", "https://x/a/b/"),
    "trailing dot-dot": ("https://x/a/b/..", "https://x/a/"),
    "%2e%2e": ("https://x/a/%2e%2e/b", "https://x/b"),
    "%2E": ("https://x/a/%2E/b", "https://x/a/b"),
    ".%2e": ("https://x/a/.%2e/b", "https://x/b"),
    "never above root": ("https://x/../../etc/passwd", "https://x/etc/passwd"),
    "dot-dot at root": ("https://x/..", "https://x/"),
    "dots inside names are not segments": ("https://x/a..b/.../c.", "https://x/a..b/.../c."),
    "dots in the query untouched": ("https://x/a/..?q=../x", "https://x/?q=../x"),
    "backslash is a separator": ("https://x/a\\b", "https://x/a/b"),
    "backslash dot-dot": ("https://x/v1/..\\admin", "https://x/admin"),
    # percent-encoding: path set, special-query set, fragment set
    "space quote <> in path": ('https://x/a b"<>', "https://x/a%20b%22%3C%3E"),
    "` { } in path": ("https://x/`{}", "https://x/%60%7B%7D"),
    "' kept in path": ("https://x/it's", "https://x/it's"),
    "space quote <> ' in query": ("https://x/?q=a b\"<>'", "https://x/?q=a%20b%22%3C%3E%27"),
    "` { } kept in query": ("https://x/?q=`{}", "https://x/?q=`{}"),
    "control character": ("https://x/a\x01b", "https://x/a%01b"),
    "non-ascii as utf-8": ("https://x/café?q=ü", "https://x/caf%C3%A9?q=%C3%BC"),
    "cjk path": ("https://x/日本", "https://x/%E6%97%A5%E6%9C%AC"),
    "existing escapes kept": ("https://x/a%20b%2F?q=%2f%zz", "https://x/a%20b%2F?q=%2f%zz"),
    "empty query kept": ("https://x/a?", "https://x/a?"),
    "empty query before fragment": ("https://x/a?#f", "https://x/a?#f"),
    "fragment escaped": ("https://x/a#f g", "https://x/a#f%20g"),
    "? inside fragment is no query": ("https://x/a#?q", "https://x/a#?q"),
    # hosts
    "idn to punycode": ("https://bücher.example/", "https://xn--bcher-kva.example/"),
    "upper-case idn": ("https://BÜCHER.example/", "https://xn--bcher-kva.example/"),
    "idn: sharp s is not ss (UTS 46 non-transitional)": ("https://faß.de/", "https://xn--fa-hia.de/"),
    "ipv6": ("http://[::1]:8080/x", "http://[::1]:8080/x"),
    "ipv6 lower-cased": ("https://[2001:DB8::1]/", "https://[2001:db8::1]/"),
    "ipv6 default port": ("https://[::1]:443/", "https://[::1]/"),
    "userinfo kept": ("https://u:p@x/", "https://u:p@x/"),
    "backslash ends the host": ("https://evil.com\\@api.openai.com/", "https://evil.com/@api.openai.com/"),
    # whitespace
    "surrounding spaces": ("  https://x/a  ", "https://x/a"),
    "tab and newline removed": ("https://x/a\tb\n", "https://x/ab"),
}


@pytest.mark.parametrize("text, expected", NORMALIZE.values(), ids=NORMALIZE.keys())
def test_normalize_url(text, expected):
    assert normalize_url(text) == expected


@pytest.mark.parametrize("text, expected", NORMALIZE.values(), ids=NORMALIZE.keys())
def test_normalize_url_is_idempotent(text, expected):
    # Parkway verifies both the signed text and its normal form; that is only safe if the
    # normal form of a normal form is itself (otherwise one signature could reach two URLs).
    once = normalize_url(text)
    assert normalize_url(once) == once


INVALID = {
    "ftp": "ftp://files.example.com/x",
    "file": "file:///etc/passwd",
    "javascript": "javascript:alert(1)",
    "no scheme": "//example.com/x",
    "no host": "https:///v1/chat",
    "nothing after scheme": "https://",
    "port only": "https://:443/",
    "userinfo only": "https://u@/",
    "port out of range": "https://x:99999/",
    "negative port": "https://x:-1/",
    "port not a number": "https://x:port/",
    "unclosed ipv6": "https://[::1/",
    "stray bracket": "https://x]/",
    "empty": "",
    "garbage": "not a url",
    "space in host": "https://exa mple.com/",
    "control character in host": "https://a\x01b.example/",
}


@pytest.mark.parametrize("text", INVALID.values(), ids=INVALID.keys())
def test_normalize_url_refuses(text):
    with pytest.raises(InvalidURL):
        normalize_url(text)


def test_invalid_url_names_the_url():
    with pytest.raises(InvalidURL, match="ftp://files.example.com/x"):
        normalize_url("ftp://files.example.com/x")


def test_normalize_url_other_schemes_on_request():
    assert normalize_url("WSS://X:443/ws", schemes=frozenset({"ws", "wss"})) == "wss://x/ws"
    with pytest.raises(InvalidURL):
        normalize_url("https://x/", schemes=frozenset({"ws", "wss"}))


OPENAI = ("https://api.openai.com/",)
V1 = ("https://api.openai.com/v1/",)
ALLOWED = {
    "no prefixes allow all": ("https://anything.example/x", (), True),
    "same origin": ("https://api.openai.com/v1/chat", OPENAI, True),
    "origin without slash means its tree": ("https://api.openai.com/v1/chat", ("https://api.openai.com",), True),
    "host suffix attack": ("https://api.openai.com.evil.com/v1", OPENAI, False),
    "host suffix attack, prefix without slash": (
        "https://api.openai.com.evil.com/v1",
        ("https://api.openai.com",),
        False,
    ),
    "userinfo attack": ("https://api.openai.com@evil.com/", OPENAI, False),
    "userinfo attack, prefix without slash": ("https://api.openai.com@evil.com/", ("https://api.openai.com",), False),
    "backslash userinfo attack": ("https://evil.com\\@api.openai.com/", OPENAI, False),
    "other port": ("https://api.openai.com:8443/v1", OPENAI, False),
    "other scheme": ("http://api.openai.com/v1", OPENAI, False),
    "url spelled differently": ("HTTPS://API.OPENAI.COM:443/v1/x", V1, True),
    "prefix spelled differently": ("https://api.openai.com/v1/x", ("HTTPS://API.OpenAI.com:443/v1/",), True),
    "path prefix": ("https://api.openai.com/v1/chat/completions", V1, True),
    "outside the path prefix": ("https://api.openai.com/v2/models", V1, False),
    "prefix directory itself without slash": ("https://api.openai.com/v1", V1, False),
    "dot-dot escape": ("https://api.openai.com/v1/../admin", V1, False),
    "%2e%2e escape": ("https://api.openai.com/v1/%2e%2e/admin", V1, False),
    "backslash escape": ("https://api.openai.com/v1/..\\admin", V1, False),
    "/v1/ does not allow /v1beta": ("https://api.openai.com/v1beta/models", V1, False),
    "/v1 allows /v1beta, as documented": ("https://api.openai.com/v1beta/models", ("https://api.openai.com/v1",), True),
    "second prefix matches": ("https://api.anthropic.com/v1/messages", V1 + ("https://api.anthropic.com/",), True),
    "no prefix matches": ("https://api.mistral.ai/v1/chat", V1 + ("https://api.anthropic.com/",), False),
}


@pytest.mark.parametrize("url, prefixes, expected", ALLOWED.values(), ids=ALLOWED.keys())
def test_url_allowed(url, prefixes, expected):
    # As the proxy uses it: both sides normalised first.
    assert url_allowed(normalize_url(url), tuple(normalize_prefix(p) for p in prefixes)) is expected


@pytest.mark.parametrize(
    "prefix, expected",
    [
        ("https://api.openai.com", "https://api.openai.com/"),
        ("HTTPS://API.OpenAI.com:443/v1/", "https://api.openai.com/v1/"),
        ("https://api.openai.com/v1", "https://api.openai.com/v1"),
    ],
)
def test_normalize_prefix(prefix, expected):
    assert normalize_prefix(prefix) == expected


TARGETS = {
    "path, query, fragment dropped": (
        "https://api.example.com/v1/x?a=1&b=2#frag",
        ("https", "api.example.com", "/v1/x?a=1&b=2"),
    ),
    "port kept": ("http://127.0.0.1:8080/", ("http", "127.0.0.1:8080", "/")),
    "ipv6": ("http://[::1]:8080/x", ("http", "[::1]:8080", "/x")),
    "userinfo dropped": ("https://u:p@h.example/x", ("https", "h.example", "/x")),
    "empty query kept": ("https://h/x?", ("https", "h", "/x?")),
    "? in fragment": ("https://h/x#a?b", ("https", "h", "/x")),
    "query then fragment": ("https://h/x?q=a#b", ("https", "h", "/x?q=a")),
    "no path": ("https://h", ("https", "h", "/")),
}


@pytest.mark.parametrize("url, expected", TARGETS.values(), ids=TARGETS.keys())
def test_origin_and_target(url, expected):
    assert origin_and_target(url) == expected


def test_origin_and_target_of_normalised_url():
    url = normalize_url("HTTPS://H.example:443/a/../b c?x y#frag")
    assert origin_and_target(url) == ("https", "h.example", "/b%20c?x%20y")


# --- listen addresses -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "split"),
    [
        ("127.0.0.1:3000", ("127.0.0.1", 3000)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:65535", ("::1", 65535)),
        ("[::]:80", ("::", 80)),
    ],
)
def test_split_host_port(address, split):
    assert split_host_port(address) == split


@pytest.mark.parametrize("address", ["3000", "host:", "host:65536", ":80", "::1:80", "[::1:80", "[x]:80", "h:٣"])
def test_split_host_port_refuses(address):
    with pytest.raises(ValueError):
        split_host_port(address)


# --- the shortcuts give the answers of the code they replaced --------------------------------------

_URLS = st.lists(
    st.sampled_from(["http://h", "https://h:1", "/v1", "/", "%2f", "%25", "%2e", "%41", "?q=%2F", "#%2F", "a"])
)


@given(_URLS.map("".join), st.lists(_URLS.map("".join), max_size=3).map(tuple))
def test_url_allowed_is_any_prefix(url: str, prefixes: tuple[str, ...]) -> None:
    assert url_allowed(url, prefixes) is (not prefixes or any(url.startswith(p) for p in prefixes))


@given(_URLS.map("".join))
def test_an_unambiguous_path_check_skips_only_urls_without_escapes(url: str) -> None:
    """Refused exactly when the path is ambiguous, as when every URL was split first."""
    try:
        reason = path_ambiguity(urlsplit(url).path)
    except ValueError:  # not a URL urlsplit reads: nothing to compare
        return
    try:
        check_unambiguous_path(url)
    except Forbidden as exc:
        assert reason is not None and reason in exc.message
    else:
        assert reason is None
