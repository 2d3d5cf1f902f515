"""proxy.relay.usage: token usage read beside the relayed bytes, fed chunk by chunk (pure, no I/O).

The observer sees exactly the chunks Parkway relays, wherever the network cut them, so
every case is checked under many chunkings: whole, byte by byte, and split at every
position of the usage line.
"""

from __future__ import annotations

import json
import tracemalloc

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.relay.usage import _NOTABLE, MAX_JSON_BODY, MAX_LINE, Usage, UsageObserver, _json_body, _usage

SSE = "text/event-stream"
JSON = "application/json"

USAGE = {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}


def event(payload: object, eol: bytes = b"\n") -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + eol + eol


def delta(text: str, **extra: object) -> dict:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}], **extra}


USAGE_EVENT = event({"object": "chat.completion.chunk", "choices": [], "usage": USAGE})
# An OpenAI stream with stream_options.include_usage: "usage": null on every chunk, the
# usage object in the last chunk before [DONE].
OPENAI_STREAM = event(delta("Hel", usage=None)) + event(delta("lo", usage=None)) + USAGE_EVENT + b"data: [DONE]\n\n"


def observe(content_type: str, chunks: list[bytes]) -> Usage | None:
    observer = UsageObserver(content_type)
    for chunk in chunks:
        observer.feed(chunk)
    observer.finish(complete=True)
    return observer.usage


def split_at(data: bytes, *cuts: int) -> list[bytes]:
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def chunkings(data: bytes) -> dict[str, list[bytes]]:
    """The same body cut the ways a network may cut it."""
    return {
        "whole": [data],
        "bytes": [data[i : i + 1] for i in range(len(data))],
        "sevens": [data[i : i + 7] for i in range(0, len(data), 7)],
    }


# --- streams ------------------------------------------------------------------------------------


def test_usage_chunk_of_an_openai_stream_is_found():
    for name, chunks in chunkings(OPENAI_STREAM).items():
        assert observe(SSE, chunks) == Usage(9, 12, 21), name


def test_usage_chunk_split_at_every_byte_position():
    start = OPENAI_STREAM.index(USAGE_EVENT)
    for cut in range(start, start + len(USAGE_EVENT) + 1):
        assert observe(SSE, split_at(OPENAI_STREAM, cut)) == Usage(9, 12, 21), cut
        # Three pieces: the usage line is also cut in its middle by a second boundary.
        middle = start + len(USAGE_EVENT) // 2
        cuts = sorted({cut, middle})
        assert observe(SSE, split_at(OPENAI_STREAM, *cuts)) == Usage(9, 12, 21), (cut, middle)


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"], ids=["crlf", "lf"])
def test_line_endings(eol):
    stream = event(delta("Hi"), eol) + event({"choices": [], "usage": USAGE}, eol) + b"data: [DONE]" + eol + eol
    start = stream.index(b'{"choices":[]')
    for name, chunks in chunkings(stream).items():
        assert observe(SSE, chunks) == Usage(9, 12, 21), name
    for cut in range(start, len(stream) + 1):  # a cut between "\r" and "\n" included
        assert observe(SSE, split_at(stream, cut)) == Usage(9, 12, 21), cut


@pytest.mark.parametrize("eol", [b"", b"\r"], ids=["bare", "cr"])
def test_last_line_without_a_newline_is_read_at_finish(eol):
    stream = event(delta("Hi")) + b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}' + eol
    for name, chunks in chunkings(stream).items():
        assert observe(SSE, chunks) == Usage(1, 2, 3), name


def test_data_without_a_space_and_the_last_usage_wins():
    stream = (
        b'data:{"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n'
        + b'data: {"usage":{"prompt_tokens":5,"completion_tokens":6,"total_tokens":99}}\n\n'
        + event(delta("after", usage=None))
    )
    for name, chunks in chunkings(stream).items():
        assert observe(SSE, chunks) == Usage(5, 6, 99), name


