"""The proxied-exchange client and its pool, through Parkway on real sockets.

The class of pool poisoning (issue 10, item 1): an upstream's stray bytes must never become
another request's answer. A connection is kept only when its response ended cleanly with
nothing after it; an idle connection with anything to read is dropped when taken. Each case
sends the stray bytes as a complete ``200 POISONED`` answer, so a reused connection would show.
"""

from __future__ import annotations

import pytest
import trio

from support.http import read_until_eof, request_bytes
from support.logs import watch_logs
from support.parkway import RunningParkway
from support.scripted import ScriptedRequest, ScriptedUpstream, answer_with

HANG_LIMIT = 20.0
pytestmark = pytest.mark.usefixtures("relay_path", "http_parser")  # both drivers, both HTTP/1.1 implementations
POISON = b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nPOISONED"
FRESH = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\nfresh"
CLEAN = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok"


@pytest.fixture
async def scripted(nursery: trio.Nursery) -> ScriptedUpstream:
    return await nursery.start(ScriptedUpstream().serve)


async def fetch(parkway: RunningParkway, url: str, method: str = "GET") -> bytes:
    """One request on its own client connection; the raw response bytes."""
    with trio.fail_after(5):
        async with await trio.open_tcp_stream("127.0.0.1", parkway.port) as stream:
            await stream.send_all(request_bytes(method, url, headers=[("connection", "close")]))
            return await read_until_eof(stream)


async def late_junk(req: ScriptedRequest) -> None:
    """A clean answer, then stray bytes once Parkway has put the connection back in its pool."""
    await req.send(CLEAN)
    await trio.sleep(0.2)  # the stray bytes must arrive after the response: nothing to wait on upstream
    await req.send(POISON)


POISONING = {
    "204 with a body": (b"HTTP/1.1 204 No Content\r\ncontent-length: 45\r\n\r\n" + POISON, "GET", 204),
    "304 with a body": (b"HTTP/1.1 304 Not Modified\r\ncontent-length: 45\r\n\r\n" + POISON, "GET", 304),
    "HEAD answered with a body": (b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\n" + POISON, "HEAD", 200),
    "bytes after a Content-Length body": (CLEAN + POISON, "GET", 200),
    "bytes after the chunked terminator": (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n" + POISON, "GET", 200),
    "bytes after trailers": (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nx-t: 1\r\n\r\n" + POISON, "GET", 200),
    "pipelined junk": (CLEAN + b"garbage that is no response at all\r\n\r\n", "GET", 200),
}  # fmt: skip


@pytest.mark.parametrize("case", POISONING)
async def test_stray_bytes_never_answer_another_request(start_parkway, scripted, case):
    answer, method, status = POISONING[case]
    scripted.answers = [answer_with(answer), answer_with(FRESH)]
    parkway = await start_parkway()

    first = await fetch(parkway, parkway.sign(f"{scripted.base}/v1/first", method=method), method)
    second = await fetch(parkway, parkway.sign(f"{scripted.base}/v1/second"))

    assert first.startswith(b"HTTP/1.1 %d " % status)
    assert b"POISONED" not in first
    assert second.startswith(b"HTTP/1.1 200 ") and second.endswith(b"fresh")
    assert [r.connection for r in scripted.requests] == [1, 2]  # the first connection was dropped


async def test_stray_bytes_arriving_after_the_response_are_found_before_reuse(start_parkway, scripted):
    scripted.answers = [late_junk, answer_with(FRESH)]
    parkway = await start_parkway()

    first = await fetch(parkway, parkway.sign(f"{scripted.base}/v1/first"))
    await trio.sleep(0.4)  # let the late bytes reach Parkway's idle connection
    second = await fetch(parkway, parkway.sign(f"{scripted.base}/v1/second"))

    assert first.endswith(b"ok")
    assert second.endswith(b"fresh")
    assert [r.connection for r in scripted.requests] == [1, 2]


async def test_a_clean_answer_keeps_its_connection(start_parkway, scripted):
    chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    scripted.answers = [answer_with(CLEAN), answer_with(chunked), answer_with(FRESH)]
    parkway = await start_parkway()

    for path in ("a", "b", "c"):
        await fetch(parkway, parkway.sign(f"{scripted.base}/v1/{path}"))

    assert [r.connection for r in scripted.requests] == [1, 1, 1]


@pytest.mark.parametrize(
    "answer",
    [
        CLEAN.replace(b"content-length", b"connection: close\r\ncontent-length"),
        b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\n\r\nok",  # the body ends at the close
    ],
    ids=["connection-close", "http-1.0", "close-delimited"],
)
async def test_answers_that_end_the_connection_are_not_reused(start_parkway, scripted, answer):
    scripted.answers = [answer_with(answer, close=True), answer_with(FRESH)]
    parkway = await start_parkway()

    first = await fetch(parkway, parkway.sign(f"{scripted.base}/v1/a"))
    second = await fetch(parkway, parkway.sign(f"{scripted.base}/v1/b"))

    assert first.endswith((b"\r\n\r\nok", b"2\r\nok\r\n0\r\n\r\n"))  # chunked for us when it had no length
    assert second.endswith(b"fresh")
    assert [r.connection for r in scripted.requests] == [1, 2]


async def test_a_kept_connection_the_upstream_dropped_is_retried_on_a_new_one(start_parkway, scripted):
    async def hang_up(req: ScriptedRequest) -> None:
        req.close_after = True  # the kept-alive connection dies as the request reaches it

    scripted.answers = [answer_with(CLEAN), hang_up, answer_with(FRESH)]
    parkway = await start_parkway()

    await fetch(parkway, parkway.sign(f"{scripted.base}/v1/a"))
    second = await fetch(parkway, parkway.sign(f"{scripted.base}/v1/b"))

    assert second.endswith(b"fresh")
    assert [r.connection for r in scripted.requests] == [1, 1, 2]


# --- Content-Length and Transfer-Encoding together (issue 10, item 4) ----------------------------


async def test_length_and_chunked_together_are_framed_by_the_chunks(start_parkway, scripted):
    # RFC 9112 6.1: Transfer-Encoding wins, the Content-Length goes, the connection is not kept.
    both = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    scripted.answers = [answer_with(both), answer_with(FRESH)]
    parkway = await start_parkway()

    with watch_logs() as logs:
        first = await fetch(parkway, parkway.sign(f"{scripted.base}/v1/a"))
        second = await fetch(parkway, parkway.sign(f"{scripted.base}/v1/b"))
        entry = await logs.wait_for(event="request", upstream_path="/v1/a")

    head, _, body = first.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"content-length" not in head.lower()
    assert body == b"5\r\nhello\r\n0\r\n\r\n"
    assert entry["outcome"] == "ok"
    assert second.endswith(b"fresh")
    assert [r.connection for r in scripted.requests] == [1, 2]


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n", "transfer-encoding"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd", "content-length"),
        (b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n", "switch"),
        (b"NOT HTTP AT ALL\r\n\r\n", "malformed"),
    ],
)
async def test_heads_no_one_may_act_on_are_502(start_parkway, scripted, answer, why):
    scripted.answers = [answer_with(answer, close=True)]
    parkway = await start_parkway()

    with watch_logs() as logs:
        raw = await fetch(parkway, parkway.sign(f"{scripted.base}/v1/a"))
        entry = await logs.wait_for(event="request", outcome="upstream_error")

    assert raw.startswith(b"HTTP/1.1 502 ")
    assert why in entry["error"].lower()
