"""Request policy per credential: methods, upstream paths, body size and JSON body rules.

Pure: every check takes what it needs and raises a :mod:`proxy.errors` refusal that names
the rule. The JSON rules (allowed ``model`` values, caps on ``max_tokens`` /
``max_completion_tokens`` and ``n``, as in OpenAI-style requests) are checked by
:class:`BodyInspector`, which reads the body as it arrives and holds back only what it must:

* it holds chunks until it can decide: every field with a rule has been seen, or the JSON
  object has ended, or ``inspect_bytes`` were held without the required fields (then
  ``overflow`` decides: ``"refuse"``, or ``"stream"`` to forward and keep checking);
* once decided, the held chunks are forwarded, then the rest streams through the same scanner,
  chunk by chunk *before* each is forwarded. A later violation (a second ``"model"`` key, which
  parsers resolve differently; a late ``n``) raises before the chunk that completes it is sent,
  so the upstream never receives a complete request that breaks a rule;
* a body over ``max_body_bytes`` is refused before anything is forwarded when its
  ``Content-Length`` says so, or before the chunk that crosses the limit otherwise.

The scanner only tracks the top-level object (depth, strings, escapes) and keeps at most a
short field name or value, so its own memory is constant.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any, overload

from .errors import BadRequest, BodyTooLarge, Forbidden

OVERFLOW_CHOICES = ("refuse", "stream")


@dataclass(frozen=True, slots=True)
class RequestPolicy:
    """What a credential's signed URLs may ask of the upstream; empty or None means no rule."""

    allowed_methods: tuple[str, ...] = ()  # upper-case
    allowed_path_prefixes: tuple[str, ...] = ()  # upstream paths, matched on segment boundaries
    max_body_bytes: int | None = None
    allowed_models: tuple[str, ...] = ()
    max_tokens_cap: int | None = None  # caps max_tokens and max_completion_tokens; one is then required
    max_n: int | None = None
    inspect_bytes: int = 65536  # most body bytes held back while the JSON rules are checked
    overflow: str = "refuse"  # when the required fields are not within inspect_bytes: refuse | stream

    # Derived once from the fields above (a policy is built once per credential, read per request).
    json_rules: bool = field(init=False, repr=False, compare=False)  # JSON body rules to check
    # Whether a body must pass through a BodyInspector (JSON rules or a size cap).
    inspects_body: bool = field(init=False, repr=False, compare=False)
    checks_head: bool = field(init=False, repr=False, compare=False)  # any rule check_request applies

    def __post_init__(self) -> None:
        if self.overflow not in OVERFLOW_CHOICES:
            raise ValueError(f"overflow must be one of {', '.join(OVERFLOW_CHOICES)}")
        if self.inspect_bytes < 1:
            raise ValueError("inspect_bytes must be at least 1")
        json_rules = bool(self.allowed_models) or self.max_tokens_cap is not None or self.max_n is not None
        object.__setattr__(self, "json_rules", json_rules)
        object.__setattr__(self, "inspects_body", json_rules or self.max_body_bytes is not None)
        checks_head = bool(self.allowed_methods or self.allowed_path_prefixes) or self.max_body_bytes is not None
        object.__setattr__(self, "checks_head", checks_head)


# --- the body, as forwarded ----------------------------------------------------------------


@overload
async def checked_body(policy: RequestPolicy, declared_length: int | None, body: bytes) -> bytes: ...
@overload
async def checked_body(
    policy: RequestPolicy, declared_length: int | None, body: AsyncGenerator[bytes, None]
) -> AsyncGenerator[bytes, None]: ...
async def checked_body(
    policy: RequestPolicy, declared_length: int | None, body: bytes | AsyncGenerator[bytes, None]
) -> bytes | AsyncGenerator[bytes, None]:
    """The request body to forward upstream, under the credential's body rules.

    A body already read whole (a signed body) is checked at once and returned. Of a streamed
    body, it first reads what the rules need to decide (one chunk ahead for a size cap alone,
    so a body already over it is refused before any connection is made; up to
    ``inspect_bytes`` for the JSON rules), raising on a violation; the body it returns yields
    the held chunks, then the rest, each checked before it goes. Without body rules it is
    ``body`` itself. Close a returned generator (``aclosing``) as well as ``body``.
    """
    if not policy.inspects_body:
        return body
    inspector = BodyInspector(policy, declared_length)
    if isinstance(body, bytes):
        inspector.feed(body)
        inspector.end()
        return body
    if inspector.decided:
        first = await anext(body, None)
        if first is not None:
            inspector.feed(first)
            inspector.hold(first)
    else:  # hold back what the JSON rules need, no more
        async for chunk in body:
            if inspector.feed(chunk):
                break
        else:
            inspector.end()
    return inspector.forward(body)


