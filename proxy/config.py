"""Parkway's configuration: one TOML file read into frozen dataclasses.

Everything here is pure except ``load_config``, the one function that reads a file and the
process environment, so every rule is tested with plain strings and dictionaries. Validation
collects every problem with its key path before refusing, so an operator fixes a file in one
pass. Secrets and injected header values never appear in a ``repr`` or in a problem message.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from functools import partial
from typing import Any, ClassVar, NoReturn
from urllib.parse import urlsplit

from . import webhooks
from .errors import ConfigError, ConfigProblem
from .jobs import STORES, JobsConfig
from .limits import LimitSpec, parse_rate
from .policy import OVERFLOW_CHOICES
from .urls import InvalidURL, normalize_prefix, split_host_port
from .ws_policy import WebSocketConfig, http_form

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
    """The ``[state]`` section: where limits and single-use signatures live (see :mod:`proxy.state`)."""

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
    return parse_config(text, os.environ if env is None else env)


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
    root.finish()
    if cors.allow_credentials and "*" in cors.allow_origins:
        root.report(
            "cors.allow_credentials",
            "cannot be true while allow_origins contains '*': browsers reject credentialed "
            "responses for a wildcard origin; list the origins instead",
        )
    if problems:
        raise ConfigError(problems)
    return Config(server, credentials, cors, log, admin, state, websocket, jobs)


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ENV_REF = re.compile(r"\$\$\{|\$\{(?P<name>[^}]*)(?P<close>\}?)")


def expand_env(value: str, env: Mapping[str, str], path: str) -> str:
    """Replace each ``${NAME}`` with ``env[NAME]``; ``$${`` stands for a literal ``${``.

    Substituted text is not expanded again. Unset or empty variables are refused (an empty
    API key is never meant). Raises ConfigError at ``path``; messages name variables, never values.
    """
    problems: list[ConfigProblem] = []

    def substitute(match: re.Match[str]) -> str:
        name = match["name"]
        if match[0] == "$${":
            return "${"
        if not match["close"]:
            problems.append(ConfigProblem(path, "unterminated '${' (write '$${' for a literal '${')"))
        elif not _ENV_NAME.fullmatch(name):  # not echoed: it may be a secret pasted in by mistake
            problems.append(ConfigProblem(path, "'${...}' must hold a variable name (letters, digits, _)"))
        elif not env.get(name):
            problems.append(ConfigProblem(path, f"environment variable {name} is not set or is empty"))
        else:
            return env[name]
        return ""

    result = _ENV_REF.sub(substitute, value)
    if problems:
        raise ConfigError(problems)
    return result


# --- reading tables ---------------------------------------------------------------------------

# A converter takes (value, key path) and returns the checked value, or raises ConfigError.
_Convert = Callable[[Any, str], Any]
_KINDS = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table"}


def _kind(value: object) -> str:
    """The TOML name of ``value``'s type: messages say what was found, never the value itself."""
    return _KINDS.get(type(value), type(value).__name__)


def _fail(path: str, message: str) -> NoReturn:
    raise ConfigError([ConfigProblem(path, message)])


def _all(checks: Iterable[Callable[[], Any]]) -> tuple[Any, ...]:
    """Run every check; return their values, or raise one ConfigError with all their problems."""
    values: list[Any] = []
    problems: list[ConfigProblem] = []
    for check in checks:
        try:
            values.append(check())
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return tuple(values)


def _join(path: str, key: str) -> str:
    """Extend a key path the way TOML writes it, quoting keys that are not bare."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", key):
        key = json.dumps(key, ensure_ascii=False)
    return f"{path}.{key}" if path else key


class _Table:
    """One TOML table being read: its path, the keys asked for so far, and the shared problem list."""

    def __init__(self, data: Mapping[str, Any], path: str, problems: list[ConfigProblem]):
        self.data, self.path, self.problems = data, path, problems
        self.allowed: list[str] = []

    def at(self, key: str) -> str:
        return _join(self.path, key)

    def report(self, path: str, message: str) -> None:
        self.problems.append(ConfigProblem(path, message))

    def value(self, key: str, default: Any, convert: _Convert, *, required: bool = False) -> Any:
        """``convert`` the value at ``key``; on a problem, record it and carry on with ``default``."""
        self.allowed.append(key)
        if key not in self.data:
            if required:
                self.report(self.at(key), "is required")
            return default
        try:
            return convert(self.data[key], self.at(key))
        except ConfigError as exc:
            self.problems.extend(exc.problems)
            return default

    def table(self, key: str) -> _Table:
        return _Table(self.value(key, {}, _expect(dict, "a table")), self.at(key), self.problems)

    def tables(self, key: str) -> list[_Table]:
        items = self.value(key, [], _expect(list, f"an array of tables ([[{key}]])"))
        tables = []
        for i, item in enumerate(items):
            if isinstance(item, dict):
                tables.append(_Table(item, f"{self.at(key)}[{i}]", self.problems))
            else:
                self.report(f"{self.at(key)}[{i}]", f"expected a table, got {_kind(item)}")
        return tables

    def finish(self) -> None:
        """Report keys nobody asked for: a typo must not silently leave a default in place."""
        for key in self.data:
            if key not in self.allowed:
                self.report(self.at(key), f"unknown key {key!r}; allowed keys: {', '.join(self.allowed)}")


def _section(table: _Table, cls: type, rules: Mapping[str, _Convert]) -> Any:
    """Build dataclass ``cls`` from ``table`` with one converter per field; absent keys keep defaults."""
    values = {f.name: table.value(f.name, f.default, rules[f.name]) for f in fields(cls)}
    table.finish()
    return cls(**values)


# --- converters -------------------------------------------------------------------------------


def _expect(kind: type, name: str) -> _Convert:
    def convert(value: Any, path: str) -> Any:
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            _fail(path, f"expected {name}, got {_kind(value)}")
        return value

    return convert


_str = _expect(str, "a string")


def _list_of(item: _Convert, *, single_ok: bool = False, non_empty: bool = False) -> _Convert:
    """An array whose items are each checked by ``item``; with ``single_ok`` a lone value is one item."""

    def convert(value: Any, path: str) -> tuple[Any, ...]:
        if single_ok and not isinstance(value, list):
            return (item(value, path),)
        items = _expect(list, "an array")(value, path)
        if non_empty and not items:
            _fail(path, "must not be empty")
        return _all(partial(item, each, f"{path}[{i}]") for i, each in enumerate(items))

    return convert


def _number(minimum: float, *, above: bool = False, integer: bool = False) -> _Convert:
    """A finite number >= ``minimum`` (> with ``above``); TOML integers also serve as floats."""

    def convert(value: Any, path: str) -> float | int:
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            _fail(path, f"expected {'an integer' if integer else 'a number'}, got {_kind(value)}")
        if not math.isfinite(value):
            _fail(path, "must be a finite number")
        if value < minimum or (above and value == minimum):
            _fail(path, f"must be {'greater than' if above else 'at least'} {minimum:g}")
        return value if integer else float(value)

    return convert


def _choice(*options: str) -> _Convert:
    def convert(value: Any, path: str) -> str:
        if _str(value, path).lower() not in options:
            _fail(path, f"must be one of {', '.join(options)}, not {value!r}")
        return value.lower()

    return convert


def _listen_address(value: Any, path: str) -> str:
    try:
        split_host_port(_str(value, path))
    except ValueError as exc:
        _fail(path, str(exc))
    return value


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 §5.6.2 (RFC 7230 §3.2.6)
_ORIGIN = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#@\s]+")


def _token(value: Any, path: str) -> str:
    if not _TOKEN.fullmatch(_str(value, path)):
        _fail(path, f"{value!r} is not an HTTP token (RFC 9110 §5.6.2)")
    return value


def _origin(value: Any, path: str) -> str:
    """'*', or an origin the way browsers send it: scheme://host[:port], no path; lower-cased."""
    if _str(value, path) == "*":
        return value
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        parts = None
    if not (parts and parts.hostname and _ORIGIN.fullmatch(value)):
        _fail(path, f"{value!r} is not '*' or scheme://host[:port] (an Origin has no path, not even '/')")
    return value.lower()


def _upstream_prefix(value: Any, path: str) -> str:
    """An absolute http(s) URL prefix in the canonical form ``urls.normalize_url`` gives requests.

    Requests are compared with these prefixes as text, so both sides must be spelled alike
    (lower-case scheme and host, no default port, a bare origin ending in '/'). A ws(s)://
    prefix is kept in its http(s) form, the one WebSocket URLs are matched in.
    """
    if re.search(r"\s", _str(value, path)):  # the normaliser would quietly strip it
        _fail(path, "must not contain whitespace")
    value = http_form(value)
    try:
        parts = urlsplit(value)
    except ValueError:
        _fail(path, f"{value!r} is not a valid URL")
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        _fail(path, f"{value!r} must be an absolute http:// or https:// (or ws:// or wss://) URL with a host")
    if "@" in parts.netloc:  # not echoed: user info may hold a password
        _fail(path, "must not contain user info (user:password@)")
    if "#" in value:
        _fail(path, f"{value!r} must not contain a fragment ('#'): it is never sent upstream")
    try:
        return normalize_prefix(value)
    except InvalidURL as exc:
        _fail(path, str(exc))


def _path_prefix(value: Any, path: str) -> str:
    """'' or an absolute path without query; stored without a trailing slash ("/ai")."""
    if _str(value, path) and (not value.startswith("/") or re.search(r"[?#\s]", value)):
        _fail(path, f"{value!r} must be an absolute path such as '/ai' (no query, no spaces)")
    return value.rstrip("/")


def _network(value: Any, path: str) -> str:
    """An IP address or CIDR network, stored in canonical form."""
    try:
        return str(ipaddress.ip_network(_str(value, path), strict=False))
    except ValueError:
        _fail(path, f"{value!r} is not an IP address or CIDR network (e.g. 127.0.0.1/32, 10.0.0.0/8)")


def _non_empty(value: Any, path: str) -> str:
    if not _str(value, path):
        _fail(path, "must not be empty")
    return value


def _credential_id(value: Any, path: str) -> str:
    if "/" in _non_empty(value, path):
        _fail(path, f"{value!r} must not contain '/': it separates the id from the scope in X-Sw-Credential")
    return value


def _secret_from(env: Mapping[str, str]) -> _Convert:
    def convert(value: Any, path: str) -> str:
        if not _ENV_NAME.fullmatch(_str(value, path)):  # not echoed: it may be a misplaced secret
            _fail(path, "must name an environment variable (letters, digits, _); secrets go in 'secret'")
        if not env.get(value):
            _fail(path, f"environment variable {value} is not set or is empty")
        return env[value]

    return convert


def limit_spec_from_toml(value: Any, path: str) -> LimitSpec:
    """Converter for a ``limits`` / ``user_limits`` table (a ``_Convert``): TOML into a LimitSpec.

    Keys: ``max_concurrent`` (integer >= 1), ``rate`` (``"10/s"``, ``"600/min"``, or a number
    per second), ``burst`` (integer >= 1, needs ``rate``). Raises ConfigError listing every problem.
    """
    if not isinstance(value, Mapping):
        raise ConfigError([ConfigProblem(path, 'expected a table such as { max_concurrent = 4, rate = "10/s" }')])
    problems: list[ConfigProblem] = []
    values: dict[str, Any] = {}
    for key, item in value.items():
        at = f"{path}.{key}"
        if key in ("max_concurrent", "burst"):
            if isinstance(item, bool) or not isinstance(item, int) or item < 1:
                problems.append(ConfigProblem(at, "expected an integer of at least 1"))
            else:
                values[key] = item
        elif key == "rate":
            if isinstance(item, str):
                try:
                    values[key] = parse_rate(item)
                except ValueError as exc:
                    problems.append(ConfigProblem(at, str(exc)))
            elif isinstance(item, (int, float)) and not isinstance(item, bool) and math.isfinite(item) and item > 0:
                values[key] = float(item)
            else:
                problems.append(ConfigProblem(at, "expected a rate such as '10/s' or a number per second above 0"))
        else:
            problems.append(ConfigProblem(at, f"unknown key {key!r}; allowed keys: max_concurrent, rate, burst"))
    if "burst" in value and "rate" not in value:
        problems.append(ConfigProblem(f"{path}.burst", "needs a rate: burst is the size of the rate's bucket"))
    if problems:
        raise ConfigError(problems)
    return LimitSpec(**values)


_NOT_INJECTABLE = dict.fromkeys(
    ["connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"],
    "is hop-by-hop (RFC 9110 §7.6.1): it describes one connection and Parkway manages it",
) | {"host": "is set from the upstream URL", "content-length": "is computed from the body being forwarded"}
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e]*")


def _headers(env: Mapping[str, str]) -> _Convert:
    """The ``[credentials.headers]`` table: name = value, each value expanded with ``${VAR}``."""

    def header(name: str, value: Any, path: str, seen: set[str]) -> tuple[str, str]:
        if not _TOKEN.fullmatch(name):
            _fail(path, f"{name!r} is not a valid header name (an RFC 9110 token)")
        if reason := _NOT_INJECTABLE.get(name.lower()):
            _fail(path, f"{name} cannot be injected: it {reason}")
        if name.lower() in seen:
            _fail(path, f"{name} is set twice (header names are case-insensitive)")
        seen.add(name.lower())
        expanded = expand_env(_str(value, path), env, path)
        if not _FIELD_VALUE.fullmatch(expanded):
            # CR/LF/NUL would let a value smuggle in more headers; httpx refuses non-ASCII anyway.
            _fail(path, "value may hold only visible ASCII, space and tab (no CR, LF, NUL or controls)")
        return name, expanded

    def convert(value: Any, path: str) -> tuple[tuple[str, str], ...]:
        table, seen = _expect(dict, "a table")(value, path), set[str]()
        return _all(partial(header, name, each, _join(path, name), seen) for name, each in table.items())

    return convert


def _webhook_secret(value: Any, path: str) -> str:
    try:
        webhooks.parse_secret(_str(value, path))
    except webhooks.InvalidWebhookSecret as exc:  # the message never holds the secret
        _fail(path, f"is not a Standard Webhooks secret: {exc}")
    return value


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
    # 0 means: no overall cap / cancel in-flight requests at once / no clock tolerance.
    **dict.fromkeys(["request_timeout", "drain_timeout", "clock_skew"], _number(0)),
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
}


