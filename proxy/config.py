"""Parkway's configuration: one TOML file read into frozen dataclasses.

Everything here is pure except ``load_config``, the one function that reads a file and the
process environment, so every rule is tested with plain strings and dictionaries. Validation
collects every problem with its key path before refusing, so an operator fixes a file in one
pass. Secrets and injected header values never appear in a ``repr`` or in a problem message.

Here: the sections' dataclasses, each section's rules and the whole file's checks. The table
reader and the value converters are :mod:`proxy.config_values`.
"""

from __future__ import annotations

import importlib.util
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar
from urllib.parse import urlsplit

from .cache.policy import CACHE_BACKENDS, REPLAY_MODES, CacheConfig, CacheRules
from .config_values import (
    _choice,
    _Convert,
    _credential_id,
    _expect,
    _fail,
    _headers,
    _kind,
    _list_of,
    _listen_address,
    _network,
    _non_empty,
    _number,
    _origin,
    _path_prefix,
    _public_url,
    _secret_from,
    _section,
    _str,
    _Table,
    _token,
    _upstream_prefix,
    _webhook_secret,
    expand_env,
    limit_spec_from_toml,
)
from .errors import ConfigError, ConfigProblem
from .jobs.model import STORES, JobsConfig, credential_job_limits
from .limits.budget_spec import BudgetsConfig, BudgetSpec, budget_spec_from_toml, parse_prices
from .limits.limiter import LimitSpec
from .policy import OVERFLOW_CHOICES
from .telemetry.model import TelemetryConfig
from .websocket.policy import WebSocketConfig

__all__ = [  # the names other modules and the tests import from here
    "FAILURE_POLICIES",
    "STATE_BACKENDS",
    "AdminConfig",
    "Config",
    "CorsConfig",
    "Credential",
    "LogConfig",
    "ServerConfig",
    "StateConfig",
    "config_from_dict",
    "expand_env",
    "jobs_problems",
    "limit_spec_from_toml",
    "load_config",
    "parse_config",
]

