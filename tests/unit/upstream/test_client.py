"""proxy.upstream.client's pure decisions (the exchanges themselves: tests/e2e/test_upstream_*.py)."""

from __future__ import annotations

import pytest

from proxy.upstream.client import may_retry


@pytest.mark.parametrize(
    ("method", "written", "streamed", "retry"),
    [
        ("POST", False, False, True),  # dead before use: nothing reached the upstream
        ("POST", False, True, True),  # the held first chunk and the unread rest go again
        ("POST", True, False, False),  # RFC 9110 §9.2.2: never a second POST
        ("PATCH", True, False, False),
        ("GET", True, False, True),
        ("HEAD", True, False, True),
        ("OPTIONS", True, False, True),
        ("DELETE", True, False, True),
        ("TRACE", True, False, True),
        ("PUT", True, False, True),  # idempotent, its body held whole
        ("PUT", True, True, False),  # idempotent, but a streamed body cannot be replayed
    ],
)
def test_may_retry(method, written, streamed, retry):
    assert may_retry(method, written=written, streamed=streamed) is retry
