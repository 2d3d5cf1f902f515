"""The budgets' step of the gateway: hold a request's worst case before it is forwarded, replace
the hold by what it really cost when it ends (docs/budgets.md; the arithmetic is
:mod:`proxy.limits.budget`, the stores :mod:`proxy.limits.budget_state`).

Admission (:mod:`proxy.gateway.admit`) wraps step 7 in :func:`budget_hold`; for a credential
without budgets it does nothing. This module never imports the handler.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
import trio

from .. import policy
from ..config import Config, Credential
from ..errors import Forbidden, ParkwayError
from ..http.connection import ClientGone
from ..limits import (
    NANO_USD,
    NOTHING,
    USAGE,
    USD,
    BudgetStore,
    BudgetTicket,
    Charge,
    RequestCost,
    Settlement,
    amount,
    applied_budgets,
    charge_for,
    rate_limit_headers,
    refusal,
    request_cost,
    session_cap,
    session_charge,
)
from ..metrics import Metrics
from ..record import RequestRecord
from ..relay.usage import Usage, UsageChunkRemover
from ..upstream.client import UpstreamResponse
from .plan import Plan, Request

log = structlog.get_logger("parkway.budget")

# The log fields of a request served without an upstream call.
FREE = {"budget_charge": 0, "budget_estimate": "free:cache"}


@dataclass(frozen=True, slots=True)
class Budgets:
    """What the budget step needs: the store, the metrics, the clock that picks windows."""

    store: BudgetStore
    metrics: Metrics
    clock: Callable[[], datetime]


def has_budget(credential: Credential) -> bool:
    """Whether budgets apply to the credential's requests (decided once, when it is built)."""
    return credential.budgeted


@asynccontextmanager
async def budget_hold(gw: Budgets, req: Request) -> AsyncIterator[Request]:
    """Hold the request's worst case in every budget that applies (or refuse it: 429
    ``budget_exhausted``, nothing forwarded), yield the request to forward (its body with the
    output cap written in), and charge what it cost when it ends, however it ends. The body was
    read whole by the plan (:func:`~proxy.gateway.handler.read_body_if_needed`)."""
    config, record, plan = req.config, req.record, req.plan
    credential = plan.credential
    if not credential.budgeted:
        yield req
        return
    if plan.websocket:
        cost = _session_cost(credential, config)
    else:
        cost = request_cost(
            plan.body,
            path=record.upstream_path or "",
            settings=config.budgets,
            cap=credential.max_tokens,
            want_usage=plan.background is None,
        )
    if cost.body is not None and plan.rules.inspects_body:
        await policy.checked_body(plan.rules, len(cost.body), cost.body)  # refused before anything is held
    now = gw.clock()
    budgets, price = applied_budgets(
        credential.id, credential.budget, plan.user, credential.user_budget, cost, config.budgets.price_table, now
    )
    hold_id = secrets.token_hex(12)
    reservation = await gw.store.reserve(budgets, hold_id)
    fields: dict[str, Any] = {"budget_hold": cost.tokens}
    if cost.unbounded:
        fields["budget_unbounded"] = list(cost.unbounded)
    if not reservation.allowed:
        refused = budgets[reservation.refused]
        gw.metrics.budget_refusals.labels(refused.name).inc()
        record.budget = {**fields, "budget": refused.name}
        raise refusal(refused, reservation.levels[0], now.timestamp())
    if not reservation.enforced:
        fields["budget_enforced"] = False
        log.warning("budget_unenforced", reason="the shared budget store is unreachable and failure_policy is open")
    headers = rate_limit_headers(list(zip(budgets, reservation.levels, strict=True)), now.timestamp())
    ticket = BudgetTicket(hold_id, budgets, cost, price, headers, reservation.enforced, gw.store.ledger)
    record.budget = fields
    forwarded = plan._replace(
        body=cost.body,
        declared_length=len(cost.body) if cost.body is not None else plan.declared_length,
        budget=ticket,
    )
    failure: BaseException | None = None
    try:
        yield req._replace(plan=forwarded)
    except BaseException as exc:
        failure = exc
        raise
    finally:
        with trio.CancelScope(shield=True):
            await _settle(gw, record, forwarded, ticket, failure, config.budgets.price_table.version)