STATE_BACKENDS = ("memory", "redis")
FAILURE_POLICIES = ("open", "closed")  # of a shared state store that cannot be reached


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Listening addresses, timeouts (seconds) and limits."""

    listen: tuple[str, ...] = ("127.0.0.1:3000",)  # "host:port" or "[v6]:port"; see split_host_port
    header_read_timeout: float = 10.0  # to receive a full request head
    keepalive_timeout: float = 75.0  # idle time between requests on a kept-alive connection
    client_body_timeout: float = 30.0  # max gap between request-body chunks from the client
    client_write_timeout: float = 60.0  # max time one write to a slow client may take
    upstream_connect_timeout: float = 10.0
    upstream_first_byte_timeout: float = 120.0  # until response headers arrive
    upstream_idle_timeout: float = 120.0  # max gap between upstream body chunks
    upstream_dns_ttl: float = 30.0  # seconds an upstream host name's addresses are kept, 0 = resolve per connection
    request_timeout: float = 900.0  # overall cap on one request, 0 = none
    max_header_bytes: int = 16384
    max_signed_body_bytes: int = 1048576  # max body buffered for signed-body verification
    max_connections: int = 10000
    drain_timeout: float = 30.0  # grace for in-flight requests on shutdown, 0 = cancel at once
    clock_skew: float = 60.0  # tolerance for X-Sw-Date in the future and for expiry
    max_expiry: int = 604800  # refuse X-Sw-Expires above this (7 days, like SigV4)
    public_path_prefix: str = ""  # path where browsers reach Parkway, e.g. "/ai" behind nginx
    trusted_proxies: tuple[str, ...] = ()  # CIDRs whose X-Forwarded-* headers are believed
    max_in_flight: int = 10000  # upstream requests at once; past it 503 + Retry-After
    max_queued: int = 0  # requests that may wait for an in-flight slot; 0 = refuse at once
    queue_timeout: float = 0.0  # longest such wait, in seconds
    user_param: str = "pw_user"  # signed query parameter naming the end user ("" = none)
    single_use_param: str = "pw_single_use"  # signed parameter making one URL single-use
    allow_private_upstreams: bool = False  # allow loopback/private upstream addresses for all
    upstream_ca_file: str = ""  # PEM certificates trusted for https upstreams instead of the system's
    inspect_body_bytes: int = 65536  # most body bytes held back to check JSON body rules
    body_rules_overflow: str = "refuse"  # rules' fields not within inspect_body_bytes: refuse | stream
    http: str = "auto"  # request-head parser: auto (httptools when installed) | h11 | httptools


@dataclass(frozen=True, slots=True)
class Credential:
    """Who may sign URLs, with which secrets, and what Parkway adds to the upstream request."""

    id: str
    secrets: tuple[str, ...] = field(repr=False)  # several allow rotation: any one verifies
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # names as written
    allowed_upstreams: tuple[str, ...] = ()  # URL prefixes; empty = any upstream
    allow_private_upstreams: bool = False  # loopback/private/link-local upstream addresses
    single_use: bool = False  # every URL of this credential may be used once
    limits: LimitSpec | None = None  # the credential as a whole
    user_limits: LimitSpec | None = None  # each end user (server.user_param) of the credential
    allowed_methods: tuple[str, ...] = ()  # empty = any
    allowed_paths: tuple[str, ...] = ()  # upstream path prefixes; empty = any
    max_body_bytes: int | None = None
    allowed_models: tuple[str, ...] = ()  # JSON body "model"; empty = any
    max_tokens: int | None = None  # cap on max_tokens / max_completion_tokens
    max_n: int | None = None  # cap on "n"
    allowed_callbacks: tuple[str, ...] = ()  # URL prefixes a signed pw_callback may name; empty = none
    webhook_secrets: tuple[str, ...] = field(default=(), repr=False)  # whsec_...: each signs deliveries
    max_jobs_queued: int | None = None  # this credential's queued jobs; None = its share of [jobs] max_jobs_queued
    max_jobs_running: int | None = None  # its jobs one process runs at once; None = its share of max_jobs_in_flight
    cache: CacheRules | None = None  # [credentials.cache]: a default ttl and how entries are kept
    budget: BudgetSpec | None = None  # tokens or USD per window, the credential as a whole (docs/budgets.md)
    user_budget: BudgetSpec | None = None  # the same for each end user; URLs must then name one
    propagate_trace: bool = False  # send traceparent upstream (third parties see it): docs/operations.md
    # Derived once (a credential is built once, read per request): budget or user_budget is set.
    budgeted: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "budgeted", self.budget is not None or self.user_budget is not None)

    def __hash__(self) -> int:
        # By id alone (equal credentials have equal ids): the per-credential caches (the request
        # policy, the address policy) hash one on every request, and hashing all the fields, the
        # nested sections' too, took a µs.
        return hash(self.id)


@dataclass(frozen=True, slots=True)
class CorsConfig:
    allow_origins: tuple[str, ...] = ("*",)
    allow_methods: tuple[str, ...] = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
    allow_headers: tuple[str, ...] = ("*",)
    expose_headers: tuple[str, ...] = ()
    max_age: int = 600
    allow_credentials: bool = False


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"  # debug | info | warning | error
    format: str = "json"  # json | console


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The operators' listener: /healthz, /readyz, /metrics, POST /reload. Empty = off."""

    listen: tuple[str, ...] = ("127.0.0.1:9180",)


@dataclass(frozen=True, slots=True)
class StateConfig:
    """The ``[state]`` section: where limits and single-use signatures live (see :mod:`proxy.limits.state`)."""

    backend: str = "memory"  # memory | redis
    url: str = "redis://127.0.0.1:6379/0"  # redis:// or rediss://; a password may come from ${ENV}
    key_prefix: str = "parkway:"  # several Parkway deployments can share one Redis
    failure_policy: str = "open"  # when Redis is unreachable: open (serve unlimited) | closed (503)
    timeout: float = 0.25  # seconds for one Redis operation, connecting included
    retry_interval: float = 1.0  # while Redis is down, try it again at most this often
    lease_ttl: float = 60.0  # a concurrency slot of a crashed process is freed after this
    max_keys: int = 100_000  # memory backend: rate/concurrency keys kept (LRU beyond)
    max_signatures: int = 100_000  # memory backend: live single-use signatures remembered
    concurrency_retry_after: float = 1.0  # Retry-After for a concurrency refusal (no better guess exists)

    def __post_init__(self) -> None:
        if self.backend not in STATE_BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(STATE_BACKENDS)}")
        if self.failure_policy not in FAILURE_POLICIES:
            raise ValueError(f"failure_policy must be one of {', '.join(FAILURE_POLICIES)}")


