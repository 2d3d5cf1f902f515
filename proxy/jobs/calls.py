"""The HTTP calls of a job: its upstream request and its webhook deliveries (httpx2, Trio).

Both go through Parkway's own outbound client (:func:`proxy.upstream.outbound.outbound_client`), whose
connections pass the SSRF guard with the policy given per request: the upstream call with the
credential's (``allowed_upstreams``, ``allow_private_upstreams``), a delivery with the same
flags and ``allowed_callbacks`` listed. Every httpx exception becomes a
:class:`~proxy.errors.ParkwayError` here, where the library is called; timeouts are Trio
cancel scopes around the awaits they limit, as for proxied requests.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import httpx2 as httpx
import trio

from .. import forwarding
from ..config import Config, Credential
from ..errors import (
    Forbidden,
    ParkwayError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from ..forwarding import Headers
from ..upstream import ssrf
from ..upstream.outbound import POLICY_EXTENSION
from . import webhooks
from .model import AttemptOutcome, Job, JobResult

USER_AGENT = b"Parkway-Webhooks/1"
RESPONSE_READ_LIMIT = 65536  # of a receiver's answer, only this much is read (and ignored)
CALLBACK_RESOLVE_TIMEOUT = 5.0


def upstream_policy(credential: Credential, allow_private: bool) -> ssrf.AddressPolicy:
    return ssrf.policy_for(
        allow_private=allow_private or credential.allow_private_upstreams,
        allowed_upstreams=credential.allowed_upstreams,
    )


def callback_policy(credential: Credential, allow_private: bool) -> ssrf.AddressPolicy:
    """Where a credential's deliveries may connect: as its upstreams, with its callbacks listed."""
    return ssrf.policy_for(
        allow_private=allow_private or credential.allow_private_upstreams,
        allowed_upstreams=credential.allowed_callbacks,
    )


