"""proxy.http.h11_impl's helpers, against h11 itself."""

from __future__ import annotations

import h11
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.http.h11_impl import header_pairs

NAMES = st.text(alphabet="abcXYZ-_0", min_size=1, max_size=8).map(str.encode)
VALUES = st.text(alphabet="abc XYZ,;=/", max_size=12).map(lambda v: v.strip().encode())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(NAMES, VALUES), max_size=8))
def test_header_pairs_are_h11s_own_iteration(headers: list[tuple[bytes, bytes]]) -> None:
    event = h11.Request(method="GET", target="/", headers=[(b"Host", b"a"), *headers])
    assert header_pairs(event.headers) == list(event.headers)
    response = h11.Response(status_code=200, headers=headers)
    assert header_pairs(response.headers) == list(response.headers)


def test_header_pairs_of_a_plain_sequence_are_its_items() -> None:
    # Were h11 to keep its headers otherwise, its public iteration is used.
    assert header_pairs(((b"a", b"1"), (b"b", b"2"))) == [(b"a", b"1"), (b"b", b"2")]
