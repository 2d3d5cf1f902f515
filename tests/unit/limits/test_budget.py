"""proxy.limits.budget (pure) and the memory budget store: windows, holds, prices, charges, the
ledger, RateLimit headers, and the usage-chunk remover of proxy.relay.usage."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio

from proxy.config import load_config, parse_config
from proxy.errors import BadRequest, ConfigError, Forbidden
from proxy.limits.budget import (
    Applied,
    BudgetLedger,
    Charge,
    JobHold,
    Level,
    applied_budgets,
    budget_key,
    charge_for,
    job_settlement,
    rate_limit_headers,
    refusal,
    request_cost,
)
from proxy.limits.budget_spec import (
    NANO_USD,
    TOKENS,
    USD,
    BudgetsConfig,
    BudgetSpec,
    Price,
    PriceTable,
    budget_spec_from_toml,
    parse_prices,
    window,
)
from proxy.limits.budget_state import MemoryBudgets
from proxy.relay.usage import UsageChunkRemover

SETTINGS = BudgetsConfig()
T = datetime(2026, 12, 7, 13, 45, 30, tzinfo=UTC)


# --- specs and windows ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "spec"),
    [
        ({"tokens": 50_000, "per": "day"}, BudgetSpec(50_000, TOKENS, "day")),
        ({"usd": 2.5, "per": "month"}, BudgetSpec(2_500_000_000, USD, "month")),
    ],
)
def test_budget_specs(value: dict, spec: BudgetSpec) -> None:
    assert budget_spec_from_toml(value, "b") == spec


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ({"tokens": 5, "per": "year"}, "b.per"),
        ({"tokens": 5, "usd": 1, "per": "day"}, "exactly one of tokens or usd"),
        ({"tokens": 0, "per": "day"}, "b.tokens"),
        ({"usd": -1, "per": "day"}, "b.usd"),
        ({"tokens": 5, "per": "day", "cap": 1}, "unknown key 'cap'"),
        ("lots", "expected a table"),
    ],
)
def test_bad_budget_specs_are_refused(value: object, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        budget_spec_from_toml(value, "b")
    assert problem in str(info.value)


@pytest.mark.parametrize(
    ("per", "start", "end"),
    [
        ("minute", datetime(2026, 12, 7, 13, 45, tzinfo=UTC), datetime(2026, 12, 7, 13, 46, tzinfo=UTC)),
        ("hour", datetime(2026, 12, 7, 13, tzinfo=UTC), datetime(2026, 12, 7, 14, tzinfo=UTC)),
        ("day", datetime(2026, 12, 7, tzinfo=UTC), datetime(2026, 12, 8, tzinfo=UTC)),
        ("month", datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)),
    ],
)
def test_fixed_utc_windows(per: str, start: datetime, end: datetime) -> None:
    assert window(per, T) == (start, end)
    # Another time zone, same instant, same window.
    assert window(per, T.astimezone(__import__("zoneinfo").ZoneInfo("Asia/Tokyo"))) == (start, end)


def test_february_has_its_own_length() -> None:
    start, end = window("month", datetime(2028, 2, 29, 23, 59, tzinfo=UTC))
    assert (end - start) == timedelta(days=29)


# --- holds ------------------------------------------------------------------------------------------

CHAT = "/v1/chat/completions"


def body(**fields: object) -> bytes:
    return json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


def test_the_hold_is_the_body_size_plus_the_output_cap() -> None:
    b = body(max_tokens=100)
    cost = request_cost(b, path=CHAT, settings=SETTINGS, cap=None, want_usage=True)
    assert (cost.input_tokens, cost.output_tokens, cost.body, cost.unbounded) == (len(b), 100, b, ())
    assert cost.model == "gpt-4o-mini"
    # n answers: n times the output
    cost = request_cost(body(max_tokens=100, n=3), path=CHAT, settings=SETTINGS, cap=None, want_usage=True)
    assert cost.output_tokens == 300
    # a looser ratio, as configured
    cost = request_cost(b, path=CHAT, settings=BudgetsConfig(input_bytes_per_token=4), cap=None, want_usage=True)
    assert cost.input_tokens == -(-len(b) // 4)


@pytest.mark.parametrize(
    ("path", "cap", "written"),
    [
        (CHAT, 50, {"max_completion_tokens": 50}),
        ("/v1/responses", None, {"max_output_tokens": 4096}),
        ("/v1/completions", 7, {"max_tokens": 7}),
        ("/v1/embeddings", 7, {}),
    ],
)
def test_a_missing_output_cap_is_written_in_front_leaving_the_rest_as_sent(path: str, cap: int | None, written) -> None:
    original = b'{"model": "m",  "input": "x"}'
    cost = request_cost(original, path=path, settings=SETTINGS, cap=cap, want_usage=True)
    assert cost.output_tokens == sum(written.values())
    if written:
        name, value = next(iter(written.items()))
        assert cost.body == b'{"' + name.encode() + b'":' + str(value).encode() + b',"model": "m",  "input": "x"}'
    else:
        assert cost.body == original


def test_a_null_cap_and_a_stream_without_usage_are_rewritten() -> None:
    original = b'{"model":"m","stream":true,"stream_options":{"include_obfuscation":false},"max_tokens":null}'
    cost = request_cost(original, path=CHAT, settings=SETTINGS, cap=20, want_usage=True)
    sent = json.loads(cost.body or b"")
    assert sent["max_completion_tokens"] == 20 and sent["max_tokens"] is None
    assert sent["stream_options"] == {"include_obfuscation": False, "include_usage": True}
    assert cost.strip_usage
    # Asked by the client: left alone and kept in its stream.
    asked = b'{"model":"m","stream":true,"stream_options":{"include_usage":true},"max_tokens":5}'
    cost = request_cost(asked, path=CHAT, settings=SETTINGS, cap=20, want_usage=True)
    assert (cost.body, cost.strip_usage) == (asked, False)
    # An empty object gets no stray comma.
    cost = request_cost(b"{}", path=CHAT, settings=SETTINGS, cap=3, want_usage=True)
    assert cost.body == b'{"max_completion_tokens":3}'


def test_what_no_body_bounds_is_held_as_configured_and_named() -> None:
    image = body(
        max_tokens=10,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}],
    )
    cost = request_cost(image, path=CHAT, settings=SETTINGS, cap=None, want_usage=True)
    assert cost.input_tokens == len(image) + SETTINGS.unbounded_hold
    assert cost.unbounded == ("1 image/audio/file input",)
    form = request_cost(b"--boundary\r\n...", path="/v1/audio/x", settings=SETTINGS, cap=None, want_usage=True)
    assert form.unbounded == ("a body that is not a JSON object",) and form.output_tokens == SETTINGS.unbounded_hold


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b'{"max_tokens": 5, "max_tokens": 50000}', "duplicate_field"),
        (b'{"max_tokens": "lots"}', "invalid_field"),
        (b'{"max_tokens": 5, "n": 0}', "invalid_field"),
    ],
)
def test_bodies_that_would_hide_their_cost_are_refused(raw: bytes, code: str) -> None:
    with pytest.raises((BadRequest, Forbidden)) as info:
        request_cost(raw, path=CHAT, settings=SETTINGS, cap=None, want_usage=True)
    assert info.value.code == code


# --- which budgets, prices ----------------------------------------------------------------------------

PRICES = PriceTable(
    (Price("gpt-4o-mini", 0.15, 0.60, 0.075), Price("gpt-4o*", 2.5, 10.0), Price("gpt-4o-mini-*", 9, 9)), "v1"
)


def test_prices_exact_name_first_then_the_longest_glob() -> None:
    assert PRICES.lookup("gpt-4o-mini") == PRICES.prices[0]
    assert PRICES.lookup("gpt-4o-mini-2024-07-18") == PRICES.prices[2]
    assert PRICES.lookup("gpt-4o-2024-08-06") == PRICES.prices[1]
    assert PRICES.lookup("o3") is None and PRICES.lookup(None) is None
    # 1M input of which 400k cached, 1M output: 0.6*0.15 + 0.4*0.075 + 0.60 = $0.72, in nano-dollars
    assert PRICES.prices[0].cost(1_000_000, 400_000, 1_000_000) == 720_000_000


def test_price_files() -> None:
    table = parse_prices('version = "2026-12"\n[models."gpt-4.1*"]\ninput = 2.0\ncached_input = 0.5\noutput = 8.0\n')
    assert table == PriceTable((Price("gpt-4.1*", 2.0, 8.0, 0.5),), "2026-12")
    assert parse_prices("[models.m]\ninput = 1\noutput = 2\n").version.startswith("sha256:")
    with pytest.raises(ConfigError) as info:
        parse_prices("[models.m]\ninput = -1\n[models.n]\noutput = 1\nextra = 2\n")
    text = str(info.value)
    assert 'models."m".input' in text and "needs input and output" in text and "unknown key" in text


def test_applied_budgets_name_their_windows_and_refuse_what_they_cannot_price() -> None:
    cost = request_cost(body(max_tokens=1000), path=CHAT, settings=SETTINGS, cap=None, want_usage=True)
    day, month = BudgetSpec(50_000, TOKENS, "day"), BudgetSpec(NANO_USD, USD, "month")
    budgets, price = applied_budgets("app", day, "u1", month, cost, PRICES, T)
    assert [b.name for b in budgets] == ["credential-day", "user-month-usd"]
    assert budgets[0].key == budget_key("credential", "app", None, day, T)
    assert budgets[1].key == "user:app/u1:month:" + str(int(datetime(2026, 12, 1, tzinfo=UTC).timestamp()))
    assert budgets[0].hold == cost.tokens
    assert budgets[1].hold == math_ceil_nano(cost.input_tokens * 0.15 + 1000 * 0.60)
    assert price == PRICES.prices[0]
    with pytest.raises(BadRequest, match="signed with a user"):
        applied_budgets("app", None, None, day, cost, PRICES, T)
    unpriced = request_cost(body(max_tokens=5, model="o3"), path=CHAT, settings=SETTINGS, cap=None, want_usage=True)
    with pytest.raises(Forbidden) as info:
        applied_budgets("app", month, None, None, unpriced, PRICES, T)
    assert info.value.code == "model_unpriced"
    # tokens budgets need no price
    assert applied_budgets("app", day, None, None, unpriced, PriceTable(), T)[1] is None


def math_ceil_nano(micro: float) -> int:
    import math

    return math.ceil(micro * 1000 - 1e-6)


# --- charges ---------------------------------------------------------------------------------------------

COST = request_cost(body(max_tokens=100), path=CHAT, settings=SETTINGS, cap=None, want_usage=True)


@pytest.mark.parametrize(
    ("usage", "status", "outcome", "code", "background", "kind", "why"),
    [
        ((10, 2, 20), 200, "ok", None, False, "usage", "usage"),
        (None, 200, "ok", None, False, "hold", "no_usage"),
        (None, 200, "client_gone", None, False, "hold", "client_gone"),
        (None, None, "cancelled", None, False, "hold", "cancelled"),
        (None, 200, "cancelled", None, False, "hold", "cancelled"),
        (None, 200, "upstream_error", "upstream_protocol_error", False, "hold", "upstream_error"),
        (None, None, "upstream_error", "upstream_timeout", False, "hold", "upstream_error"),
        (None, None, "upstream_error", "upstream_connect_failed", False, "nothing", "upstream_connect_failed"),
        (None, None, "refused:invalid_json", "invalid_json", False, "nothing", "invalid_json"),
        (None, 400, "ok", None, False, "nothing", "upstream_refused_400"),
        (None, 202, "ok", None, True, "hold", "job"),
        (None, None, "client_gone", None, True, "hold", "job"),  # stored, then the 202 could not be sent
        (None, 503, "refused:job_queue_full", "job_queue_full", True, "nothing", "job_not_accepted"),
        (None, 400, "refused:invalid_json", "invalid_json", True, "nothing", "job_not_accepted"),
    ],
)
def test_what_an_answer_is_charged(usage, status, outcome, code, background, kind, why) -> None:
    charge = charge_for(COST, usage, status=status, outcome=outcome, error_code=code, background=background)
    assert (charge.kind, charge.why) == (kind, why)
    tokens = charge.input_tokens + charge.output_tokens
    if kind == "hold":
        assert tokens == COST.tokens > 0  # never zero
    elif kind == "nothing":
        assert tokens == 0


# --- the ledger and the memory store ------------------------------------------------------------------------


def test_the_ledger_holds_in_every_budget_or_in_none() -> None:
    cost = request_cost(body(max_tokens=100), path=CHAT, settings=SETTINGS, cap=None, want_usage=True)
    user = BudgetSpec(cost.tokens * 2, TOKENS, "day")
    whole = BudgetSpec(cost.tokens * 3 + 10, TOKENS, "day")
    ledger = BudgetLedger()
    now = T.timestamp()
    a = applied_budgets("app", whole, "a", user, cost, PriceTable(), T)[0]
    b = applied_budgets("app", whole, "b", user, cost, PriceTable(), T)[0]
    assert ledger.reserve(a, "1", now).levels == (Level(0, cost.tokens), Level(0, cost.tokens))
    assert ledger.reserve(a, "2", now).allowed
    refused = ledger.reserve(a, "3", now)  # user a is full
    assert (refused.allowed, refused.refused) == (False, 1)
    assert ledger.reserve(b, "4", now).allowed  # the credential's third
    refused = ledger.reserve(b, "5", now)  # the credential is full; user b's hold is not taken
    assert (refused.allowed, refused.refused) == (False, 0)
    assert ledger.level(b[1].key, now) == Level(0, cost.tokens)
    ledger.settle(a, "1", [10, 10], now)  # real usage replaces the hold
    assert ledger.level(a[0].key, now) == Level(10, cost.tokens * 2)
    assert ledger.reserve(b, "5", now).allowed


async def test_a_budget_window_resets(autojump_clock: trio.testing.MockClock) -> None:
    start = datetime(2026, 12, 7, 23, 0, tzinfo=UTC)
    store = MemoryBudgets(lambda: start + timedelta(seconds=trio.current_time()))
    spec = BudgetSpec(500, TOKENS, "day")
    cost = request_cost(body(max_tokens=300), path=CHAT, settings=SETTINGS, cap=None, want_usage=True)

    def applied() -> tuple:
        return applied_budgets("app", None, "u", spec, cost, PriceTable(), store.clock())[0]

    first = applied()
    assert (await store.reserve(first, "1")).allowed
    await store.settle(first, "1", [cost.tokens])
    refused = await store.reserve(applied(), "2")
    assert not refused.allowed
    error = refusal(first[0], refused.levels[0], store.clock().timestamp())
    assert error.retry_after == 3600 and error.code == "budget_exhausted"
    await trio.sleep(3599)
    assert not (await store.reserve(applied(), "3")).allowed
    await trio.sleep(1)  # midnight UTC: a new window
    assert (await store.reserve(applied(), "4")).allowed


def test_rate_limit_headers() -> None:
    cost = request_cost(body(max_tokens=100), path=CHAT, settings=SETTINGS, cap=None, want_usage=True)
    budgets, _ = applied_budgets(
        "app", BudgetSpec(NANO_USD * 2, USD, "month"), "u", BudgetSpec(50_000, TOKENS, "day"), cost, PRICES, T
    )
    headers = dict(
        rate_limit_headers([(budgets[0], Level(NANO_USD, 0)), (budgets[1], Level(18_000, 800))], T.timestamp())
    )
    assert headers[b"ratelimit-policy"] == b'"credential-month-usd";q=2000000;w=2678400, "user-day";q=50000;w=86400'
    assert headers[b"ratelimit"] == b'"credential-month-usd";r=1000000;t=2110470, "user-day";r=31200;t=36870'
    assert b"RateLimit" in headers[b"access-control-expose-headers"]


def test_budgets_in_the_config_file() -> None:
    config = parse_config(
        '[budgets]\nunbounded_hold = 500\n[[credentials]]\nid = "a"\nsecret = "x"\n'
        'budget = { tokens = 5_000_000, per = "day" }\nuser_budget = { tokens = 50_000, per = "hour" }\n',
        {},
    )
    assert config.credentials[0].budget == BudgetSpec(5_000_000, TOKENS, "day")
    assert config.budgets.unbounded_hold == 500
    with pytest.raises(ConfigError, match=r"credentials\[0\].budget: a usd budget needs a price table"):
        parse_config('[[credentials]]\nid = "a"\nsecret = "x"\nbudget = { usd = 1, per = "day" }\n', {})


# --- the usage chunk, out of the client's stream --------------------------------------------------------------

STREAM = (
    b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
    b': a comment with "usage"\n\n'
    b'data: {"choices":[{"delta":{"content":"usage"}}],"usage":null}\n\n'
    b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"prompt_tokens_details":{"cached_tokens":2}}}\n\n'
    b"data: [DONE]\n\n"
)
USAGE_EVENT = STREAM.split(b"\n\n")[3] + b"\n\n"


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_the_usage_chunk_is_removed_and_nothing_else_at_any_split(newline: bytes) -> None:
    stream = STREAM.replace(b"\n", newline)
    expected = stream.replace(USAGE_EVENT.replace(b"\n", newline), b"")
    assert len(expected) < len(stream)
    for cut in range(len(stream) + 1):
        for step in (1, 7, len(stream)):
            remover = UsageChunkRemover()
            pieces = [stream[:cut]] + [stream[i : i + step] for i in range(cut, len(stream), step)]
            out = b"".join(remover.feed(p) for p in pieces) + remover.end()
            assert out == expected, (cut, step)
            assert remover.usage is not None and (remover.usage.total_tokens, remover.usage.cached_tokens) == (7, 2)


def test_only_held_is_the_event_in_progress() -> None:
    remover = UsageChunkRemover()
    assert remover.feed(b'data: {"choices":[{"delta":{}}]}\n\ndata: {"cho') == b'data: {"choices":[{"delta":{}}]}\n\n'
    assert remover.end() == b'data: {"cho'  # a stream cut mid-event: what was held goes on as it was


def test_the_price_table_is_read_beside_the_config_and_its_problems_named(tmp_path: Path) -> None:
    (tmp_path / "prices.toml").write_text('version = "v7"\n[models."mock-*"]\ninput = 1\noutput = 2\n')
    config_file = tmp_path / "parkway.toml"
    config_file.write_text(
        '[budgets]\nprices = "prices.toml"\n[[credentials]]\nid = "a"\nsecret = "x"\n'
        'budget = { usd = 5, per = "month" }\n'
    )
    config = load_config(config_file)
    assert config.budgets.price_table == PriceTable((Price("mock-*", 1.0, 2.0),), "v7")
    (tmp_path / "prices.toml").write_text('[models."mock-*"]\ninput = "cheap"\noutput = 2\n')
    with pytest.raises(ConfigError, match=r'budgets.prices.models."mock-\*".input'):
        load_config(config_file)
    (tmp_path / "prices.toml").unlink()
    with pytest.raises(ConfigError, match="cannot read the price table 'prices.toml'"):
        load_config(config_file)


def test_a_session_is_charged_its_usage_or_its_hold_when_a_response_was_cut() -> None:
    from proxy.limits.budget import RequestCost, session_cap, session_charge

    hold = RequestCost(30, 0, None, None)
    assert session_charge(hold, (20, 0, 16), 0).kind == "usage"
    cut = session_charge(hold, (5, 0, 2), 1)
    assert (cut.kind, cut.why, cut.input_tokens + cut.output_tokens) == ("hold", "response_cut", 32)
    cap = session_cap(30)
    assert cap(29) is None and "used 30 tokens of the 30" in (cap(30) or "")


def test_realtime_usage_counts_responses_begun_and_not_done() -> None:
    from proxy.websocket.policy import BUDGET_SPENT, Ending, RealtimeUsage, decide_close

    usage = RealtimeUsage()
    usage.feed('{"type":"response.created","response":{"id":"r1"}}')
    assert usage.open == 1
    usage.feed('{"type":"response.done","response":{"usage":{"input_tokens":3,"output_tokens":4}}}')
    usage.feed('{"type":"response.created","response":{"id":"r2"}}')
    assert (usage.open, usage.responses, usage.total_tokens) == (1, 1, 7)
    closing = decide_close(Ending(why=BUDGET_SPENT, reason="budget: used up"))
    assert (closing.to_client, closing.to_upstream, closing.outcome) == (
        (1008, "budget: used up"),
        (1000, "budget: used up"),
        "budget_exhausted",
    )


def test_input_the_upstream_adds_itself_is_held_as_configured_and_named() -> None:
    raw = json.dumps(
        {
            "model": "gpt-4.1",
            "input": "and then?",
            "previous_response_id": "resp_1",
            "tools": [{"type": "web_search"}, {"type": "function", "name": "f"}],
            "max_output_tokens": 100,
        }
    ).encode()
    cost = request_cost(raw, path="/v1/responses", settings=SETTINGS, cap=None, want_usage=True)
    assert cost.unbounded == ("input the upstream stored (previous_response_id)", "web_search results")
    assert cost.input_tokens == len(raw) + 2 * SETTINGS.unbounded_hold
    assert (cost.output_tokens, cost.body) == (100, raw)


# --- background jobs ----------------------------------------------------------------------------------------


def job_hold(ledger: str = "memory:a", price: Price | None = None) -> JobHold:
    user = BudgetSpec(1000, "tokens", "day")
    usd = BudgetSpec(5 * NANO_USD, "usd", "day")
    budgets = (
        Applied("user-day", "user:app/alice:day:0", user, 0.0, 86400.0, 300),
        Applied("credential-day-usd", "credential:app:day:0", usd, 0.0, 86400.0, 1_000_000),
    )
    return JobHold(ledger, budgets, 100, 200, price)


def test_a_job_hold_survives_its_record() -> None:
    price = Price("mock-*", 1.0, 2.0, 0.5)
    for hold in (job_hold(), job_hold(price=price)):
        assert JobHold.from_json(json.loads(json.dumps(hold.to_json()))) == hold
    with pytest.raises((KeyError, TypeError, ValueError)):
        JobHold.from_json({"ledger": "x"})


@pytest.mark.parametrize(
    ("charge", "interrupted", "ledger", "tokens_added"),
    [
        (Charge(9, 0, 200, "usage", "usage"), 0, "memory:a", 209 - 300),  # the hold replaced by the usage
        (Charge(100, 0, 200, "hold", "no_usage"), 0, "memory:a", 0),  # no usage: stays charged its hold
        (Charge(0, 0, 0, "nothing", "upstream_connect_failed"), 0, "memory:a", -300),  # never called: released
        (Charge(9, 0, 200, "usage", "usage"), 1, "memory:a", 209),  # one earlier run cut off: its hold too
        (Charge(9, 0, 200, "usage", "usage"), 0, "memory:b", 209),  # charged where the hold is gone: in full
    ],
)
def test_what_a_finished_job_adds_to_its_budgets(charge, interrupted, ledger, tokens_added) -> None:
    price = Price("mock-*", 1.0, 2.0)
    hold = job_hold(price=price)
    tokens, usd = job_settlement(hold, charge, interrupted=interrupted, ledger=ledger)
    assert tokens == tokens_added
    cost = price.cost(charge.input_tokens, 0, charge.output_tokens) + interrupted * price.cost(100, 0, 200)
    assert usd == cost - (1_000_000 if ledger == hold.ledger else 0)
