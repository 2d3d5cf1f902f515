"""An upstream named by host name (``localhost``, the system resolver) through a running Parkway:
resolved once per ``upstream_dns_ttl`` across fresh connections, again after a failed connect
(a WebSocket session's too),
and the address guard applied to the kept answer on every connect, credential by credential."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
import trio
from trio_websocket import ConnectionRejected

from proxy.config import Credential
from support.http import read_until_eof, request_bytes
from support.metrics import Scrape, parse_metrics
from support.parkway import INJECTED, SECRET, RunningParkway
from support.processes import free_port
from support.scripted import ScriptedUpstream, answer_with
from support.websocket import ws_client

pytestmark = pytest.mark.usefixtures("http_parser")
CLOSING = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"


@pytest.fixture
async def scripted(nursery: trio.Nursery) -> ScriptedUpstream:
    return await nursery.start(ScriptedUpstream().serve)


async def fetch(parkway: RunningParkway, url: str) -> bytes:
    """One request on its own client connection; the raw response bytes."""
    with trio.fail_after(5):
        async with await trio.open_tcp_stream("127.0.0.1", parkway.port) as stream:
            await stream.send_all(request_bytes("GET", url, headers=[("connection", "close")]))
            return await read_until_eof(stream)


def by_name(scripted: ScriptedUpstream, path: str) -> str:
    return scripted.base.replace("127.0.0.1", "localhost") + path


async def test_a_named_upstream_is_resolved_once_across_fresh_connections(start_parkway, scripted):
    scripted.answers = [answer_with(CLOSING, close=True) for _ in range(3)]
    parkway = await start_parkway()
    dns = parkway.parkway.upstream.dns
    for i in range(3):
        assert (await fetch(parkway, parkway.sign(by_name(scripted, f"/v1/{i}")))).endswith(b"\r\n\r\nok")
    assert [r.connection for r in scripted.requests] == [1, 2, 3]  # three connections, one look-up
    assert (dns.lookups, dns.hits) == (1, 2)
    scrape = Scrape(parse_metrics(parkway.parkway.metrics.render().decode()))
    assert scrape.by("parkway_upstream_dns_total", "kept") == {("false",): 1, ("true",): 2}


async def test_a_ttl_of_zero_resolves_for_every_connection(start_parkway, scripted):
    scripted.answers = [answer_with(CLOSING, close=True) for _ in range(2)]
    parkway = await start_parkway(upstream_dns_ttl=0)
    for i in range(2):
        assert (await fetch(parkway, parkway.sign(by_name(scripted, f"/v1/{i}")))).endswith(b"ok")
    assert (parkway.parkway.upstream.dns.lookups, parkway.parkway.upstream.dns.hits) == (2, 0)


async def test_a_name_whose_addresses_refused_the_connection_is_looked_up_again(start_parkway):
    parkway = await start_parkway()
    dead = f"http://localhost:{free_port()}/v1/x"  # nothing listens there
    for _ in range(2):
        assert (await fetch(parkway, parkway.sign(dead))).startswith(b"HTTP/1.1 502 ")
    assert (parkway.parkway.upstream.dns.lookups, parkway.parkway.upstream.dns.hits) == (2, 0)


async def test_the_kept_answer_is_checked_again_for_a_credential_that_may_not_reach_it(start_parkway, scripted):
    scripted.answers = [answer_with(CLOSING, close=True)]
    private_ok = Credential("app", (SECRET,), INJECTED, allow_private_upstreams=True)
    public_only = Credential("public", ("other-secret",), INJECTED)
    parkway = await start_parkway(credentials=(private_ok, public_only), allow_private_upstreams=False)
    url = by_name(scripted, "/v1/x")
    assert (await fetch(parkway, parkway.sign(url))).endswith(b"ok")
    refused = await fetch(parkway, parkway.sign(url, id="public", secret="other-secret"))
    assert refused.startswith(b"HTTP/1.1 403 ") and b"upstream_address_refused" in refused
    assert parkway.parkway.upstream.dns.hits == 1  # the answer was kept, and still refused
    assert len(scripted.requests) == 1


async def test_a_websocket_upstream_whose_addresses_refused_the_connection_is_looked_up_again(start_parkway):
    parkway = await start_parkway()
    dead = f"ws://localhost:{free_port()}/v1/realtime"  # nothing listens there
    for _ in range(2):
        signed = urlsplit(parkway.sign(dead))
        with trio.fail_after(5), pytest.raises(ConnectionRejected) as rejected:
            async with ws_client(
                parkway.port, f"{signed.path}?{signed.query}", headers=[(b"origin", b"https://app.example.com")]
            ):
                pass
        assert rejected.value.status_code == 502
    assert (parkway.parkway.upstream.dns.lookups, parkway.parkway.upstream.dns.hits) == (2, 0)
