"""proxy.limits.outage: when a Redis that is down is tried again, and when an outage is logged (pure)."""

from __future__ import annotations

import pytest

from proxy.limits.outage import Outage


def test_outage_timeline() -> None:
    outage = Outage(retry_interval=2.0)
    steps = [
        ("claim", 0.0, True),
        ("fail", 0.0, True),  # starts an outage: log it
        ("claim", 1.0, False),  # within the interval: follow the failure policy at once
        ("claim", 2.0, True),  # one probe ...
        ("claim", 2.1, False),  # ... not two
        ("fail", 2.2, False),  # same outage: no second log line
        ("claim", 3.0, False),
        ("claim", 4.2, True),
        ("succeed", 4.3, 4.3),  # the outage lasted 4.3 s
        ("succeed", 5.0, None),
        ("claim", 5.0, True),
    ]
    for action, now, expected in steps:
        if action == "claim":
            assert outage.claim_attempt(now) is expected, (action, now)
        elif action == "fail":
            assert outage.failed(now) is expected, (action, now)
        else:
            assert outage.succeeded(now) == pytest.approx(expected) if expected else outage.succeeded(now) is None
    assert not outage.down
