"""proxy.policy: method, path and size rules, and the incremental JSON body inspector.

Every body case runs whole, and split into 1-byte and 7-byte chunks, so chunk boundaries
inside names, values, escapes and nested strings are all exercised.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import BadRequest, BodyTooLarge, Forbidden, Refused
from proxy.policy import (
    BodyInspector,
    RequestPolicy,
    check_content_length,
    check_method,
    check_path,
    check_request,
    path_allowed,
)

# --- method, path, length ------------------------------------------------------------------------


@given(
    st.builds(
        RequestPolicy,
        allowed_methods=st.sampled_from([(), ("POST",), ("GET", "POST")]),
        allowed_path_prefixes=st.sampled_from([(), ("/v1/",), ("/v1/chat", "/x")]),
        max_body_bytes=st.sampled_from([None, 0, 10]),
        allowed_models=st.sampled_from([(), ("m",)]),
        max_n=st.sampled_from([None, 1]),
    ),
    st.sampled_from(["GET", "POST", "post", "PUT"]),
    st.sampled_from(["/", "/v1/chat", "/v1/chat/x", "/v1%2fchat", "/x"]),
    st.sampled_from([None, 0, 10, 11]),
)
def test_check_request_is_each_check_in_turn(policy, method, path, length) -> None:
    """Its shortcut (no rule for the head) refuses exactly what the three checks refuse."""

    def outcome(*checks) -> str | None:
        try:
            for check in checks:
                check()
        except (Forbidden, BodyTooLarge) as exc:
            return exc.message
        return None

    assert outcome(lambda: check_request(policy, method=method, upstream_path=path, content_length=length)) == outcome(
        lambda: check_method(policy, method),
        lambda: check_path(policy, path),
        lambda: check_content_length(policy, length),
    )
    assert policy.inspects_body is (policy.json_rules or policy.max_body_bytes is not None)
    assert policy.json_rules is (
        bool(policy.allowed_models) or policy.max_tokens_cap is not None or policy.max_n is not None
    )


@pytest.mark.parametrize(
    "allowed, method, ok",
    [
        ((), "DELETE", True),
        (("POST",), "POST", True),
        (("POST",), "post", True),
        (("POST",), "GET", False),
        (("GET", "POST"), "PUT", False),
    ],
)
def test_check_method(allowed: tuple[str, ...], method: str, ok: bool) -> None:
    policy = RequestPolicy(allowed_methods=allowed)
    if ok:
        check_method(policy, method)
    else:
        with pytest.raises(Forbidden) as info:
            check_method(policy, method)
        assert info.value.code == "method_not_allowed" and method in info.value.message


PATHS = [
    ((), "/anything", True),
    (("/v1/chat/completions",), "/v1/chat/completions", True),
    (("/v1/chat/completions",), "/v1/chat/completions/", True),
    (("/v1/chat/completions",), "/v1/chat/completions/x", True),
    (("/v1/chat/completions",), "/v1/chat/completionsX", False),  # segment boundary
    (("/v1/chat/completions",), "/v1/chat", False),
    (("/v1/",), "/v1/models", True),
    (("/v1/",), "/v1", True),
    (("/v1/",), "/v2/models", False),
    (("/v1",), "/v1beta/models", False),
    (("/v1/chat", "/v1/embeddings"), "/v1/embeddings", True),
    (("/v1/chat/completions",), "/v1/chat/completions%2F..%2F..%2Ffiles", False),  # encoded separators
    (("/v1/chat/completions",), "/v1/chat/completions/..%5cfiles", False),
    (("/",), "/anything/at/all", True),
]


@pytest.mark.parametrize("prefixes, path, ok", PATHS)
def test_path_allowed(prefixes: tuple[str, ...], path: str, ok: bool) -> None:
    assert path_allowed(path, prefixes) is ok
    policy = RequestPolicy(allowed_path_prefixes=prefixes)
    if ok:
        check_path(policy, path)
    else:
        with pytest.raises(Forbidden) as info:
            check_path(policy, path)
        assert info.value.code == "path_not_allowed" and path in info.value.message


@pytest.mark.parametrize(
    "limit, declared, ok",
    [(None, 10**9, True), (100, None, True), (100, 100, True), (100, 101, False)],
)
def test_check_content_length(limit: int | None, declared: int | None, ok: bool) -> None:
    policy = RequestPolicy(max_body_bytes=limit)
    if ok:
        check_content_length(policy, declared)
    else:
        with pytest.raises(BodyTooLarge) as info:
            check_content_length(policy, declared)
        assert (info.value.status, info.value.code) == (413, "body_too_large")
        assert "101 bytes exceeds this credential's limit of 100 bytes" in info.value.message


def test_check_request_order() -> None:
    policy = RequestPolicy(allowed_methods=("POST",), allowed_path_prefixes=("/v1/",), max_body_bytes=10)
    check_request(policy, method="POST", upstream_path="/v1/x", content_length=10)
    for kwargs, code in [
        (dict(method="GET", upstream_path="/v2", content_length=99), "method_not_allowed"),
        (dict(method="POST", upstream_path="/v2", content_length=99), "path_not_allowed"),
        (dict(method="POST", upstream_path="/v1/x", content_length=99), "body_too_large"),
    ]:
        with pytest.raises(Refused) as info:
            check_request(policy, **kwargs)
        assert info.value.code == code


def test_policy_validation() -> None:
    with pytest.raises(ValueError):
        RequestPolicy(overflow="ignore")
    with pytest.raises(ValueError):
        RequestPolicy(inspect_bytes=0)
    assert not RequestPolicy(allowed_methods=("POST",)).json_rules
    assert RequestPolicy(max_n=1).json_rules


# --- JSON body rules -----------------------------------------------------------------------------

RULES = RequestPolicy(allowed_models=("gpt-4o-mini", "gpt-4o"), max_tokens_cap=1000, max_n=2)
MODELS = RequestPolicy(allowed_models=("gpt-4o-mini",))
TOKENS = RequestPolicy(max_tokens_cap=1000)
N = RequestPolicy(max_n=2)
MESSAGES = '"messages":[{"role":"user","content":"hi {\\"model\\": \\"evil\\"} ]}"}]'

# (policy, body, None when allowed or the refusal code)
BODIES = [
    (RULES, '{"model":"gpt-4o-mini","max_tokens":100,' + MESSAGES + "}", None),
    (RULES, "{" + MESSAGES + ',"model":"gpt-4o","max_completion_tokens":1000,"n":2}', None),
    (RULES, ' \n{ "model" : "gpt-4o" , "max_tokens" : 0 , "n" : null }\r\n', None),
    (RULES, '{"model":"gpt-4","max_tokens":100}', "model_not_allowed"),
    (RULES, '{"max_tokens":100}', "model_not_allowed"),
    (RULES, '{"model":"gpt-4o","max_tokens":1001}', "max_tokens_too_high"),
    (RULES, '{"model":"gpt-4o","max_tokens":10,"max_completion_tokens":5000}', "max_tokens_too_high"),
    (RULES, '{"model":"gpt-4o"}', "max_tokens_required"),
    (RULES, '{"model":"gpt-4o","max_tokens":null}', "max_tokens_required"),
    (RULES, '{"model":"gpt-4o","max_tokens":10,"n":3}', "n_too_high"),
    # Escapes are decoded before comparing, in names and in values.
    (MODELS, '{"model":"gpt\\u002d4o-mini"}', None),
    (MODELS, '{"mod\\u0065l":"gpt-4"}', "model_not_allowed"),
    (MODELS, '{"model":"gpt-4o-mini\\u0000"}', "model_not_allowed"),
    # A second occurrence is refused: parsers disagree on which one wins.
    (MODELS, '{"model":"gpt-4o-mini","model":"gpt-4"}', "duplicate_field"),
    (MODELS, '{"model":"gpt-4o-mini","mod\\u0065l":"gpt-4o-mini"}', "duplicate_field"),
    (TOKENS, '{"max_tokens":1,"max_tokens":1}', "duplicate_field"),
    # Only the top level counts.
    (MODELS, '{"messages":[{"model":"gpt-4"}],"meta":{"model":{"x":["gpt-4"]}},"model":"gpt-4o-mini"}', None),
    (MODELS, '{"x":"\\\\","model":"gpt-4o-mini"}', None),  # an escaped backslash ends no string
    (MODELS, '{"x":"\\\\\\"model\\":\\"gpt-4\\"","model":"gpt-4o-mini"}', None),
    # Wrong types.
    (MODELS, '{"model":["gpt-4o-mini"]}', "invalid_field"),
    (MODELS, '{"model":7}', "invalid_field"),
    (MODELS, '{"model":null}', "invalid_field"),
    (TOKENS, '{"max_tokens":"100"}', "invalid_field"),
    (TOKENS, '{"max_tokens":1.5}', "invalid_field"),
    (TOKENS, '{"max_tokens":1e3}', "invalid_field"),
    (TOKENS, '{"max_tokens":true}', "invalid_field"),
    (TOKENS, '{"max_tokens":-1}', "invalid_field"),
    (TOKENS, '{"max_tokens":{"value":1}}', "invalid_field"),
    (MODELS, '{"model":"' + "x" * 2000 + '"}', "invalid_field"),
    (N, '{"n":1}', None),
    (N, "{}", None),
    (N, '{"n":2.0}', "invalid_field"),
    # Not a JSON object.
    (MODELS, '["model","gpt-4o-mini"]', "invalid_json"),
    (MODELS, "{'model':'gpt-4o-mini'}", "invalid_json"),
    (MODELS, '{"model":"gpt-4o-mini"} {"model":"gpt-4"}', "invalid_json"),
    (MODELS, '{"model":"gpt-4o-mini",}', "invalid_json"),
    (MODELS, '{"model" "gpt-4o-mini"}', "invalid_json"),
    (MODELS, '{"model":"gpt-4o-mini"', "invalid_json"),
    (MODELS, '{"model":"gpt-4o-mini" "n":1}', "invalid_json"),
    (MODELS, '{"model":}', "invalid_json"),
    (TOKENS, '{"max_tokens":01}', "invalid_json"),
    (MODELS, '\ufeff{"model":"gpt-4o-mini"}', "invalid_json"),
    (N, '{"n":1', "invalid_json"),
    (MODELS, '{"model":"gpt-4o-mini","x":"\\q"}', None),  # not a watched value: the upstream judges it
    (MODELS, "", None),  # no body, nothing to judge
]


def chunked(body: bytes, size: int) -> list[bytes]:
    return [body[i : i + size] for i in range(0, len(body), size)] or [b""]


def run(policy: RequestPolicy, chunks: list[bytes]) -> BodyInspector:
    inspector = BodyInspector(policy)
    for chunk in chunks:
        inspector.feed(chunk)
    inspector.end()
    return inspector


@pytest.mark.parametrize("size", [1, 7, 1 << 20])
@pytest.mark.parametrize("policy, body, code", BODIES)
def test_body_rules(policy: RequestPolicy, body: str, code: str | None, size: int) -> None:
    chunks = chunked(body.encode(), size)
    if code is None:
        inspector = run(policy, chunks)
        assert inspector.decided
    else:
        with pytest.raises(Refused) as info:
            run(policy, chunks)
        assert info.value.code == code, info.value.message
        expected = BadRequest if code in ("invalid_json", "invalid_field") else Forbidden
        assert type(info.value) is expected


@pytest.mark.parametrize(
    "policy, body, message",
    [
        (MODELS, '{"model":"gpt-4"}', "model 'gpt-4' is not allowed for this credential (allowed: gpt-4o-mini)"),
        (TOKENS, '{"max_tokens":5000}', "max_tokens is 5000, above this credential's cap of 1000"),
        (TOKENS, "{}", "max_tokens or max_completion_tokens is required for this credential (at most 1000)"),
        (N, '{"n":9}', "n is 9, above this credential's limit of 2"),
        (MODELS, '{"model":"gpt-4o-mini","model":"b"}', "field 'model' appears more than once in the JSON body"),
    ],
)
def test_body_messages_say_why(policy: RequestPolicy, body: str, message: str) -> None:
    with pytest.raises(Refused) as info:
        run(policy, [body.encode()])
    assert info.value.message == message


def test_invalid_utf8_in_a_watched_value() -> None:
    with pytest.raises(BadRequest) as info:
        run(MODELS, [b'{"model":"gpt\xff"}'])
    assert info.value.code == "invalid_json"


def test_fields_are_reported() -> None:
    inspector = run(RULES, [b'{"model":"gpt-4o","max_tokens":7,"n":null}'])
    assert inspector.fields == {"model": "gpt-4o", "max_tokens": 7, "n": None}


# --- when it decides, and what it holds back ---------------------------------------------------------


def big_body(head: str, tail: str = "", filler: int = 200_000) -> bytes:
    content = json.dumps("x" * filler)
    return f'{{{head}"messages":[{{"role":"user","content":{content}}}]{tail}}}'.encode()


def feed_until_decided(inspector: BodyInspector, chunks: list[bytes]) -> int:
    """Feed chunks until decided; the number fed."""
    for i, chunk in enumerate(chunks, 1):
        if inspector.feed(chunk):
            return i
    inspector.end()
    return len(chunks)


def test_decides_as_soon_as_every_ruled_field_is_seen() -> None:
    chunks = chunked(big_body('"model":"gpt-4o","max_tokens":10,"max_completion_tokens":10,"n":1,'), 1024)
    inspector = BodyInspector(RULES)
    assert feed_until_decided(inspector, chunks) == 1
    assert sum(map(len, inspector.take_held())) == 1024
    assert inspector.take_held() == []  # handed over once


def test_waits_for_the_end_while_an_optional_field_may_follow() -> None:
    # n has a rule and has not been seen: the object's end (or inspect_bytes) decides.
    body = b'{"model":"gpt-4o","max_tokens":10,"x":[1,2,3]}'
    inspector = BodyInspector(RULES)
    assert feed_until_decided(inspector, chunked(body, 5)) == len(chunked(body, 5))
    assert inspector.decided and b"".join(inspector.take_held()) == body


def test_no_rules_holds_nothing() -> None:
    inspector = BodyInspector(RequestPolicy(allowed_methods=("POST",)))
    assert inspector.decided
    assert inspector.feed(b"not json at all")
    assert inspector.take_held() == []


def test_required_fields_beyond_inspect_bytes_are_refused() -> None:
    policy = RequestPolicy(allowed_models=("gpt-4o",), inspect_bytes=4096)
    inspector = BodyInspector(policy)
    with pytest.raises(Forbidden) as info:
        feed_until_decided(inspector, chunked(big_body("", ',"model":"gpt-4o"'), 1024))
    assert info.value.code == "body_not_inspectable"
    assert info.value.message == (
        "model must appear within the first 4096 bytes of the JSON body for this credential's rules to be checked"
    )
    assert inspector.total == 4096  # it stopped reading there


def test_required_fields_found_then_optional_ones_checked_while_streaming() -> None:
    policy = RequestPolicy(allowed_models=("gpt-4o",), max_n=1, inspect_bytes=4096)
    chunks = chunked(big_body('"model":"gpt-4o",', ',"n":5'), 1024)
    inspector = BodyInspector(policy)
    assert feed_until_decided(inspector, chunks) == 4  # model seen, n may follow: held up to inspect_bytes
    with pytest.raises(Forbidden) as info:
        for chunk in chunks[4:]:
            inspector.feed(chunk)
    assert info.value.code == "n_too_high"


@pytest.mark.parametrize(
    "tail, code", [(',"model":"gpt-4o"', None), (',"model":"gpt-4"', "model_not_allowed"), ("", "model_not_allowed")]
)
def test_overflow_stream_mode_checks_while_streaming(tail: str, code: str | None) -> None:
    policy = RequestPolicy(allowed_models=("gpt-4o",), inspect_bytes=4096, overflow="stream")
    chunks = chunked(big_body("", tail), 1024)
    inspector = BodyInspector(policy)
    assert feed_until_decided(inspector, chunks) == 4
    assert len(inspector.take_held()) == 4

    def rest() -> None:
        for chunk in chunks[4:]:
            inspector.feed(chunk)
        inspector.end()

    if code is None:
        rest()
    else:
        with pytest.raises(Forbidden) as info:
            rest()
        assert info.value.code == code


def test_declared_length_over_the_limit_is_refused_before_reading() -> None:
    with pytest.raises(BodyTooLarge):
        BodyInspector(RequestPolicy(max_body_bytes=10), content_length=11)


def test_streamed_body_over_the_limit_is_refused_on_the_chunk_that_crosses_it() -> None:
    inspector = BodyInspector(RequestPolicy(max_body_bytes=10))
    assert inspector.feed(b"12345")
    assert inspector.feed(b"67890")
    with pytest.raises(BodyTooLarge):
        inspector.feed(b"!")


async def aiter(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        await trio.lowlevel.checkpoint()
        yield chunk


async def test_forward_sends_held_chunks_then_the_rest_checked() -> None:
    body = big_body('"model":"gpt-4o","max_tokens":5,', filler=20_000)
    chunks = chunked(body, 1000)
    inspector = BodyInspector(RequestPolicy(allowed_models=("gpt-4o",), max_tokens_cap=10))
    rest = aiter(chunks)
    async for chunk in rest:
        if inspector.feed(chunk):
            break
    sent = [chunk async for chunk in inspector.forward(rest)]
    assert b"".join(sent) == body


async def test_duplicate_within_inspect_bytes_is_refused_before_forwarding() -> None:
    body = big_body('"model":"gpt-4o","max_tokens":5,', ',"model":"gpt-5"', filler=20_000)
    inspector = BodyInspector(RequestPolicy(allowed_models=("gpt-4o",), max_tokens_cap=10))
    with pytest.raises(Forbidden) as info:
        feed_until_decided(inspector, chunked(body, 1000))
    assert info.value.code == "duplicate_field" and not inspector.decided


async def test_forward_stops_before_the_chunk_that_breaks_a_rule() -> None:
    """A late duplicate completes in the last chunk: that chunk (and so the complete body) never goes."""
    body = big_body('"model":"gpt-4o","max_tokens":5,', ',"model":"gpt-5"', filler=20_000)
    chunks = chunked(body, 1000)
    # Required fields seen within inspect_bytes: forwarding starts there, the rest is checked on the way.
    inspector = BodyInspector(RequestPolicy(allowed_models=("gpt-4o",), max_tokens_cap=10, inspect_bytes=4096))
    rest = aiter(chunks)
    async for chunk in rest:
        if inspector.feed(chunk):
            break
    sent: list[bytes] = []
    with pytest.raises(Forbidden) as info:
        async for chunk in inspector.forward(rest):
            sent.append(chunk)
    assert info.value.code == "duplicate_field"
    assert len(b"".join(sent)) < len(body) and b"gpt-5" not in b"".join(sent)
