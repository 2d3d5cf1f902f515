"""The gateway: the one place that sees every pure piece, in the order a request needs them.

1. parse the signed URL          (signing.parse_signed_request)
2. find the credential's secrets (config)
3. check validity and headers    (signing.check_validity)
4. read the body only if signed  (http_server, bounded)
5. verify the signature          (signing.verify_signature)
6. apply the credential's policy (urls.url_allowed)
7. forward and stream back       (forwarding + upstream, policy.checked_body, relay)
   or, for a WebSocket handshake, open the session (ws_policy + websocket)

Nothing reaches the upstream before step 6 has passed. Every refusal is a
:class:`~proxy.errors.ParkwayError`, answered by :meth:`Gateway.reject` and logged once
(the request's record, log line and metrics: :mod:`proxy.record`).
"""

from __future__ import annotations

import math
import secrets as _secrets
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache, partial
from typing import Any
from urllib.parse import urlsplit

import structlog
import trio

from . import cors, forwarding, limits, policy, ssrf, ws_policy
from .admission import GlobalGate
from .background import BackgroundAsk, background_ask, job_id_from_path
from .cache import ALONE, LEAD, FellBehind, Flight, LeaderFailed, ResponseCache
from .cache_policy import (
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
    unstorable_reason,
)
from .cache_respond import send_followed, send_stored
from .config import Config, Credential
from .errors import (
    BadRequest,
    BodyTooLarge,
    CacheMiss,
    Forbidden,
    InternalError,
    Overloaded,
    ParkwayError,
    UnknownCredential,
    UpstreamError,
    UpstreamTimeout,
    client_text,
    error_response,
)
from .http_server import ClientGone, HTTPConnection, RequestHead
from .jobapi import JobAPI, no_such_job
from .metrics import Metrics
from .record import RequestRecord, count_request, log, log_request
from .relay import BodyObserver, EpollEngine, relay
from .signing import check_validity, parse_signed_request, verify_signature
from .state import MemoryState, StateBackend
from .upstream import UpstreamClient, UpstreamRequest, UpstreamResponse
from .urls import check_unambiguous_path, origin_and_target, url_allowed
from .usage import UsageObserver
from .websocket import SessionPlan, SessionReport, WebSocketProxy

