"""The cache's steps of the gateway: a request the signer made cacheable is answered from a stored
answer, from an identical request's answer as it arrives, or by an upstream call that records it.

:func:`cache_ask` and :func:`keyed` are the cache's part of the plan; :class:`ServeCacheable` is
step 7 of a cacheable request, given admission and forwarding (:mod:`proxy.gateway.admit`,
:mod:`proxy.gateway.forward`) when the gateway is built. A miss's upstream call is not the
client's: :meth:`ServeCacheable.fetch` runs as the cache's task and every client, the one that
started it included, reads its recording at its own pace (:mod:`proxy.cache.flight`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from functools import lru_cache, partial
from urllib.parse import urlsplit

import trio

from .. import cors, forwarding, limits, policy
from ..cache.flight import ALONE, LEAD, FellBehind, Flight, LeaderFailed, ResponseCache
from ..cache.policy import (
    CacheRequest,
    CacheRules,
    CacheUnavailable,
    NotShared,
    cache_key,
    cache_plan,
    cache_scope,
    cache_status,
    key_header_values,
    keyed_request_headers,
    replay_headers,
    request_directives,
    signed_ttl,
    unstorable_reason,
)
from ..cache.respond import send_followed, send_stored
from ..config import Config, Credential
from ..errors import (
    CacheMiss,
    CacheUserRequired,
    Forbidden,
    ParkwayError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from ..http.connection import RequestHead
from ..metrics import Metrics
from ..record import traced
from ..relay.usage import UsageObserver
from ..upstream import ssrf
from ..upstream.client import UpstreamClient, UpstreamRequest, UpstreamResponse
from ..upstream.wire import BrokenResponse
from .admit import Admission
from .budget import FREE, has_budget, usage_remover
from .forward import Forward
from .plan import Plan, Request, address_policy, has_body

NO_CACHE_RULES = CacheRules()


def cache_ask(
    head: RequestHead,
    config: Config,
    credential: Credential,
    extras: dict[str, str],
    body_read: bool,
    declared_length: int | None,
) -> CacheRequest | None:
    """The cache's part of the plan, before the key (None: not cacheable). Unless it bypasses
    the cache, the key is made by :func:`keyed` once the body is read (bounded by the caller)."""
    settings, rules = config.cache, credential.cache or NO_CACHE_RULES
    if not extras and not rules.ttl:  # neither the signer nor the credential asks for it (most requests)
        return None
    ttl = signed_ttl(extras.get(settings.param), rules.ttl, settings.max_ttl, settings.param)
    if ttl <= 0:
        return None  # the common case: nothing more to look at
    directives = request_directives(head.header(b"cache-control"), head.header(b"pragma"))
    plan = cache_plan(ttl, directives, head.method)
    if plan is None:
        return None
    max_entry = rules.max_entry_bytes or settings.max_entry_bytes
    if rules.per_user and limits.end_user(extras, config.server.user_param) is None:
        # Every such URL would share one entry: one user's answer served to another. Never.
        raise CacheUserRequired(
            f"credential {credential.id!r} caches per end user, but this URL was signed without "
            f"{config.server.user_param or 'the end-user parameter'}: sign it with the user, or without {settings.param}"
        )
    if not plan.bypass and not body_read and has_body(head):
        if head.header(b"transfer-encoding") is not None or (declared_length or 0) > settings.max_body_bytes:
            return CacheRequest("", plan, rules, max_entry, bypass_reason="request body too large to key")
    return CacheRequest("", plan, rules, max_entry)


def keyed(
    cached: CacheRequest,
    head: RequestHead,
    config: Config,
    credential: Credential,
    upstream_url: str,
    user: str | None,
    body: bytes | None,
) -> CacheRequest:
    """``cached`` with its key: what makes two requests the same answer. What the key covers is
    all the upstream will see of the client: the key headers that survive hop-by-hop removal (a
    header named in Connection is neither keyed nor forwarded)."""
    injected = {n.lower().encode("latin-1") for n, _ in credential.headers}
    forwarded = keyed_request_headers(
        forwarding.forwarded_client_headers(head.headers, injected), config.cache.key_headers
    )
    key = cache_key(
        scope=cache_scope(credential.id, cached.rules.namespace),
        method=head.method,
        url=upstream_url,
        body=body or b"",
        injected=credential.headers,
        key_headers=key_header_values(forwarded, config.cache.key_headers),
        user=user if cached.rules.per_user else None,
    )
    return replace(cached, key=key, keyed_headers=tuple(forwarded))


@dataclass(frozen=True, slots=True)
class ServeCacheable:
    """Step 7 of a cacheable request (``await serve(req)``): a stored answer, an identical
    request's answer as it arrives, or an upstream call (recorded for the next ones).
    Admission happens once either way."""

    cache: ResponseCache
    admission: Admission
    forward: Forward
    metrics: Metrics
    upstream: UpstreamClient

    async def __call__(self, req: Request) -> None:
        conn, config, record, plan = req.conn, req.config, req.record, req.plan
        cached, cache, admission = plan.cache, self.cache, self.admission
        assert cached is not None
        check_upstream_nowait(plan, config)
        if plan.body is not None and plan.rules.inspects_body and not cached.bypass:
            # The body rules (models, max_tokens...) as they are now, before any stored answer is served.
            await policy.checked_body(plan.rules, plan.declared_length, plan.body)
        if cached.bypass:
            record.cache = "bypass"
            if cached.plan.only_if_cached:
                raise cache_miss()
            status = cache_status("bypass", detail=cached.bypass_reason)
            return await admission.admit(req, partial(self.forward, cache_headers=(status,)))
        if cached.plan.lookup:
            try:
                with traced(record, "parkway.cache.lookup"):
                    entry = await cache.lookup(cached.key)
            except CacheUnavailable:
                record.cache = "unavailable"
                if cached.plan.only_if_cached:
                    raise cache_miss() from None
                status = cache_status("bypass", detail="cache store unavailable")
                return await admission.admit(req, partial(self.forward, cache_headers=(status,)))
            if entry is not None:
                record.cache = "hit"
                await admission.admit_without_upstream(req)
                now = cache.store.clock()
                headers = [
                    *replay_headers(entry.headers, entry.age(now)),
                    *own_headers(config, plan),
                    cache_status("hit", ttl=entry.remaining(now)),
                ]
                record.tokens_saved = (entry.prompt_tokens, entry.completion_tokens)
                if has_budget(plan.credential):
                    record.budget = dict(FREE)  # no upstream call: no budget is charged, and the log says so
                await send_stored(conn, entry, headers, record, paced=cached.rules.replay == "paced")
                return
        if cached.plan.only_if_cached:
            raise cache_miss()
        record.cache = "miss"
        admitted = False
        for _attempt in range(2):  # a fetch that fails before its answer starts: followers try once more
            role, flight = cache.join_nowait(
                cached.key,
                ttl=cached.plan.ttl,
                store=cached.plan.store,
                max_entry_bytes=cached.max_entry_bytes,
                refresh=not cached.plan.lookup,
            )
            if flight is None or role == ALONE:
                break
            if role == LEAD:
                try:
                    await admission.admit(req, partial(self.lead, flight), limits_passed=admitted)
                finally:
                    if flight.scope is None:
                        cache.abandon(flight)  # refused before it started: followers go their own way
                    flight.leave()
                return
            try:
                if not admitted:
                    await admission.admit_without_upstream(req)
                    admitted = True
                with traced(record, "parkway.cache.collapse"):
                    if await follow(req, flight):
                        return
            finally:
                flight.leave()
        status = cache_status("miss", detail="identical request in flight")
        await admission.admit(req, partial(self.forward, cache_headers=(status,)), limits_passed=admitted)

    async def lead(self, flight: Flight, req: Request) -> None:
        """Step 7 of the request that starts ``flight``: the upstream call runs as the cache's task
        (:meth:`fetch`), and this client reads its answer like any follower, at its own pace."""
        conn, config, record, plan = req.conn, req.config, req.record, req.plan
        cached = plan.cache
        assert cached is not None
        flight.refresh = not cached.plan.lookup
        self.cache.start(flight, partial(self.fetch, req))
        try:
            answer = await flight.head()  # the fetch's error before the head is this client's answer
        except NotShared:  # another process's answer that is not to be shared: call on our own
            status = cache_status("miss", detail="identical request in flight")
            return await self.forward(req, cache_headers=(status,))
        record.status = answer.status
        record.ttfb = flight.head_at - record.started
        if flight.remote:  # another process makes the call: this request follows it
            record.cache = "collapsed"
            status = cache_status("collapsed")
        else:
            result = "miss" if cached.plan.lookup else "refresh"
            status = cache_status(result, stored=flight.store, detail=flight.detail)
        headers = [*answer.headers, *own_headers(config, plan), status]

        async def settled() -> None:
            # The answer is whole; its entry is written before the end of the body goes out (bounded
            # by the store's timeout), so this request's log line says whether it was stored.
            with trio.move_on_after(max(config.cache.timeout, 0.1) * 4):
                await flight.settled.wait()

        try:
            await send_followed(conn, flight, answer, headers, record, settled)
        except (LeaderFailed, FellBehind) as exc:
            if isinstance(flight.error, ParkwayError):
                raise flight.error from None
            raise UpstreamError(str(exc), code="collapsed_leader_failed") from None
        if flight.remote:
            record.tokens_saved = flight.usage
        else:
            record.usage = flight.usage_detail  # type: ignore[assignment]
        if flight.stored:
            record.cache = "stored"
            self.metrics.cache_evictions.inc(flight.evicted)

    async def fetch(self, req: Request, flight: Flight) -> None:
        """The upstream call of a flight, at the upstream's pace, into its recording. Only the
        headers the key covers go upstream with the credential's own (and the body the key was
        computed from)."""
        config, plan = req.config, req.plan
        cached = plan.cache
        assert cached is not None
        body = await policy.checked_body(plan.rules, plan.declared_length, plan.body) if plan.body is not None else None
        headers = [
            *cached.keyed_headers,
            *((n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in plan.credential.headers),
        ]
        if plan.body is not None:
            headers.append((b"content-length", str(len(plan.body)).encode()))
        record, call = req.record, None
        if record.trace is not None:  # the CLIENT span of the flight's call, in the leader's trace
            call = record.trace.upstream_call(
                req.head.method, plan.upstream_url, plan.body, propagate=plan.credential.propagate_trace,
                now=trio.current_time(),
            )  # fmt: skip
            if call.traceparent is not None:
                headers.append((b"traceparent", call.traceparent.encode()))
        request = UpstreamRequest(
            method=req.head.method,
            url=plan.upstream_url,
            headers=headers,
            body=body,
            address_policy=address_policy(plan.credential, config.server.allow_private_upstreams),
        )
        usage: UsageObserver | None = None
        self.metrics.in_flight += 1
        try:
            async with self.upstream.open(request) as response:
                if call is not None:
                    call.status = response.status
                usage = UsageObserver(
                    response.content_type, details=call is not None, on_first_chunk=record.first_chunk_now
                )
                reason = unstorable_reason(
                    response.status,
                    response.headers,
                    cached.rules,
                    max_entry_bytes=cached.max_entry_bytes,
                    key_headers=config.cache.key_headers,
                    close_delimited=response.framing.kind == "close",
                )
                flight.detail = reason
                headers_out = tuple(forwarding.response_headers(response.headers, lowered=True))
                flight.begin(response.status, headers_out, share=reason is None)
                # The usage chunk a budget asked for is read here and recorded for no client.
                remover = usage_remover(plan, response) if response.framing.kind == "chunked" else None
                async for chunk in body_chunks(response):
                    usage.feed(chunk)
                    if remover is not None:
                        chunk = remover.feed(chunk)
                    if chunk:
                        await flight.room(len(chunk))
                        flight.feed(chunk)
                if remover is not None and (rest := remover.end()):
                    await flight.room(len(rest))
                    flight.feed(rest)
                usage.finish(True)
                record.model, record.streamed = usage.model, response.content_type.startswith("text/event-stream")
                if usage.usage is not None:
                    flight.usage = (usage.usage.prompt_tokens, usage.usage.completion_tokens)
                    flight.usage_detail = usage.usage
                flight.finish(True)
        except BaseException as exc:
            if call is not None:
                call.first_chunk = record.first_chunk
                call.end(usage, False, exc)
            raise
        else:
            if call is not None:
                call.first_chunk = record.first_chunk
                call.end(usage, True)
        finally:
            self.metrics.in_flight -= 1


async def body_chunks(response: UpstreamResponse) -> AsyncIterator[bytes]:
    """An upstream answer's de-framed body, read as fast as the upstream sends it (no client to
    wait for); a silent upstream is cut after its idle timeout, broken framing is an error."""
    up = response.conn.http
    if response.framing.bodiless:
        try:
            stray = up.end_bodiless(response.initial)
        except BrokenResponse as exc:
            raise UpstreamProtocolError(f"{response.conn.host} broke the HTTP protocol: {exc}") from None
        response.reusable = not stray and response.framing.reusable and up.reusable()
        return
    data: bytes | None = response.initial or None  # b"" would say the upstream closed
    while True:
        if data is not None:
            pieces: list[bytes] = []
            try:
                excess = up.deframe(data, pieces)
            except BrokenResponse as exc:
                raise UpstreamProtocolError(f"{response.conn.host} broke the HTTP protocol: {exc}") from None
            for piece in pieces:
                if piece:
                    yield piece
            if excess is not None:
                response.reusable = not excess and response.framing.reusable and up.reusable()
                return
        with trio.move_on_after(response.idle_timeout) as idle:
            data = await response.conn.recv()
        if idle.cancelled_caught:
            raise UpstreamTimeout(
                f"{response.conn.host} sent nothing for {response.idle_timeout:g} s in the middle of the response"
            )


async def follow(req: Request, flight: Flight) -> bool:
    """Send the answer an identical request in flight is receiving; False when there is none to
    follow after all (its fetch failed before its head, or the answer is not shared)."""
    conn, config, record, plan = req.conn, req.config, req.record, req.plan
    answer = await flight.wait_head()
    if answer is None:
        return False
    record.cache = "collapsed"
    headers = [*answer.headers, *own_headers(config, plan), cache_status("collapsed")]
    try:
        await send_followed(conn, flight, answer, headers, record)
    except (LeaderFailed, FellBehind) as exc:
        raise UpstreamError(str(exc), code="collapsed_leader_failed") from None
    record.tokens_saved = flight.usage
    if has_budget(plan.credential):
        record.budget = dict(FREE)
    return True


def own_headers(config: Config, plan: Plan) -> list[tuple[bytes, bytes]]:
    """What Parkway adds to every answer of this request: CORS and the request id."""
    return [*cors.response_headers(config.cors, plan.origin), (b"x-request-id", plan.request_id.encode())]


def check_upstream_nowait(plan: Plan, config: Config) -> None:
    """The part of the SSRF guard that needs no DNS, for answers served without connecting (a hit,
    a collapsed follower): the scheme, and an upstream named by its IP address. Names are checked
    when a connection is made; a hit makes none."""
    origin = plan.upstream_url.split("/", 3)[:3]  # scheme:, "", host[:port]
    refusal = origin_refusal("/".join(origin), plan.credential, config.server.allow_private_upstreams)
    if refusal is not None:
        raise Forbidden(refusal[0], code=refusal[1])


@lru_cache(maxsize=1024)
def origin_refusal(origin: str, credential: Credential, allow_private: bool) -> tuple[str, str] | None:
    """Why the address guard refuses ``origin`` outright (message, code), or None (cached: hot path)."""
    parts = urlsplit(origin)
    try:
        ssrf.check_scheme(parts.scheme)
        try:
            ip = ssrf.parse_ip(parts.hostname or "")
        except ValueError:
            return None
        address_policy(credential, allow_private).check(ip, parts.hostname)
    except Forbidden as exc:
        return exc.message, exc.code
    return None


def cache_miss() -> CacheMiss:
    return CacheMiss("no stored answer, and the request said Cache-Control: only-if-cached")
