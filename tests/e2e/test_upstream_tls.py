"""TLS upstreams through Parkway on real sockets: session resumption, pooled TLS connections,
certificate checks that resumption never skips, and an upstream that closes mid-answer.

The test upstream (``support.scripted.TLSUpstream``) reports, per request, whether the TLS
handshake of its connection resumed a session and which port Parkway's side used, so a test
tells a resumed handshake from a full one and a pooled connection from a new one.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trio

from support.logs import watch_logs
from support.metrics import Scrape, parse_metrics
from support.parkway import RunningParkway
from support.scripted import Certificate, TLSUpstream, make_certificate
from support.upstream import SSE_HEADERS, Exchange

from .test_relay_engine import open_stream, read_to_close, receive_until

HANG_LIMIT = 20.0
pytestmark = pytest.mark.usefixtures("relay_path")  # the relay hands connections back: both drivers


@pytest.fixture
def certificate(tmp_path: Path) -> Certificate:
    return make_certificate(tmp_path)


def handshakes_metric(parkway: RunningParkway) -> dict[tuple[str, ...], float]:
    """``parkway_upstream_tls_handshakes_total`` as ``/metrics`` renders it, by ``resumed``."""
    scrape = Scrape(parse_metrics(parkway.parkway.metrics.render().decode()))
    return scrape.by("parkway_upstream_tls_handshakes_total", "resumed")


class Handshakes:
    """What the upstream saw of each request: (target path, peer port, session resumed)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, bool]] = []
        self.versions: set[str] = set()

    def record(self, ex: Exchange) -> None:
        self.seen.append((ex.request.path, ex.request.peer_port, ex.stream.session_reused))
        self.versions.add(ex.stream.version)

    def of(self, path: str) -> tuple[int, bool]:
        return next((port, resumed) for p, port, resumed in self.seen if p == path)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["TLS 1.3", "TLS 1.2"])
async def test_a_stream_opened_while_another_answers_resumes_its_session(start_parkway, nursery, certificate, version):
    """The session is kept from the first answer's head, not from its end: a ramp of long SSE
    streams to a new origin does one full handshake, not one per stream."""
    handshakes, release = Handshakes(), trio.Event()

    async def behaviour(ex: Exchange) -> None:
        handshakes.record(ex)
        if ex.request.path == "/v1/long":
            await ex.send_head(200, SSE_HEADERS)
            await ex.send_data(b"data: first\n\n")
            await release.wait()
            await ex.send_data(b"data: last\n\n")
            await ex.send_end()
        else:
            await ex.respond(200, [("content-type", "text/plain")], b"short")

    upstream = await nursery.start(TLSUpstream(certificate, behaviour, maximum_version=version).serve)
    parkway = await start_parkway(upstream_ca_file=str(certificate.cert))

    with trio.fail_after(HANG_LIMIT):
        async with await open_stream(parkway.port, parkway.sign(f"{upstream.base}/v1/long")) as long:
            got = await receive_until(long, b"data: first")
            async with await open_stream(parkway.port, parkway.sign(f"{upstream.base}/v1/short"), close=True) as short:
                assert (await read_to_close(short)).endswith(b"short")
            release.set()
            await receive_until(long, b"\r\n0\r\n\r\n", got)

    long_port, long_resumed = handshakes.of("/v1/long")
    short_port, short_resumed = handshakes.of("/v1/short")
    assert short_port != long_port  # a connection of its own: the first one was still answering
    assert (long_resumed, short_resumed) == (False, True)
    assert handshakes.versions == {"TLSv1.3" if version is ssl.TLSVersion.TLSv1_3 else "TLSv1.2"}
    assert handshakes_metric(parkway) == {("false",): 1, ("true",): 1}


async def test_a_finished_tls_answer_leaves_its_connection_for_the_next_request(start_parkway, nursery, certificate):
    handshakes = Handshakes()

    async def behaviour(ex: Exchange) -> None:
        handshakes.record(ex)
        await ex.respond(200, [("content-type", "text/plain")], ex.request.path.encode())

    upstream = await nursery.start(TLSUpstream(certificate, behaviour).serve)
    parkway = await start_parkway(upstream_ca_file=str(certificate.cert))

    with trio.fail_after(HANG_LIMIT):
        for path in ("/v1/one", "/v1/two", "/v1/three"):
            async with await open_stream(parkway.port, parkway.sign(f"{upstream.base}{path}"), close=True) as stream:
                assert (await read_to_close(stream)).endswith(path.encode())

    assert upstream.connections == 1  # one handshake for all three
    assert len({port for _, port, _ in handshakes.seen}) == 1
    assert handshakes_metric(parkway) == {("false",): 1, ("true",): 0}


