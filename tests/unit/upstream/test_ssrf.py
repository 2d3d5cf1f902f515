"""proxy.upstream.ssrf: address classification, the check, and the guard where sockets are opened.

Pure tables first; then the backend with a scripted resolver and a spy in place of the
network (DNS rebinding, mixed answers, timeouts); then real loopback connections through
httpx with an upstream that counts every connection it accepts.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import httpcore2 as httpcore  # httpx2's pool; see upstream.py
import httpx2 as httpx  # the maintained drop-in fork; see upstream.py
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import Forbidden
from proxy.upstream.outbound import POLICY_EXTENSION, GuardedTransport
from proxy.upstream.ssrf import (
    AddressKind,
    AddressPolicy,
    GuardedBackend,
    check_address,
    classify,
    explicit_addresses,
    policy_for,
)
from support.loopback import LoopbackServer, receive_head

K = AddressKind
CLASSES = [
    ("8.8.8.8", K.PUBLIC),
    ("1.1.1.1", K.PUBLIC),
    ("2606:4700:4700::1111", K.PUBLIC),
    ("127.0.0.1", K.LOOPBACK),
    ("127.255.255.254", K.LOOPBACK),
    ("::1", K.LOOPBACK),
    ("10.1.2.3", K.PRIVATE),
    ("172.16.0.1", K.PRIVATE),
    ("172.31.255.255", K.PRIVATE),
    ("172.32.0.1", K.PUBLIC),
    ("192.168.1.1", K.PRIVATE),
    ("100.64.0.1", K.PRIVATE),  # carrier-grade NAT
    ("fd12:3456::1", K.PRIVATE),
    ("169.254.1.1", K.LINK_LOCAL),
    ("fe80::1", K.LINK_LOCAL),
    ("fe80::1%1", K.LINK_LOCAL),
    ("169.254.169.254", K.METADATA),
    ("169.254.170.2", K.METADATA),
    ("fd00:ec2::254", K.METADATA),
    ("100.100.100.200", K.METADATA),
    ("168.63.129.16", K.METADATA),
    ("0.0.0.0", K.UNSPECIFIED),
    ("0.1.2.3", K.UNSPECIFIED),
    ("::", K.UNSPECIFIED),
    ("224.0.0.1", K.MULTICAST),
    ("ff02::1", K.MULTICAST),
    ("255.255.255.255", K.RESERVED),
    ("240.0.0.1", K.RESERVED),
    ("192.0.2.10", K.RESERVED),
    ("198.18.0.1", K.RESERVED),
    ("2001:db8::1", K.RESERVED),
    # IPv6 spellings of IPv4 addresses are judged by the IPv4 address.
    ("::ffff:127.0.0.1", K.LOOPBACK),
    ("::ffff:169.254.169.254", K.METADATA),
    ("::ffff:10.0.0.1", K.PRIVATE),
    ("::ffff:8.8.8.8", K.PUBLIC),
    ("64:ff9b::a9fe:a9fe", K.METADATA),  # NAT64 of 169.254.169.254
    ("64:ff9b::7f00:1", K.LOOPBACK),
    ("2002:7f00:1::1", K.LOOPBACK),  # 6to4 of 127.0.0.1
    ("2002:0808:0808::1", K.PUBLIC),
    ("::7f00:1", K.LOOPBACK),  # IPv4-compatible
    ("[::1]", K.LOOPBACK),
]


@pytest.mark.parametrize("ip, kind", CLASSES)
def test_classify(ip: str, kind: AddressKind) -> None:
    assert classify(ip) is kind


# (ip, allow_private, explicitly allowed, allowed?)
CHECKS = [
    ("8.8.8.8", False, (), True),
    ("127.0.0.1", False, (), False),
    ("127.0.0.1", True, (), True),
    ("10.0.0.5", False, ("10.0.0.5",), True),
    ("10.0.0.6", False, ("10.0.0.5",), False),
    ("10.0.0.6", False, ("10.0.0.0/24",), True),
    ("::ffff:127.0.0.1", False, ("127.0.0.1",), True),
    ("fe80::1", True, (), True),
    ("169.254.169.254", True, (), False),  # metadata: the flag is not enough
    ("169.254.169.254", True, ("169.254.0.0/16",), False),  # nor a range that contains it
    ("169.254.169.254", False, ("169.254.169.254",), True),  # only the address itself
    ("169.254.169.254", False, ("169.254.169.254/32",), True),
    ("::ffff:169.254.169.254", False, ("169.254.169.254",), True),
    ("fd00:ec2::254", True, (), False),
    ("0.0.0.0", True, (), False),  # unspecified, multicast, reserved: only when listed
    ("0.0.0.0", False, ("0.0.0.0",), True),
    ("224.0.0.1", True, (), False),
    ("240.0.0.1", True, (), False),
    ("192.0.2.1", False, ("192.0.2.0/24",), True),
]


@pytest.mark.parametrize("ip, allow_private, listed, ok", CHECKS)
def test_check_address(ip: str, allow_private: bool, listed: tuple[str, ...], ok: bool) -> None:
    policy = AddressPolicy(allow_private, frozenset(listed))
    if ok:
        check_address(ip, allow_private=allow_private, explicitly_allowed=listed)
        policy.check(ip)
    else:
        with pytest.raises(Forbidden) as info:
            check_address(ip, allow_private=allow_private, explicitly_allowed=listed)
        assert (info.value.status, info.value.code) == (403, "upstream_address_refused")
        with pytest.raises(Forbidden):
            policy.check(ip)


def _verdict(check: object, *args: object, **kwargs: object) -> str | None:
    try:
        check(*args, **kwargs)  # type: ignore[operator]
    except Forbidden as exc:
        return exc.message
    return None


# Addresses near every edge of the policy: the table above, their neighbours and spellings, any.
_EDGES = [ip for ip, _ in CLASSES] + ["127.0.0.2", "10.0.0.5", "10.0.0.6", "169.254.169.253", "::ffff:10.0.0.5"]
_ADDRESSES = st.one_of(
    st.sampled_from(_EDGES),
    st.ip_addresses().map(str),
    st.ip_addresses(v=4).map(lambda ip: f"::ffff:{ip}"),
    st.ip_addresses(v=4).map(lambda ip: f"64:ff9b::{ip}"),
)
_LISTABLE = ["10.0.0.5", "10.0.0.0/8", "169.254.169.254", "169.254.0.0/16", "127.0.0.1", "::1", "0.0.0.0",
             "fd00:ec2::254", "192.0.2.0/24", "224.0.0.0/4", "2001:db8::/32"]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    allow_private=st.booleans(),
    listed=st.frozensets(st.sampled_from(_LISTABLE), max_size=4),
    calls=st.lists(st.tuples(_ADDRESSES, st.sampled_from([None, "api.example", "127.0.0.1"])), max_size=12),
)
def test_a_policy_remembering_its_verdicts_answers_as_the_uncached_check(
    allow_private: bool, listed: frozenset[str], calls: list[tuple[str, str | None]]
) -> None:
    # AddressPolicy.check remembers the addresses it allowed: each call (repeats too, in any
    # order, with any host) answers as check_address does from scratch, refusals word for word.
    policy = AddressPolicy(allow_private, listed)
    for ip, host in calls + calls[::-1]:
        expected = _verdict(check_address, ip, allow_private=allow_private, explicitly_allowed=listed, host=host)
        assert _verdict(policy.check, ip, host=host) == expected, (ip, host)


def test_remembered_verdicts_are_bounded() -> None:
    policy = AddressPolicy(allow_private=True)
    for n in range(3000):
        policy.check(f"10.{n >> 8}.{n & 255}.1")
    assert 0 < len(policy._allowed) <= 256
    with pytest.raises(Forbidden):
        policy.check("169.254.169.254")  # still refused after any number of allowed ones


@pytest.mark.parametrize(
    "ip, host, message",
    [
        ("127.0.0.1", "127.0.0.1", "upstream 127.0.0.1 is 127.0.0.1, a loopback address: refused "
         "(allow it with allow_private_upstreams = true or by listing the address in allowed_upstreams)"),
        # For a name, the address it resolved to stays in Parkway: the client learns only its kind.
        ("10.0.0.1", "llm.internal", "upstream llm.internal resolves to a private address: refused "
         "(allow it with allow_private_upstreams = true or by listing the address in allowed_upstreams)"),
        ("169.254.169.254", "metadata.google.internal", "upstream metadata.google.internal resolves to a "
         "cloud metadata address: refused (only listing this exact address in allowed_upstreams allows it)"),
        ("224.0.0.1", None, "the upstream is 224.0.0.1, a multicast address: refused "
         "(only listing the address in allowed_upstreams allows it)"),
    ],
)  # fmt: skip
def test_refusals_say_why(ip: str, host: str | None, message: str) -> None:
    with pytest.raises(Forbidden) as info:
        check_address(ip, allow_private=False, host=host)
    assert info.value.message == message


def test_explicit_addresses_are_the_ip_hosts_of_allowed_upstreams() -> None:
    prefixes = [
        "https://api.openai.com/v1/",
        "http://10.0.0.5:8000/",
        "http://[fd00::5]:8080/v1/",
        "http://169.254.169.254/latest/",
        "http://localhost:3000/",
    ]
    assert explicit_addresses(prefixes) == {"10.0.0.5", "fd00::5", "169.254.169.254"}
    policy = policy_for(allow_private=False, allowed_upstreams=prefixes)
    assert policy == AddressPolicy(False, frozenset({"10.0.0.5/32", "fd00::5/128", "169.254.169.254/32"}))
    assert hash(policy) == hash(AddressPolicy(False, frozenset({"169.254.169.254", "fd00::5", "10.0.0.5"})))


# --- the backend, with a scripted resolver and no network ----------------------------------------


class Spy(httpcore.AsyncNetworkBackend):
    """Records where it was asked to connect; never connects."""

    def __init__(self) -> None:
        self.connects: list[str] = []
        self.refuse: set[str] = set()

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        self.connects.append(host)
        if host in self.refuse:
            raise httpcore.ConnectError(f"{host} refused")
        return httpcore.AsyncMockStream([])

    async def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise AssertionError("not used")

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)


class ScriptedDNS:
    """Answers each lookup with the next scripted answer (a rebinding attacker's DNS)."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)
        self.lookups: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


async def test_rebinding_cannot_slip_between_check_and_connect() -> None:
    dns = ScriptedDNS(["93.184.216.34"], ["127.0.0.1"])
    spy = Spy()
    backend = GuardedBackend(AddressPolicy(), spy, dns)
    await backend.connect_tcp("rebind.example", 80)
    # One lookup per connection, and the socket goes to the address that was checked.
    assert dns.lookups == ["rebind.example"] and spy.connects == ["93.184.216.34"]
    with pytest.raises(Forbidden):
        await backend.connect_tcp("rebind.example", 80)
    assert spy.connects == ["93.184.216.34"]  # nothing more


async def test_a_mixed_answer_is_refused_not_filtered() -> None:
    spy = Spy()
    backend = GuardedBackend(AddressPolicy(), spy, ScriptedDNS(["93.184.216.34", "10.0.0.1"]))
    with pytest.raises(Forbidden):
        await backend.connect_tcp("mixed.example", 443)
    assert spy.connects == []


async def test_next_checked_address_is_tried_when_one_refuses_the_connection() -> None:
    spy = Spy()
    spy.refuse.add("2606:4700::1")
    backend = GuardedBackend(AddressPolicy(), spy, ScriptedDNS(["2606:4700::1", "104.16.0.1"]))
    await backend.connect_tcp("dual.example", 443)
    assert spy.connects == ["2606:4700::1", "104.16.0.1"]


async def test_ip_literals_are_not_resolved() -> None:
    spy, dns = Spy(), ScriptedDNS()
    backend = GuardedBackend(AddressPolicy(allow_private=True), spy, dns)
    await backend.connect_tcp("127.0.0.1", 80)
    await backend.connect_tcp("[::1]", 80)
    assert dns.lookups == [] and spy.connects == ["127.0.0.1", "::1"]


async def test_resolution_failures_are_connect_errors() -> None:
    spy = Spy()
    backend = GuardedBackend(AddressPolicy(), spy, ScriptedDNS(socket.gaierror(-2, "Name or service not known"), []))
    with pytest.raises(httpcore.ConnectError, match="cannot resolve nowhere.example: Name or service not known"):
        await backend.connect_tcp("nowhere.example", 80)
    with pytest.raises(httpcore.ConnectError, match="has no address"):
        await backend.connect_tcp("empty.example", 80)


async def test_resolution_is_bounded_by_the_connect_timeout(autojump_clock: trio.testing.MockClock) -> None:
    async def hang(host: str, port: int) -> list[str]:
        await trio.sleep_forever()
        raise AssertionError

    backend = GuardedBackend(AddressPolicy(), Spy(), hang)
    start = trio.current_time()
    with pytest.raises(httpcore.ConnectTimeout):
        await backend.connect_tcp("slow.example", 80, timeout=3.0)
    assert trio.current_time() - start == pytest.approx(3.0)


# --- real loopback connections through httpx ------------------------------------------------------


class CountingUpstream(LoopbackServer):
    """A tiny HTTP/1.1 upstream on 127.0.0.1 that counts every connection it accepts."""

    def __init__(self) -> None:
        self.connections = 0
        self.hosts: list[str] = []

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        async with stream:
            buffer = b""
            while True:
                received = await receive_head(stream, buffer)
                if received is None:
                    return
                head, buffer = received
                lines = head.split(b"\r\n")
                host = next(line.split(b":", 1)[1].strip() for line in lines if line.lower().startswith(b"host:"))
                self.hosts.append(host.decode())
                await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> CountingUpstream:
    return await nursery.start(CountingUpstream().serve)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=GuardedTransport(), trust_env=False, timeout=5.0) as client:
        yield client


