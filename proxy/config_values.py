"""Reading TOML values for :mod:`proxy.config`: a table reader that records every problem with
its key path and carries on, and the converters each key is checked with (pure).

A converter takes ``(value, key path)`` and returns the checked value or raises ConfigError;
messages say what was found, never the value (it may be a secret).
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import fields
from functools import partial
from typing import Any, NoReturn
from urllib.parse import urlsplit

from .errors import ConfigError, ConfigProblem
from .jobs import webhooks
from .limits.limiter import LimitSpec, parse_rate
from .urls import InvalidURL, normalize_prefix, normalize_url, split_host_port
from .websocket.policy import http_form

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
        self.allowed: list[str] = []  # named in an unknown key's message
        self.asked: set[str] = set()  # the allowed ones and those only refused with a reason (derived fields)

    def at(self, key: str) -> str:
        return _join(self.path, key)

    def report(self, path: str, message: str) -> None:
        self.problems.append(ConfigProblem(path, message))

    def value(self, key: str, default: Any, convert: _Convert, *, required: bool = False, listed: bool = True) -> Any:
        """``convert`` the value at ``key``; on a problem, record it and carry on with ``default``.
        A key not ``listed`` is not offered as allowed (a field set from elsewhere, whose converter refuses it)."""
        self.asked.add(key)
        if listed:
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
            if key not in self.asked:
                self.report(self.at(key), unknown_key(key, self.allowed))


def unknown_key(key: str, allowed: list[str]) -> str:
    """The problem of a key nobody reads: the allowed key it most likely misspells, else them all."""
    close = difflib.get_close_matches(key, allowed, n=1)
    if close:
        return f"unknown key {key!r}; did you mean {close[0]!r}?"
    return f"unknown key {key!r}; allowed keys: {', '.join(allowed)}"


def _section(table: _Table, cls: type, rules: Mapping[str, _Convert]) -> Any:
    """Build dataclass ``cls`` from ``table`` with one converter per field; absent keys keep defaults.
    A field with ``metadata={"derived": True}`` is not a key of the table (its rule says why)."""
    values = {
        f.name: table.value(f.name, f.default, rules[f.name], listed=not f.metadata.get("derived")) for f in fields(cls)
    }
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


def _public_url(value: Any, path: str) -> str:
    """Where clients reach Parkway from outside: an absolute http(s) URL with a host, its path
    the public prefix, no query, fragment or user info; stored without a trailing slash."""
    text = _str(value, path)
    if re.search(r"\s", text):
        _fail(path, "must not contain whitespace")
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        _fail(path, f"{text!r} is not a valid URL")
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        _fail(
            path, f"{text!r} must be an absolute http:// or https:// URL with a host, e.g. 'https://app.example.com/ai'"
        )
    if "@" in parts.netloc:  # not echoed: user info may hold a password
        _fail(path, "must not contain user info (user:password@)")
    if parts.query or parts.fragment or "?" in text or "#" in text:
        _fail(path, f"{text!r} must not have a query or fragment: job URLs are <public_url>/jobs/<id>")
    try:
        return normalize_url(text).rstrip("/")
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
            problems.append(ConfigProblem(at, unknown_key(key, ["max_concurrent", "rate", "burst"])))
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