@dataclass(frozen=True)
class Config:
    """The whole configuration; ``credential(id)`` is the per-request lookup."""

    server: ServerConfig = ServerConfig()
    credentials: tuple[Credential, ...] = ()
    cors: CorsConfig = CorsConfig()
    log: LogConfig = LogConfig()
    # Off when built in code (tests, embedding, the demo): a fixed port would collide there.
    # A TOML file without [admin] gets AdminConfig()'s loopback default.
    admin: AdminConfig = AdminConfig(listen=())
    state: StateConfig = StateConfig()
    websocket: WebSocketConfig = WebSocketConfig()
    jobs: JobsConfig = JobsConfig()
    cache: CacheConfig = CacheConfig()
    budgets: BudgetsConfig = BudgetsConfig()
    telemetry: TelemetryConfig = TelemetryConfig()  # off unless an OTLP endpoint is named

    # Not a field, so equality, hashing, repr and asdict() ignore it.
    _by_id: ClassVar[Mapping[str, Credential]]

    def __post_init__(self) -> None:
        by_id = {c.id: c for c in self.credentials}
        if len(by_id) != len(self.credentials):
            raise ValueError("credential ids must be unique")
        object.__setattr__(self, "_by_id", by_id)

    def credential(self, id: str) -> Credential | None:
        """The credential named ``id``, or None (O(1): called on every request)."""
        return self._by_id.get(id)

    def job_limits(self, credential: Credential) -> tuple[int, int]:
        """(queued, running per process) jobs of ``credential``: see :func:`proxy.jobs.model.credential_job_limits`."""
        return credential_job_limits(
            self.jobs,
            max_queued=credential.max_jobs_queued,
            max_running=credential.max_jobs_running,
            credentials=len(self.credentials),
        )


# --- public functions -----------------------------------------------------------------------


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and validate the file at ``path``; ``env`` defaults to ``os.environ``."""
    try:
        with open(path, "rb") as file:
            text = file.read().decode("utf-8")
    except OSError as exc:
        message = f"cannot read {os.fspath(path)!r}: {exc.strerror or exc}"
        raise ConfigError([ConfigProblem("", message)]) from None
    except UnicodeDecodeError as exc:
        message = f"{os.fspath(path)!r} is not UTF-8 (byte {exc.start}), as TOML requires"
        raise ConfigError([ConfigProblem("", message)]) from None
    config = parse_config(text, os.environ if env is None else env)
    if config.budgets.prices:
        prices_path = os.path.join(os.path.dirname(os.fspath(path)), config.budgets.prices)
        try:
            with open(prices_path, "rb") as file:
                table = parse_prices(file.read().decode("utf-8"), "budgets.prices")
        except (OSError, UnicodeDecodeError) as exc:
            message = f"cannot read the price table {config.budgets.prices!r}: {getattr(exc, 'strerror', None) or exc}"
            raise ConfigError([ConfigProblem("budgets.prices", message)]) from None
        config = replace(config, budgets=replace(config.budgets, price_table=table))
    return config


def parse_config(text: str, env: Mapping[str, str]) -> Config:
    """Parse TOML ``text``; raises ConfigError listing every problem found."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # its message ends with "(at line L, column C)"
        raise ConfigError([ConfigProblem("", f"invalid TOML: {exc}")]) from None
    return config_from_dict(data, env)


