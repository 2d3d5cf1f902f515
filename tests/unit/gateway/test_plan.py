"""proxy.gateway.plan's pure helpers: the header text the signature check reads, and has_body."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.gateway.plan import has_body, header_map
from proxy.http.connection import RequestHead


def head(*headers: tuple[bytes, bytes]) -> RequestHead:
    return RequestHead("POST", "/", headers, "1.1", "127.0.0.1")


def reference_map(headers: tuple[tuple[bytes, bytes], ...]) -> dict[str, str]:
    """What the gateway's header map was: every value decoded on its own, then joined."""
    out: dict[str, str] = {}
    for name, value in headers:
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            text = value.decode("latin-1")
        key = name.decode("latin-1")
        out[key] = f"{out[key]}, {text}" if key in out else text
    return out


NAMES = st.sampled_from([b"x-a", b"x-b", b"origin", b"content-type"])
VALUES = st.sampled_from([b"", b"plain", b"caf\xc3\xa9", b"caf\xe9", b"\xff", b"a, b", b"\xe2\x82"])


@given(st.lists(st.tuples(NAMES, VALUES), max_size=6))
def test_the_header_map_reads_as_a_dict_of_each_value_decoded(headers) -> None:
    headers = tuple(headers)
    expected = reference_map(headers)
    text = header_map(head(*headers))
    assert dict(text) == expected
    assert len(text) == len(expected)
    for name in ["x-a", "x-b", "origin", "content-type", "missing", "caf\u00e9", "\u20ac"]:
        assert (name in text) == (name in expected)
        assert text.get(name) == expected.get(name)
        assert text.get(name, "-") == expected.get(name, "-")
    with pytest.raises(KeyError):
        text["\u20ac"]
    assert 3 not in text


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ((), False),
        (((b"content-length", b"0"),), False),
        (((b"content-length", b"00"),), True),  # as before: only a bare 0 is no body
        (((b"content-length", b"12"),), True),
        (((b"transfer-encoding", b"chunked"),), True),
    ],
)
def test_has_body(headers, expected) -> None:
    assert has_body(head(*headers)) is expected
