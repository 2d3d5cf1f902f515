"""Admission, between the plan (steps 1-6) and step 7: the global in-flight gate (503), the
credential's and user's limits (429) and single use (403), with every slot given back."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import trio

from .. import limits
from ..config import Config
from ..limits import GlobalGate, StateBackend
from .budget import Budgets, budget_hold
from .plan import Plan, Request, Step


def gate_settings(config: Config) -> tuple[int | None, int, float]:
    return config.server.max_in_flight, config.server.max_queued, config.server.queue_timeout


def gate_for(config: Config) -> GlobalGate:
    max_in_flight, max_queued, queue_timeout = gate_settings(config)
    return GlobalGate(max_in_flight, max_waiting=max_queued, queue_timeout=queue_timeout)


class Admission:
    """Runs step 7 once a request is admitted. ``gate`` is replaced when a reload changes the
    in-flight cap; requests admitted by the old gate finish and release there."""

    def __init__(self, config: Config, state: StateBackend, clock: Callable[[], datetime], budgets: Budgets):
        self.gate = gate_for(config)
        self._gate_settings = gate_settings(config)
        self.state = state
        self.clock = clock
        self.budgets = budgets

    def apply(self, config: Config) -> None:
        """A reloaded config: a changed in-flight cap gets a new gate."""
        if gate_settings(config) != self._gate_settings:
            self.gate = gate_for(config)
            self._gate_settings = gate_settings(config)

    async def admit(self, req: Request, step7: Step, *, limits_passed: bool = False) -> None:
        """Admission (in-flight gate, limits, single use, budgets), then ``step7``; slots and
        budget holds always given back (the hold replaced by what the request cost).
        ``limits_passed``: rate limits and single use were already passed (a follower going alone).

        A WebSocket session holds its slots for its whole life, as a stream does."""
        plan = req.plan
        credential = plan.credential
        keys = limits.limit_keys(credential.id, credential.limits, plan.user, credential.user_limits)
        if limits_passed:
            keys = limits.split_limits(keys)[1]
        trace = req.record.trace
        step = trace.start_step("parkway.limits") if trace is not None else None
        # Plain try/finally rather than ``gate.slot()`` and ``budget_hold`` for a credential
        # without budgets: each async context manager costs a generator and two awaits.
        gate = self.gate
        await gate.acquire()
        try:
            decision = await self.state.acquire(keys, trio.current_time()) if keys else limits.ALLOWED
            decision.raise_if_refused()
            try:
                if plan.single_use and not limits_passed:
                    await self.check_single_use(req.config, plan)
                if not credential.budgeted:
                    if trace is not None:  # limits passed; a refusal: closed at the end
                        trace.end_step(step)
                    await step7(req)
                    return
                async with budget_hold(self.budgets, req) as req:
                    if trace is not None:  # limits and the budget's hold passed; a refusal: closed at the end
                        trace.end_step(step)
                    await step7(req)
            finally:
                if decision.lease is not None:  # None: no concurrency limit counted this request
                    with trio.CancelScope(shield=True):
                        await self.state.release(decision.lease)
        finally:
            gate.release()

    async def admit_without_upstream(self, req: Request) -> None:
        """Admission of a request served without an upstream call (a cache hit, a collapsed
        follower): request-rate limits and single use, but no in-flight slot and no lease."""
        credential = req.plan.credential
        keys = limits.limit_keys(credential.id, credential.limits, req.plan.user, credential.user_limits)
        rate, _ = limits.split_limits(keys)
        if rate:
            decision = await self.state.acquire(rate, trio.current_time())
            decision.raise_if_refused()
        await self.check_single_use(req.config, req.plan)

    async def check_single_use(self, config: Config, plan: Plan) -> None:
        if plan.single_use:
            # Remembered until the last moment the URL could still verify.
            last_valid = plan.expires_at + config.server.clock_skew
            if not await self.state.check_and_add_signature(plan.signature, last_valid, self.clock().timestamp()):
                raise limits.replay_refusal()