NO_USAGE_STREAMS = {
    "none-at-all": event(delta("Hello")) + b"data: [DONE]\n\n",
    "usage-null": event(delta("Hello", usage=None)) + b"data: [DONE]\n\n",
    "word-in-content": event(delta('the "usage" of words')) + event(delta("usage")),
    "usage-not-a-table": b'data: {"usage": [1, 2]}\n\n',
    "tokens-not-integers": b'data: {"usage": {"prompt_tokens": "9", "completion_tokens": 1}}\n\n',
    "only-one-count": b'data: {"usage": {"prompt_tokens": 9}}\n\n',
    "broken-json": b'data: {"usage": {"prompt_tokens": 9, \n\n',
    "comment-line": b': {"usage": {"prompt_tokens": 9, "completion_tokens": 1}}\n\n',
    "other-field": b'event: {"usage": {"prompt_tokens": 9, "completion_tokens": 1}}\n\n',
    "empty": b"",
}


@pytest.mark.parametrize("stream", NO_USAGE_STREAMS.values(), ids=NO_USAGE_STREAMS.keys())
def test_streams_without_usage(stream):
    for name, chunks in chunkings(stream).items():
        assert observe(SSE, chunks) is None, name


HUGE_USAGE_LINE = (
    b'data: {"usage":{"prompt_tokens":1000,"completion_tokens":1000},"pad":"' + b"x" * MAX_LINE + b'"}\n\n'
)


@pytest.mark.parametrize("piece", [len(HUGE_USAGE_LINE), 4096, 65536], ids=["line-per-chunk", "4k", "64k"])
def test_huge_line_is_skipped_and_the_next_line_still_read(piece):
    # The huge line carries a usage object of its own: it is skipped, not parsed.
    stream = HUGE_USAGE_LINE + USAGE_EVENT + b"data: [DONE]\n\n"
    chunks = [stream[i : i + piece] for i in range(0, len(stream), piece)]
    assert observe(SSE, chunks) == Usage(9, 12, 21)


def test_huge_usage_line_alone_gives_nothing():
    huge = b'data: {"usage":{"prompt_tokens":1,"completion_tokens":2},"pad":"' + b"x" * MAX_LINE + b'"}'
    assert observe(SSE, [huge[i : i + 1000] for i in range(0, len(huge), 1000)]) is None
    assert observe(SSE, [huge[i : i + 1000] for i in range(0, len(huge), 1000)] + [b"\n\n"]) is None


def peak_memory_while_feeding(content_type: str, chunk: bytes, count: int) -> tuple[int, Usage | None]:
    """Peak bytes allocated while ``count`` copies of ``chunk`` are fed (the chunk itself excluded)."""
    observer = UsageObserver(content_type)
    tracemalloc.start()
    try:
        for _ in range(count):
            observer.feed(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    observer.finish(complete=True)
    return peak, observer.usage


def test_a_line_that_never_ends_keeps_memory_bounded():
    chunk = b"data: " + b"x" * 65530  # 64 KiB, no newline, 16 MiB in all
    peak, usage = peak_memory_while_feeding(SSE, chunk, 256)
    assert usage is None
    assert peak < 4 * MAX_LINE, peak


# --- JSON bodies ----------------------------------------------------------------------------------

COMPLETION = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}],
        "usage": USAGE,
    }
).encode()


@pytest.mark.parametrize("content_type", [JSON, "application/json; charset=utf-8", "Application/JSON"])
def test_json_body_with_usage(content_type):
    for name, chunks in chunkings(COMPLETION).items():
        assert observe(content_type, chunks) == Usage(9, 12, 21), name


def test_input_and_output_tokens_spelling():
    # The Responses API (and Anthropic) spell them input_tokens / output_tokens.
    body = json.dumps({"object": "response", "usage": {"input_tokens": 7, "output_tokens": 3, "total_tokens": 10}})
    assert observe(JSON, [body.encode()]) == Usage(7, 3, 10)
    no_total = b'{"usage": {"input_tokens": 7, "output_tokens": 3}}'
    assert observe(JSON, [no_total]) == Usage(7, 3, 10)
    stream = b'data: {"usage": {"input_tokens": 4, "output_tokens": 5}}\n\ndata: [DONE]\n\n'
    for name, chunks in chunkings(stream).items():
        assert observe(SSE, chunks) == Usage(4, 5, 9), name


