"""Budget specs, price tables and fixed UTC windows: what a credential's budgets and the
``[budgets]`` table say, read from TOML and decided without I/O (docs/budgets.md). The
holds and charges built on them are :mod:`proxy.limits.budget`."""

from __future__ import annotations

import calendar
import fnmatch
import hashlib
import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from ..errors import ConfigError, ConfigProblem

PERIODS = ("minute", "hour", "day", "month")
TOKENS, USD = "tokens", "usd"
CREDENTIAL, USER = "credential", "user"
NANO_USD = 1_000_000_000  # amounts of a usd budget are kept in nano-dollars: integers add up exactly
MICRO_USD = 1_000_000  # RateLimit headers state usd budgets in micro-dollars (structured fields take integers)


# --- specs and settings ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BudgetSpec:
    """``{ tokens = 50_000, per = "day" }`` or ``{ usd = 2.5, per = "month" }``."""

    limit: int  # tokens, or nano-dollars
    unit: str = TOKENS  # tokens | usd
    per: str = "day"

    def __post_init__(self) -> None:
        if self.unit not in (TOKENS, USD):
            raise ValueError("unit must be tokens or usd")
        if self.per not in PERIODS:
            raise ValueError(f"per must be one of {', '.join(PERIODS)}")

    def shown(self, amount: int | None = None) -> str:
        """``50000 tokens`` / ``$2.50``: the limit, or ``amount`` in its unit, for messages."""
        value = self.limit if amount is None else amount
        return f"{value} tokens" if self.unit == TOKENS else f"${value / NANO_USD:.6g}"


def budget_spec_from_toml(value: Any, path: str) -> BudgetSpec:
    """Converter for ``budget`` / ``user_budget`` (a ``_Convert`` of :mod:`proxy.config_values`)."""
    example = 'a table such as { tokens = 50_000, per = "day" } or { usd = 2.5, per = "month" }'
    if not isinstance(value, Mapping):
        raise ConfigError([ConfigProblem(path, f"expected {example}")])
    problems: list[ConfigProblem] = []
    for key in value:
        if key not in ("tokens", "usd", "per"):
            problems.append(ConfigProblem(f"{path}.{key}", f"unknown key {key!r}; allowed keys: tokens, usd, per"))
    per = value.get("per")
    if per not in PERIODS:
        problems.append(ConfigProblem(f"{path}.per", f"must be one of {', '.join(PERIODS)}"))
    units = [k for k in ("tokens", "usd") if k in value]
    limit = 0
    if len(units) != 1:
        problems.append(ConfigProblem(path, f"needs exactly one of tokens or usd: {example}"))
    elif units[0] == "tokens":
        item = value["tokens"]
        if isinstance(item, bool) or not isinstance(item, int) or item < 1:
            problems.append(ConfigProblem(f"{path}.tokens", "expected an integer of at least 1"))
        else:
            limit = item
    else:
        item = value["usd"]
        if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item) or item <= 0:
            problems.append(ConfigProblem(f"{path}.usd", "expected a number of dollars above 0"))
        else:
            limit = math.floor(item * NANO_USD)  # never more than configured
    if problems:
        raise ConfigError(problems)
    return BudgetSpec(limit, units[0], str(per))


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens of one model name or glob (``gpt-4.1*``)."""

    pattern: str
    input: float
    output: float
    cached_input: float | None = None  # None: cached input costs as much as input

    def cost(self, input_tokens: int, cached_tokens: int, output_tokens: int) -> int:
        """Nano-dollars, rounded up."""
        cached = min(max(cached_tokens, 0), input_tokens)
        cached_rate = self.input if self.cached_input is None else self.cached_input
        micro = (input_tokens - cached) * self.input + cached * cached_rate + output_tokens * self.output
        return math.ceil(micro * (NANO_USD / 1_000_000) - 1e-6)


@dataclass(frozen=True, slots=True)
class PriceTable:
    prices: tuple[Price, ...] = ()
    version: str = ""  # logged with every charge: which table priced it

    def lookup(self, model: str | None) -> Price | None:
        """The exact name first, then the longest matching glob."""
        if not model:
            return None
        for price in self.prices:
            if price.pattern == model:
                return price
        globs = [p for p in self.prices if any(c in p.pattern for c in "*?[") and fnmatch.fnmatchcase(model, p.pattern)]
        return max(globs, key=lambda p: len(p.pattern), default=None)


def parse_prices(text: str, source: str = "prices") -> PriceTable:
    """A prices file: ``version = "..."`` and ``[models."NAME-OR-GLOB"]`` tables of ``input``,
    ``cached_input``, ``output`` (USD per million tokens). Raises ConfigError with every problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigProblem(source, f"invalid TOML: {exc}")]) from None
    problems: list[ConfigProblem] = []
    for key in data:
        if key not in ("version", "models"):
            problems.append(ConfigProblem(f"{source}.{key}", "unknown key; allowed keys: version, models"))
    version = data.get("version")
    if version is not None and not isinstance(version, str):
        problems.append(ConfigProblem(f"{source}.version", "expected a string"))
    models = data.get("models", {})
    prices: list[Price] = []
    if not isinstance(models, dict):
        problems.append(ConfigProblem(f"{source}.models", 'expected tables such as [models."gpt-4o"]'))
        models = {}
    for name, table in models.items():
        at = f"{source}.models.{json.dumps(name)}"
        if not isinstance(table, dict):
            problems.append(ConfigProblem(at, "expected a table of input, cached_input, output"))
            continue
        values: dict[str, float] = {}
        for key, item in table.items():
            if key not in ("input", "cached_input", "output"):
                problems.append(ConfigProblem(f"{at}.{key}", "unknown key; allowed keys: input, cached_input, output"))
            elif isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item) or item < 0:
                problems.append(ConfigProblem(f"{at}.{key}", "expected USD per million tokens, a number >= 0"))
            else:
                values[key] = float(item)
        if "input" not in table or "output" not in table:
            problems.append(ConfigProblem(at, "needs input and output (USD per million tokens)"))
        elif len(values) == len(table):
            prices.append(Price(name, values["input"], values["output"], values.get("cached_input")))
    if problems:
        raise ConfigError(problems)
    if not isinstance(version, str) or not version:
        version = "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:12]
    return PriceTable(tuple(prices), version)


