"""Parkway's own outbound HTTP calls: an httpx2 client whose connections pass the SSRF guard.

Proxied requests do not come here: :mod:`proxy.upstream.client` sends them on its own h11
connections, which the relay moves bytes on directly. This is the HTTP client for what Parkway
itself calls (a webhook, a callback), with the same address policy at connect time: one
httpcore pool per :class:`~proxy.upstream.ssrf.AddressPolicy`, each connecting through
:class:`~proxy.upstream.ssrf.GuardedBackend`. Use :func:`outbound_client`.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from contextlib import contextmanager

import httpcore2 as httpcore
import httpx2 as httpx  # the maintained drop-in fork of httpx

from .ssrf import DEFAULT_POLICY, AddressPolicy, GuardedBackend, Resolver, check_scheme, resolve

# The policy of one request: ``httpx.Request(..., extensions={POLICY_EXTENSION: policy})``.
POLICY_EXTENSION = "parkway.address_policy"


# --- the transport: one guarded connection pool per address policy -------------------------------

DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0)  # httpx's

# httpcore exceptions as the httpx ones httpx's own transport raises, most specific first.
_HTTPX_EXCEPTIONS: tuple[tuple[type[Exception], type[httpx.HTTPError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
    (httpcore.ProxyError, httpx.ProxyError),
)


@contextmanager
def _as_httpx_errors() -> Iterator[None]:
    """httpcore's exceptions as httpx's (what httpx's transport does, so callers see one family)."""
    try:
        yield
    except Exception as exc:
        for core, mapped in _HTTPX_EXCEPTIONS:
            if isinstance(exc, core):
                raise mapped(str(exc)) from exc
        raise


class _ResponseStream(httpx.AsyncByteStream):
    """An httpcore response body as httpx reads it, with httpx's exceptions."""

    def __init__(self, stream: AsyncIterable[bytes]) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _as_httpx_errors():
            async for part in self._stream:
                yield part

    async def aclose(self) -> None:
        aclose = getattr(self._stream, "aclose", None)
        if aclose is not None:
            await aclose()


class GuardedTransport(httpx.AsyncBaseTransport):
    """An httpx transport over httpcore pools whose connections pass the SSRF guard.

    One pool per :class:`~proxy.upstream.ssrf.AddressPolicy` (a request's ``POLICY_EXTENSION``, else
    ``default``), so a kept-alive connection opened for a credential that may reach private
    addresses is never lent to one that may not. No proxies: the guard must see the
    upstream's own address.
    """

    def __init__(
        self,
        *,
        default: AddressPolicy = DEFAULT_POLICY,
        verify: bool | ssl.SSLContext = True,
        limits: httpx.Limits = DEFAULT_LIMITS,
        resolver: Resolver = resolve,
        inner_backend: httpcore.AsyncNetworkBackend | None = None,
    ):
        self._default = default
        # trust_env=False: no certificate settings from the environment.
        self._ssl_context = httpx.create_ssl_context(verify=verify, trust_env=False)
        self._limits = limits
        self._resolver = resolver
        self._inner_backend = inner_backend
        self._pools: dict[AddressPolicy, httpcore.AsyncConnectionPool] = {}

    def _pool(self, policy: AddressPolicy) -> httpcore.AsyncConnectionPool:
        pool = self._pools.get(policy)
        if pool is None:
            pool = self._pools[policy] = httpcore.AsyncConnectionPool(
                ssl_context=self._ssl_context,
                max_connections=self._limits.max_connections,
                max_keepalive_connections=self._limits.max_keepalive_connections,
                keepalive_expiry=self._limits.keepalive_expiry,
                network_backend=GuardedBackend(policy, self._inner_backend, self._resolver),
            )
        return pool

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        check_scheme(request.url.scheme)
        policy = request.extensions.get(POLICY_EXTENSION)
        pool = self._pool(policy if isinstance(policy, AddressPolicy) else self._default)
        assert isinstance(request.stream, httpx.AsyncByteStream)
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _as_httpx_errors():
            response = await pool.handle_async_request(core_request)
        assert isinstance(response.stream, AsyncIterable)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_ResponseStream(response.stream),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            await pool.aclose()


def outbound_client(
    *, default: AddressPolicy = DEFAULT_POLICY, verify: bool | ssl.SSLContext = True, timeout: float = 10.0
) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` for Parkway's own calls: guarded transport, no redirects, nothing
    from the environment (proxies, certificates)."""
    return httpx.AsyncClient(
        transport=GuardedTransport(default=default, verify=verify),
        timeout=timeout,
        follow_redirects=False,
        trust_env=False,
    )