NO_USAGE_BODIES = {
    "no-usage": b'{"object": "list", "data": []}',
    "usage-null": b'{"usage": null}',
    "not-json": b"<html>Bad gateway</html>",
    "truncated": COMPLETION[:-5],
    "array": b"[1, 2, 3]",
    "empty": b"",
}


@pytest.mark.parametrize("body", NO_USAGE_BODIES.values(), ids=NO_USAGE_BODIES.keys())
def test_json_bodies_without_usage(body):
    assert observe(JSON, [body]) is None


@pytest.mark.parametrize("content_type", ["text/plain", "application/octet-stream", ""])
def test_other_content_types_are_not_inspected(content_type):
    assert observe(content_type, [COMPLETION]) is None
    assert observe(content_type, [USAGE_EVENT]) is None


def test_json_body_over_the_cap_is_ignored():
    # Usage first, so a parser that kept the start of the body would find it.
    head = b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2}, "pad": "'
    filler = b"x" * 65536
    count = MAX_JSON_BODY // len(filler) + 1
    body = head + filler * count + b'"}'
    assert len(body) > MAX_JSON_BODY
    assert observe(JSON, [head, *([filler] * count), b'"}']) is None
    assert observe(JSON, [body]) is None

    # Memory stays near the cap however much more arrives (16 MiB here).
    peak, usage = peak_memory_while_feeding(JSON, filler, 256)
    assert usage is None
    assert peak < 2 * MAX_JSON_BODY + 4 * len(filler), peak


def test_json_body_at_the_cap_is_read():
    head = b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2}, "pad": "'
    body = head + b"x" * (MAX_JSON_BODY - len(head) - 2) + b'"}'
    assert len(body) == MAX_JSON_BODY
    assert observe(JSON, [body[i : i + 65536] for i in range(0, len(body), 65536)]) == Usage(1, 2, 3)


def test_finish_is_safe_to_call_twice():
    observer = UsageObserver(JSON)
    observer.feed(COMPLETION)
    observer.finish(complete=True)
    assert observer.usage == Usage(9, 12, 21)
    observer.finish(complete=True)
    assert observer.usage == Usage(9, 12, 21)


@pytest.mark.parametrize("content_type", [JSON, SSE])
def test_a_response_cut_short_reports_no_usage(content_type):
    # The relay says complete=False when the body did not all reach the client.
    body = COMPLETION if content_type == JSON else OPENAI_STREAM
    observer = UsageObserver(content_type)
    observer.feed(body)
    observer.finish(complete=False)
    assert observer.usage is None


# --- what the answer says of itself: model, id, finish reasons (for traces and GenAI metrics) ------