def config_from_dict(data: Mapping[str, Any], env: Mapping[str, str]) -> Config:
    """Validate already-parsed TOML ``data``; raises ConfigError listing every problem found."""
    if not isinstance(data, Mapping):
        raise ConfigError([ConfigProblem("", f"expected a table, got {_kind(data)}")])
    problems: list[ConfigProblem] = []
    root = _Table(data, "", problems)
    server = _section(root.table("server"), ServerConfig, _SERVER_RULES)
    credentials = _credentials(root.tables("credentials"), env)
    cors = _section(root.table("cors"), CorsConfig, _CORS_RULES)
    log = _section(root.table("log"), LogConfig, _LOG_RULES)
    admin = _section(root.table("admin"), AdminConfig, _ADMIN_RULES)
    state = _section(root.table("state"), StateConfig, _state_rules(env))
    websocket = _section(root.table("websocket"), WebSocketConfig, _WEBSOCKET_RULES)
    jobs = _section(root.table("jobs"), JobsConfig, _JOBS_RULES)
    if "jobs" in data and "enabled" not in data.get("jobs", {}):
        jobs = replace(jobs, enabled=True)  # a [jobs] table turns them on
    cache = _section(root.table("cache"), CacheConfig, _cache_rules(env))
    budgets = _section(root.table("budgets"), BudgetsConfig, _BUDGETS_RULES)
    telemetry = _telemetry(root, data, env)
    root.finish()
    for i, c in enumerate(credentials):
        for key in ("budget", "user_budget"):
            spec = getattr(c, key)
            if spec is not None and spec.unit == "usd" and not budgets.prices:
                root.report(f"credentials[{i}].{key}", "a usd budget needs a price table: set [budgets] prices")
    if not any(p.path == "jobs.public_url" for p in problems):
        problems.extend(jobs_problems(jobs))
    signed_params = {"server.user_param": server.user_param, "server.single_use_param": server.single_use_param}
    for where, name in signed_params.items():
        if name and name == cache.param:
            root.report("cache.param", f"{cache.param!r} is already the {where}: each signed parameter has one meaning")
    if cors.allow_credentials and "*" in cors.allow_origins:
        root.report(
            "cors.allow_credentials",
            "cannot be true while allow_origins contains '*': browsers reject credentialed "
            "responses for a wildcard origin; list the origins instead",
        )
    if problems:
        raise ConfigError(problems)
    return Config(server, credentials, cors, log, admin, state, websocket, jobs, cache, budgets, telemetry)


def config_warnings(config: Config) -> list[ConfigProblem]:
    """What a valid configuration allows that its author may not mean: said, never refused."""
    warnings = []
    for i, credential in enumerate(config.credentials):
        if not credential.allowed_upstreams:
            private = credential.allow_private_upstreams or config.server.allow_private_upstreams
            reach = "any upstream, private addresses included" if private else "any public upstream"
            warnings.append(
                ConfigProblem(
                    f"credentials[{i}].allowed_upstreams",
                    f"warning: not set, so URLs signed for {credential.id!r} may reach {reach}; "
                    "list the URL prefixes it is for",
                )
            )
    return warnings


def kept_per_process(config: Config) -> list[str]:
    """What the memory state backend keeps in each process, so that several processes (``--workers``)
    each enforce it alone: a limit or budget N times over, a single-use URL once per process."""
    if config.state.backend != "memory":
        return []
    credentials = config.credentials
    kept = []
    if any(c.limits or c.user_limits for c in credentials):
        kept.append("limits")
    if any(c.budgeted for c in credentials):
        kept.append("budgets")
    return [*kept, "single-use URLs"]  # any signer may make a URL single-use (server.single_use_param)


def jobs_problems(jobs: JobsConfig) -> list[ConfigProblem]:
    """What keeps jobs from starting: they are on without a ``public_url`` to build their URLs from.
    Checked on load and again when Parkway starts (a configuration built in code)."""
    if jobs.enabled and not jobs.public_url:
        message = (
            "is required when jobs are enabled: the absolute URL where clients reach Parkway, public prefix "
            'included (e.g. "https://app.example.com/ai"); job status URLs and webhook links are built from '
            "it, never from the request's Host header, which the client chooses"
        )
        return [ConfigProblem("jobs.public_url", message)]
    return []


