"""Token usage read on the side of a response, without touching or delaying the bytes relayed.

OpenAI-style APIs report ``usage`` in the JSON body, or, when streaming with
``stream_options.include_usage``, in the last SSE chunk before ``[DONE]``. The observer is fed
each chunk after it has been written to the client; it keeps only what it needs (the current
partial line, or a bounded JSON body) and parses JSON only for lines that mention ``usage``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

MAX_JSON_BODY = 1 << 20  # a larger non-streamed body is not inspected
MAX_LINE = 1 << 16  # an SSE line longer than this is skipped


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def _usage(obj: object) -> Usage | None:
    if not isinstance(obj, dict):
        return None
    u = obj.get("usage")
    if not isinstance(u, dict):
        return None
    prompt = u.get("prompt_tokens", u.get("input_tokens"))
    completion = u.get("completion_tokens", u.get("output_tokens"))
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    total = u.get("total_tokens")
    return Usage(prompt, completion, total if isinstance(total, int) else prompt + completion)


class UsageObserver:
    """A body observer (see :mod:`proxy.relay.pump`): ``feed`` it the response body as it is written,
    then ``finish``; ``usage`` is then the response's usage, if it reported one."""

    __slots__ = ("_sse", "_buf", "_skipping", "usage")

    def __init__(self, content_type: str):
        ct = content_type.lower()
        self._sse = ct.startswith("text/event-stream")
        self._buf: bytearray | None = bytearray() if (self._sse or ct.startswith("application/json")) else None
        self._skipping = False
        self.usage: Usage | None = None

    def feed(self, chunk: bytes) -> None:
        if self._buf is None:
            return
        if not self._sse:
            self._buf += chunk
            if len(self._buf) > MAX_JSON_BODY:
                self._buf = None
            return
        if not self._buf and chunk.endswith(b"\n") and b'"usage"' not in chunk:
            # Whole lines, none of them about usage (most events): nothing to parse or keep.
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
        if not line.startswith(b"data:") or b'"usage"' not in line:
            return
        try:
            found = _usage(json.loads(line[5:]))
        except ValueError:
            return
        if found is not None:
            self.usage = found

    def finish(self, complete: bool) -> None:
        """The body has ended: a buffered JSON body is parsed now. A response cut short
        (``complete`` False) reports no usage. Calling it again changes nothing."""
        if not complete:
            self._buf, self.usage = None, None
        elif self._buf is not None and not self._sse and self._buf:
            try:
                self.usage = _usage(json.loads(self._buf)) or self.usage
            except ValueError:
                pass
            self._buf = None
        elif self._sse and self._buf:
            self._line(bytes(self._buf).rstrip(b"\r"))
            self._buf = None