HEADED = {"id": "chatcmpl-7", "model": "gpt-4o-mini-2024-07-18"}
NAMED_STREAM = (
    event({**delta("Hel"), **HEADED, "choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]})
    + event({**HEADED, "choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": None}]})
    + event({**HEADED, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    + event({**HEADED, "choices": [], "usage": USAGE})
    + b"data: [DONE]\n\n"
)


def described(content_type: str, chunks: list[bytes], *, details: bool) -> UsageObserver:
    observer = UsageObserver(content_type, details=details)
    for chunk in chunks:
        observer.feed(chunk)
    observer.finish(complete=True)
    return observer


@pytest.mark.parametrize("details", [False, True])
def test_a_streams_model_and_id_come_from_its_first_event(details):
    for name, chunks in chunkings(NAMED_STREAM).items():
        observer = described(SSE, chunks, details=details)
        assert (observer.model, observer.response_id) == (HEADED["model"], HEADED["id"]), name
        assert observer.usage == Usage(9, 12, 21), name
        # Finish reasons only when asked (tracing): a null finish_reason is not one.
        assert observer.finish_reasons == (("stop",) if details else ()), name


def test_a_json_answer_is_described_from_its_body():
    body = json.dumps({**HEADED, "choices": [{"index": 0, "finish_reason": "length"}], "usage": USAGE}).encode()
    observer = described(JSON, [body], details=True)
    assert (observer.model, observer.response_id, observer.finish_reasons) == (
        HEADED["model"],
        "chatcmpl-7",
        ("length",),
    )


def test_events_without_these_fields_take_the_fast_path(monkeypatch):
    """Once the model is known, an event without usage or a finish reason is never parsed."""
    parsed: list[bytes] = []
    real = json.loads
    monkeypatch.setattr("proxy.relay.usage.json.loads", lambda data: parsed.append(bytes(data)) or real(data))
    observer = UsageObserver(SSE, details=True)
    for chunk in NAMED_STREAM.split(b"\n\n")[:-1]:  # one event per chunk, as streams usually come
        observer.feed(chunk + b"\n\n")
    assert len(parsed) == 3  # the first event (model, id), the finish and the usage: not the middle one


def test_the_first_chunk_callback_runs_once():
    calls: list[int] = []
    observer = UsageObserver(SSE, on_first_chunk=lambda: calls.append(1))
    for chunk in chunkings(NAMED_STREAM)["sevens"]:
        observer.feed(chunk)
    assert calls == [1]


# --- the fast paths, held to the code they replaced (Hypothesis) -----------------------------------


def reference_usage(obj: object) -> Usage | None:
    """``_usage`` as it was: isinstance and ``dict.get`` throughout (the oracle)."""
    if not isinstance(obj, dict):
        return None
    u = obj.get("usage")
    if not isinstance(u, dict):
        inner = obj.get("response")
        u = inner.get("usage") if isinstance(inner, dict) else None
        if not isinstance(u, dict):
            return None
    prompt = u.get("prompt_tokens", u.get("input_tokens"))
    completion = u.get("completion_tokens", u.get("output_tokens"))
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    total = u.get("total_tokens")
    details = u.get("prompt_tokens_details", u.get("input_tokens_details"))
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    cached = cached if isinstance(cached, int) and not isinstance(cached, bool) and 0 <= cached <= prompt else 0
    return Usage(prompt, completion, total if isinstance(total, int) else prompt + completion, cached)


def reference_json_body(body: bytearray) -> object:
    try:
        return json.loads(body)
    except ValueError:
        return None


class SubDict(dict):
    pass


class SubInt(int):
    pass


class SubStr(str):
    pass


USAGE_KEYS = [
    "usage", "response", "prompt_tokens", "input_tokens", "completion_tokens", "output_tokens", "total_tokens",
    "prompt_tokens_details", "input_tokens_details", "cached_tokens", "model", "id", "x",
]  # fmt: skip
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 50),
    st.integers(-5, 50).map(SubInt),
    st.floats(allow_nan=False),
    st.text(max_size=3),
    st.text(max_size=3).map(SubStr),
)
json_like = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=2),
        st.dictionaries(st.sampled_from(USAGE_KEYS), inner, max_size=6),
        st.dictionaries(st.sampled_from(USAGE_KEYS), inner, max_size=6).map(SubDict),
    ),
    max_leaves=20,
)


dicts = st.sampled_from([dict, SubDict])
tokens = st.one_of(st.integers(-2, 60), scalars)  # half of them plain ints
details_like = st.one_of(
    st.tuples(dicts, st.fixed_dictionaries({}, optional={"cached_tokens": tokens, "x": scalars})).map(
        lambda t: t[0](t[1])
    ),
    scalars,
)
TOKEN_KEYS = ["prompt_tokens", "input_tokens", "completion_tokens", "output_tokens", "total_tokens"]
optional_fields = {
    **{key: tokens for key in TOKEN_KEYS},
    "prompt_tokens_details": details_like,
    "input_tokens_details": details_like,
}
usage_fields = st.one_of(
    st.fixed_dictionaries(
        {"prompt_tokens": tokens, "completion_tokens": tokens},
        optional={k: v for k, v in optional_fields.items() if k not in ("prompt_tokens", "completion_tokens")},
    ),
    st.fixed_dictionaries({}, optional=optional_fields),
)
usage_like = st.tuples(dicts, dicts, st.sampled_from(["usage", "response", "x"]), usage_fields).map(
    lambda t: t[0]({t[2]: t[1](t[3])} if t[2] != "response" else {"response": t[0]({"usage": t[1](t[3])})})
)