def _state_rules(env: Mapping[str, str]) -> Mapping[str, _Convert]:
    def redis_url(value: Any, path: str) -> str:
        url = expand_env(_str(value, path), env, path)
        if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
            _fail(path, "must be a redis://, rediss:// or unix:// URL")
        return url

    return {
        "backend": _choice(*STATE_BACKENDS),
        "url": redis_url,
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
    "store": _choice(*STORES),
    "path": _non_empty,
    **dict.fromkeys(
        ["max_jobs_in_flight", "max_jobs_queued", "max_attempts", "max_result_bytes"], _number(1, integer=True)
    ),
    "inline_payload_bytes": _number(0, integer=True),
    **dict.fromkeys(["result_ttl", "max_delivery_age", "lease", "poll_interval"], _number(0, above=True)),
    "delivery_timeout": _number(0, above=True),
    "retry_schedule": _list_of(_number(0), non_empty=True),
    **dict.fromkeys(["async_param", "callback_param"], _non_empty),
}
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
    # 0 means: no idle limit / no maximum duration.
    **dict.fromkeys(["idle_timeout", "max_session_duration"], _number(0)),
    **dict.fromkeys(["handshake_timeout", "close_timeout"], _number(0, above=True)),
}
_LOG_RULES: Mapping[str, _Convert] = {
    "level": _choice("debug", "info", "warning", "error"),
    "format": _choice("json", "console"),
}
