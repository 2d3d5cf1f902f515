"""Kept TLS sessions (proxy.upstream.tlssession): resumed without the stdlib's DER copy, with the
certificate and host-name checks of the context, one private copy per connection.

Client and server are real ``ssl`` objects of this process talking through memory BIOs (the
handshake bytes are handed across directly), with a throwaway certificate for 127.0.0.1.
"""

from __future__ import annotations

import gc
import ssl
from pathlib import Path
from typing import Any

import pytest

from proxy.upstream import tlssession
from proxy.upstream.tlssession import KeptSession, keep, wrap
from support.scripted import Certificate, make_certificate


class SpyContext(ssl.SSLContext):
    """A client context that records the ``session`` each ``wrap_bio`` was given."""

    sessions: list[Any]

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:  # type: ignore[override]
        self.sessions.append(kwargs.get("session"))
        return super().wrap_bio(*args, **kwargs)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    return make_certificate(Path(tmp_path_factory.mktemp("tlssession")))


def client_context(certificate: Certificate) -> SpyContext:
    context = SpyContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    context.load_verify_locations(certificate.cert)
    context.sessions = []
    return context


def connect(
    client: ssl.SSLContext, server: ssl.SSLContext, kept: KeptSession | None, name: str = "127.0.0.1"
) -> ssl.SSLObject:
    """A handshaken client (through :func:`wrap`), after the server's first data record (the
    TLS 1.3 tickets come before it); the server's SSLObject is dropped without a shutdown."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = wrap(client, c_in, c_out, name, kept)
    peer = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        done = False
        try:
            tls.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            pass
        s_in.write(c_out.read())
        try:
            peer.do_handshake()
        except ssl.SSLWantReadError:
            pass
        c_in.write(s_out.read())
        if done:
            break
    peer.write(b"x")
    c_in.write(s_out.read())
    assert tls.read(10) == b"x"
    return tls


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["TLS 1.3", "TLS 1.2"])
def test_a_kept_session_resumes_every_new_connection_without_the_stdlib_copy(certificate, version):
    """Each connection gets its own copy of the kept session: connections that end without a TLS
    shutdown (as Parkway closes them) would otherwise mark a shared one "not resumable"."""
    server = certificate.server_context()
    server.maximum_version = version
    client = client_context(certificate)
    first = connect(client, server, None)
    kept = keep(first)
    assert kept is not None and kept.fast  # CPython with OpenSSL 1.1.1+: the fast path is there
    del first
    resumed = []
    for _ in range(5):
        tls = connect(client, server, kept)
        resumed.append(tls.session_reused)
        del tls  # freed without a shutdown
        gc.collect()
    assert resumed == [True] * 5
    assert client.sessions == [None] * 6  # never the stdlib's session argument (its DER copy)


def test_a_resumed_connection_still_checks_the_host_name(certificate):
    """The context's checks stay on: a name the certificate does not carry is refused on a full
    handshake, and a kept session is only ever offered where it was kept (per origin, by the client)."""
    server, client = certificate.server_context(), client_context(certificate)
    with pytest.raises(ssl.SSLCertVerificationError):
        connect(client, server, None, name="other.example")


def test_another_contexts_session_is_not_offered(certificate):
    server = certificate.server_context()
    kept = keep(connect(client_context(certificate), server, None))
    tls = connect(client_context(certificate), server, kept)
    assert not tls.session_reused


def test_without_the_fast_path_the_stdlib_resumes(certificate, monkeypatch):
    monkeypatch.setattr(tlssession, "_LIB", None)
    server, client = certificate.server_context(), client_context(certificate)
    kept = keep(connect(client, server, None))
    assert kept is not None and not kept.fast and kept.session is not None
    assert connect(client, server, kept).session_reused
    assert client.sessions == [None, kept.session]


def test_a_layout_that_does_not_hold_falls_back_to_the_stdlib(certificate, monkeypatch):
    """The pointers are only used when each object's context field is the caller's context."""
    server, client = certificate.server_context(), client_context(certificate)
    first = connect(client, server, None)
    monkeypatch.setattr(tlssession, "_HEAD", tlssession._HEAD + tlssession._WORD)  # every offset one word off
    kept = keep(first)
    assert kept is not None and not kept.fast
    assert connect(client, server, kept).session_reused


def test_the_operator_can_choose_the_stdlib_path():
    assert tlssession._load({"PARKWAY_TLS_SESSIONS": "stdlib"}) is None
    assert (tlssession._load({}) is None) == (tlssession._LIB is None)  # otherwise as found at import
