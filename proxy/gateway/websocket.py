"""Step 7 for a WebSocket handshake: the upstream's handshake, the client's 101, then the session
(:mod:`proxy.websocket.session` runs it; :mod:`proxy.websocket.policy` decides what crosses)."""

from __future__ import annotations

import trio

from ..metrics import Metrics
from ..record import log
from ..websocket import policy as ws_policy
from ..websocket.session import SessionPlan, SessionReport, WebSocketProxy
from .budget import budget_headers, usage_cap
from .plan import Request, address_policy


async def open_session(
    websockets: WebSocketProxy,
    metrics: Metrics,
    req: Request,
) -> None:
    """Step 7 for a WebSocket: the upstream's handshake, then the client's 101, then the session.

    Until the upstream has accepted, a failure is an HTTP error like any other; from the 101
    on, the session ends with close frames and its report fills the request's record.
    """
    head, conn, config, record, plan = req.head, req.conn, req.config, req.record, req.plan
    proposed = ws_policy.parse_subprotocols(head.header(b"sec-websocket-protocol"))
    offered, dropped = ws_policy.split_subprotocols(proposed)
    if dropped:  # the count only: each was an API key
        log.warning("websocket_key_subprotocol_dropped", count=dropped)
    session = SessionPlan(
        target=ws_policy.upstream_target(plan.upstream_url),
        headers=ws_policy.upstream_headers(head.headers, plan.credential.headers, plan.ctx),
        subprotocols=offered,
        address_policy=address_policy(plan.credential, config.server.allow_private_upstreams),
        response_headers=[(b"x-request-id", plan.request_id.encode()), *budget_headers(plan)],
        usage_cap=usage_cap(plan),
    )

    def hand_over() -> tuple[trio.abc.Stream, bytes]:
        stream, after_head = conn.hand_over()
        return stream, ws_policy.handshake_request(head.target, head.headers) + after_head

    record.session = report = SessionReport()
    span = record.trace.websocket(plan.upstream_url) if record.trace is not None else None
    metrics.in_flight += 1
    try:
        await websockets.run(session, hand_over, report)
    finally:
        metrics.in_flight -= 1
        if span is not None and record.trace is not None:
            record.trace.end_websocket(span, report)
        if report.outcome is not None:  # the client was handed over: the session decided
            record.status = 101 if report.accepted else None
            record.outcome, record.completed, record.usage = report.outcome, True, report.usage
            if report.outcome == ws_policy.UPSTREAM_ERROR:
                record.error = f"the upstream ended the session with {report.client_code}"
                record.error_code = "upstream_websocket_error"
