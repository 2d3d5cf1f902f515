"""proxy.cache.entry: entries, their bytes for Redis, and the recording followers read from. Pure."""

from __future__ import annotations

import pytest

from proxy.cache.entry import (
    COMPLETE,
    FAILED,
    NOT_STARTED,
    CacheEntry,
    CorruptEntry,
    End,
    Head,
    Recording,
    decode_entry,
    decode_record,
    encode_data,
    encode_end,
    encode_entry,
    encode_head,
)

SSE = ((b"content-type", b"text/event-stream"), (b"x-upstream", b"mock"))
CHUNKS = (b'data: {"a":1}\n\n', b'data: {"b":2}\n\n', b"", b"data: [DONE]\n\n")


def entry(**changes: object) -> CacheEntry:
    fields: dict = {
        "status": 200,
        "headers": SSE,
        "chunks": CHUNKS,
        "offsets": (0.0, 0.25, 0.25, 1.5),
        "stored_at": 100.0,
        "ttl": 60.0,
    }
    return CacheEntry(**{**fields, **changes})


def test_entry_freshness_and_age() -> None:
    e = entry()
    assert e.expires_at == 160.0
    assert e.fresh(159.999) and not e.fresh(160.0)
    assert e.age(130.0) == 30.0 and e.age(90.0) == 0.0  # a clock behind the store's: never negative
    assert e.remaining(130.0) == 30.0
    assert e.body == b"".join(CHUNKS) and e.body_bytes == len(e.body)
    assert e.size > e.body_bytes


def test_entry_needs_one_offset_per_chunk() -> None:
    with pytest.raises(ValueError):
        entry(offsets=(0.0,))


ROUND_TRIP = [
    entry(),
    entry(chunks=(), offsets=(), headers=()),
    entry(chunks=(b"\x00\xff" * 70000,), offsets=(0.0,), prompt_tokens=12, completion_tokens=2**40),
    entry(headers=((b"x-weird", "é".encode()), (b"set", b"")), stored_at=1.7e9 + 0.123456),
]


@pytest.mark.parametrize("original", ROUND_TRIP)
def test_encode_decode_round_trip(original: CacheEntry) -> None:
    data = encode_entry(original)
    assert decode_entry(data) == original
    assert decode_entry(bytearray(data)) == original


def test_encoding_golden_prefix() -> None:
    """The first bytes are a version marker: another version's entries read as corrupt, not garbage."""
    assert encode_entry(entry()).startswith(b"PWC1\x00\xc8")


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d[:-1],  # truncated body
        lambda d: d + b"x",  # trailing bytes
        lambda d: d[:20],  # truncated head
        lambda d: b"XXXX" + d[4:],  # another format
        lambda d: b"",
        lambda d: d[:6] + b"\xff\xff\xff\xff" + d[10:],  # a header count far beyond the data
    ],
)
def test_decode_refuses_damaged_bytes(damage) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(CorruptEntry):
        decode_entry(damage(encode_entry(entry())))


def test_recording_keeps_a_whole_answer() -> None:
    rec = Recording(200, SSE, started=10.0, max_bytes=100, window_bytes=10)
    for i, chunk in enumerate(CHUNKS):
        rec.add(chunk, 10.0 + i * 0.5)
    assert rec.keeping and rec.end == 4 and rec.base == 0
    assert [rec.get(i) for i in range(4)] == list(CHUNKS)
    stored = rec.entry(stored_at=50.0, ttl=5.0, prompt_tokens=3, completion_tokens=4)
    assert stored.chunks == CHUNKS and stored.offsets == (0.0, 0.5, 1.0, 1.5)
    assert (stored.stored_at, stored.ttl, stored.prompt_tokens, stored.completion_tokens) == (50.0, 5.0, 3, 4)


def test_recording_past_max_bytes_keeps_only_a_window() -> None:
    rec = Recording(200, SSE, started=0.0, max_bytes=25, window_bytes=20)
    rec.add(b"a" * 10, 0.0)
    rec.add(b"b" * 10, 0.0)
    assert rec.keeping and rec.held == 20
    rec.add(b"c" * 10, 0.0)  # 30 > 25: no longer a storable whole
    assert not rec.keeping
    assert rec.base == 1 and rec.get(0) is None and rec.get(1) == b"b" * 10 and rec.get(2) == b"c" * 10
    rec.add(b"d" * 50, 0.0)  # bigger than the window alone: the newest chunk is always held
    assert rec.base == 3 and rec.get(3) == b"d" * 50 and rec.held == 50
    with pytest.raises(ValueError):
        rec.entry(stored_at=0.0, ttl=1.0)


def test_recording_exactly_max_bytes_is_kept() -> None:
    rec = Recording(200, SSE, started=0.0, max_bytes=20, window_bytes=1)
    rec.add(b"x" * 20, 0.0)
    assert rec.keeping and rec.entry(stored_at=0.0, ttl=1.0).body == b"x" * 20


# --- records of a recording shared through a stream --------------------------------------------------


@pytest.mark.parametrize(
    "record",
    [
        Head(200, ((b"content-type", b"text/event-stream"), (b"x-empty", b"")), True),
        Head(429, (), False),
        End(COMPLETE, 11, 8),
        End(FAILED, reason="over max_entry_bytes"),
        End(NOT_STARTED, reason="not shared"),
    ],
)
def test_head_and_end_records_round_trip(record: Head | End) -> None:
    encoded = encode_head(record) if isinstance(record, Head) else encode_end(record)
    assert decode_record(encoded) == record


def test_data_records_keep_chunk_boundaries() -> None:
    chunks = (b"data: a\n\n", b"", b"x" * 70000)
    assert decode_record(encode_data(chunks)) == chunks


@pytest.mark.parametrize(
    "data",
    [b"", b"z", b"h\x00", encode_head(Head(200, ((b"a", b"b"),), True))[:-1], encode_data((b"abc",))[:-1], b"e\x00"],
)
def test_a_broken_record_is_corrupt_never_a_crash(data: bytes) -> None:
    with pytest.raises(CorruptEntry):
        decode_record(data)