# --- the sections' rules ----------------------------------------------------------------------


def _credentials(tables: list[_Table], env: Mapping[str, str]) -> tuple[Credential, ...]:
    credentials: list[Credential] = []
    first_seen: dict[str, str] = {}
    for t in tables:
        cid = t.value("id", "", _credential_id, required=True)
        inline = t.value("secret", (), _list_of(_non_empty, single_ok=True))
        from_env = t.value("secret_env", (), _list_of(_secret_from(env), single_ok=True))
        headers = t.value("headers", (), _headers(env))
        upstreams = t.value("allowed_upstreams", (), _list_of(_upstream_prefix))
        extra = {key: t.value(key, default, rule) for key, (default, rule) in _CREDENTIAL_POLICY_RULES.items()}
        callbacks = t.value("allowed_callbacks", (), _list_of(_upstream_prefix))
        hook_inline = t.value("webhook_secret", (), _list_of(_webhook_secret, single_ok=True))
        hook_env = t.value(
            "webhook_secret_env", (), _list_of(lambda v, p: _webhook_secret(_secret_from(env)(v, p), p), single_ok=True)
        )
        t.finish()
        if callbacks and not any(t.data.get(key) for key in ("webhook_secret", "webhook_secret_env")):
            t.report(t.at("allowed_callbacks"), "needs webhook_secret_env (or webhook_secret) to sign deliveries")
        if all(t.data.get(key) in (None, []) for key in ("secret", "secret_env")):
            t.report(t.path, "needs at least one secret: set secret_env (or secret)")
        if cid in first_seen:
            t.report(t.at("id"), f"duplicate id {cid!r}, first used at {first_seen[cid]}")
        elif cid:
            first_seen[cid] = t.at("id")
        credentials.append(
            Credential(
                cid, inline + from_env, headers, upstreams, **extra,
                allowed_callbacks=callbacks, webhook_secrets=hook_inline + hook_env,
            )
        )  # fmt: skip
    return tuple(credentials)


def _http_parser(value: Any, path: str) -> str:
    choice = _choice("auto", "h11", "httptools")(value, path)
    if choice == "httptools" and importlib.util.find_spec("httptools") is None:
        _fail(path, "httptools is not installed (pip install 'parkway[fast]'); use auto or h11")
    return choice


_TIMEOUTS = [
    "header_read_timeout",
    "keepalive_timeout",
    "client_body_timeout",
    "client_write_timeout",
    "upstream_connect_timeout",
    "upstream_first_byte_timeout",
    "upstream_idle_timeout",
]
_LIMITS = ["max_header_bytes", "max_signed_body_bytes", "max_connections", "max_expiry"]
_SERVER_RULES: Mapping[str, _Convert] = {
    "listen": _list_of(_listen_address, single_ok=True, non_empty=True),
    **dict.fromkeys(_TIMEOUTS, _number(0, above=True)),
    # 0 means: no overall cap / cancel in-flight requests at once / no clock tolerance / no DNS cache.
    **dict.fromkeys(["request_timeout", "drain_timeout", "clock_skew", "upstream_dns_ttl"], _number(0)),
    **dict.fromkeys(_LIMITS, _number(1, integer=True)),
    "public_path_prefix": lambda value, path: _path_prefix(value, path),
    "trusted_proxies": _list_of(lambda value, path: _network(value, path), single_ok=True),
    "max_in_flight": _number(1, integer=True),
    "max_queued": _number(0, integer=True),
    "queue_timeout": _number(0),
    "user_param": _expect(str, "a string"),
    "single_use_param": _expect(str, "a string"),
    "allow_private_upstreams": _expect(bool, "a boolean"),
    "upstream_ca_file": _expect(str, "a string"),
    "inspect_body_bytes": _number(1, integer=True),
    "body_rules_overflow": _choice(*OVERFLOW_CHOICES),
    "http": lambda value, path: _http_parser(value, path),
}
_CREDENTIAL_POLICY_RULES: Mapping[str, tuple[Any, _Convert]] = {
    "allow_private_upstreams": (False, _expect(bool, "a boolean")),
    "single_use": (False, _expect(bool, "a boolean")),
    "limits": (None, limit_spec_from_toml),
    "user_limits": (None, limit_spec_from_toml),
    "allowed_methods": ((), _list_of(lambda value, path: _token(value, path).upper())),
    "allowed_paths": ((), _list_of(lambda value, path: _path_prefix(value, path) or "/")),
    "max_body_bytes": (None, _number(0, integer=True)),
    "allowed_models": ((), _list_of(_non_empty)),
    "max_tokens": (None, _number(1, integer=True)),
    "max_n": (None, _number(1, integer=True)),
    "max_jobs_queued": (None, _number(1, integer=True)),
    "max_jobs_running": (None, _number(1, integer=True)),
    "cache": (None, lambda value, path: _credential_cache(value, path)),
    "budget": (None, budget_spec_from_toml),
    "user_budget": (None, budget_spec_from_toml),
    "propagate_trace": (False, _expect(bool, "a boolean")),
}
_BUDGETS_RULES: Mapping[str, _Convert] = {
    "prices": _expect(str, "a string (a TOML file, relative to this one)"),
    "input_bytes_per_token": _number(1),
    "unbounded_hold": _number(0, integer=True),
    "default_max_tokens": _number(1, integer=True),
    "session_hold": _number(1, integer=True),
    "price_table": lambda value, path: _fail(path, "is read from the file named by prices"),
}