@dataclass(frozen=True, slots=True)
class BudgetsConfig:
    """The ``[budgets]`` section: how holds are computed and where prices come from."""

    prices: str = ""  # a TOML price table, relative to the config file; "" = none (usd budgets need one)
    input_bytes_per_token: float = 1.0  # body bytes per token of input, at least; 1 is a true bound
    unbounded_hold: int = 2000  # tokens held more per image/audio/file input, or for a non-JSON body
    default_max_tokens: int = 4096  # the output cap written into a body that has none (without a credential cap)
    session_hold: int = 20_000  # tokens a WebSocket (realtime) session holds; it is closed once it used them
    # read from ``prices`` by load_config; derived: not a key of [budgets]
    price_table: PriceTable = field(default=PriceTable(), repr=False, metadata={"derived": True})

    def __post_init__(self) -> None:
        if self.input_bytes_per_token < 1:
            raise ValueError("input_bytes_per_token must be at least 1")


# --- windows -----------------------------------------------------------------------------------

_SECONDS = {"minute": 60, "hour": 3600, "day": 86400}


def window(per: str, now: datetime) -> tuple[datetime, datetime]:
    """The fixed UTC window of ``per`` holding ``now``: [start, end)."""
    now = now.astimezone(UTC)
    if per == "month":
        start = datetime(now.year, now.month, 1, tzinfo=UTC)
        days = calendar.monthrange(now.year, now.month)[1]
        return start, start + timedelta(days=days)
    seconds = _SECONDS[per]
    epoch = math.floor(now.timestamp())
    start_ts = epoch - epoch % seconds
    start = datetime.fromtimestamp(start_ts, UTC)
    return start, start + timedelta(seconds=seconds)
