"""Token usage read on the side of a response, without touching or delaying the bytes relayed.

OpenAI-style APIs report ``usage`` in the JSON body, or, when streaming with
``stream_options.include_usage``, in the last SSE chunk before ``[DONE]``. The observer is fed
each chunk after it has been written to the client; it keeps only what it needs (the current
partial line, or a bounded JSON body) and parses JSON only for lines that mention ``usage``.

It also reads what a trace and the GenAI metrics name the answer by: the response's ``model`` and
``id`` (from the first event that has them, or the JSON body) and, with ``details`` (tracing on),
the choices' ``finish_reason``. Events that mention none of these still take the fast path.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

MAX_JSON_BODY = 1 << 20  # a larger non-streamed body is not inspected
MAX_LINE = 1 << 16  # an SSE line longer than this is skipped


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int = 0  # of prompt_tokens, read from the cache (priced apart)


def _usage(obj: object) -> Usage | None:
    # ``type(x) is T or isinstance(x, T)``: the same test, told without a call for what JSON gives
    # (a plain dict, a plain int); ``k in d`` and ``d[k]`` likewise stand for ``d.get`` (once per
    # response, in every request's path).
    if not (type(obj) is dict or isinstance(obj, dict)):
        return None
    u = obj["usage"] if "usage" in obj else None
    if not (type(u) is dict or isinstance(u, dict)):
        # The Responses API's response.completed and realtime's response.done nest it.
        inner = obj.get("response")
        u = inner.get("usage") if isinstance(inner, dict) else None
        if not isinstance(u, dict):
            return None
    prompt = u["prompt_tokens"] if "prompt_tokens" in u else u.get("input_tokens")
    completion = u["completion_tokens"] if "completion_tokens" in u else u.get("output_tokens")
    if not (type(prompt) is int or isinstance(prompt, int)) or not (
        type(completion) is int or isinstance(completion, int)
    ):
        return None
    total = u["total_tokens"] if "total_tokens" in u else None
    if "prompt_tokens_details" in u:
        details = u["prompt_tokens_details"]
    else:
        details = u["input_tokens_details"] if "input_tokens_details" in u else None
    cached = None
    if type(details) is dict or (details is not None and isinstance(details, dict)):
        cached = details["cached_tokens"] if "cached_tokens" in details else None
    if not (
        cached is not None
        and (type(cached) is int or (isinstance(cached, int) and not isinstance(cached, bool)))
        and 0 <= cached <= prompt
    ):
        cached = 0
    if not (type(total) is int or (total is not None and isinstance(total, int))):
        total = prompt + completion
    return Usage(prompt, completion, total, cached)


def usage_of(obj: object) -> Usage | None:
    """The usage an OpenAI-style JSON message reports (chat, Responses, realtime), if any."""
    return _usage(obj)


def _finish_reasons(obj: dict) -> tuple[str, ...]:
    choices = obj.get("choices")
    if isinstance(choices, list):
        found = (c.get("finish_reason") for c in choices if isinstance(c, dict))
        return tuple(r for r in found if isinstance(r, str))
    reason = obj.get("stop_reason")  # Anthropic's messages
    return (reason,) if isinstance(reason, str) else ()


# What makes a line worth parsing, by what the observer still looks for: (the model and id, the
# finish reasons) -> one scan for all of its words (one ``in`` per word cost ~3x that per event).
# ``usage`` always; a finish_reason only with a value (streamed chunks carry ``"finish_reason":null``
# until the last).
_NOTABLE = {
    (False, False): re.compile(rb'"usage"').search,
    (True, False): re.compile(rb'"(?:usage|model)"').search,
    (False, True): re.compile(rb'"(?:usage"|finish_reason": ?")').search,
    (True, True): re.compile(rb'"(?:usage"|model"|finish_reason": ?")').search,
}


_DECODER = json.JSONDecoder()  # json.loads's own: the same options


def _json_body(body: bytearray) -> object:
    """``json.loads(body)``, None where it raises ValueError. A JSON object in UTF-8 (what every
    JSON answer is) is decoded without json.loads's encoding sniffing and whitespace passes (a
    dozen calls); anything else goes to json.loads itself."""
    if body[:1] != b"{" or body[1:2] == b"\0":  # a NUL second byte: json.loads would read UTF-16
        try:
            return json.loads(body)
        except ValueError:
            return None
    try:
        text = body.decode("utf-8", "surrogatepass")
        obj, end = _DECODER.raw_decode(text)
    except ValueError:
        return None
    if end != len(text) and text[end:].strip(" \t\n\r"):  # json.loads: "Extra data"
        return None
    return obj


class UsageObserver:
    """A body observer (see :mod:`proxy.relay.pump`): ``feed`` it the response body as it is written,
    then ``finish``; ``usage`` is then the response's usage, if it reported one, and ``model``,
    ``response_id`` (and with ``details`` ``finish_reasons``) what the answer said of itself.
    ``on_first_chunk`` is called once, when the first body bytes have been written; ``streamed``
    says whether the answer is an event stream (its content type, as the caller's record needs it)."""

    __slots__ = (
        "streamed", "_buf", "_skipping", "usage",
        "_details", "_notable", "_on_first", "model", "response_id", "finish_reasons",
    )  # fmt: skip

    def __init__(self, content_type: str, *, details: bool = False, on_first_chunk: Callable[[], None] | None = None):
        ct = content_type.lower()
        # The JSON test first: the common small answer's content type is tested once.
        json_body = ct.startswith("application/json")
        self.streamed = not json_body and ct.startswith("text/event-stream")
        self._buf: bytearray | None = bytearray() if (json_body or self.streamed) else None
        self._skipping = False
        self.usage: Usage | None = None
        self._details = details
        # A stream's model and id come from the first event that names them: looked for until then.
        self._notable = _NOTABLE[self.streamed, details]
        self._on_first = on_first_chunk
        self.model: str | None = None
        self.response_id: str | None = None
        self.finish_reasons: tuple[str, ...] = ()

    def feed(self, chunk: bytes) -> None:
        if self._on_first is not None:
            self._on_first()
            self._on_first = None
        if self._buf is None:
            return
        if not self.streamed:
            self._buf += chunk
            if len(self._buf) > MAX_JSON_BODY:
                self._buf = None
            return
        if not self._buf and chunk.endswith(b"\n") and self._notable(chunk) is None:
            # Whole lines, none of them about usage, model or finish (most events): nothing to parse or keep.
            self._skipping = False
            return
        if b"\n" not in chunk:
            self._append(chunk)
            return
        head, *lines, tail = chunk.split(b"\n")
        self._append(head)
        self._line(bytes(self._buf))
        for line in lines:
            self._line(line)
        self._buf.clear()
        self._skipping = False
        self._append(tail)

    def _append(self, data: bytes) -> None:
        if self._skipping:
            return
        assert self._buf is not None  # only fed while there is a buffer
        self._buf += data
        if len(self._buf) > MAX_LINE:
            self._buf.clear()
            self._skipping = True

    def _line(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return
        if self._notable(line) is None:
            return
        usage = b'"usage"' in line
        try:
            obj = json.loads(line[5:])
        except ValueError:
            return
        if usage:
            found = _usage(obj)
            if found is not None:
                self.usage = found
        if isinstance(obj, dict):
            self._describe(obj)

    def _describe(self, obj: dict) -> None:
        """The answer's model, id and finish reasons, from a parsed event or body."""
        if self.model is None:
            model = obj["model"] if "model" in obj else None
            rid = obj["id"] if "id" in obj else None
            if type(model) is str or (model is not None and isinstance(model, str)):
                self.model = model[:128]
                self._notable = _NOTABLE[False, self._details]
            if type(rid) is str or (rid is not None and isinstance(rid, str)):
                self.response_id = rid[:128]
        if self._details:
            self.finish_reasons += _finish_reasons(obj)

    def finish(self, complete: bool) -> None:
        """The body has ended: a buffered JSON body is parsed now. A response cut short
        (``complete`` False) reports no usage. Calling it again changes nothing."""
        if not complete:
            self._buf, self.usage = None, None
        elif self._buf is not None and not self.streamed and self._buf:
            obj = _json_body(self._buf)
            self.usage = _usage(obj) or self.usage
            if type(obj) is dict or isinstance(obj, dict):
                self._describe(obj)
            self._buf = None
        elif self.streamed and self._buf:
            self._line(bytes(self._buf).rstrip(b"\r"))
            self._buf = None


_EVENT_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")
MAX_EVENT = 1 << 20  # an SSE event longer than this is passed on without being looked at


class UsageChunkRemover:
    """Takes the usage-only chunk out of an SSE answer whose ``stream_options.include_usage``
    Parkway asked for (the client did not), and keeps its usage.

    Every other byte goes on unchanged and in order; only the current incomplete event is held
    (an event is dispatched by SSE clients only once complete, so none of them sees a delay).
    The removed event is exactly a ``data:`` line whose JSON has a ``usage`` object and an
    empty ``choices`` list, with its blank-line terminator.
    """

    __slots__ = ("_buf", "_passing", "usage")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._passing = False  # the current event is too long to look at: it streams through
        self.usage: Usage | None = None

    def feed(self, data: bytes) -> bytes:
        """The bytes to send on for ``data``."""
        if self._passing:
            end = _EVENT_END.search(data)
            if end is None or (end.end() == len(data) and data.endswith(b"\r")):
                return data
            self._passing = False
            return data[: end.end()] + self.feed(data[end.end() :])
        self._buf += data
        out = bytearray()
        start = 0
        buf = self._buf
        while True:
            end = _EVENT_END.search(buf, start)
            # A trailing \r may still become \r\n: wait for the next byte.
            if end is None or (end.end() == len(buf) and buf.endswith(b"\r")):
                break
            event = bytes(buf[start : end.end()])
            if not self._usage_only(event):
                out += event
            start = end.end()
        rest = bytes(buf[start:])
        self._buf = bytearray(rest)
        if len(self._buf) > MAX_EVENT:
            out += self._buf
            self._buf = bytearray()
            self._passing = True
        return bytes(out)

    def end(self) -> bytes:
        """The body has ended: what is still held goes on as it is."""
        rest, self._buf = bytes(self._buf), bytearray()
        return rest

    def _usage_only(self, event: bytes) -> bool:
        if b'"usage"' not in event:
            return False
        lines = [line for line in re.split(rb"\r\n|\r|\n", event) if line]
        if len(lines) != 1 or not lines[0].startswith(b"data:"):
            return False
        try:
            obj = json.loads(lines[0][5:])
        except ValueError:
            return False
        if not isinstance(obj, dict) or obj.get("choices") != [] or not isinstance(obj.get("usage"), dict):
            return False
        found = _usage(obj)
        if found is None:
            return False
        self.usage = found
        return True