def _state_rules(env: Mapping[str, str]) -> Mapping[str, _Convert]:
    return {
        "backend": _choice(*STATE_BACKENDS),
        "url": _redis_url(env),
        "key_prefix": _expect(str, "a string"),
        "failure_policy": _choice(*FAILURE_POLICIES),
        "timeout": _number(0, above=True),
        "retry_interval": _number(0, above=True),
        "lease_ttl": _number(1),
        "max_keys": _number(1, integer=True),
        "max_signatures": _number(1, integer=True),
        "concurrency_retry_after": _number(0, above=True),
    }


_JOBS_RULES: Mapping[str, _Convert] = {
    "enabled": _expect(bool, "a boolean"),
    "public_url": _public_url,
    "store": _choice(*STORES),
    "path": _non_empty,
    **dict.fromkeys(
        ["max_jobs_in_flight", "max_jobs_queued", "max_attempts", "max_result_bytes"], _number(1, integer=True)
    ),
    "inline_payload_bytes": _number(0, integer=True),
    **dict.fromkeys(
        ["result_ttl", "max_delivery_age", "lease", "poll_interval", "purge_interval"], _number(0, above=True)
    ),
    "delivery_timeout": _number(0, above=True),
    "retry_schedule": _list_of(_number(0), non_empty=True),
    **dict.fromkeys(["async_param", "callback_param"], _non_empty),
}


def _redis_url(env: Mapping[str, str], *, empty_ok: bool = False) -> _Convert:
    def convert(value: Any, path: str) -> str:
        url = expand_env(_str(value, path), env, path)
        if not (empty_ok and url == "") and urlsplit(url).scheme not in ("redis", "rediss", "unix"):
            _fail(
                path,
                "must be a redis://, rediss:// or unix:// URL" + (' (or "" for the [state] url)' if empty_ok else ""),
            )
        return url

    return convert


def _cache_rules(env: Mapping[str, str]) -> Mapping[str, _Convert]:
    return {
        "backend": _choice(*CACHE_BACKENDS),
        "url": _redis_url(env, empty_ok=True),
        "key_prefix": _expect(str, "a string"),
        **dict.fromkeys(
            ["max_bytes", "max_entry_bytes", "max_followers", "follower_lag_bytes"], _number(1, integer=True)
        ),
        "max_ttl": _number(1, integer=True),
        "max_body_bytes": _number(0, integer=True),
        "param": _non_empty,
        "key_headers": _list_of(lambda value, path: _token(value, path).lower()),
        "timeout": _number(0, above=True),
        "retry_interval": _number(0, above=True),
        "lock_timeout": _number(0.1),
        "stream_readers": _number(1, integer=True),
    }


