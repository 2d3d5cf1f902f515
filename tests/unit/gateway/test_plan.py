"""The plan and the request every later step takes: immutable, so a step cannot swap the
config, the connection or what steps 1-6 decided under a later one."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from proxy import forwarding, policy
from proxy.config import Config, Credential
from proxy.gateway.plan import Plan, Request


def _plan() -> Plan:
    return Plan(
        request_id="r1",
        upstream_url="http://127.0.0.1:1/v1/x",
        signature="s",
        expires_at=datetime(2026, 1, 1, tzinfo=UTC),
        credential=Credential(id="app", secrets=("k",)),
        ctx=forwarding.ForwardContext(client_ip="127.0.0.1", prefix=""),
        origin=None,
        body=None,
        declared_length=None,
        body_follows=False,
        rules=policy.RequestPolicy(),
        user=None,
        single_use=False,
    )


def test_a_step_cannot_swap_what_a_later_step_reads() -> None:
    plan = _plan()
    req = Request(head=None, conn=None, config=Config(), record=None, plan=plan)  # type: ignore[arg-type]
    for obj, name, value in ((req, "config", Config()), (req, "plan", plan), (plan, "credential", None)):
        with pytest.raises(AttributeError):
            setattr(obj, name, value)
    changed = plan._replace(body=b"{}", declared_length=2)  # a changed plan is a new one
    assert (changed.body, changed.declared_length, plan.body) == (b"{}", 2, None)
    assert (plan.websocket, plan.background, plan.prefix, plan.cache, plan.budget) == (False, None, "", None, None)