async def test_loopback_upstream_is_refused_by_default(upstream: CountingUpstream, client: httpx.AsyncClient) -> None:
    with trio.fail_after(5), pytest.raises(Forbidden) as info:
        await client.get(f"http://127.0.0.1:{upstream.port}/v1/models")
    assert info.value.code == "upstream_address_refused"
    assert upstream.connections == 0


async def test_localhost_by_name_is_refused(upstream: CountingUpstream, client: httpx.AsyncClient) -> None:
    with trio.fail_after(5), pytest.raises(Forbidden) as info:
        await client.get(f"http://localhost:{upstream.port}/")
    assert "upstream localhost resolves to a loopback address" in info.value.message
    assert upstream.connections == 0


async def test_allow_private_reaches_loopback(upstream: CountingUpstream, client: httpx.AsyncClient) -> None:
    private = {POLICY_EXTENSION: AddressPolicy(allow_private=True)}
    with trio.fail_after(5):
        response = await client.get(f"http://127.0.0.1:{upstream.port}/", extensions=private)
        # every address it resolves to is checked
        by_name = await client.get(f"http://localhost:{upstream.port}/", extensions=private)
    assert (response.status_code, response.text, by_name.status_code) == (200, "ok", 200)
    assert upstream.hosts == [f"127.0.0.1:{upstream.port}", f"localhost:{upstream.port}"]


