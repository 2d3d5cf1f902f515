"""Step 7 of a proxied request: forward it (the body checked against the JSON rules as it
passes), send the client the upstream's head, relay the body. (A cacheable request's upstream
call is the cache's own: :meth:`proxy.gateway.cache.ServeCacheable.fetch`.)
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from functools import partial

from .. import cors, forwarding, policy
from ..config import Config
from ..errors import UpstreamTimeout
from ..http.connection import HTTPConnection
from ..metrics import Metrics
from ..record import RequestRecord
from ..relay.pump import BodyObserver, EpollEngine, relay
from ..relay.usage import UsageObserver
from ..upstream.client import UpstreamClient, UpstreamRequest, UpstreamResponse
from .budget import budget_headers, usage_remover
from .plan import Plan, Request, address_policy

Header = tuple[bytes, bytes]


@dataclass(frozen=True, slots=True)
class Forward:
    """Step 7 of a proxied request, as a :data:`~proxy.gateway.plan.Step` (``await forward(req)``)."""

    upstream: UpstreamClient
    metrics: Metrics
    engine: EpollEngine | None  # relays every stream's body when running; else each request's own task

    async def __call__(self, req: Request, *, cache_headers: tuple[Header, ...] = ()) -> None:
        """Forward, with the body checked against the JSON rules as it passes, then relay.
        ``cache_headers``: its Cache-Status (a cacheable request that goes upstream alone)."""
        head, conn, config, record, plan = req.head, req.conn, req.config, req.record, req.plan
        # The generators to close when the request ends, inner first (a list and one finally:
        # cheaper than an AsyncExitStack and an ``aclosing`` per generator).
        opened: list[AsyncGenerator[bytes, None]] = []
        try:
            content_length: int | None = None
            upstream_body: bytes | AsyncGenerator[bytes, None] | None = None
            # Without body rules checked_body returns the body itself: not awaited then (a coroutine less).
            if plan.body is not None:
                upstream_body = plan.body
                if plan.rules.inspects_body:
                    upstream_body = await policy.checked_body(plan.rules, plan.declared_length, plan.body)
                content_length = len(plan.body)
            elif plan.body_follows:
                # An unsigned body streams through; only what the body rules need is held back.
                content_length = plan.declared_length
                chunks = conn.body_chunks()
                opened.append(chunks)
                upstream_body = chunks
                if plan.rules.inspects_body:
                    upstream_body = await policy.checked_body(plan.rules, plan.declared_length, chunks)
                    if upstream_body is not chunks:
                        opened.append(upstream_body)
            headers = forwarding.request_headers(
                head.headers, plan.credential.headers, plan.ctx, content_length=content_length
            )
            forward_at = record.clock()
            call = None
            if record.trace is not None:  # the CLIENT span; its traceparent only where the credential allows
                call = record.trace.upstream_call(
                    head.method, plan.upstream_url, plan.body, propagate=plan.credential.propagate_trace, now=forward_at
                )
                if call.traceparent is not None:
                    headers = [(n, v) for n, v in headers if n not in (b"traceparent", b"tracestate")]
                    headers.append((b"traceparent", call.traceparent.encode()))
                if upstream_body is not None and not isinstance(upstream_body, bytes):
                    upstream_body = call.watch_body(upstream_body)
                    opened.append(upstream_body)
            request = UpstreamRequest(
                method=head.method,
                url=plan.upstream_url,
                headers=headers,
                body=upstream_body,
                address_policy=address_policy(plan.credential, config.server.allow_private_upstreams),
                informational=partial(pass_informational, conn),
            )
            usage: UsageObserver | None = None
            self.metrics.in_flight += 1
            try:
                async with self.upstream.open(request, record.scope, forward_at) as response:
                    head_at = record.clock()
                    record.ttfb = head_at - record.started
                    record.status = response.status
                    usage = UsageObserver(
                        response.content_type, details=call is not None, on_first_chunk=record.first_chunk_now
                    )
                    record.streamed = usage.streamed
                    observers: tuple[BodyObserver, ...] = (usage,)
                    if plan.budget is None:  # no budget: no usage chunk of its own, no header of its own
                        remover = None
                        extra = cache_headers
                    else:
                        remover = usage_remover(plan, response)  # the usage chunk a budget asked for, not the client
                        extra = (*cache_headers, *budget_headers(plan))
                    await respond(conn, response, record, config, plan, extra)
                    record.overhead = (forward_at - record.started) + (record.head_sent_at - head_at)
                    await relay(conn, response, record, observers, engine=self.engine, watcher=record.client_watch,
                                rewrite=remover)  # fmt: skip
                    record.usage = usage.usage or (remover.usage if remover is not None else None)
                    record.model = usage.model
            except BaseException as exc:
                if usage is None and isinstance(exc, UpstreamTimeout):
                    record.failure = exc  # the first byte's: the request's scope may report it (handler)
                if call is not None:
                    call.status, call.first_chunk = record.status if usage is not None else None, record.first_chunk
                    call.end(usage, False, exc)
                raise
            else:
                if call is not None:
                    call.status, call.first_chunk = record.status, record.first_chunk
                    call.end(usage, record.completed, tokens=record.usage)  # a budget's usage chunk included
            finally:
                self.metrics.in_flight -= 1
        finally:
            if opened:  # close_all's first step here: the common one generator without its coroutine
                generator = opened.pop()
                try:
                    await generator.aclose()
                finally:
                    if opened:
                        await close_all(opened)


async def close_all(generators: list[AsyncGenerator[bytes, None]]) -> None:
    """Close the generators, the last opened first, each even when closing another raised
    (as an ``AsyncExitStack`` of ``aclosing`` would)."""
    generator = generators.pop()
    try:
        await generator.aclose()
    finally:
        if generators:
            await close_all(generators)


async def respond(
    conn: HTTPConnection,
    response: UpstreamResponse,
    record: RequestRecord,
    config: Config,
    plan: Plan,
    extra_headers: tuple[Header, ...] = (),
) -> None:
    """Send the client the upstream's status and headers (hop-by-hop ones replaced by ours)."""
    out_headers = forwarding.response_headers(response.headers, lowered=True)  # a ResponseHead's names
    # One pass for both: the first Content-Length, and whether any Content-Type is an event
    # stream (forwarding.is_event_stream's test).
    expected_length: int | None = None
    length_seen = event_stream = False
    for name, value in out_headers:
        if name == b"content-length":
            if not length_seen:
                length_seen = True
                expected_length = int(value) if value.isdigit() else None
        elif name == b"content-type" and not event_stream:
            event_stream = value.lower().startswith(b"text/event-stream")
    record.expected_length = expected_length
    if event_stream:
        # nginx in front would otherwise buffer the stream (X-Accel-Buffering).
        out_headers.append((b"x-accel-buffering", b"no"))
    out_headers += cors.response_headers(config.cors, plan.origin)
    out_headers.append((b"x-request-id", plan.request_id.encode()))
    out_headers += extra_headers
    # A head whose first body bytes came with it (an SSE answer's first event, a small JSON
    # answer), or whose answer has no body, goes out with them in one write: the relay's
    # first write takes it. Any other head goes out now, so a client sees it as soon as
    # it arrived, whether or when the body follows (docs/proxying.md).
    hold = bool(response.initial) or response.framing.bodiless
    await conn.send_head(response.status, out_headers, flush=not hold)
    record.head_sent_at = record.clock()


async def pass_informational(conn: HTTPConnection, status: int, headers: list[Header]) -> None:
    """An upstream's unasked 1xx (103 Early Hints) to the client, under the response header policy."""
    await conn.send_informational(status, forwarding.response_headers(headers, lowered=True))
