"""The gateway: the one place that sees every pure piece, in the order a request needs them.

1. parse the signed URL          (signing.parse_signed_request)
2. find the credential's secrets (config)
3. check validity and headers    (signing.check_validity)
4. read the body only if signed  (http_server, bounded)
5. verify the signature          (signing.verify_signature)
6. apply the credential's policy (urls.url_allowed)
7. forward and stream back       (forwarding + upstream, policy.checked_body, relay)
   or, for a WebSocket handshake, open the session (gateway_ws), for a background request
   store a job (gateway_jobs), for a cacheable one answer from the cache (gateway_cache)

What steps 1-6 decide is a :class:`~proxy.gateway.plan.Plan`; a client that leaves mid-way cancels
the work (:mod:`proxy.relay.client_watch`).

Nothing reaches the upstream before step 6 has passed. Every refusal is a
:class:`~proxy.errors.ParkwayError`, answered by :meth:`Gateway.reject` and logged once
(the request's record, log line and metrics: :mod:`proxy.record`).
"""

from __future__ import annotations

import math
import secrets as _secrets
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import AsyncExitStack, aclosing
from datetime import UTC, datetime, timedelta
from functools import partial

import structlog
import trio

from .. import cors, forwarding, policy
from ..cache.flight import Flight, ResponseCache
from ..cache.policy import CacheRequest
from ..config import Config
from ..errors import (
    BadRequest,
    BodyTooLarge,
    Forbidden,
    InternalError,
    ParkwayError,
    UnknownCredential,
    UpstreamTimeout,
    client_text,
    error_response,
)
from ..http.connection import ClientGone, HTTPConnection, RequestHead
from ..jobs.api import JobAPI
from ..jobs.background import background_ask, job_id_from_path
from ..limits import limiter as limits
from ..limits.admission import GlobalGate
from ..limits.state import MemoryState, StateBackend
from ..metrics import Metrics
from ..record import RequestRecord, count_request, log, log_request
from ..relay.client_watch import unless_client_leaves
from ..relay.pump import BodyObserver, EpollEngine, relay
from ..relay.usage import UsageObserver
from ..signing import check_validity, parse_signed_request, verify_signature
from ..upstream.client import UpstreamClient, UpstreamRequest, UpstreamResponse
from ..urls import check_unambiguous_path, origin_and_target, url_allowed
from ..websocket import policy as ws_policy
from ..websocket.session import WebSocketProxy
from .cache import begin_flight, cache_request, serve_cacheable
from .jobs import enqueue, serve_job
from .plan import Plan, address_policy, canonical_paths, has_body, header_map, request_policy
from .websocket import open_session


def utcnow() -> datetime:
    return datetime.now(UTC)


async def _pass_informational(conn: HTTPConnection, status: int, headers: list[tuple[bytes, bytes]]) -> None:
    """An upstream's unasked 1xx (103 Early Hints) to the client, under the response header policy."""
    await conn.send_informational(status, forwarding.response_headers(headers))


class Gateway:
    """The application behind :class:`~proxy.http.server.Server`; ``config`` may be swapped live."""

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
            await serve_job(self.jobs, head, conn, config, record, request_id, job_id)
            return
        plan = await self._plan(head, conn, config, record, request_id, origin)
        if plan.websocket:
            # A session has limits of its own (idle_timeout, max_session_duration), not request_timeout.
            overall.deadline = math.inf
            await self._admit(head, conn, config, record, plan, partial(open_session, self.websockets, self.metrics))
        elif plan.cache is not None:
            await unless_client_leaves(
                self.engine, conn, record, partial(serve_cacheable, self), head, conn, config, record, plan
            )
        else:
            step7 = self._forward if plan.background is None else partial(enqueue, self.jobs)
            await unless_client_leaves(self.engine, conn, record, self._admit, head, conn, config, record, plan, step7)

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
        headers = header_map(head)
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
            paths=canonical_paths(head.path, config.server.public_path_prefix, ctx.prefix),
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
        rules = request_policy(credential, config.server.inspect_body_bytes, config.server.body_rules_overflow)
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
            cached, body = await cache_request(
                head, conn, config, credential, extras, upstream_url, user, body, declared_length
            )
        if body is None and not has_body(head):
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

    async def _check_single_use(self, config: Config, plan: Plan) -> None:
        if plan.single_use:
            # Remembered until the last moment the URL could still verify.
            last_valid = plan.expires_at + timedelta(seconds=config.server.clock_skew)
            if not await self.state.check_and_add_signature(
                plan.signature, last_valid.timestamp(), self.clock().timestamp()
            ):
                raise limits.replay_refusal()

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
            elif has_body(head):
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
                address_policy=address_policy(plan.credential, config.server.allow_private_upstreams),
                informational=partial(_pass_informational, conn),
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
                        cache_headers = (begin_flight(flight, response, config, plan),)
                        observers = (usage, flight)
                    await self._respond(conn, response, record, config, plan.origin, plan.request_id, cache_headers)
                    record.overhead = (forward_at - record.started) + (record.head_sent_at - head_at)
                    await relay(conn, response, record, observers, engine=self.engine, watcher=record.client_watch)
                    record.usage = usage.usage
                    if flight is not None and usage.usage is not None:
                        flight.usage = (usage.usage.prompt_tokens, usage.usage.completion_tokens)
            finally:
                self.metrics.in_flight.dec()

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
        # A head whose first body bytes came with it (an SSE answer's first event, a small JSON
        # answer), or whose answer has no body, goes out with them in one write: the relay's
        # first write takes it. Any other head goes out now, so a client sees it as soon as
        # it arrived, whether or when the body follows (docs/proxying.md).
        hold = bool(response.initial) or response.framing.bodiless
        await conn.send_head(response.status, out_headers, flush=not hold)
        record.head_sent_at = trio.current_time()

    @staticmethod
    async def _drain_request_body(conn: HTTPConnection) -> None:
        async for _ in conn.body_chunks():
            pass

    # --- the one mapping from errors to responses -----------------------------------------

    async def _send_error(
        self, head: RequestHead | None, conn: HTTPConnection, config: Config, exc: ParkwayError, request_id: str
    ) -> None:
        status, headers, body = error_response(exc, head_only=conn.head_only)
        origin = head.header(b"origin") if head else None
        headers += cors.response_headers(config.cors, origin)
        headers.append((b"x-request-id", request_id.encode()))
        try:
            await conn.send_full(status, headers, body)
        except ClientGone:
            pass