# --- method, path, declared length ----------------------------------------------------------


def check_method(policy: RequestPolicy, method: str) -> None:
    if policy.allowed_methods and method.upper() not in policy.allowed_methods:
        raise Forbidden(
            f"method {method} is not allowed for this credential (allowed: {', '.join(policy.allowed_methods)})",
            code="method_not_allowed",
        )


_ENCODED_SEPARATOR = re.compile(r"%(2f|5c)", re.IGNORECASE)


def path_allowed(path: str, prefixes: tuple[str, ...]) -> bool:
    """True when ``path`` is a prefix or lies under one (``/v1/chat`` allows ``/v1/chat/x``,
    not ``/v1/chatty``). An empty tuple allows any path. Paths are the normalised upstream path
    (dot segments already resolved), without query."""
    if not prefixes:
        return True
    if _ENCODED_SEPARATOR.search(path):
        return False  # an upstream that decodes %2F would see other segments than we checked
    for prefix in prefixes:
        base = prefix.rstrip("/")
        if path == prefix or path == base or path.startswith(base + "/"):
            return True
    return False


def check_path(policy: RequestPolicy, path: str) -> None:
    if not path_allowed(path, policy.allowed_path_prefixes):
        hint = " (encoded '/' or '\\' is never allowed here)" if _ENCODED_SEPARATOR.search(path) else ""
        raise Forbidden(
            f"upstream path {path} is not allowed for this credential{hint} "
            f"(allowed: {', '.join(policy.allowed_path_prefixes)})",
            code="path_not_allowed",
        )


def check_content_length(policy: RequestPolicy, content_length: int | None) -> None:
    if policy.max_body_bytes is not None and content_length is not None and content_length > policy.max_body_bytes:
        raise BodyTooLarge(
            f"request body of {content_length} bytes exceeds this credential's limit of {policy.max_body_bytes} bytes"
        )


def check_request(policy: RequestPolicy, *, method: str, upstream_path: str, content_length: int | None) -> None:
    """Every rule that needs no body, in the order a client would fix them."""
    if not policy.checks_head:  # no such rule (most credentials): nothing to call
        return
    check_method(policy, method)
    check_path(policy, upstream_path)
    check_content_length(policy, content_length)


# --- the JSON body scanner ---------------------------------------------------------------------

# States of the top-level object scanner.
_START, _FIRST, _KEY_START, _KEY, _COLON, _VALUE, _STRING, _SCALAR, _NESTED, _NESTED_STRING, _COMMA, _DONE = range(12)
_STRUCTURAL = {_START, _FIRST, _KEY_START, _COLON, _VALUE, _COMMA, _DONE}
_NON_WS = re.compile(rb"[^ \t\n\r]")
_STRING_STOP = re.compile(rb'["\\]')
_SCALAR_STOP = re.compile(rb"[^-+.0-9A-Za-z]")
_NESTED_STOP = re.compile(rb'["\[\]{}]')
_SCALAR_START = frozenset(b"-0123456789tfn")
_KEY_CAP = 256  # bytes of a raw key kept; a watched name escaped char by char needs at most 126
_VALUE_CAP = 1024  # bytes of a raw watched value kept

_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")


def _invalid_json(why: str) -> BadRequest:
    return BadRequest(f"request body must be a JSON object for this credential's rules: {why}", code="invalid_json")


