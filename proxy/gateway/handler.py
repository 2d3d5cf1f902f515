"""The gateway: the one place that sees every pure piece, in the order a request needs them.

1. parse the signed URL          (verify.parse_signed_request)
2. find the credential's secrets (config)
3. check validity and headers    (verify.check_validity)
4. read the body only if signed  (:func:`read_body`, bounded)
5. verify the signature          (verify.verify_signature)
6. apply the credential's policy (urls.url_allowed, policy), read a job's or a cache key's body
   (:func:`read_body` again), then admission (:mod:`proxy.gateway.admit`)
7. forward and stream back       (:mod:`proxy.gateway.forward`)
   or, for a WebSocket handshake, open the session (:mod:`proxy.gateway.websocket`), for a
   background request store a job (:mod:`proxy.gateway.jobs`), for a cacheable one answer from
   the cache (:mod:`proxy.gateway.cache`)

What steps 1-6 decide is a :class:`~proxy.gateway.plan.Plan`; from there every step takes one
:class:`~proxy.gateway.plan.Request` (head, connection, config, record, plan) and step 7 in each
form is a :data:`~proxy.gateway.plan.Step`, built once with the gateway. A client that leaves
mid-way cancels the work (:mod:`proxy.relay.client_watch`).

Nothing reaches the upstream before step 6 has passed. Every refusal is a
:class:`~proxy.errors.ParkwayError`, answered by :meth:`Gateway.reject` and logged once
(the request's record, log line and metrics: :mod:`proxy.record`).
"""

from __future__ import annotations

import math
import os
import secrets as _secrets
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING

import trio

from .. import cors, forwarding, limits, policy
from ..cache.flight import ResponseCache
from ..cache.policy import CacheRequest
from ..config import Config
from ..errors import (
    BodyTooLarge,
    InternalError,
    ParkwayError,
    UnknownCredential,
    UpstreamTimeout,
    client_text,
    error_response,
)
from ..http.connection import ClientGone, HTTPConnection, RequestHead
from ..jobs.api import JobAPI
from ..jobs.background import BackgroundAsk, background_ask, job_id_from_path
from ..limits import BudgetStore, GlobalGate, MemoryBudgets, MemoryState, StateBackend
from ..logs import request_fields
from ..metrics import Metrics
from ..record import RequestRecord, count_request, finish_trace, log, log_request, trace_route
from ..relay.client_watch import unless_client_leaves
from ..relay.pump import EpollEngine
from ..upstream.client import UpstreamClient
from ..urls import origin_and_target
from ..verify import check_validity, parse_signed_request, verify_signature
from ..websocket.session import WebSocketProxy
from .admit import Admission
from .budget import Budgets
from .cache import ServeCacheable, cache_ask, keyed
from .forward import Forward
from .jobs import enqueue, serve_job
from .plan import (
    Plan,
    Request,
    Step,
    canonical_paths,
    check_upstream,
    has_body,
    header_map,
    request_policy,
)
from .websocket import open_session

if TYPE_CHECKING:  # loaded only when tracing is on
    from ..telemetry.tracing import Tracing


# The gateway's default clock: a partial, so that reading it runs no Python frame.
utcnow: Callable[[], datetime] = partial(datetime.now, UTC)


