"""The cache's steps of the gateway: a request the signer made cacheable is answered from a stored
answer, from an identical request's answer as it arrives, or by an upstream call that records it.

:func:`cache_ask` and :func:`keyed` are the cache's part of the plan; :class:`ServeCacheable` is
step 7 of a cacheable request, given admission and forwarding (:mod:`proxy.gateway.admit`,
:mod:`proxy.gateway.forward`) when the gateway is built.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache, partial
from urllib.parse import urlsplit

from .. import cors, policy
from ..cache.flight import ALONE, LEAD, FellBehind, Flight, LeaderFailed, ResponseCache
from ..cache.policy import (
    CacheRequest,
    CacheRules,
    CacheUnavailable,
    cache_key,
    cache_plan,
    cache_scope,
    cache_status,
    key_header_values,
    replay_headers,
    request_directives,
    signed_ttl,
)
from ..cache.respond import send_followed, send_stored
from ..config import Config, Credential
from ..errors import CacheMiss, Forbidden, UpstreamError
from ..http.connection import RequestHead
from ..metrics import Metrics
from ..upstream import ssrf
from .admit import Admission
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
    ttl = signed_ttl(extras.get(settings.param), rules.ttl, settings.max_ttl, settings.param)
    if ttl <= 0:
        return None  # the common case: nothing more to look at
    directives = request_directives(head.header(b"cache-control"), head.header(b"pragma"))
    plan = cache_plan(ttl, directives, head.method)
    if plan is None:
        return None
    max_entry = rules.max_entry_bytes or settings.max_entry_bytes
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
    """``cached`` with its key: what makes two requests the same answer."""
    key = cache_key(
        scope=cache_scope(credential.id, cached.rules.namespace),
        method=head.method,
        url=upstream_url,
        body=body or b"",
        injected=credential.headers,
        key_headers=key_header_values(head.headers, config.cache.key_headers, (n for n, _ in credential.headers)),
        user=user if cached.rules.per_user else None,
    )
    return replace(cached, key=key)


@dataclass(frozen=True, slots=True)
class ServeCacheable:
    """Step 7 of a cacheable request (``await serve(req)``): a stored answer, an identical
    request's answer as it arrives, or an upstream call (recorded for the next ones).
    Admission happens once either way."""

    cache: ResponseCache
    admission: Admission
    forward: Forward
    metrics: Metrics

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
                await send_stored(conn, entry, headers, record, paced=cached.rules.replay == "paced")
                return
        if cached.plan.only_if_cached:
            raise cache_miss()
        record.cache = "miss"
        admitted = False
        for _attempt in range(2):  # a leader that fails before its answer starts: try once more
            role, flight = cache.join_nowait(
                cached.key, ttl=cached.plan.ttl, store=cached.plan.store, max_entry_bytes=cached.max_entry_bytes
            )
            if flight is None or role == ALONE:
                break
            if role == LEAD:
                async with cache.leading(flight):
                    await admission.admit(req, partial(self.forward, flight=flight), limits_passed=admitted)
                if flight.stored:
                    record.cache = "stored"
                    self.metrics.cache_evictions.inc(flight.evicted)
                return
            try:
                if not admitted:
                    await admission.admit_without_upstream(req)
                    admitted = True
                if await follow(req, flight):
                    return
            finally:
                flight.followers -= 1
        status = cache_status("miss", detail="identical request in flight")
        await admission.admit(req, partial(self.forward, cache_headers=(status,)), limits_passed=admitted)


async def follow(req: Request, flight: Flight) -> bool:
    """Send the answer an identical request in flight is receiving; False when there is none to
    follow after all (its leader failed before its head, or the answer is not shared)."""
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