async def test_a_tls_upstream_that_closes_mid_answer_cuts_the_stream(start_parkway, nursery, certificate):
    """A TCP close without close_notify in the middle of the body: the client's stream is cut
    (no terminator), the log says so, and the broken connection is not pooled."""
    handshakes = Handshakes()

    async def behaviour(ex: Exchange) -> None:
        handshakes.record(ex)
        if ex.request.path == "/v1/crash":
            await ex.send_head(200, SSE_HEADERS)
            await ex.send_data(b"data: before the crash\n\n")
            await ex.close()
        else:
            await ex.respond(200, [("content-type", "text/plain")], b"fresh")

    upstream = await nursery.start(TLSUpstream(certificate, behaviour).serve)
    parkway = await start_parkway(upstream_ca_file=str(certificate.cert))

    with watch_logs() as logs, trio.fail_after(HANG_LIMIT):
        async with await open_stream(parkway.port, parkway.sign(f"{upstream.base}/v1/crash")) as stream:
            raw = await read_to_close(stream)
        entry = await logs.wait_for(event="request", outcome="upstream_error")
        async with await open_stream(parkway.port, parkway.sign(f"{upstream.base}/v1/next"), close=True) as stream:
            after = await read_to_close(stream)

    assert b"data: before the crash" in raw
    assert not raw.endswith(b"\r\n0\r\n\r\n")  # cut, not ended
    assert entry["status"] == 200
    assert after.startswith(b"HTTP/1.1 200 ") and after.endswith(b"fresh")
    assert handshakes.of("/v1/next")[0] != handshakes.of("/v1/crash")[0]  # a new connection
    assert handshakes.of("/v1/next")[1] is True  # which resumed the crashed one's session


async def test_a_kept_session_never_skips_the_hostname_check(start_parkway, nursery, certificate):
    """Sessions are kept per origin: the certificate is for 127.0.0.1, so ``localhost`` (the
    same server, another name) is refused even after 127.0.0.1's session was kept."""
    handshakes = Handshakes()

    async def behaviour(ex: Exchange) -> None:
        handshakes.record(ex)
        await ex.respond(200, [("content-type", "text/plain")], b"ok")

    upstream = await nursery.start(TLSUpstream(certificate, behaviour).serve)
    parkway = await start_parkway(upstream_ca_file=str(certificate.cert))

    with watch_logs() as logs, trio.fail_after(HANG_LIMIT):
        async with await open_stream(parkway.port, parkway.sign(f"{upstream.base}/v1/ip"), close=True) as s:
            assert (await read_to_close(s)).endswith(b"ok")  # its session is kept, to be (mis)used
        async with await open_stream(
            parkway.port, parkway.sign(f"https://localhost:{upstream.port}/v1/name"), close=True
        ) as stream:
            refused = await read_to_close(stream)
        entry = await logs.wait_for(event="request", outcome="upstream_error")

    assert refused.startswith(b"HTTP/1.1 502 ")
    assert "certificate" in entry["error"].lower()
    assert [path for path, _, _ in handshakes.seen] == ["/v1/ip"]


async def test_a_resumed_handshake_still_names_the_server(start_parkway, nursery, tmp_path: Path):
    """SNI on every handshake, resumed or not, and a certificate for a DNS name checked against it."""
    certificate = make_certificate(tmp_path, names="DNS:localhost")
    handshakes, release = Handshakes(), trio.Event()

    async def behaviour(ex: Exchange) -> None:
        handshakes.record(ex)
        await ex.send_head(200, SSE_HEADERS)
        await ex.send_data(b"data: first\n\n")
        if ex.request.path == "/v1/held":
            await release.wait()
        await ex.send_end()

    upstream = await nursery.start(TLSUpstream(certificate, behaviour).serve)
    parkway = await start_parkway(upstream_ca_file=str(certificate.cert))
    base = f"https://localhost:{upstream.port}"

    with trio.fail_after(HANG_LIMIT):
        async with await open_stream(parkway.port, parkway.sign(f"{base}/v1/held")) as held:
            got = await receive_until(held, b"data: first")
            async with await open_stream(parkway.port, parkway.sign(f"{base}/v1/next"), close=True) as stream:
                assert (await read_to_close(stream)).endswith(b"\r\n0\r\n\r\n")
            release.set()
            await receive_until(held, b"\r\n0\r\n\r\n", got)

    assert [resumed for _, _, resumed in handshakes.seen] == [False, True]
    assert upstream.server_names == ["localhost", "localhost"]