_CREDENTIAL_CACHE_RULES: Mapping[str, _Convert] = {
    "ttl": _number(0, integer=True),
    "namespace": _expect(str, "a string"),
    "per_user": _expect(bool, "a boolean"),
    "replay": _choice(*REPLAY_MODES),
    "honour_upstream_no_store": _expect(bool, "a boolean"),
    "max_entry_bytes": _number(1, integer=True),
}


def _credential_cache(value: Any, path: str) -> CacheRules:
    """The ``[credentials.cache]`` table, every problem reported with its key path."""
    problems: list[ConfigProblem] = []
    rules = _section(_Table(_expect(dict, "a table")(value, path), path, problems), CacheRules, _CREDENTIAL_CACHE_RULES)
    if problems:
        raise ConfigError(problems)
    return rules


def _otlp_endpoint(value: Any, path: str) -> str:
    url = _str(value, path).strip()
    if url and (urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc):
        _fail(path, 'must be an http:// or https:// URL (or "" for off)')
    return url


_TELEMETRY_RULES: Mapping[str, _Convert] = {
    "otlp_endpoint": _otlp_endpoint,
    "service_name": _non_empty,
    "sample_ratio": _number(0),
    "record_user": _expect(bool, "a boolean"),
}


def _telemetry(root: _Table, data: Mapping[str, Any], env: Mapping[str, str]) -> TelemetryConfig:
    """``[telemetry]``, or without that table the standard OTEL_EXPORTER_OTLP_ENDPOINT and
    OTEL_SERVICE_NAME. An endpoint needs the ``otel`` extra: without it the file is refused here
    rather than the traces silently missing."""
    table = root.table("telemetry")
    if "telemetry" in data:
        telemetry = _section(table, TelemetryConfig, _TELEMETRY_RULES)
        where = "telemetry.otlp_endpoint"
    else:
        endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
        try:
            endpoint = _otlp_endpoint(endpoint, "OTEL_EXPORTER_OTLP_ENDPOINT")
        except ConfigError as exc:
            root.problems.extend(exc.problems)
            endpoint = ""
        telemetry = TelemetryConfig(endpoint, env.get("OTEL_SERVICE_NAME", "").strip() or "parkway")
        where = "OTEL_EXPORTER_OTLP_ENDPOINT"
    if telemetry.sample_ratio > 1:
        root.report("telemetry.sample_ratio", "must be between 0 and 1")
    if telemetry.enabled and not otel_installed():
        root.report(where, "needs the OpenTelemetry packages: install Parkway with its extra, parkway[otel]")
    return telemetry


def otel_installed() -> bool:
    """The ``otel`` extra's SDK and exporter can be imported (looked up, not loaded)."""
    try:
        return all(
            importlib.util.find_spec(name) is not None
            for name in ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http")
        )
    except ModuleNotFoundError:  # a parent package is missing
        return False


_CORS_RULES: Mapping[str, _Convert] = {
    "allow_origins": _list_of(_origin),
    "allow_methods": _list_of(lambda value, path: _token(value, path).upper()),
    "allow_headers": _list_of(_token),
    "expose_headers": _list_of(_token),
    "max_age": _number(0, integer=True),
    "allow_credentials": _expect(bool, "a boolean"),
}
_ADMIN_RULES: Mapping[str, _Convert] = {"listen": _list_of(_listen_address, single_ok=True)}
_WEBSOCKET_RULES: Mapping[str, _Convert] = {
    "max_message_size": _number(1024, integer=True),
    "message_queue_size": _number(1, integer=True),
    "max_message_frames": _number(1, integer=True),
    # 0 means: no idle limit / no maximum duration.
    **dict.fromkeys(["idle_timeout", "max_session_duration"], _number(0)),
    **dict.fromkeys(["handshake_timeout", "close_timeout"], _number(0, above=True)),
}
_LOG_RULES: Mapping[str, _Convert] = {
    "level": _choice("debug", "info", "warning", "error"),
    "format": _choice("json", "console"),
}