class BodyInspector:
    """Decides on a request body from its first bytes; see the module docstring.

    ``feed`` every chunk in order, then ``end`` when the body is complete. While ``decided``
    is False, fed chunks are held (``take_held`` hands them over); once it is True, the caller
    forwards them and everything after. :meth:`forward` does exactly that.
    """

    def __init__(self, policy: RequestPolicy, content_length: int | None = None):
        check_content_length(policy, content_length)
        self.policy = policy
        self.total = 0
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._ended = False
        self._watched: frozenset[str] = frozenset(
            (["model"] if policy.allowed_models else [])
            + (list(_TOKEN_FIELDS) if policy.max_tokens_cap is not None else [])
            + (["n"] if policy.max_n is not None else [])
        )
        self.decided = not self._watched  # size alone is checked chunk by chunk, holding nothing
        self.fields: dict[str, Any] = {}  # watched fields seen so far (null values included)
        # scanner state
        self._state = _START
        self._depth = 0
        self._escape = False
        self._raw = bytearray()
        self._capturing = False
        self._overflowed = False
        self._field: str | None = None

    # --- public ---------------------------------------------------------------------------

    def feed(self, chunk: bytes) -> bool:
        """Check ``chunk``; return whether the body may now be forwarded. Raises on a violation,
        before ``chunk`` is forwarded."""
        self.total += len(chunk)
        limit = self.policy.max_body_bytes
        if limit is not None and self.total > limit:
            raise BodyTooLarge(f"request body exceeds this credential's limit of {limit} bytes")
        if self._watched:
            self._scan(chunk)
        if not self.decided:
            self._held.append(chunk)
            self._held_bytes += len(chunk)
            if self._state == _DONE:
                self.decided = True
            elif self._watched <= self.fields.keys() and not self._missing_required():
                self.decided = True  # every ruled field seen: only duplicates can follow, and they are caught
            elif self._held_bytes >= self.policy.inspect_bytes:
                self._decide_overflow()
        return self.decided

    def end(self) -> None:
        """The body is complete: decide on all of it (idempotent)."""
        if self._ended:
            return
        self._ended = True
        if self._watched and self.total and self._state != _DONE:
            raise _invalid_json("it ends before the JSON object is complete")
        self.decided = True

    def hold(self, chunk: bytes) -> None:
        """Keep an already-fed chunk to be forwarded first (a read-ahead by the caller)."""
        self._held.append(chunk)
        self._held_bytes += len(chunk)

    def take_held(self) -> list[bytes]:
        """The chunks held while deciding, once; afterwards nothing is held."""
        held, self._held, self._held_bytes = self._held, [], 0
        return held

    async def forward(self, rest: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
        """The body to send upstream: the held chunks, then ``rest``, each checked before it goes."""
        for chunk in self.take_held():
            yield chunk
        async for chunk in rest:
            self.feed(chunk)
            yield chunk
        self.end()

    # --- deciding -------------------------------------------------------------------------

    def _missing_required(self) -> list[str]:
        missing = []
        if self.policy.allowed_models and self.fields.get("model") is None:
            missing.append("model")
        if self.policy.max_tokens_cap is not None and all(self.fields.get(f) is None for f in _TOKEN_FIELDS):
            missing.append("max_tokens (or max_completion_tokens)")
        return missing

    def _decide_overflow(self) -> None:
        missing = self._missing_required()
        if not missing or self.policy.overflow == "stream":
            self.decided = True  # later fields are still checked as they stream past
            return
        raise Forbidden(
            f"{' and '.join(missing)} must appear within the first {self.policy.inspect_bytes} bytes "
            f"of the JSON body for this credential's rules to be checked",
            code="body_not_inspectable",
        )

    def _object_ended(self) -> None:
        missing = self._missing_required()
        if "model" in missing:
            raise Forbidden(
                f"the JSON body has no model; this credential allows only: {', '.join(self.policy.allowed_models)}",
                code="model_not_allowed",
            )
        if missing:
            raise Forbidden(
                f"max_tokens or max_completion_tokens is required for this credential "
                f"(at most {self.policy.max_tokens_cap})",
                code="max_tokens_required",
            )

    def _check_field(self, name: str, value: Any) -> None:
        policy = self.policy
        if name == "model":
            if not isinstance(value, str):
                raise BadRequest("model must be a string", code="invalid_field")
            if value not in policy.allowed_models:
                shown = value if len(value) <= 100 else value[:100] + "..."
                raise Forbidden(
                    f"model {shown!r} is not allowed for this credential (allowed: {', '.join(policy.allowed_models)})",
                    code="model_not_allowed",
                )
            return
        if value is None:
            return  # JSON null: the field is unset, as the upstream reads it
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise BadRequest(f"{name} must be a non-negative integer", code="invalid_field")
        if name in _TOKEN_FIELDS and policy.max_tokens_cap is not None and value > policy.max_tokens_cap:
            raise Forbidden(
                f"{name} is {value}, above this credential's cap of {policy.max_tokens_cap}",
                code="max_tokens_too_high",
            )
        if name == "n" and policy.max_n is not None and value > policy.max_n:
            raise Forbidden(f"n is {value}, above this credential's limit of {policy.max_n}", code="n_too_high")

    # --- scanning -------------------------------------------------------------------------

    def _capture(self, piece: bytes, cap: int) -> None:
        if self._capturing:
            if len(self._raw) + len(piece) > cap:
                self._capturing, self._overflowed = False, True
            else:
                self._raw += piece

    def _start_capture(self, on: bool) -> None:
        self._raw.clear()
        self._capturing, self._overflowed = on, False

    def _decode(self, raw: bytes, what: str) -> Any:
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise _invalid_json(f"{what} is not valid JSON") from None

    def _end_key(self) -> None:
        name = None if self._overflowed else self._decode(b'"' + self._raw + b'"', "a field name")
        if name in self._watched:
            if name in self.fields:
                raise Forbidden(f"field {name!r} appears more than once in the JSON body", code="duplicate_field")
            self._field = name
        else:
            self._field = None
        self._state = _COLON

    def _end_value(self, raw: bytes) -> None:
        name, self._field = self._field, None
        self._state = _COMMA
        if name is None:
            return
        if self._overflowed:
            raise BadRequest(f"the value of {name} is too long", code="invalid_field")
        value = self._decode(raw, f"the value of {name}")
        self._check_field(name, value)
        self.fields[name] = value

    def _structural(self, c: int) -> None:
        state = self._state
        if state == _START:
            if c != ord("{"):
                raise _invalid_json("it does not start with '{'")
            self._state = _FIRST
        elif state in (_FIRST, _KEY_START):
            if c == ord('"'):
                self._start_capture(True)
                self._state = _KEY
            elif c == ord("}") and state == _FIRST:
                self._state = _DONE
                self._object_ended()
            else:
                raise _invalid_json("expected a field name")
        elif state == _COLON:
            if c != ord(":"):
                raise _invalid_json("expected ':' after a field name")
            self._state = _VALUE
        elif state == _VALUE:
            if c == ord('"'):
                self._start_capture(self._field is not None)
                self._state = _STRING
            elif c in (ord("{"), ord("[")):
                if self._field is not None:
                    kind = "a string" if self._field == "model" else "an integer"
                    raise BadRequest(f"{self._field} must be {kind}", code="invalid_field")
                self._depth = 1
                self._state = _NESTED
            else:
                raise _invalid_json("expected a value")
        elif state == _COMMA:
            if c == ord(","):
                self._state = _KEY_START
            elif c == ord("}"):
                self._state = _DONE
                self._object_ended()
            else:
                raise _invalid_json("expected ',' or '}' after a value")
        else:  # _DONE
            raise _invalid_json("there is data after the JSON object")

    def _scan(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            state = self._state
            if state in _STRUCTURAL:
                match = _NON_WS.search(data, i)
                if match is None:
                    return
                i = match.start()
                c = data[i]
                if state == _VALUE and c in _SCALAR_START:
                    self._start_capture(self._field is not None)
                    self._state = _SCALAR  # the scalar branch reads it, this byte included
                    continue
                self._structural(c)
                i += 1
            elif state in (_KEY, _STRING, _NESTED_STRING):
                cap = _KEY_CAP if state == _KEY else _VALUE_CAP
                if self._escape:
                    self._escape = False
                    self._capture(data[i : i + 1], cap)
                    i += 1
                    continue
                match = _STRING_STOP.search(data, i)
                if match is None:
                    self._capture(data[i:], cap)
                    return
                j = match.start()
                self._capture(data[i:j], cap)
                i = j + 1
                if data[j] == ord("\\"):
                    self._escape = True
                    self._capture(b"\\", cap)
                elif state == _KEY:
                    self._end_key()
                elif state == _STRING:
                    self._end_value(b'"' + self._raw + b'"')
                else:
                    self._state = _NESTED
            elif state == _SCALAR:
                match = _SCALAR_STOP.search(data, i)
                if match is None:
                    self._capture(data[i:], _VALUE_CAP)
                    return
                j = match.start()
                self._capture(data[i:j], _VALUE_CAP)
                i = j  # the delimiter is read by the structural branch
                self._end_value(bytes(self._raw))
            else:  # _NESTED
                match = _NESTED_STOP.search(data, i)
                if match is None:
                    return
                j = match.start()
                i = j + 1
                c = data[j]
                if c == ord('"'):
                    self._state = _NESTED_STRING
                elif c in (ord("{"), ord("[")):
                    self._depth += 1
                else:
                    self._depth -= 1
                    if self._depth == 0:
                        self._state = _COMMA
