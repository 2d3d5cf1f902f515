"""The one module that owns upstream connections: one pooled client for every upstream request.

It is httpx2, the maintained drop-in fork: httpx 0.28's pool (httpcore 1.0) rescans every
pooled connection several times per request (encode/httpx#3215), which measured as 42 % of
Parkway's CPU with 64 clients and made 512 concurrent upstream requests reach only 23 % of
the throughput of 16; httpx2's pool halves the cost per request (docs/performance.md).

Its transport keeps one httpcore connection pool per address policy, each connecting through
the SSRF guard (:class:`~proxy.ssrf.GuardedBackend`, given as the pool's ``network_backend``).
Bodies are streamed both ways (``aiter_raw``, so encodings and SSE framing pass through
untouched). Every httpx exception is translated here into :mod:`proxy.errors`; timeouts
are Trio cancel scopes around the one await they limit, so each is reported precisely.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

import h11
import httpcore2 as httpcore
import httpx2 as httpx  # the maintained drop-in fork (see above)
import trio

from .config import ServerConfig
from .errors import UpstreamConnectError, UpstreamError, UpstreamProtocolError, UpstreamTimeout
from .forwarding import Headers
from .ssrf import DEFAULT_POLICY, AddressPolicy, GuardedBackend, Resolver, check_scheme, resolve

# The policy of one request: ``httpx.Request(..., extensions={POLICY_EXTENSION: policy})``.
POLICY_EXTENSION = "parkway.address_policy"


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    method: str
    url: str  # normalised, without fragment
    headers: Headers
    body: bytes | AsyncIterator[bytes] | None = None
    address_policy: AddressPolicy | None = None  # which addresses it may connect to (SSRF guard)


class UpstreamResponse:
    """Status and headers of an upstream answer, and its body as raw chunks."""

    def __init__(self, response: httpx.Response, host: str, idle_timeout: float):
        self._response = response
        self._host = host
        self.idle_timeout = idle_timeout  # the longest gap between body chunks (upstream_idle_timeout)
        self.status = response.status_code
        self.headers: Headers = list(response.headers.raw)
        self.content_type: str = response.headers.get("content-type", "")

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """Raw body chunks as they arrive.

        The caller bounds the gaps, with one cancel scope for the whole body (a scope per read
        was a visible share of relaying an event), and raises :meth:`idle_timeout_error` when
        a gap exceeds :attr:`idle_timeout`.
        """
        iterator = self._response.aiter_raw().__aiter__()
        while True:
            try:
                chunk = await iterator.__anext__()
            except StopAsyncIteration:
                return
            except httpx.HTTPError as exc:
                raise _translate(exc, self._host) from None
            yield chunk

    def idle_timeout_error(self) -> UpstreamTimeout:
        return UpstreamTimeout(f"{self._host} sent nothing for {self.idle_timeout:g} s in the middle of the response")


def _translate(exc: httpx.HTTPError, host: str) -> UpstreamError:
    """One httpx exception → one Parkway upstream error; messages name the host, never headers."""
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectTimeout):
        return UpstreamTimeout(f"connecting to {host} timed out")
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(f"{host} timed out: {reason}")
    if isinstance(exc, httpx.ConnectError):
        return UpstreamConnectError(f"cannot connect to {host}: {reason}")
    if isinstance(exc, httpx.RemoteProtocolError):
        return UpstreamProtocolError(f"{host} broke the HTTP protocol or closed the connection: {reason}")
    if isinstance(exc, httpx.NetworkError):
        return UpstreamProtocolError(f"connection to {host} lost: {reason}")
    return UpstreamError(f"request to {host} failed: {reason}")


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

    One pool per :class:`~proxy.ssrf.AddressPolicy` (a request's ``POLICY_EXTENSION``, else
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


class UpstreamClient:
    """A shared ``httpx.AsyncClient``: pooled keep-alive connections, TLS verified by default.

    Its transport is the SSRF guard: every connection is made to an address the request's
    :class:`~proxy.ssrf.AddressPolicy` allows, checked after DNS resolution.
    """

    def __init__(self, config: ServerConfig, *, verify: bool | ssl.SSLContext = True, max_keepalive: int = 512):
        self.config = config
        self._client = httpx.AsyncClient(
            # Connect is limited by httpx (it spans DNS, TCP and TLS); reads and writes by our
            # own cancel scopes, which tell first-byte and idle-gap timeouts apart.
            timeout=httpx.Timeout(connect=config.upstream_connect_timeout, read=None, write=None, pool=None),
            transport=GuardedTransport(
                verify=verify,
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=max_keepalive, keepalive_expiry=30),
                default=AddressPolicy(allow_private=config.allow_private_upstreams),
            ),
            follow_redirects=False,
            trust_env=False,  # no proxy or certificate settings from the environment
        )

    @asynccontextmanager
    async def open(self, req: UpstreamRequest) -> AsyncIterator[UpstreamResponse]:
        """Send ``req`` and yield the response once its head has arrived; the body streams after.

        Leaving the context (normally, by error or by cancellation) closes the response, which
        drops the upstream connection when the body was not finished: that stops generation.
        """
        extensions = {POLICY_EXTENSION: req.address_policy} if req.address_policy is not None else None
        request = httpx.Request(req.method, req.url, headers=req.headers, content=req.body, extensions=extensions)
        host = request.url.host + (f":{request.url.port}" if request.url.port else "")
        try:
            with trio.fail_after(self.config.upstream_first_byte_timeout):
                response = await self._client.send(request, stream=True)
        except trio.TooSlowError:
            raise UpstreamTimeout(
                f"{host} sent no response within {self.config.upstream_first_byte_timeout:g} s"
            ) from None
        except httpx.HTTPError as exc:
            raise _translate(exc, host) from None
        except h11.LocalProtocolError as exc:  # httpcore lets this one through unwrapped
            raise UpstreamError(f"request to {host} could not be sent: {exc}") from None
        try:
            yield UpstreamResponse(response, host, self.config.upstream_idle_timeout)
        finally:
            with trio.CancelScope(shield=True):
                await response.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()