async def check_callback_address(url: str, policy: ssrf.AddressPolicy, resolver: ssrf.Resolver = ssrf.resolve) -> None:
    """Refuse at once a callback whose address the SSRF guard would refuse at delivery.

    Delivery checks again, after its own resolution (the one that counts); this only spares a
    signer a job whose result could never be delivered. A name that does not resolve now is let
    through: it may by the time the job finishes.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        with trio.move_on_after(CALLBACK_RESOLVE_TIMEOUT):
            addresses = [host] if _is_ip(host) else await resolver(host, port)
            for address in addresses:
                policy.check(address, host=host)
    except Forbidden as exc:
        raise Forbidden(exc.message.replace("upstream", "callback", 1), code="callback_address_refused") from None
    except (OSError, ValueError):
        return


def _is_ip(host: str) -> bool:
    try:
        ssrf.parse_ip(host)
    except ValueError:
        return False
    return True


def _translate(exc: httpx.HTTPError, host: str) -> UpstreamError:
    """One httpx exception → one Parkway upstream error; messages name the host, never headers."""
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(f"{host} timed out: {reason}")
    if isinstance(exc, httpx.ConnectError):
        return UpstreamConnectError(f"cannot connect to {host}: {reason}")
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.NetworkError)):
        return UpstreamProtocolError(f"{host} broke the connection or the protocol: {reason}")
    return UpstreamError(f"request to {host} failed: {reason}")


# Headers httpx adds to every request unless given: a job sends only what its client sent (as
# a proxied request does), so ``Accept-Encoding: gzip, deflate`` never turns a stored answer into gzip.
_CLIENT_DEFAULTS = ("accept", "accept-encoding", "user-agent")


def run_headers(job: Job, credential: Credential) -> Headers:
    """The stored request headers with the credential's injected ones added (they override)."""
    injected = {n.lower() for n, _ in credential.headers}
    out = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in job.request.headers if n.lower() not in injected]
    out += [(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in credential.headers]
    if job.request.body or job.request.method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
        out.append((b"content-length", str(len(job.request.body)).encode()))
    return out


async def fetch_answer(
    client: httpx.AsyncClient, job: Job, credential: Credential, config: Config, *, traceparent: str | None = None
) -> JobResult:
    """Make the job's upstream call and read the answer whole (raw bytes, as relayed).
    ``traceparent``: the call's trace context, sent for a credential that propagates it.

    The server's timeouts apply as to a proxied request: connect, first byte, and the longest
    gap between body chunks. Raises UpstreamError (``result_too_large`` past
    ``max_result_bytes``) or Forbidden (an address the SSRF guard refuses).
    """
    server, limit = config.server, config.jobs.max_result_bytes
    host = urlsplit(job.request.url).netloc
    outgoing = run_headers(job, credential)
    if traceparent is not None:
        outgoing = [(n, v) for n, v in outgoing if n.lower() not in (b"traceparent", b"tracestate")]
        outgoing.append((b"traceparent", traceparent.encode()))
    request = client.build_request(
        job.request.method,
        job.request.url,
        headers=outgoing,
        content=job.request.body or None,
        extensions={POLICY_EXTENSION: upstream_policy(credential, server.allow_private_upstreams)},
        timeout=httpx.Timeout(connect=server.upstream_connect_timeout, read=None, write=None, pool=None),
    )
    sent = {n.lower() for n, _ in job.request.headers}
    for name in _CLIENT_DEFAULTS:
        if name not in sent and name in request.headers:
            del request.headers[name]
    try:
        with trio.fail_after(server.upstream_first_byte_timeout):
            response = await client.send(request, stream=True)
    except trio.TooSlowError:
        raise UpstreamTimeout(f"{host} sent no response within {server.upstream_first_byte_timeout:g} s") from None
    except httpx.HTTPError as exc:
        raise _translate(exc, host) from None
    try:
        chunks = response.aiter_raw().__aiter__()
        body = bytearray()
        while True:
            with trio.move_on_after(server.upstream_idle_timeout) as gap:
                chunk = await anext(chunks, None)
            if gap.cancelled_caught:
                raise UpstreamTimeout(f"{host} sent nothing for {server.upstream_idle_timeout:g} s mid-answer")
            if chunk is None:
                break
            body += chunk
            if len(body) > limit:
                raise UpstreamError(f"the answer exceeds max_result_bytes ({limit})", code="result_too_large")
    except httpx.HTTPError as exc:
        raise _translate(exc, host) from None
    finally:
        with trio.CancelScope(shield=True):
            await response.aclose()
    headers = tuple(
        (n.decode("latin-1"), v.decode("latin-1"))
        for n, v in forwarding.response_headers(response.headers.raw)
        if n != b"content-length"  # replays set their own
    )
    return JobResult(response.status_code, headers, bytes(body))


async def post_webhook(
    client: httpx.AsyncClient, job: Job, credential: Credential, config: Config, *, now: float, body: bytes
) -> AttemptOutcome:
    """POST one delivery, signed now with each of the credential's webhook secrets; what came of it."""
    assert job.callback is not None
    timeout = config.jobs.delivery_timeout
    keys = [webhooks.parse_secret(s) for s in credential.webhook_secrets]
    headers: Headers = [(n.encode(), v.encode()) for n, v in webhooks.headers(keys, job.webhook_id, int(now), body)]
    headers += [(b"content-type", b"application/json"), (b"user-agent", USER_AGENT)]
    request = client.build_request(
        "POST",
        job.callback,
        headers=headers,
        content=body,
        extensions={POLICY_EXTENSION: callback_policy(credential, config.server.allow_private_upstreams)},
        timeout=httpx.Timeout(timeout),
    )
    try:
        with trio.fail_after(timeout):
            response = await client.send(request, stream=True)
            try:
                read = 0
                async for chunk in response.aiter_raw():  # a little, so the connection can be reused
                    read += len(chunk)
                    if read > RESPONSE_READ_LIMIT:
                        break
            finally:
                await response.aclose()
    except trio.TooSlowError:
        return AttemptOutcome(None, error=f"no answer within {timeout:g} s")
    except httpx.HTTPError as exc:
        return AttemptOutcome(None, error=_translate(exc, urlsplit(job.callback).netloc).message)
    except ParkwayError as exc:  # the SSRF guard: retrying cannot help
        return AttemptOutcome(None, error=exc.message, permanent=exc.code.endswith("_refused"))
    return AttemptOutcome(response.status_code, response.headers.get("retry-after"))