async def test_listed_address_is_allowed(upstream: CountingUpstream, client: httpx.AsyncClient) -> None:
    policy = policy_for(allow_private=False, allowed_upstreams=[f"http://127.0.0.1:{upstream.port}/"])
    with trio.fail_after(5):
        response = await client.get(f"http://127.0.0.1:{upstream.port}/", extensions={POLICY_EXTENSION: policy})
    assert response.status_code == 200
    with trio.fail_after(5), pytest.raises(Forbidden):  # that address only, not its neighbours
        await client.get(f"http://127.0.0.2:{upstream.port}/", extensions={POLICY_EXTENSION: policy})
    assert upstream.connections == 1


async def test_connections_are_not_shared_across_policies(
    upstream: CountingUpstream, client: httpx.AsyncClient
) -> None:
    """A kept-alive connection opened for a permissive credential is never lent to a strict one."""
    url = f"http://127.0.0.1:{upstream.port}/"
    with trio.fail_after(5):
        private = {POLICY_EXTENSION: AddressPolicy(allow_private=True)}
        assert (await client.get(url, extensions=private)).status_code == 200
        assert (await client.get(url, extensions=private)).status_code == 200  # reused
        assert upstream.connections == 1
        with pytest.raises(Forbidden):
            await client.get(url)
    assert upstream.connections == 1 and len(upstream.hosts) == 2


async def test_only_http_and_https() -> None:
    transport = GuardedTransport()
    with pytest.raises(Forbidden) as info:
        await transport.handle_async_request(httpx.Request("GET", "ftp://127.0.0.1/"))
    assert info.value.code == "upstream_scheme_refused"
    await transport.aclose()
