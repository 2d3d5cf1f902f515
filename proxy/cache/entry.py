"""One stored answer, how it is recorded while it streams, and its bytes for a shared store. Pure.

An entry keeps the body as the chunks the upstream sent, in order, with each chunk's offset in
seconds from the response head: a hit replays the same sequence of chunks (a browser renders it
token by token, as it did the original), at once or paced like the original.

:class:`Recording` is also the buffer followers of a collapsed request read from. While the answer
may still be stored it keeps every chunk (at most ``max_bytes``); once the answer is too big to
store it keeps only a window of recent chunks for followers, who are cut loose if they fall out.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass

Header = tuple[bytes, bytes]

# Bytes an entry costs beyond its body and headers (objects, lists, dictionary slot): the memory
# store counts it so that many tiny entries cannot exceed max_bytes by much.
ENTRY_OVERHEAD = 400
CHUNK_OVERHEAD = 48


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """A complete 200 answer: status, headers (hop-by-hop already removed), body chunks."""

    status: int
    headers: tuple[Header, ...]
    chunks: tuple[bytes, ...]
    offsets: tuple[float, ...]  # seconds from the head to each chunk (same length as chunks)
    stored_at: float  # in the clock of the store that holds it
    ttl: float  # seconds
    prompt_tokens: int = 0  # usage reported by the original answer: the tokens a hit saves
    completion_tokens: int = 0

    def __post_init__(self) -> None:
        if len(self.offsets) != len(self.chunks):
            raise ValueError("one offset per chunk")

    @property
    def body_bytes(self) -> int:
        return sum(len(c) for c in self.chunks)

    @property
    def size(self) -> int:
        """What the entry costs in memory, approximately, for the store's byte bound."""
        headers = sum(len(n) + len(v) + 64 for n, v in self.headers)
        return ENTRY_OVERHEAD + headers + self.body_bytes + CHUNK_OVERHEAD * len(self.chunks)

    @property
    def expires_at(self) -> float:
        return self.stored_at + self.ttl

    def age(self, now: float) -> float:
        return max(0.0, now - self.stored_at)

    def remaining(self, now: float) -> float:
        """Seconds of freshness left (``ttl`` in Cache-Status)."""
        return self.expires_at - now

    def fresh(self, now: float) -> bool:
        return now < self.expires_at

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


# --- bytes for a shared store ---------------------------------------------------------------------

_MAGIC = b"PWC1"
_HEAD = struct.Struct(">4sHIIddQQ")  # magic, status, headers, chunks, stored_at, ttl, prompt, completion
_HEADER = struct.Struct(">HI")  # name length, value length


class CorruptEntry(ValueError):
    """Bytes that are not an entry this version wrote (another version, a truncated value)."""


def encode_entry(entry: CacheEntry) -> bytes:
    n = len(entry.chunks)
    parts = [
        _HEAD.pack(
            _MAGIC, entry.status, len(entry.headers), n, entry.stored_at, entry.ttl,
            entry.prompt_tokens, entry.completion_tokens,
        ),
    ]  # fmt: skip
    for name, value in entry.headers:
        parts += [_HEADER.pack(len(name), len(value)), name, value]
    parts.append(struct.pack(f">{n}I", *(len(c) for c in entry.chunks)))
    parts.append(struct.pack(f">{n}d", *entry.offsets))
    parts.extend(entry.chunks)
    return b"".join(parts)


def decode_entry(data: bytes) -> CacheEntry:
    """The entry :func:`encode_entry` wrote; :class:`CorruptEntry` for anything else."""
    view = memoryview(data)
    try:
        magic, status, n_headers, n, stored_at, ttl, prompt, completion = _HEAD.unpack_from(view, 0)
        if magic != _MAGIC:
            raise CorruptEntry("not a Parkway cache entry")
        pos = _HEAD.size
        headers = []
        for _ in range(n_headers):
            name_len, value_len = _HEADER.unpack_from(view, pos)
            pos += _HEADER.size
            name, value = bytes(view[pos : pos + name_len]), bytes(view[pos + name_len : pos + name_len + value_len])
            pos += name_len + value_len
            headers.append((name, value))
        lengths = struct.unpack_from(f">{n}I", view, pos)
        pos += 4 * n
        offsets = struct.unpack_from(f">{n}d", view, pos)
        pos += 8 * n
    except struct.error as exc:
        raise CorruptEntry(f"truncated entry: {exc}") from None
    if pos + sum(lengths) != len(data) or len(headers) != n_headers:
        raise CorruptEntry("entry length does not match its contents")
    chunks = []
    for length in lengths:
        chunks.append(bytes(view[pos : pos + length]))
        pos += length
    return CacheEntry(status, tuple(headers), tuple(chunks), tuple(offsets), stored_at, ttl, prompt, completion)


# --- recording an answer as it passes --------------------------------------------------------------


