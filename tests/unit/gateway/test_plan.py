"""proxy.gateway.plan: the plan and the request every later step takes (immutable, so a step
cannot swap the config, the connection or what steps 1-6 decided under a later one), and the
pure helpers: the header text the signature check reads, has_body."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy import forwarding, policy
from proxy.config import Config, Credential
from proxy.gateway.plan import Plan, Request, has_body, header_map
from proxy.http.connection import RequestHead


def _plan() -> Plan:
    return Plan(
        request_id="r1",
        upstream_url="http://127.0.0.1:1/v1/x",
        signature="s",
        expires_at=datetime(2026, 1, 1, tzinfo=UTC).timestamp(),
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
    for missing in ("\u20ac", "missing"):
        with pytest.raises(KeyError):
            text[missing]
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


def test_the_gateway_builds_the_plan_in_its_field_order() -> None:
    """Gateway._plan builds Plan positionally (the cheaper call): each argument must name the field
    it fills, by its variable or attribute name, or by a comment on its line."""
    import ast
    import inspect
    import textwrap

    from proxy.gateway.handler import Gateway

    source = textwrap.dedent(inspect.getsource(Gateway._plan))
    lines = source.splitlines()
    calls = [
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Plan"
    ]
    assert len(calls) == 1 and not calls[0].keywords
    args = calls[0].args
    assert len(args) == len(Plan._fields) - 1  # all but budget, which admission sets
    for arg, name in zip(args, Plan._fields, strict=False):
        said = arg.id if isinstance(arg, ast.Name) else arg.attr if isinstance(arg, ast.Attribute) else None
        comment = lines[arg.lineno - 1].partition("#")[2].strip()
        assert name in (said, comment), f"argument {ast.unparse(arg)} is in the place of {name}"
