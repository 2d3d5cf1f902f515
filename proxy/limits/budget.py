"""Token and spend budgets, decided without I/O: specs, fixed UTC windows, the worst case of a
request (its hold), prices and the charge of an answer (see docs/budgets.md).

A budget is never overspent because a request is admitted only when, for every budget that
applies, ``spent + held + its hold <= limit`` (:class:`BudgetLedger` here for one process,
:mod:`proxy.limits.budget_redis` for many), and its hold is an upper bound of what it can cost:

* output: the ``max_tokens`` / ``max_completion_tokens`` / ``max_output_tokens`` of the body
  (times ``n``), or the cap Parkway writes into the body when it has none;
* text input: the body's size divided by ``input_bytes_per_token`` (1 by default: no tokenizer
  turns one byte of JSON into more than one token of prompt);
* what no body can bound (image, audio and file inputs; a body that is not JSON): a configured
  ``unbounded_hold`` more, and the request is logged as ``unbounded``.

Amounts are integers: tokens, or USD in nano-dollars (``NANO_USD``), always rounded up.
Everything takes ``now`` as an argument.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any

from ..errors import BadRequest, Forbidden, TooManyRequests
from .budget_spec import (
    CREDENTIAL,
    MICRO_USD,
    NANO_USD,
    TOKENS,
    USD,
    USER,
    BudgetsConfig,
    BudgetSpec,
    Price,
    PriceTable,
    window,
)

# Content parts whose tokens the body's size does not bound (OpenAI chat and Responses names).
MEDIA_PARTS = frozenset(
    {"image_url", "input_image", "image", "input_audio", "audio", "file", "input_file", "input_video", "video_url"}
)
# Fields that make the upstream add input the body does not show: earlier turns it stored, a
# stored prompt, and hosted tools whose results become input (Responses API names).
SERVER_SIDE_INPUT = ("previous_response_id", "conversation", "prompt")
HOSTED_TOOLS = frozenset(
    {"web_search", "web_search_preview", "file_search", "code_interpreter", "computer_use_preview", "mcp"}
)
# Endpoints with no generated output: nothing to cap, nothing to inject.
NO_OUTPUT_PATHS = ("/embeddings", "/moderations")


# --- what a request may cost -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestCost:
    """The worst case of one request, and the body to forward so that it holds."""

    input_tokens: int  # the bound of the prompt (unbounded parts included as configured)
    output_tokens: int  # the bound of the answer
    model: str | None
    body: bytes | None  # the body to forward (with the output cap / include_usage written in)
    unbounded: tuple[str, ...] = ()  # why part of it is not a true bound ("image input", ...)
    strip_usage: bool = False  # include_usage was asked for Parkway: its chunk is not the client's
    injected: tuple[str, ...] = ()  # fields written into the body

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def _token_fields(path: str) -> tuple[tuple[str, ...], str | None]:
    """The fields that cap output on this endpoint, and the one to write when none is given."""
    path = path.rstrip("/")
    if path.endswith(NO_OUTPUT_PATHS):
        return (), None
    if path.endswith("/responses"):
        return ("max_output_tokens",), "max_output_tokens"
    if path.endswith("/chat/completions"):
        return ("max_tokens", "max_completion_tokens"), "max_completion_tokens"
    return ("max_tokens", "max_completion_tokens", "max_output_tokens"), "max_tokens"


def _media_parts(value: Any, depth: int = 0) -> int:
    """How many image/audio/file parts a message list holds (bounded recursion)."""
    if depth > 8:
        return 0
    if isinstance(value, dict):
        found = 1 if value.get("type") in MEDIA_PARTS else 0
        return found + sum(_media_parts(v, depth + 1) for k, v in value.items() if k != "type")
    if isinstance(value, list):
        return sum(_media_parts(v, depth + 1) for v in value)
    return 0


def _pairs_once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise Forbidden(f"field {key!r} appears more than once in the JSON body", code="duplicate_field")
        seen[key] = value
    return seen


def request_cost(
    body: bytes | None, *, path: str, settings: BudgetsConfig, cap: int | None, want_usage: bool
) -> RequestCost:
    """The hold of a request to upstream ``path`` with ``body`` (read whole), and the body to send.

    ``cap``: the credential's ``max_tokens`` (written into a body without one; else
    ``default_max_tokens``). ``want_usage``: ask a streamed chat answer for its usage
    (``stream_options.include_usage``) when the client did not.
    """
    if not body:
        return RequestCost(0, 0, None, body)
    input_tokens = math.ceil(len(body) / settings.input_bytes_per_token)
    try:
        top: dict[str, Any] | None = json.loads(body, object_pairs_hook=_pairs_once)
    except (ValueError, UnicodeDecodeError):
        top = None
    if not isinstance(top, dict):
        hold = settings.unbounded_hold
        return RequestCost(input_tokens + hold, hold, None, body, unbounded=("a body that is not a JSON object",))
    model = top.get("model") if isinstance(top.get("model"), str) else None
    unbounded: list[str] = []
    media = _media_parts(top.get("messages")) + _media_parts(top.get("input"))
    if media:
        input_tokens += media * settings.unbounded_hold
        unbounded.append(f"{media} image/audio/file input{'s' if media > 1 else ''}")
    stored = [name for name in SERVER_SIDE_INPUT if top.get(name) not in (None, "", {}, [])]
    tools = top.get("tools")
    hosted = sorted(
        {t["type"] for t in tools if isinstance(t, dict) and t.get("type") in HOSTED_TOOLS}
        if isinstance(tools, list)
        else set()
    )
    for why in [*(f"input the upstream stored ({name})" for name in stored), *(f"{t} results" for t in hosted)]:
        input_tokens += settings.unbounded_hold
        unbounded.append(why)
    fields, inject_as = _token_fields(path)
    given = [top[f] for f in fields if top.get(f) is not None]
    for value in given:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise BadRequest("max_tokens must be a non-negative integer", code="invalid_field")
    injected: dict[str, Any] = {}
    if inject_as is None:
        output = 0
    elif given:
        output = max(given)
    else:
        output = cap if cap is not None else settings.default_max_tokens
        injected[inject_as] = output
    n = top.get("n")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise BadRequest("n must be a positive integer", code="invalid_field")
        output *= n
    strip = False
    if want_usage and top.get("stream") is True and path.rstrip("/").endswith("completions"):
        options = top.get("stream_options")
        if not (isinstance(options, dict) and options.get("include_usage") is True):
            injected["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
            strip = True
    out = _with_fields(body, top, injected) if injected else body
    return RequestCost(input_tokens, output, model, out, tuple(unbounded), strip, tuple(injected))


def _with_fields(body: bytes, top: dict[str, Any], fields: dict[str, Any]) -> bytes:
    """``body`` with ``fields`` set: written in front of the other fields when none of them is
    there (the client's bytes stay as they were), else the object written anew."""
    if any(name in top for name in fields):  # a null or partial value: replace it, never duplicate it
        return json.dumps({**top, **fields}, ensure_ascii=False, separators=(",", ":")).encode()
    text = body.decode("utf-8")
    start = text.index("{") + 1
    added = ",".join(f"{json.dumps(k)}:{json.dumps(v, separators=(',', ':'))}" for k, v in fields.items())
    return (text[:start] + added + ("," if top else "") + text[start:]).encode("utf-8")


# --- which budgets apply, and what a request holds in each ------------------------------------


@dataclass(frozen=True, slots=True)
class Applied:
    """One budget as it applies to one request."""

    name: str  # "user-day": names the policy in RateLimit headers and in refusals
    key: str  # the budget and its window, for the store
    spec: BudgetSpec
    window_start: float  # UNIX seconds
    window_end: float
    hold: int  # this request's worst case in the budget's unit

    @property
    def expires_at(self) -> float:
        """When the store may forget this window (an hour after it ends)."""
        return self.window_end + 3600


def applied_budgets(
    credential: str,
    budget: BudgetSpec | None,
    user: str | None,
    user_budget: BudgetSpec | None,
    cost: RequestCost,
    prices: PriceTable,
    now: datetime,
) -> tuple[tuple[Applied, ...], Price | None]:
    """The budgets that apply and the price used; refuses what no budget may admit."""
    if user_budget is not None and user is None:
        raise BadRequest(
            f"credential {credential!r} has a budget per end user: the URL must be signed with a user",
            code="user_required",
        )
    chosen = [(CREDENTIAL, credential, budget), (USER, f"{credential}/{user}", user_budget)]
    price: Price | None = None
    if any(spec is not None and spec.unit == USD for _, _, spec in chosen):
        price = prices.lookup(cost.model)
        if price is None:
            shown = repr(cost.model[:100]) if cost.model else "(none)"
            raise Forbidden(
                f"model {shown} has no price in the price table; a spend budget never charges an unpriced model $0",
                code="model_unpriced",
            )
    out = []
    for scope, who, spec in chosen:
        if spec is None:
            continue
        start, end = window(spec.per, now)
        hold = cost.tokens if spec.unit == TOKENS else _cost(price, cost.input_tokens, 0, cost.output_tokens)
        out.append(
            Applied(
                f"{scope}-{spec.per}" + ("-usd" if spec.unit == USD else ""),
                f"{scope}:{who}:{spec.per}:{int(start.timestamp())}",
                spec, start.timestamp(), end.timestamp(), hold,
            )
        )  # fmt: skip
    return tuple(out), price


def _cost(price: Price | None, input_tokens: int, cached: int, output: int) -> int:
    assert price is not None  # a usd budget always has one (applied_budgets refuses otherwise)
    return price.cost(input_tokens, cached, output)


@dataclass(frozen=True, slots=True)
class Level:
    """A budget's spent and held amounts, this request's hold included."""

    spent: int
    held: int


def refusal(budget: Applied, level: Level, now: float) -> TooManyRequests:
    """429 budget_exhausted, with Retry-After until the window resets."""
    retry = max(1, math.ceil(budget.window_end - now))
    left = max(0, budget.spec.limit - level.spent - level.held)
    spec = budget.spec
    error = TooManyRequests(
        f"budget {budget.name!r} ({spec.shown()} per {spec.per}) cannot cover this request: it may cost up to "
        f"{spec.shown(budget.hold)} and {spec.shown(left)} remain; the budget resets in {retry} s",
        code="budget_exhausted",
        retry_after=retry,
    )
    error.headers = rate_limit_headers([(budget, Level(level.spent, level.held))], now, include_hold=False)
    return error


def rate_limit_headers(
    levels: Sequence[tuple[Applied, Level]], now: float, *, include_hold: bool = True
) -> tuple[tuple[bytes, bytes], ...]:
    """``RateLimit-Policy`` and ``RateLimit`` (draft-ietf-httpapi-ratelimit-headers), one item per
    budget; usd budgets count micro-dollars. Exposed to browsers through CORS."""
    if not levels:
        return ()
    policies, states = [], []
    for budget, level in levels:
        scale = 1 if budget.spec.unit == TOKENS else NANO_USD // MICRO_USD
        quota = budget.spec.limit // scale
        remaining = max(0, budget.spec.limit - level.spent - level.held) // scale
        window_seconds = round(budget.window_end - budget.window_start)
        policies.append(f'"{budget.name}";q={quota};w={window_seconds}')
        states.append(f'"{budget.name}";r={remaining};t={max(0, math.ceil(budget.window_end - now))}')
    return (
        (b"ratelimit-policy", ", ".join(policies).encode()),
        (b"ratelimit", ", ".join(states).encode()),
        (b"access-control-expose-headers", b"RateLimit, RateLimit-Policy, Retry-After"),
    )


# --- what an answer is charged ------------------------------------------------------------------

USAGE = "usage"  # the upstream's own count
HOLD = "hold"  # no usage to read: the hold, the most it could have cost
NOTHING = "nothing"  # the upstream did nothing billable (refused the request, was never reached)


@dataclass(frozen=True, slots=True)
class Charge:
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    kind: str  # usage | hold | nothing
    why: str  # for the log: "usage", "client_gone", "upstream_error", "no_usage", "job", ...


def charge_for(
    cost: RequestCost,
    usage: tuple[int, int, int] | None,
    *,
    status: int | None,
    outcome: str,
    error_code: str | None,
    background: bool,
) -> Charge:
    """What a finished request is charged: its usage when the upstream reported one, else an
    honest upper estimate (its hold), never zero unless nothing billable can have happened."""
    if usage is not None:
        prompt, cached, completion = usage
        return Charge(prompt, cached, completion, USAGE, "usage")
    hold = Charge(cost.input_tokens, 0, cost.output_tokens, HOLD, "")
    if background:
        # A job stored is charged its hold now, settled by the runner from what its upstream call
        # cost (JobHold); one refused before it was stored (queue full, body rules) never runs.
        if status == 202 or outcome in ("client_gone", "cancelled"):
            return _why(hold, "job")
        return Charge(0, 0, 0, NOTHING, "job_not_accepted")
    if status is None and (
        error_code in ("upstream_connect_failed", "upstream_address_refused") or outcome.startswith("refused:")
    ):
        return Charge(0, 0, 0, NOTHING, error_code or outcome)  # nothing was sent upstream
    if status is not None and 400 <= status < 500 and outcome == "ok":
        return Charge(0, 0, 0, NOTHING, f"upstream_refused_{status}")  # a refusal is not billed
    if outcome in ("client_gone", "cancelled"):
        return _why(hold, outcome)
    if outcome != "ok" or status is None:
        return _why(hold, "upstream_error")
    return _why(hold, "no_usage")


def _why(charge: Charge, why: str) -> Charge:
    return Charge(charge.input_tokens, charge.cached_tokens, charge.output_tokens, charge.kind, why)


def session_charge(cost: RequestCost, usage: tuple[int, int, int] | None, responses_open: int) -> Charge:
    """What a WebSocket session is charged: the usage of its ``response.done`` events, or its
    whole hold when a response was cut short (billed upstream, never reported)."""
    prompt, cached, completion = usage or (0, 0, 0)
    if responses_open:
        return Charge(max(prompt, cost.input_tokens), 0, max(completion, cost.output_tokens), HOLD, "response_cut")
    return Charge(prompt, cached, completion, USAGE, "usage")


def session_cap(hold: int) -> Callable[[int], str | None]:
    """When a session must end: once its usage reached what it holds."""

    def cap(used: int) -> str | None:
        if used < hold:
            return None
        return f"budget: this session used {used} tokens of the {hold} its budget held for it; open a new one"

    return cap


def amount(budget: Applied, charge: Charge, price: Price | None) -> int:
    """``charge`` in ``budget``'s unit."""
    if budget.spec.unit == TOKENS:
        return charge.input_tokens + charge.output_tokens
    return _cost(price, charge.input_tokens, charge.cached_tokens, charge.output_tokens)


# --- one process's ledger -----------------------------------------------------------------------


@dataclass(slots=True)
class _Window:
    spent: int = 0
    held: int = 0
    holds: dict[str, int] = field(default_factory=dict)
    expires_at: float = 0.0


class Settlement(Enum):
    """What is known of a settlement (``BudgetStore.settle``): operators reconcile from it.

    ``UNKNOWN``: the settle script may have reached Redis (it timed out, or the connection broke
    after it could have been written), so it may still run when Redis answers; either way the
    hold was an upper bound, so the budget is never overspent."""

    RECORDED = "recorded"
    NOT_RECORDED = "not_recorded"  # never sent: the outage policy skipped it, or the connection was refused
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Reservation:
    allowed: bool
    levels: tuple[Level, ...] = ()  # per budget, this hold included (when allowed)
    refused: int = -1  # the index of the budget that refused
    enforced: bool = True  # False: the store was unreachable and failure_policy is open


class BudgetLedger:
    """Spent and held per budget window in this process; every check-and-hold is one step.

    Windows are forgotten once they have expired (and the least recently used beyond
    ``max_windows``), so memory stays bounded.
    """

    def __init__(self, max_windows: int = 100_000):
        self.max_windows = max_windows
        self._windows: OrderedDict[str, _Window] = OrderedDict()

    def _window(self, key: str, expires_at: float, now: float) -> _Window:
        w = self._windows.get(key)
        if w is None or w.expires_at <= now:
            w = self._windows[key] = _Window(expires_at=expires_at)
            while len(self._windows) > self.max_windows:
                old_key, old = next(iter(self._windows.items()))
                if old.holds:  # a window with requests in flight is never dropped
                    self._windows.move_to_end(old_key)
                    break
                del self._windows[old_key]
        self._windows.move_to_end(key)
        return w

    def reserve(self, budgets: Sequence[Applied], hold_id: str, now: float) -> Reservation:
        """Hold every budget's amount, or none of them."""
        windows = [self._window(b.key, b.expires_at, now) for b in budgets]
        for i, (b, w) in enumerate(zip(budgets, windows, strict=True)):
            if w.spent + w.held + b.hold > b.spec.limit:
                return Reservation(False, (Level(w.spent, w.held),), refused=i)
        for b, w in zip(budgets, windows, strict=True):
            w.holds[hold_id] = b.hold
            w.held += b.hold
        return Reservation(True, tuple(Level(w.spent, w.held) for w in windows))

    def settle(self, budgets: Sequence[Applied], hold_id: str, amounts: Sequence[int], now: float) -> None:
        """Replace the hold by what was used."""
        for b, charge in zip(budgets, amounts, strict=True):
            w = self._window(b.key, b.expires_at, now)
            w.held -= w.holds.pop(hold_id, 0)
            w.spent += charge

    def level(self, key: str, now: float) -> Level:
        w = self._windows.get(key)
        if w is None or w.expires_at <= now:
            return Level(0, 0)
        return Level(w.spent, w.held)


def budget_key(scope: str, credential: str, user: str | None, spec: BudgetSpec, now: datetime) -> str:
    """The store key of a budget's current window (as :func:`applied_budgets` makes it)."""
    who = credential if scope == CREDENTIAL else f"{credential}/{user}"
    return f"{scope}:{who}:{spec.per}:{int(window(spec.per, now)[0].timestamp())}"


@dataclass(frozen=True, slots=True)
class BudgetTicket:
    """A request admitted under budgets: what it holds, and what its answer must carry."""

    hold_id: str
    budgets: tuple[Applied, ...]
    cost: RequestCost
    price: Price | None
    headers: tuple[tuple[bytes, bytes], ...] = ()  # RateLimit-Policy, RateLimit
    enforced: bool = True  # False: the shared store was unreachable and failure_policy is open
    ledger: str = ""  # the store that holds it (:attr:`BudgetStore.ledger`): a job's settlement checks it


# --- background jobs ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobHold:
    """What a job accepted under budgets holds, kept in the job's record so that whichever runner
    finishes it (after a restart too) can settle it.

    The gateway charges a job its hold as spent when it accepts it (a queued job may wait longer
    than any lease); the runner then adds the difference between what the job cost and that hold
    (:func:`job_settlement`). ``ledger`` names the store the hold was charged in: a memory store
    that has since restarted no longer has it, so the job is then charged what it cost in full.
    """

    ledger: str
    budgets: tuple[Applied, ...]
    input_tokens: int
    output_tokens: int
    price: Price | None = None

    @classmethod
    def of(cls, ticket: BudgetTicket) -> JobHold:
        return cls(ticket.ledger, ticket.budgets, ticket.cost.input_tokens, ticket.cost.output_tokens, ticket.price)

    @property
    def cost(self) -> RequestCost:
        return RequestCost(self.input_tokens, self.output_tokens, None, None)

    def to_json(self) -> dict[str, Any]:
        p = self.price
        return {
            "ledger": self.ledger, "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
            "price": None if p is None else [p.pattern, p.input, p.output, p.cached_input],
            "budgets": [
                [b.name, b.key, b.spec.limit, b.spec.unit, b.spec.per, b.window_start, b.window_end, b.hold]
                for b in self.budgets
            ],
        }  # fmt: skip

    @classmethod
    def from_json(cls, rec: Mapping[str, Any]) -> JobHold:
        """Inverse of :meth:`to_json`; raises KeyError, TypeError or ValueError on a record it cannot read."""
        price = rec["price"]
        budgets = tuple(
            Applied(
                str(name), str(key), BudgetSpec(int(limit), str(unit), str(per)), float(start), float(end), int(hold)
            )
            for name, key, limit, unit, per, start, end, hold in rec["budgets"]
        )
        return cls(
            str(rec["ledger"]), budgets, int(rec["input_tokens"]), int(rec["output_tokens"]),
            None if price is None else Price(str(price[0]), float(price[1]), float(price[2]),
                                             None if price[3] is None else float(price[3])),
        )  # fmt: skip


def job_settlement(hold: JobHold, charge: Charge, *, interrupted: int, ledger: str) -> list[int]:
    """What a finished job adds to each budget it was accepted under, the hold charged at
    acceptance being already spent there.

    ``charge`` is what this run cost; each of the ``interrupted`` runs before it (a process that
    died or was drained mid-call) may have reached the upstream without anyone reading its usage,
    so each is charged the hold. In the ledger that charged the hold, the difference is added
    (negative when the job cost less); in another one (a memory store restarted since), the
    hold is gone with it and the whole cost is added.
    """
    held = hold.cost
    whole = Charge(held.input_tokens, 0, held.output_tokens, HOLD, "interrupted")
    out = []
    for b in hold.budgets:
        cost = amount(b, charge, hold.price) + interrupted * amount(b, whole, hold.price)
        out.append(cost - b.hold if ledger == hold.ledger else cost)
    return out