# A fixed-length answer up to this size has its head held back and written with the first body
# chunk (one write instead of two: the upstream sends a small body together with its head).
SMALL_RESPONSE_BYTES = 16384


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything decided about a request before admission: what steps 1-6 produced.

    Only what admission and forwarding need: a parked stream keeps its plan as long as it
    lasts, while the parsed signed URL and the header map go once it is made (with the
    target kept once in RequestHead, 3.5 KB less per parked stream).
    """

    request_id: str
    upstream_url: str  # the normalised X-Sw-Proxy, without fragment
    signature: str  # for single use
    expires_at: datetime
    credential: Credential
    ctx: forwarding.ForwardContext
    origin: str | None
    body: bytes | None  # a verified signed body, or None when the body streams (or is empty)
    declared_length: int | None
    rules: policy.RequestPolicy
    user: str | None
    single_use: bool
    websocket: bool = False  # a WebSocket handshake: step 7 opens a session
    background: BackgroundAsk | None = None  # run as a job (proxy.background)
    prefix: str = ""  # the public path prefix this client reached Parkway under
    cache: CacheRequest | None = None  # the signer made it cacheable (pw_cache or the credential's ttl)


class Gateway:
    """The application behind :class:`~proxy.http_server.Server`; ``config`` may be swapped live."""

    def __init__(
        self,
        config: Config,
        upstream: UpstreamClient,
        *,
        metrics: Metrics | None = None,
        state: StateBackend | None = None,
        cache: ResponseCache | None = None,
        clock: Callable[[], datetime] = utcnow,
        engine: EpollEngine | None = None,
        websockets: WebSocketProxy | None = None,
    ):
        self.config = config
        self.upstream = upstream
        self.engine = engine  # relays every stream's body when running; else each request's own task
        self.metrics = metrics or Metrics()
        self.state: StateBackend = state or MemoryState()
        self.cache = cache  # None: nothing is cached (tests and embedding that leave it out)
        self.gate = self._gate_for(config)
        self.clock = clock
        self.websockets = websockets or WebSocketProxy(config.websocket)
        self.jobs: JobAPI | None = None  # set by the app when [jobs] is on

    @staticmethod
    def _gate_for(config: Config) -> GlobalGate:
        return GlobalGate(
            config.server.max_in_flight,
            max_waiting=config.server.max_queued,
            queue_timeout=config.server.queue_timeout,
        )

    def apply(self, config: Config) -> None:
        """Take a reloaded config for new requests. A changed in-flight cap gets a new gate;
        requests admitted by the old one finish and release there, uncounted by the new one."""
        old = self.config.server
        if (old.max_in_flight, old.max_queued, old.queue_timeout) != (
            config.server.max_in_flight,
            config.server.max_queued,
            config.server.queue_timeout,
        ):
            self.gate = self._gate_for(config)
        self.websockets.settings = config.websocket
        self.config = config

    # --- entry points called by the server ------------------------------------------------

    async def handle(self, head: RequestHead, conn: HTTPConnection) -> None:
        config = self.config  # one config for the whole request, even across a reload
        record = RequestRecord(trio.current_time(), conn.head_bytes_in, conn.bytes_out)
        request_id = _secrets.token_hex(8)
        # credential and user are bound later; binding them here too makes the exit reset them,
        # so the next request on a kept-alive connection does not inherit them.
        with structlog.contextvars.bound_contextvars(request_id=request_id, credential=None, user=None, job=None):
            try:
                with trio.move_on_after(config.server.request_timeout or float("inf")) as overall:
                    await self._handle(head, conn, config, record, request_id, overall)
                if overall.cancelled_caught:
                    raise UpstreamTimeout(
                        f"request exceeded the overall limit of {config.server.request_timeout:g} s",
                        code="request_timeout",
                    )
            except ParkwayError as exc:
                record.outcome = exc.outcome if record.outcome == "ok" else record.outcome
                record.error, record.error_code = exc.message, exc.code
                if conn.can_respond:
                    record.status = exc.status
                    await self._send_error(head, conn, config, exc, request_id)
                else:
                    conn.abort()
            except ClientGone as exc:
                record.outcome = "client_gone"
                record.error = str(exc)
                conn.abort()
            except Exception:
                # A bug: the traceback goes to the log under this request id, the client gets a
                # 500 if nothing was sent yet, and the connection closes (its state is unknown).
                log.exception("internal_error", method=head.method)
                error = InternalError()
                record.outcome, record.error, record.error_code = error.outcome, error.message, error.code
                if conn.can_respond:
                    record.status = error.status
                    conn.close_after_response()
                    await self._send_error(head, conn, config, error, request_id)
                else:
                    conn.abort()
            finally:
                if record.outcome == "ok" and not record.completed:
                    # Cancelled from outside (drain deadline, overall timeout) mid-way.
                    record.outcome = "cancelled"
                record.settle(conn.bytes_in, conn.bytes_out, trio.current_time())
                log_request(head, record)
                count_request(self.metrics, config, record)

    async def reject(self, head: RequestHead | None, conn: HTTPConnection, exc: ParkwayError) -> None:
        """Answer a request the server refused before it reached :meth:`handle` (bad HTTP, too slow)."""
        config = self.config
        request_id = _secrets.token_hex(8)
        started, out_start = trio.current_time(), conn.bytes_out
        log.warning(
            "request",
            request_id=request_id,
            method=head.method if head else None,
            client=conn.peer,
            status=exc.status,
            outcome=exc.outcome,
            error=exc.message,
        )
        try:
            await self._send_error(head, conn, config, exc, request_id)
        finally:
            record = RequestRecord(
                started,
                conn.head_bytes_in,
                out_start,
                status=exc.status,
                outcome=exc.outcome,
                error=exc.message,
                error_code=exc.code,
            )
            record.settle(conn.bytes_in, conn.bytes_out, trio.current_time())
            count_request(self.metrics, config, record)

    # --- the steps ------------------------------------------------------------------------

    async def _handle(
        self,
        head: RequestHead,
        conn: HTTPConnection,
        config: Config,
        record: RequestRecord,
        request_id: str,
        overall: trio.CancelScope,
    ) -> None:
        origin = head.header(b"origin")
        if cors.is_preflight(head.method, origin, head.header(b"access-control-request-method")):
            await self._drain_request_body(conn)
            headers = cors.preflight_headers(config.cors, origin, head.header(b"access-control-request-headers"))
            record.status = 204
            record.outcome = "preflight"
            await conn.send_full(204, [*headers, (b"x-request-id", request_id.encode())], b"")
            return
        job_id = job_id_from_path(head.path, (config.server.public_path_prefix,))
        if job_id is not None:
            await self._serve_job(head, conn, config, record, request_id, job_id)
            return
        plan = await self._plan(head, conn, config, record, request_id, origin)
        if plan.websocket:
            # A session has limits of its own (idle_timeout, max_session_duration), not request_timeout.
            overall.deadline = math.inf
            await self._admit(head, conn, config, record, plan, self._open_session)
        elif plan.cache is not None:
            await self._unless_client_leaves(conn, record, self._serve_cacheable, head, conn, config, record, plan)
        else:
            step7 = self._forward if plan.background is None else self._enqueue
            await self._unless_client_leaves(conn, record, self._admit, head, conn, config, record, plan, step7)

    async def _plan(
        self,
        head: RequestHead,
        conn: HTTPConnection,
        config: Config,
        record: RequestRecord,
        request_id: str,
        origin: str | None,
    ) -> Plan:
        """Steps 1-6: everything that can refuse the request before admission."""
        # 1-3: parse, credential, validity. No body has been read yet.
        signed = parse_signed_request(head.query)
        credential = config.credential(signed.credential_id)
        # An unknown id is client text: logged capped and escaped, never whole.
        record.credential = signed.credential_id if credential else client_text(signed.credential_id, 64, quoted=False)
        structlog.contextvars.bind_contextvars(credential=record.credential)
        if credential is None:
            raise UnknownCredential(f"unknown credential {client_text(signed.credential_id)}")
        check_validity(signed, self.clock(), clock_skew=config.server.clock_skew, max_expiry=config.server.max_expiry)
        headers = _header_map(head)
        ctx = forwarding.forward_context(head.peer, headers, config.server.trusted_proxies)
        record.client = ctx.client_ip

        # 4: a signed body is read (bounded) and verified before anything is forwarded.
        body: bytes | None = None
        if signed.body_signed:
            limit = config.server.max_signed_body_bytes
            declared = head.header(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                conn.close_after_response()
                raise BodyTooLarge(
                    f"request body of {declared} bytes exceeds the limit of {limit} bytes for signed bodies"
                )
            body = await conn.read_body(limit)

        # 5-6a: signature, then the credential's allowed upstreams.
        verify_signature(
            signed,
            method=head.method,
            secrets=credential.secrets,
            paths=_canonical_paths(head.path, config.server.public_path_prefix, ctx.prefix),
            headers=headers,
            body=body,
        )
        # A signed header must reach the upstream as signed: no Connection header may strip it.
        forwarding.check_connection_header(head.headers, signed.signed_headers, credential.headers)
        _scheme, host, target = origin_and_target(signed.proxy_url)
        record.upstream_host, record.upstream_path = host, target.partition("?")[0]
        # A WebSocket handshake (valid, from an allowed origin) for a WebSocket URL, and a
        # WebSocket URL only with a handshake; allowed_upstreams match it in its http(s) form.
        websocket = ws_policy.is_websocket_request(head.method, headers)
        if websocket:
            ws_policy.check_handshake(head.http_version, headers)
            ws_policy.check_origin(config.cors.allow_origins, origin)
        elif ws_policy.is_websocket_url(signed.proxy_url):
            raise BadRequest(
                "X-Sw-Proxy is a WebSocket URL: open it with a WebSocket handshake (GET, Upgrade: websocket)",
                code="websocket_required",
            )
        allowed = url_allowed(signed.proxy_url, credential.allowed_upstreams)
        if websocket and not allowed:  # an https:// prefix (as the config stores wss://) covers wss://
            allowed = url_allowed(ws_policy.http_form(signed.proxy_url), credential.allowed_upstreams)
        if not allowed:
            raise Forbidden(
                f"upstream {host}{record.upstream_path} is not allowed for credential {credential.id!r}",
                code="upstream_not_allowed",
            )
        if credential.allowed_upstreams or credential.allowed_paths:
            check_unambiguous_path(signed.proxy_url)  # what was checked is what the upstream reads

        # 6b: request policy (method, path, size), the end user, then admission: global
        # in-flight cap (503), the credential's and user's limits (429), single use (403).
        # All after the signature: nobody can spend a credential's budget with forged URLs.
        extras = signed.extra_params()
        user = limits.end_user(extras, config.server.user_param)
        if user is not None:
            record.user = user
            structlog.contextvars.bind_contextvars(user=user)
        rules = _request_policy(credential, config.server.inspect_body_bytes, config.server.body_rules_overflow)
        declared = head.header(b"content-length")
        declared_length = (
            len(body) if body is not None else (int(declared) if declared and declared.isdigit() else None)
        )
        policy.check_request(
            rules, method=head.method, upstream_path=record.upstream_path, content_length=declared_length
        )
        background = None if websocket else background_ask(
            extras, head.header(b"prefer"), config.jobs,
            credential=credential.id, allowed_callbacks=credential.allowed_callbacks,
        )  # fmt: skip
        upstream_url = signed.proxy_url.split("#", 1)[0]
        cached: CacheRequest | None = None
        if self.cache is not None and not websocket and background is None:
            # 6c: the cache, only as the signer allowed it (a job's answer goes to its job, not the cache); the body is read (bounded) for the key.
            cached, body = await self._cache_request(
                head, conn, config, credential, extras, upstream_url, user, body, declared_length
            )
        if body is None and not _has_body(head):
            # Consume the (empty) body's end now: from here on a client that leaves is noticed,
            # even while queued for a slot.
            await self._drain_request_body(conn)
        return Plan(
            request_id=request_id,
            upstream_url=upstream_url,
            signature=signed.signature,
            expires_at=signed.expires_at,
            credential=credential,
            ctx=ctx,
            origin=origin,
            body=body,
            declared_length=declared_length,
            rules=rules,
            user=user,
            single_use=limits.wants_single_use(credential.single_use, extras, config.server.single_use_param),
            websocket=websocket,
            background=background,
            prefix=config.server.public_path_prefix or ctx.prefix,
            cache=cached,
        )

    async def _cache_request(
        self,
        head: RequestHead,
        conn: HTTPConnection,
        config: Config,
        credential: Credential,
        extras: dict[str, str],
        upstream_url: str,
        user: str | None,
        body: bytes | None,
        declared_length: int | None,
    ) -> tuple[CacheRequest | None, bytes | None]:
        """The cache's part of the plan (None: not cacheable), and the body, read if the key needs it."""
        settings, rules = config.cache, credential.cache or _NO_CACHE_RULES
        ttl = signed_ttl(extras.get(settings.param), rules.ttl, settings.max_ttl, settings.param)
        if ttl <= 0:
            return None, body  # the common case: nothing more to look at
        directives = request_directives(head.header(b"cache-control"), head.header(b"pragma"))
        plan = cache_plan(ttl, directives, head.method)
        if plan is None:
            return None, body
        max_entry = rules.max_entry_bytes or settings.max_entry_bytes
        if plan.bypass:
            return CacheRequest("", plan, rules, max_entry), body
        if body is None and _has_body(head):
            if head.header(b"transfer-encoding") is not None or (declared_length or 0) > settings.max_body_bytes:
                return CacheRequest("", plan, rules, max_entry, bypass_reason="request body too large to key"), body
            body = await conn.read_body(settings.max_body_bytes)
        key = cache_key(
            scope=cache_scope(credential.id, rules.namespace),
            method=head.method,
            url=upstream_url,
            body=body or b"",
            injected=credential.headers,
            key_headers=key_header_values(head.headers, settings.key_headers, (n for n, _ in credential.headers)),
            user=user if rules.per_user else None,
        )
        return CacheRequest(key, plan, rules, max_entry), body

    async def _unless_client_leaves(
        self, conn: HTTPConnection, record: RequestRecord, work: Callable[..., Awaitable[None]], *args: Any
    ) -> None:
        """Run ``work``, cancelled the moment the client goes away once its request is complete:
        while queued for a slot, waiting for the upstream's first byte, or streaming.

        With the relay engine running, the engine watches the client's socket (one epoll
        registration, and the relay takes it over); otherwise a watcher task does.
        """
        engine, sock = self.engine, conn.socket
        if engine is not None and sock is not None:
            with trio.CancelScope() as scope:
                fd = sock.fileno()
                watched = engine.watch_client(fd, partial(self._client_left, scope, record))
                if watched:
                    try:
                        await work(*args)
                    finally:
                        engine.unwatch_client(fd)
            if watched:
                if record.outcome == "client_gone":
                    conn.abort()
                return
        failure: ParkwayError | ClientGone | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_client, conn, nursery.cancel_scope, record)
            try:
                await work(*args)
            except (ParkwayError, ClientGone) as exc:
                # Raised outside the nursery, so callers see the error itself, not a group.
                failure = exc
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        if record.outcome == "client_gone":
            conn.abort()

    async def _serve_cacheable(
        self, head: RequestHead, conn: HTTPConnection, config: Config, record: RequestRecord, plan: Plan
    ) -> None:
        """A request the signer made cacheable: a stored answer, an identical request's answer as it
        arrives, or an upstream call (recorded for the next ones). Admission happens once either way."""
        cached, cache = plan.cache, self.cache
        assert cached is not None and cache is not None
        _check_upstream_nowait(plan, config)
        if plan.body is not None and plan.rules.inspects_body and not cached.bypass:
            # The body rules (models, max_tokens...) as they are now, before any stored answer is served.
            await policy.checked_body(plan.rules, plan.declared_length, plan.body)
        if cached.bypass:
            record.cache = "bypass"
            if cached.plan.only_if_cached:
                raise _cache_miss()
            status = cache_status("bypass", detail=cached.bypass_reason)
            return await self._admit(head, conn, config, record, plan, partial(self._forward, cache_headers=(status,)))
        if cached.plan.lookup:
            try:
                entry = await cache.lookup(cached.key)
            except CacheUnavailable:
                record.cache = "unavailable"
                if cached.plan.only_if_cached:
                    raise _cache_miss() from None
                status = cache_status("bypass", detail="cache store unavailable")
                return await self._admit(
                    head, conn, config, record, plan, partial(self._forward, cache_headers=(status,))
                )
            if entry is not None:
                record.cache = "hit"
                await self._admit_without_upstream(config, plan)
                now = cache.store.clock()
                headers = [
                    *replay_headers(entry.headers, entry.age(now)),
                    *self._own_headers(config, plan),
                    cache_status("hit", ttl=entry.remaining(now)),
                ]
                record.tokens_saved = (entry.prompt_tokens, entry.completion_tokens)
                await send_stored(conn, entry, headers, record, paced=cached.rules.replay == "paced")
                return
        if cached.plan.only_if_cached:
            raise _cache_miss()
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
                    step7 = partial(self._forward, flight=flight)
                    await self._admit(head, conn, config, record, plan, step7, admitted=admitted)
                if flight.stored:
                    record.cache = "stored"
                    self.metrics.cache_evictions.inc(flight.evicted)
                return
            try:
                if not admitted:
                    await self._admit_without_upstream(config, plan)
                    admitted = True
                if await self._follow(conn, config, record, plan, flight):
                    return
            finally:
                flight.followers -= 1
        status = cache_status("miss", detail="identical request in flight")
        step7 = partial(self._forward, cache_headers=(status,))
        await self._admit(head, conn, config, record, plan, step7, admitted=admitted)

    async def _follow(
        self, conn: HTTPConnection, config: Config, record: RequestRecord, plan: Plan, flight: Flight
    ) -> bool:
        """Send the answer an identical request in flight is receiving; False when there is none to
        follow after all (its leader failed before its head, or the answer is not shared)."""
        answer = await flight.wait_head()
        if answer is None:
            return False
        record.cache = "collapsed"
        headers = [*answer.headers, *self._own_headers(config, plan), cache_status("collapsed")]
        try:
            await send_followed(conn, flight, answer, headers, record)
        except (LeaderFailed, FellBehind) as exc:
            raise UpstreamError(str(exc), code="collapsed_leader_failed") from None
        record.tokens_saved = flight.usage
        return True

    async def _admit_without_upstream(self, config: Config, plan: Plan) -> None:
        """Admission of a request served without an upstream call: request-rate limits and single
        use, but no in-flight slot and no concurrency lease."""
        credential = plan.credential
        keys = limits.limit_keys(credential.id, credential.limits, plan.user, credential.user_limits)
        rate, _ = limits.split_limits(keys)
        if rate:
            decision = await self.state.acquire(rate, trio.current_time())
            decision.raise_if_refused()
        await self._check_single_use(config, plan)

    async def _check_single_use(self, config: Config, plan: Plan) -> None:
        if plan.single_use:
            # Remembered until the last moment the URL could still verify.
            last_valid = plan.expires_at + timedelta(seconds=config.server.clock_skew)
            if not await self.state.check_and_add_signature(
                plan.signature, last_valid.timestamp(), self.clock().timestamp()
            ):
                raise limits.replay_refusal()

    @staticmethod
    def _client_left(scope: trio.CancelScope, record: RequestRecord) -> None:
        if record.expected_length is not None and record.relayed >= record.expected_length:
            return  # it read the whole (fixed-length) answer and closed: that is not leaving early
        record.outcome = "client_gone"
        record.error = "client closed the connection before the response was complete"
        scope.cancel()

    async def _admit(
        self,
        head: RequestHead,
        conn: HTTPConnection,
        config: Config,
        record: RequestRecord,
        plan: Plan,
        step7: Callable[[RequestHead, HTTPConnection, Config, RequestRecord, Plan], Awaitable[None]],
        *,
        admitted: bool = False,
    ) -> None:
        """Admission (in-flight gate, limits, single use), then step 7; slots always given back.
        ``admitted``: rate limits and single use were already passed (a follower going alone).

        A WebSocket session holds its slots for its whole life, as a stream does."""
        credential = plan.credential
        keys = limits.limit_keys(credential.id, credential.limits, plan.user, credential.user_limits)
        if admitted:
            keys = limits.split_limits(keys)[1]
        async with self.gate.slot():
            decision = await self.state.acquire(keys, trio.current_time())
            decision.raise_if_refused()
            try:
                if not admitted:
                    await self._check_single_use(config, plan)
                await step7(head, conn, config, record, plan)
            finally:
                if decision.lease is not None:  # None: no concurrency limit counted this request
                    with trio.CancelScope(shield=True):
                        await self.state.release(decision.lease)

    async def _enqueue(
        self, head: RequestHead, conn: HTTPConnection, config: Config, record: RequestRecord, plan: Plan
    ) -> None:
        """Step 7 of a background request: stored as a job, answered 202 at once (proxy.jobapi)."""
        if self.jobs is None:
            raise Overloaded("background jobs are not running in this process", code="jobs_unavailable")
        job = await self.jobs.accept(head, conn, config, plan)
        structlog.contextvars.bind_contextvars(job=job.id[:12])
        record.status, record.completed = 202, True

    async def _serve_job(
        self, head: RequestHead, conn: HTTPConnection, config: Config, record: RequestRecord, request_id: str,
        job_id: str,
    ) -> None:  # fmt: skip
        """``GET``/``DELETE /jobs/<id>``: the id is the capability; no signature is involved."""
        await self._drain_request_body(conn)
        record.upstream_path = "/jobs/…"  # never the id in a log line: it grants access to the job
        if self.jobs is None:
            raise no_such_job(config)
        record.status = await self.jobs.serve(head, conn, config, job_id, request_id)
        record.completed = True

    async def _forward(
        self,
        head: RequestHead,
        conn: HTTPConnection,
        config: Config,
        record: RequestRecord,
        plan: Plan,
        flight: Flight | None = None,
        cache_headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        """Step 7: forward, with the body checked against the JSON rules as it passes, then relay."""
        async with AsyncExitStack() as stack:
            content_length: int | None = None
            upstream_body: bytes | AsyncGenerator[bytes, None] | None = None
            if plan.body is not None:
                upstream_body = await policy.checked_body(plan.rules, plan.declared_length, plan.body)
                content_length = len(plan.body)
            elif _has_body(head):
                # An unsigned body streams through; only what the body rules need is held back.
                content_length = plan.declared_length
                chunks = await stack.enter_async_context(aclosing(conn.body_chunks()))
                checked = await policy.checked_body(plan.rules, plan.declared_length, chunks)
                upstream_body = await stack.enter_async_context(aclosing(checked))
            request = UpstreamRequest(
                method=head.method,
                url=plan.upstream_url,
                headers=forwarding.request_headers(
                    head.headers, plan.credential.headers, plan.ctx, content_length=content_length
                ),
                body=upstream_body,
                address_policy=_address_policy(plan.credential, config.server.allow_private_upstreams),
            )
            forward_at = trio.current_time()
            self.metrics.in_flight.inc()
            try:
                async with self.upstream.open(request) as response:
                    head_at = trio.current_time()
                    record.ttfb = head_at - record.started
                    record.status = response.status
                    usage = UsageObserver(response.content_type)
                    observers: tuple[BodyObserver, ...] = (usage,)
                    if flight is not None:
                        cache_headers = (self._begin_flight(flight, response, config, plan),)
                        observers = (usage, flight)
                    await self._respond(conn, response, record, config, plan.origin, plan.request_id, cache_headers)
                    record.overhead = (forward_at - record.started) + (record.head_sent_at - head_at)
                    await relay(conn, response, record, observers, engine=self.engine, watcher=record.client_watch)
                    record.usage = usage.usage
                    if flight is not None and usage.usage is not None:
                        flight.usage = (usage.usage.prompt_tokens, usage.usage.completion_tokens)
            finally:
                self.metrics.in_flight.dec()

    async def _open_session(
        self, head: RequestHead, conn: HTTPConnection, config: Config, record: RequestRecord, plan: Plan
    ) -> None:
        """Step 7 for a WebSocket: the upstream's handshake, then the client's 101, then the session.

        Until the upstream has accepted, a failure is an HTTP error like any other; from the 101
        on, the session ends with close frames and its report fills the request's record.
        """
        proposed = ws_policy.parse_subprotocols(head.header(b"sec-websocket-protocol"))
        offered, dropped = ws_policy.split_subprotocols(proposed)
        if dropped:  # the count only: each was an API key
            log.warning("websocket_key_subprotocol_dropped", count=dropped)
        session = SessionPlan(
            target=ws_policy.upstream_target(plan.upstream_url),
            headers=ws_policy.upstream_headers(head.headers, plan.credential.headers, plan.ctx),
            subprotocols=offered,
            address_policy=_address_policy(plan.credential, config.server.allow_private_upstreams),
            response_headers=[(b"x-request-id", plan.request_id.encode())],
        )

        def hand_over() -> tuple[trio.abc.Stream, bytes]:
            stream, after_head = conn.hand_over()
            return stream, ws_policy.handshake_request(head.target, head.headers) + after_head

        record.session = report = SessionReport()
        self.metrics.in_flight.inc()
        try:
            await self.websockets.run(session, hand_over, report)
        finally:
            self.metrics.in_flight.dec()
            if report.outcome is not None:  # the client was handed over: the session decided
                record.status = 101 if report.accepted else None
                record.outcome, record.completed, record.usage = report.outcome, True, report.usage
                if report.outcome == ws_policy.UPSTREAM_ERROR:
                    record.error = f"the upstream ended the session with {report.client_code}"
                    record.error_code = "upstream_websocket_error"

    @staticmethod
    def _begin_flight(flight: Flight, response: UpstreamResponse, config: Config, plan: Plan) -> tuple[bytes, bytes]:
        """Tell the flight the upstream's head (whether followers may share it, whether it may be
        stored once complete); return the leader's Cache-Status."""
        cached = plan.cache
        assert cached is not None
        reason = unstorable_reason(
            response.status,
            response.headers,
            cached.rules,
            max_entry_bytes=cached.max_entry_bytes,
            key_headers=config.cache.key_headers,
        )
        flight.begin(response.status, tuple(forwarding.response_headers(response.headers)), share=reason is None)
        result = "miss" if cached.plan.lookup else "refresh"
        return cache_status(result, stored=flight.store, detail=reason)

    @staticmethod
    def _own_headers(config: Config, plan: Plan) -> list[tuple[bytes, bytes]]:
        """What Parkway adds to every answer of this request: CORS and the request id."""
        return [*cors.response_headers(config.cors, plan.origin), (b"x-request-id", plan.request_id.encode())]

    async def _respond(
        self,
        conn: HTTPConnection,
        response: UpstreamResponse,
        record: RequestRecord,
        config: Config,
        origin: str | None,
        request_id: str,
        extra_headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        """Send the client the upstream's status and headers (hop-by-hop ones replaced by ours)."""
        out_headers = forwarding.response_headers(response.headers)
        length = next((v for n, v in out_headers if n == b"content-length"), None)
        record.expected_length = int(length) if length is not None and length.isdigit() else None
        if forwarding.is_event_stream(out_headers):
            # nginx in front would otherwise buffer the stream (X-Accel-Buffering).
            out_headers.append((b"x-accel-buffering", b"no"))
        out_headers += cors.response_headers(config.cors, origin)
        out_headers.append((b"x-request-id", request_id.encode()))
        out_headers += extra_headers
        # A small fixed-length answer's head waits for its body, and so does any head whose first
        # body bytes came with it (an SSE answer's first event): one write instead of two.
        small = record.expected_length is not None and record.expected_length <= SMALL_RESPONSE_BYTES
        await conn.send_head(response.status, out_headers, flush=not (small or response.initial))
        record.head_sent_at = trio.current_time()

    @staticmethod
    async def _watch_client(conn: HTTPConnection, scope: trio.CancelScope, record: RequestRecord) -> None:
        # The relay engine stops this watch once it relays the body: it watches the client itself.
        with trio.CancelScope() as record.client_watch:
            await conn.request_done.wait()
            await conn.wait_disconnect()
        if record.client_watch.cancelled_caught:
            return
        if record.expected_length is not None and record.relayed >= record.expected_length:
            return  # it read the whole (fixed-length) answer and closed: that is not leaving early
        record.outcome = "client_gone"
        record.error = "client closed the connection before the response was complete"
        scope.cancel()

    @staticmethod
    async def _drain_request_body(conn: HTTPConnection) -> None:
        async for _ in conn.body_chunks():
            pass

    # --- the one mapping from errors to responses -----------------------------------------

    async def _send_error(
        self, head: RequestHead | None, conn: HTTPConnection, config: Config, exc: ParkwayError, request_id: str
    ) -> None:
        status, headers, body = error_response(exc)
        origin = head.header(b"origin") if head else None
        headers += cors.response_headers(config.cors, origin)
        headers.append((b"x-request-id", request_id.encode()))
        try:
            await conn.send_full(status, headers, body)
        except ClientGone:
            pass


def _header_map(head: RequestHead) -> dict[str, str]:
    """Lower-case name → value (repeats joined), as the signature check wants them."""
    out: dict[str, str] = {}
    for name, value in head.headers:
        key = name.decode("latin-1")
        try:  # signers sign header values as UTF-8 text
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            text = value.decode("latin-1")
        out[key] = f"{out[key]}, {text}" if key in out else text
    return out


def _canonical_paths(path: str, *prefixes: str) -> tuple[str, ...]:
    """Paths a signer may have signed: as received, ``/`` (Signway's server), and with the
    public prefix put back when a proxy in front (nginx at ``/ai``) stripped it."""
    paths = [path, "/"]
    for prefix in prefixes:
        if prefix and not path.startswith(prefix + "/"):
            paths.append(prefix + path)
    return tuple(paths)


@lru_cache(maxsize=256)
def _request_policy(credential: Credential, inspect_bytes: int, overflow: str) -> policy.RequestPolicy:
    """The credential's rules as the policy module takes them (cached: credentials are frozen)."""
    return policy.RequestPolicy(
        allowed_methods=credential.allowed_methods,
        allowed_path_prefixes=credential.allowed_paths,
        max_body_bytes=credential.max_body_bytes,
        allowed_models=credential.allowed_models,
        max_tokens_cap=credential.max_tokens,
        max_n=credential.max_n,
        inspect_bytes=inspect_bytes,
        overflow=overflow,
    )


@lru_cache(maxsize=256)
def _address_policy(credential: Credential, allow_private: bool) -> ssrf.AddressPolicy:
    return ssrf.policy_for(
        allow_private=allow_private or credential.allow_private_upstreams,
        allowed_upstreams=credential.allowed_upstreams,
    )


_NO_CACHE_RULES = CacheRules()


def _check_upstream_nowait(plan: Plan, config: Config) -> None:
    """The part of the SSRF guard that needs no DNS, for answers served without connecting (a hit,
    a collapsed follower): the scheme, and an upstream named by its IP address. Names are checked
    when a connection is made; a hit makes none."""
    origin = plan.upstream_url.split("/", 3)[:3]  # scheme:, "", host[:port]
    refusal = _origin_refusal("/".join(origin), plan.credential, config.server.allow_private_upstreams)
    if refusal is not None:
        raise Forbidden(refusal[0], code=refusal[1])


@lru_cache(maxsize=1024)
def _origin_refusal(origin: str, credential: Credential, allow_private: bool) -> tuple[str, str] | None:
    """Why the address guard refuses ``origin`` outright (message, code), or None (cached: hot path)."""
    parts = urlsplit(origin)
    try:
        ssrf.check_scheme(parts.scheme)
        try:
            ip = ssrf.parse_ip(parts.hostname or "")
        except ValueError:
            return None
        _address_policy(credential, allow_private).check(ip, parts.hostname)
    except Forbidden as exc:
        return exc.message, exc.code
    return None


def _cache_miss() -> CacheMiss:
    return CacheMiss("no stored answer, and the request said Cache-Control: only-if-cached")


def _has_body(head: RequestHead) -> bool:
    length = head.header(b"content-length")
    return head.header(b"transfer-encoding") is not None or (length is not None and length.strip() != "0")