class Recording:
    """The chunks of one answer as they pass, numbered from 0, with their offsets from the head.

    ``keeping`` stays true while every chunk is held and the total is within ``max_bytes``: then
    :meth:`entry` can produce the whole answer. Past ``max_bytes`` it turns false for good and only
    the last ``window_bytes`` (at least the newest chunk) stay, for followers still reading.
    """

    __slots__ = (
        "base",
        "chunks",
        "headers",
        "held",
        "keeping",
        "max_bytes",
        "offsets",
        "size",
        "started",
        "status",
        "window_bytes",
    )  # fmt: skip

    def __init__(self, status: int, headers: tuple[Header, ...], *, started: float, max_bytes: int, window_bytes: int):
        self.status, self.headers, self.started = status, headers, started
        self.max_bytes, self.window_bytes = max_bytes, window_bytes
        self.chunks: deque[bytes] = deque()
        self.offsets: deque[float] = deque()
        self.base = 0  # the number of the first chunk still held
        self.size = 0  # body bytes seen
        self.held = 0  # body bytes held
        self.keeping = True

    @property
    def end(self) -> int:
        """The number the next chunk will get."""
        return self.base + len(self.chunks)

    def add(self, chunk: bytes, now: float) -> None:
        self.chunks.append(chunk)
        self.offsets.append(now - self.started)
        self.size += len(chunk)
        self.held += len(chunk)
        if self.keeping and self.size > self.max_bytes:
            self.keeping = False
        if not self.keeping:
            while self.held > self.window_bytes and len(self.chunks) > 1:
                self.held -= len(self.chunks.popleft())
                self.offsets.popleft()
                self.base += 1

    def get(self, number: int) -> bytes | None:
        """Chunk ``number``; None once it has been dropped (its reader fell behind the window)."""
        if number < self.base:
            return None
        return self.chunks[number - self.base]

    def entry(self, *, stored_at: float, ttl: float, prompt_tokens: int = 0, completion_tokens: int = 0) -> CacheEntry:
        if not self.keeping:
            raise ValueError("the answer was over max_bytes: it is not kept")
        return CacheEntry(
            self.status, self.headers, tuple(self.chunks), tuple(round(o, 4) for o in self.offsets), stored_at, ttl,
            prompt_tokens, completion_tokens,
        )  # fmt: skip


# --- a recording shared through a stream (collapsing across processes) ------------------------------
#
# One stream entry is one record: the head, a batch of body chunks, or the end. The first byte says
# which; the leader appends them in order and a reader on any process rebuilds the same answer.

HEAD, DATA, END = b"h", b"d", b"e"
_RECORD_HEAD = struct.Struct(">HB")  # status, shared
_RECORD_END = struct.Struct(">BQQ")  # outcome, prompt, completion
_LENGTH = struct.Struct(">I")

# How a shared recording ended (END records).
COMPLETE, FAILED, NOT_STARTED = 0, 1, 2  # the whole answer / cut mid-answer / failed before the head


@dataclass(frozen=True, slots=True)
class Head:
    status: int
    headers: tuple[Header, ...]
    shared: bool  # followers may have it (else each makes its own call)


@dataclass(frozen=True, slots=True)
class End:
    outcome: int  # COMPLETE, FAILED or NOT_STARTED
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reason: str = ""


def encode_head(head: Head) -> bytes:
    parts = [HEAD, _RECORD_HEAD.pack(head.status, int(head.shared)), struct.pack(">I", len(head.headers))]
    for name, value in head.headers:
        parts += [_HEADER.pack(len(name), len(value)), name, value]
    return b"".join(parts)


def encode_data(chunks: list[bytes] | tuple[bytes, ...]) -> bytes:
    parts = [DATA]
    for chunk in chunks:
        parts += [_LENGTH.pack(len(chunk)), chunk]
    return b"".join(parts)


def encode_end(end: End) -> bytes:
    return END + _RECORD_END.pack(end.outcome, end.prompt_tokens, end.completion_tokens) + end.reason.encode()


def decode_record(data: bytes) -> Head | tuple[bytes, ...] | End:
    """A record :func:`encode_head`, :func:`encode_data` or :func:`encode_end` wrote (a batch of chunks
    comes back as a tuple); :class:`CorruptEntry` for anything else."""
    view = memoryview(data)
    kind = bytes(view[:1])
    try:
        if kind == HEAD:
            status, shared = _RECORD_HEAD.unpack_from(view, 1)
            pos = 1 + _RECORD_HEAD.size
            (count,) = struct.unpack_from(">I", view, pos)
            pos += 4
            headers = []
            for _ in range(count):
                name_len, value_len = _HEADER.unpack_from(view, pos)
                pos += _HEADER.size
                if pos + name_len + value_len > len(data):
                    raise CorruptEntry("truncated head record")
                headers.append(
                    (bytes(view[pos : pos + name_len]), bytes(view[pos + name_len : pos + name_len + value_len]))
                )
                pos += name_len + value_len
            if pos != len(data):
                raise CorruptEntry("head record length does not match its contents")
            return Head(status, tuple(headers), bool(shared))
        if kind == DATA:
            pos, chunks = 1, []
            while pos < len(data):
                (length,) = _LENGTH.unpack_from(view, pos)
                pos += _LENGTH.size
                if pos + length > len(data):
                    raise CorruptEntry("truncated data record")
                chunks.append(bytes(view[pos : pos + length]))
                pos += length
            return tuple(chunks)
        if kind == END:
            outcome, prompt, completion = _RECORD_END.unpack_from(view, 1)
            return End(outcome, prompt, completion, bytes(view[1 + _RECORD_END.size :]).decode("utf-8", "replace"))
    except struct.error as exc:
        raise CorruptEntry(f"truncated record: {exc}") from None
    raise CorruptEntry("not a recording record")