@settings(max_examples=3000, deadline=None)
@given(st.one_of(json_like, usage_like))
@example({"usage": {"prompt_tokens": 5, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": True}}})
@example({"usage": {"prompt_tokens": 5, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": SubInt(2)}}})
@example({"usage": {"prompt_tokens": True, "completion_tokens": SubInt(1), "total_tokens": False}})
@example(
    SubDict(response=SubDict(usage=SubDict(input_tokens=3, output_tokens=4, input_tokens_details={"cached_tokens": 3})))
)
def test_usage_reads_what_the_isinstance_version_read(obj):
    assert repr(_usage(obj)) == repr(reference_usage(obj))


def encodings_of(obj: object) -> st.SearchStrategy[bytes]:
    text = json.dumps(obj)
    return st.sampled_from([
        text.encode(), json.dumps(obj, separators=(",", ":")).encode(), (text + " \r\n\t").encode(),
        (" " + text).encode(), (text + " x").encode(), (text + "}").encode(), text.encode()[:-1],
        text.encode("utf-16-le"), text.encode("utf-16"), text.encode("utf-32"), text.encode("utf-8-sig"),
        (text + "\x0b").encode(), text.encode().replace(b'"', b"\xff", 1),
    ])  # fmt: skip


json_bodies = st.one_of(
    st.binary(max_size=12),
    st.binary(max_size=8).map(lambda b: b"{" + b),
    st.dictionaries(st.text(max_size=3), json_like, max_size=4).flatmap(encodings_of),
    json_like.flatmap(encodings_of),
)


@settings(max_examples=2000, deadline=None)
@given(json_bodies)
def test_a_json_body_is_read_as_json_loads_reads_it(body):
    assert repr(_json_body(bytearray(body))) == repr(reference_json_body(bytearray(body)))


@settings(max_examples=500, deadline=None)
@given(json_like, st.booleans())
def test_a_json_answer_is_described_as_before(obj, details):
    """The observer's model, id and usage of a JSON answer: what the old parse and checks gave."""
    body = json.dumps(obj).encode()
    observer = described(JSON, [body], details=details)
    parsed = json.loads(body)
    expected_model = parsed.get("model") if isinstance(parsed, dict) else None
    expected_id = parsed.get("id") if isinstance(parsed, dict) else None
    assert observer.usage == reference_usage(parsed)
    assert observer.model == (expected_model[:128] if isinstance(expected_model, str) else None)
    assert observer.response_id == (expected_id[:128] if isinstance(expected_id, str) else None)


def reference_notable(line: bytes, want_head: bool, details: bool) -> bool:
    """Whether a line is worth parsing, one ``in`` per word (the code ``_NOTABLE``'s one scan replaced)."""
    finish = b'"finish_reason":"' in line or b'"finish_reason": "' in line
    return b'"usage"' in line or (want_head and b'"model"' in line) or (details and finish)


notable_words = st.sampled_from([
    b'"usage"', b'"model"', b'"finish_reason":"', b'"finish_reason": "', b'"finish_reason":null', b'"finish_reason":  "',
    b'"', b"usage", b'model"', b'"usag', b"finish_reason", b":", b" ", b'"x":1', b"\n", b"data: ",
])  # fmt: skip


@settings(max_examples=3000, deadline=None)
@given(st.lists(notable_words, max_size=12).map(b"".join), st.booleans(), st.booleans())
@example(b'"finish_reason": "stop"', False, True)
@example(b'"model"', False, True)
def test_one_scan_finds_what_the_word_scans_found(line, want_head, details):
    assert (_NOTABLE[want_head, details](line) is not None) == reference_notable(line, want_head, details)