def _session_cost(credential: Credential, config: Config) -> RequestCost:
    """A WebSocket session holds a fixed amount, and is closed once it has used it (:func:`usage_cap`)."""
    if any(spec is not None and spec.unit == USD for spec in (credential.budget, credential.user_budget)):
        raise Forbidden(
            f"credential {credential.id!r} has a usd budget, and realtime audio is not priced by the price table "
            "(see docs/budgets.md)",
            code="budget_unmetered",
        )
    return RequestCost(config.budgets.session_hold, 0, None, None, unbounded=("a WebSocket session",))


async def _settle(
    gw: Budgets,
    record: RequestRecord,
    plan: Plan,
    ticket: BudgetTicket,
    failure: BaseException | None,
    prices_version: str,
) -> None:
    outcome, code = record.outcome, record.error_code
    if isinstance(failure, ParkwayError):
        outcome, code = failure.outcome, failure.code
    elif isinstance(failure, ClientGone) or (failure is not None and record.outcome == "ok"):
        outcome = "client_gone" if isinstance(failure, ClientGone) else "cancelled"
    usage = record.usage
    used = (usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens) if usage is not None else None
    if plan.websocket:
        session = record.session
        if session is not None and session.accepted:
            charge = session_charge(ticket.cost, used, session.responses_open)
        else:  # the upstream or the client gave up before the 101: no session, nothing billed
            charge = Charge(0, 0, 0, NOTHING, "session_not_opened")
    else:
        charge = charge_for(
            ticket.cost, used, status=record.status, outcome=outcome, error_code=code,
            background=plan.background is not None,
        )  # fmt: skip
    amounts = [amount(b, charge, ticket.price) for b in ticket.budgets]
    settled = await gw.store.settle(ticket.budgets, ticket.hold_id, amounts)
    _tell(gw, record, plan, ticket, charge, settled, prices_version)


def _tell(
    gw: Budgets,
    record: RequestRecord,
    plan: Plan,
    ticket: BudgetTicket,
    charge: Charge,
    settled: Settlement,
    prices_version: str,
) -> None:
    """The charge in the request's log line and the metrics; a lost charge is an error, one whose
    fate Redis has not told yet a warning (docs/budgets.md#when-redis-fails-to-answer)."""
    tokens = charge.input_tokens + charge.output_tokens
    fields = record.budget if record.budget is not None else {}
    fields.update(
        budget_charge=tokens, budget_estimate=f"{charge.kind}:{charge.why}" if charge.kind != USAGE else USAGE
    )
    usd = None
    if ticket.price is not None:
        usd = ticket.price.cost(charge.input_tokens, charge.cached_tokens, charge.output_tokens) / NANO_USD
        fields.update(budget_charge_usd=round(usd, 9), prices_version=prices_version)
    record.budget = fields
    credential = plan.credential.id
    provisional = plan.background is not None  # a job's hold: the runner counts what it really cost
    if tokens and not provisional:
        gw.metrics.budget_tokens.labels(credential).inc(tokens)
    if usd and not provisional:
        gw.metrics.budget_usd.labels(credential).inc(usd)
    if charge.kind == USAGE and tokens > ticket.cost.tokens:
        log.warning(
            "budget_hold_exceeded", hold=ticket.cost.tokens, charge=tokens, unbounded=list(ticket.cost.unbounded)
        )
    if settled is Settlement.NOT_RECORDED:
        log.error(
            "budget_charge_lost",
            charge=tokens,
            budgets=[b.name for b in ticket.budgets],
            reason="the shared budget store is unreachable; the charge was not sent; the hold expires with its lease",
        )
    elif settled is Settlement.UNKNOWN:
        log.warning(
            "budget_charge_unknown",
            charge=tokens,
            budgets=[b.name for b in ticket.budgets],
            reason="the shared budget store did not answer; the settlement may be recorded when Redis answers, "
            "else the hold expires with its lease",
        )


def usage_remover(plan: Plan, response: UpstreamResponse) -> UsageChunkRemover | None:
    """The SSE rewrite that takes out the usage chunk Parkway asked for on the client's behalf."""
    ticket = plan.budget
    if ticket is None or not ticket.cost.strip_usage:
        return None
    if not response.content_type.lower().startswith("text/event-stream"):
        return None
    return UsageChunkRemover()


def usage_cap(plan: Plan) -> Callable[[Usage], str | None] | None:
    """For a WebSocket session under a budget: the reason to close it once it used its hold."""
    if plan.budget is None:
        return None
    cap = session_cap(plan.budget.cost.tokens)
    return lambda usage: cap(usage.total_tokens)


def budget_headers(plan: Plan) -> tuple[tuple[bytes, bytes], ...]:
    return plan.budget.headers if plan.budget is not None else ()