class _RequestIds:
    """16 hex digits, unique across requests and worker processes without a system call per
    request (``token_hex`` is a ``getrandom`` each time): a random 40-bit prefix drawn per
    process (again in a forked child, and whenever the 24-bit counter after it wraps)."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self._prefix, self._next = _secrets.token_hex(5), 0

    def __call__(self) -> str:
        n = self._next
        if n >= 1 << 24:
            self.reset()
            n = 0
        self._next = n + 1
        return f"{self._prefix}{n:06x}"


new_request_id = _RequestIds()


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
        jobs: JobAPI | None = None,
        clock: Callable[[], datetime] = utcnow,
        engine: EpollEngine | None = None,
        websockets: WebSocketProxy | None = None,
        budgets: BudgetStore | None = None,
        tracing: Tracing | None = None,
    ):
        self.config = config
        self.tracing = tracing  # None: [telemetry] is off, and a request pays this one check
        self.engine = engine  # relays every stream's body when running; else each request's own task
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.cache = cache  # None: nothing is cached (tests and embedding that leave it out)
        self.jobs = jobs  # None: [jobs] is off; a background request is refused (503 jobs_unavailable)
        self.websockets = websockets or WebSocketProxy(config.websocket)
        self.budgets: BudgetStore = budgets or MemoryBudgets(clock)
        self.admission = Admission(config, state or MemoryState(), clock, Budgets(self.budgets, self.metrics, clock))
        # Step 7 in its forms; each takes one Request (proxy.gateway.plan.Step).
        self.forward = Forward(upstream, self.metrics, engine)
        self.serve_cacheable = (
            ServeCacheable(cache, self.admission, self.forward, self.metrics, upstream) if cache is not None else None
        )
        self.enqueue: Step = partial(enqueue, jobs)
        self.open_session: Step = partial(open_session, self.websockets, self.metrics)

    @property
    def gate(self) -> GlobalGate:
        """The in-flight gate new requests go through (replaced when a reload changes the cap)."""
        return self.admission.gate

    def apply(self, config: Config) -> None:
        """Take a reloaded config for new requests. A changed in-flight cap gets a new gate;
        requests admitted by the old one finish and release there, uncounted by the new one."""
        self.admission.apply(config)
        self.websockets.settings = config.websocket
        self.config = config

    # --- entry points called by the server ------------------------------------------------

    async def handle(self, head: RequestHead, conn: HTTPConnection) -> None:
        config = self.config  # one config for the whole request, even across a reload
        clock = trio.lowlevel.current_clock().current_time  # one frame a read, where trio.current_time is three
        record = RequestRecord(clock(), conn.head_bytes_in, conn.bytes_out, clock=clock)
        request_id = new_request_id()
        if self.tracing is not None:
            record.trace = self.tracing.request(
                head.method, head.path, head.query, head.peer, head.header(b"traceparent"),
                user_param=config.server.user_param,
            )  # fmt: skip
        # credential and user are bound later; bound here too (None), the reset undoes them, so
        # the next request on a kept-alive connection does not inherit them.
        tokens = request_fields.bind(request_id)
        try:
            try:
                with trio.CancelScope(deadline=record.started + (config.server.request_timeout or math.inf)) as overall:
                    record.scope = overall
                    await self._handle(head, conn, config, record, request_id, overall)
                if overall.cancelled_caught:
                    if record.outcome == "client_gone":  # the client watch cancelled it (relay.client_watch)
                        conn.abort()
                    elif record.failure is not None:  # the first byte's deadline, carried on this scope
                        raise record.failure
                    else:
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
                record.settle(conn.bytes_in, conn.bytes_out, clock())
                log_request(head, record)
                count_request(self.metrics, config, record)
                if record.trace is not None:
                    finish_trace(head, record, config, request_id)
        finally:
            request_fields.reset(tokens)

    async def reject(self, head: RequestHead | None, conn: HTTPConnection, exc: ParkwayError) -> None:
        """Answer a request the server refused before it reached :meth:`handle` (bad HTTP, too slow)."""
        config = self.config
        request_id = new_request_id()
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
        # (the method first: the Access-Control-Request-Method scan only for an OPTIONS)
        if head.method == "OPTIONS" and cors.is_preflight(
            head.method, origin, head.header(b"access-control-request-method")
        ):
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
        if record.trace is not None:
            record.trace.planned()
        req = Request(head, conn, config, record, plan)
        if plan.websocket:
            # A session has limits of its own (idle_timeout, max_session_duration), not request_timeout.
            overall.deadline = math.inf
            await self.admission.admit(req, self.open_session)
        elif plan.cache is not None and self.serve_cacheable is not None:
            await unless_client_leaves(self.engine, conn, record, partial(self.serve_cacheable, req), overall)
        else:
            step7 = self.forward if plan.background is None else self.enqueue
            await unless_client_leaves(self.engine, conn, record, partial(self.admission.admit, req, step7), overall)

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
        request_fields.credential(record.credential)
        if credential is None:
            raise UnknownCredential(f"unknown credential {client_text(signed.credential_id)}")
        check_validity(signed, self.clock(), clock_skew=config.server.clock_skew, max_expiry=config.server.max_expiry)
        headers = header_map(head)
        ctx = forwarding.forward_context(head.peer, headers, config.server.trusted_proxies)
        record.client = ctx.client_ip

        # 4: a signed body is read (bounded) and verified before anything is forwarded.
        body: bytes | None = None
        if signed.body_signed:
            body = await read_body(conn, head, config.server.max_signed_body_bytes, "signed bodies")

        # 5-6a: signature, then the credential's allowed upstreams.
        verify_signature(
            signed,
            method=head.method,
            secrets=credential.secrets,
            paths=canonical_paths(head.path, config.server.public_path_prefix, ctx.prefix),
            headers=headers,
            body=body,
        )
        if record.trace is not None:  # from here the signed pw_traceparent may be the trace's parent
            record.trace.verified(trace_route(head, config))
        # A signed header must reach the upstream as signed: no Connection header may strip it.
        if b"connection" in head.fields:
            forwarding.check_connection_header(head.headers, signed.signed_headers, credential.headers)
        _scheme, host, target = origin_and_target(signed.proxy_url)
        record.upstream_host, record.upstream_path = host, target.partition("?")[0]
        websocket = check_upstream(
            head, headers, config, credential, signed.proxy_url, origin, f"{host}{record.upstream_path}"
        )

        # 6b: request policy (method, path, size), the end user, then admission: global
        # in-flight cap (503), the credential's and user's limits (429), single use (403).
        # All after the signature: nobody can spend a credential's budget with forged URLs.
        # (Without extra signed parameters, the common case, there is no user, job or single-use ask.)
        extras = signed.extras
        user = limits.end_user(extras, config.server.user_param) if extras else None
        if user is not None:
            record.user = user
            request_fields.user(user)
        rules = request_policy(credential, config.server.inspect_body_bytes, config.server.body_rules_overflow)
        declared = head.header(b"content-length")
        declared_length = (
            len(body) if body is not None else (int(declared) if declared and declared.isdigit() else None)
        )
        policy.check_request(
            rules, method=head.method, upstream_path=record.upstream_path, content_length=declared_length
        )
        background = None if websocket or not extras else background_ask(
            extras, head.header(b"prefer"), config.jobs,
            credential=credential.id, allowed_callbacks=credential.allowed_callbacks,
        )  # fmt: skip
        upstream_url = signed.proxy_url.split("#", 1)[0]
        cached = None
        if self.cache is not None and not websocket and background is None:
            # 6c: the cache, only as the signer allowed it (a job's answer goes to its job, not the cache).
            cached = cache_ask(head, config, credential, extras, body is not None, declared_length)
        body_follows = has_body(head)  # two lookups in the head's header map
        if body is None and body_follows:
            budgeted = credential.budgeted and not websocket
            body = await read_body_if_needed(conn, head, config, background, cached, budgeted)
        if cached is not None and not cached.bypass:
            cached = keyed(cached, head, config, credential, upstream_url, user, body)
        if body is None and not body_follows:
            # Consume the (empty) body's end now: from here on a client that leaves is noticed,
            # even while queued for a slot.
            await self._drain_request_body(conn)
        single_use = (
            limits.wants_single_use(credential.single_use, extras, config.server.single_use_param)
            if extras
            else credential.single_use
        )
        # Positional, in Plan's field order (a test holds it to the names): 0.6 against 1.5 µs.
        return Plan(
            request_id,
            upstream_url,
            signed.signature,
            signed.signed_at + signed.expires,  # expires_at
            credential,
            ctx,
            origin,
            body,
            declared_length,
            body_follows,
            rules,
            user,
            single_use,
            websocket,
            background,
            config.server.public_path_prefix or ctx.prefix,  # prefix
            cached,  # cache
        )

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


async def read_body_if_needed(
    conn: HTTPConnection,
    head: RequestHead,
    config: Config,
    background: BackgroundAsk | None,
    cached: CacheRequest | None,
    budgeted: bool = False,
) -> bytes | None:
    """An unsigned body, read whole when the request needs it so: a job stores it (bounded as a
    signed body), a budget's hold is computed from it and its output cap written into it (bounded
    as a signed body), the cache keys on it (bounded by its own limit: past it the request
    bypassed the cache and its body streams). Otherwise None: the body streams to the upstream."""
    if background is not None or budgeted:
        what = "background requests" if background is not None else "requests under a budget"
        return await read_body(conn, head, config.server.max_signed_body_bytes, what)
    if cached is not None and not cached.bypass:
        return await read_body(conn, head, config.cache.max_body_bytes, "cache keys")
    return None


async def read_body(conn: HTTPConnection, head: RequestHead, limit: int, what: str) -> bytes:
    """The request body, whole: the one place the gateway reads one (a signed body at step 4, a
    job's or a cache key's after the policy). Past ``limit``: 413, and the connection closes."""
    declared = head.header(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        conn.close_after_response()
        raise BodyTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes for {what}")
    return await conn.read_body(limit)
