"""structlog set-up: a pipeline of small processors ending in JSON lines (or console text).

Request-scoped fields (``request_id``, ``credential``) are bound once on
``structlog.contextvars``' variables (:class:`RequestFields`) and merged into every line. A
redaction processor is the last line of defence: whatever a caller passes, values of
secret-looking keys never get out. Lines go out through :class:`LineWriter`: during a Trio
run, a turn's lines in one write (:func:`turn_batches`).
"""

from __future__ import annotations

import contextvars
import json
import logging
import select
import sys
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any, TextIO

import structlog

SECRET_KEYS = frozenset({"secret", "secrets", "authorization", "api_key", "password", "signature", "headers"})

# Keys are names in Parkway's code, so few: a key found not secret is remembered (bounded, in
# case of a flood), and a line whose keys are all known costs one set operation, not a call per key.
_PLAIN_KEYS: set[str] = set()


def _is_secret_key(key: str) -> bool:
    lowered = key.lower()
    if lowered in SECRET_KEYS or lowered.endswith(("_secret", "_token")):
        return True
    if len(_PLAIN_KEYS) < 4096:
        _PLAIN_KEYS.add(key)
    return False


def redact(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Replace values of secret-bearing keys; a signature is shortened to a recognisable prefix."""
    if _PLAIN_KEYS.issuperset(event_dict):
        return event_dict
    for key in [k for k in event_dict if _is_secret_key(k)]:
        value = event_dict[key]
        if key.lower() == "signature" and isinstance(value, str):
            event_dict[key] = value[:8] + "…"
        else:
            event_dict[key] = "[redacted]"
    return event_dict


class _UTCTimestamp:
    """ISO 8601 UTC with microseconds (``2026-12-07T00:37:23.618191Z``), the date and time of
    day formatted once per second rather than through a ``datetime`` per line."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second, self._prefix = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((now - second) * 1_000_000):06d}Z"


def _context_merger() -> Callable[[Any, str, MutableMapping[str, Any]], MutableMapping[str, Any]]:
    """``structlog.contextvars.merge_contextvars``, reading only structlog's own variables: it
    copies the whole context and tests every variable's name (trio's too), 4 µs a line where
    reading the bound ones costs 1. Where structlog keeps them elsewhere, its merge itself."""
    variables = getattr(structlog.contextvars, "_CONTEXT_VARS", None)
    prefix = getattr(structlog.contextvars, "STRUCTLOG_KEY_PREFIX", None)
    if not isinstance(variables, dict) or not isinstance(prefix, str):
        return structlog.contextvars.merge_contextvars
    known: list[Any] = [-1, ()]  # how many variables structlog had, and (key, variable) for each

    def merge(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if len(variables) != known[0]:  # a key bound for the first time: a variable more
            known[:] = len(variables), tuple((name[len(prefix) :], var) for name, var in list(variables.items()))
        for key, var in known[1]:
            value = var.get()
            if value is not Ellipsis:  # unset in this context, or unbound
                event_dict.setdefault(key, value)
        return event_dict

    return merge


def _structlog_variable(key: str) -> contextvars.ContextVar[Any] | None:
    """structlog's own context variable for ``key`` (created by a bind and reset, as any bind
    would create it), or None where structlog does not keep them where :func:`_context_merger` reads."""
    variables = getattr(structlog.contextvars, "_CONTEXT_VARS", None)
    prefix = getattr(structlog.contextvars, "STRUCTLOG_KEY_PREFIX", None)
    if not isinstance(variables, dict) or not isinstance(prefix, str):
        return None
    structlog.contextvars.reset_contextvars(**structlog.contextvars.bind_contextvars(**{key: None}))
    variable = variables.get(prefix + key)
    return variable if isinstance(variable, contextvars.ContextVar) else None


class RequestFields:
    """The fields bound for every line of a request: ``request_id``, ``credential``, ``user``,
    ``job``, on structlog's own context variables (what ``bind_contextvars`` sets, so
    ``merge_contextvars`` and ``bound_contextvars`` see them). Set directly: ``bind_contextvars``
    builds each variable's name and looks it up; a request's binds and resets cost 1 µs instead
    of 3.7. Where structlog keeps its variables elsewhere, its own bind and reset."""

    KEYS = ("request_id", "credential", "user", "job")

    def __init__(self) -> None:
        found = [_structlog_variable(key) for key in self.KEYS]
        self.direct = None not in found
        self._request_id, self._credential, self._user, self._job = (
            var or contextvars.ContextVar[Any](key) for key, var in zip(self.KEYS, found)
        )

    def bind(self, request_id: str) -> Any:
        """Bind the request's id, with credential, user and job unset (None): bound here, what
        :meth:`credential` and :meth:`user` set later is undone by :meth:`reset` too, so the next
        request on a kept-alive connection does not inherit it. Returns the tokens to reset."""
        if not self.direct:
            return structlog.contextvars.bind_contextvars(request_id=request_id, credential=None, user=None, job=None)
        return (self._request_id.set(request_id), self._credential.set(None), self._user.set(None), self._job.set(None))

    def credential(self, credential: str | None) -> None:
        if self.direct:
            self._credential.set(credential)
        else:
            structlog.contextvars.bind_contextvars(credential=credential)

    def user(self, user: str | None) -> None:
        if self.direct:
            self._user.set(user)
        else:
            structlog.contextvars.bind_contextvars(user=user)

    def reset(self, tokens: Any) -> None:
        """Put the four variables back as they were before :meth:`bind`."""
        if not self.direct:
            structlog.contextvars.reset_contextvars(**tokens)
            return
        request_id, credential, user, job = tokens
        self._request_id.reset(request_id)
        self._credential.reset(credential)
        self._user.reset(user)
        self._job.reset(job)


request_fields = RequestFields()


def _stamper(json_lines: bool = False) -> Callable[[Any, str, MutableMapping[str, Any]], Any]:
    """One processor for what every line gets: the bound request fields, the level, the time,
    then redaction (last, so it sees every field); with ``json_lines``, the JSON line too (what
    :func:`_render_json` makes, in the same call: a line's whole chain is one processor)."""
    timestamp = _UTCTimestamp()
    merge = _context_merger()
    # structlog's add_log_level, as a lookup: "warn" is "warning", "exception" is "error".
    levels = {"warn": "warning", "exception": "error"}
    encode = _ENCODE

    def stamp(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event_dict = merge(logger, method, event_dict)
        event_dict["level"] = levels.get(method, method)
        event_dict["timestamp"] = timestamp()
        if _PLAIN_KEYS.issuperset(event_dict):  # redact's own first test, without its call
            return event_dict
        return redact(logger, method, event_dict)

    def line(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> str:
        event_dict = merge(logger, method, event_dict)
        event_dict["level"] = levels.get(method, method)
        event_dict["timestamp"] = timestamp()
        if not _PLAIN_KEYS.issuperset(event_dict):
            event_dict = redact(logger, method, event_dict)
        if "exc_info" in event_dict:
            event_dict = structlog.processors.format_exc_info(logger, method, event_dict)
        return encode(event_dict)

    return line if json_lines else stamp


def _json_default(obj: Any) -> Any:
    """As structlog's JSONRenderer: an object's ``__structlog__()``, else its ``repr``."""
    try:
        return obj.__structlog__()
    except AttributeError:
        return repr(obj)


def _render_json(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> str:
    # structlog's JSONRenderer builds a json.JSONEncoder per line; the output is the same.
    # format_exc_info only where there is one (it pops ``exc_info`` from every line).
    if "exc_info" in event_dict:
        event_dict = structlog.processors.format_exc_info(logger, method, event_dict)
    return _ENCODE(event_dict)


def _json_encoder() -> Callable[[Any], str]:
    """``json.JSONEncoder(default=_json_default).encode``, with its C encoder made once: the
    encoder makes one for every call (``iterencode``), a third of a log line's JSON. Where the
    C accelerator is missing or does not encode a sample line exactly as the encoder does, the
    encoder itself. (No check for circular containers: a log line has none.)"""
    plain = json.JSONEncoder(default=_json_default).encode
    try:
        from json.encoder import c_make_encoder, encode_basestring_ascii  # type: ignore[attr-defined]

        make = c_make_encoder(None, _json_default, encode_basestring_ascii, None, ": ", ", ", False, False, True)

        def encode(event_dict: Any) -> str:
            return "".join(make(event_dict, 0))

        marker = object()
        sample = {"event": "é\n\"\x00", "n": -1, "f": 0.1, "nan": float("nan"), "none": None, "yes": True,
                  "list": [1, ("a", {"k": 2.5e300})], 3: "int key", "object": marker}  # fmt: skip
        if encode(sample) == plain(sample):
            return encode
    except Exception:  # noqa: BLE001 - any failure: the plain encoder
        pass
    return plain


_ENCODE = _json_encoder()


def _bound_logger_class(min_level: int) -> type[Any]:
    """structlog's filtering bound logger at ``min_level``, each enabled level's method running
    the processors itself. The event dict is structlog's (the bound context, the keywords, then
    ``event``), the processors and the logger's method the same; where structlog's method passes
    the keywords on twice and copies them twice more (``_proxy_to_logger``, ``_process_event``),
    this one uses the keywords' own dict. A call with positional arguments (interpolation) is
    structlog's own method."""
    base: Any = structlog.make_filtering_bound_logger(min_level)

    def make(name: str) -> Callable[..., Any]:
        structlogs = getattr(base, name)

        def method(self: Any, event: str | None = None, *args: Any, **kw: Any) -> Any:
            if args:
                return structlogs(self, event, *args, **kw)
            context = self._context
            event_dict: Any = {**context, **kw} if context else kw
            if event is not None:
                event_dict["event"] = event
            logger = self._logger
            try:
                for processor in self._processors:
                    event_dict = processor(logger, name, event_dict)
            except structlog.DropEvent:
                return None
            if isinstance(event_dict, (str, bytes, bytearray)):
                return getattr(logger, name)(event_dict)
            if isinstance(event_dict, tuple):
                return getattr(logger, name)(*event_dict[0], **event_dict[1])
            if isinstance(event_dict, dict):
                return getattr(logger, name)(**event_dict)
            raise ValueError(
                "Last processor didn't return an appropriate value: a dict, an (args, kwargs) tuple, a str or bytes."
            )

        method.__name__ = name
        return method

    methods: dict[str, Any] = {}
    for name in ("debug", "info", "warning", "error", "critical"):
        if logging.getLevelNamesMapping()[name.upper()] >= min_level:
            methods[name] = make(name)
    aliases = {"warn": "warning", "msg": "info", "fatal": "critical"}
    methods.update({alias: methods[name] for alias, name in aliases.items() if name in methods})
    return type(base.__name__, (base,), methods)


# A write of at most this many bytes to a pipe is never interleaved with another process's
# (workers share the supervisor's stderr); a batch of lines is written in pieces this size.
PIPE_BUF = getattr(select, "PIPE_BUF", 512)


class LineWriter:
    """The logger structlog writes through: each line (with its newline) one ``write`` and a
    flush, under a lock, as structlog's ``WriteLogger`` does. While :func:`turn_batches` is
    on (a Trio run), the lines the run's thread logs wait in a list and are written together
    when the run loop is about to wait for I/O: a turn's lines, one system call instead of one
    each, and never later than the loop's next sleep. Only for ASCII lines (JSON), whose
    length is their size in bytes."""

    def __init__(self, stream: TextIO, batchable: bool):
        self.stream = stream
        self.batchable = batchable
        self._write = stream.write
        self._flush = stream.flush
        self._lock = threading.Lock()
        self._pending: list[str] | None = None  # a turn's lines, while batching
        self._owner = 0  # the thread that batches

    def msg(self, message: str) -> None:
        pending = self._pending
        if pending is not None and threading.get_ident() == self._owner:
            pending.append(message)
            return
        with self._lock:
            self._write(message + "\n")
            self._flush()

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg

    def start(self) -> None:
        self._owner, self._pending = threading.get_ident(), []

    def stop(self) -> None:
        try:
            self.flush()
        finally:
            self._pending = None

    def flush(self, _timeout: float = 0.0) -> None:
        """Write the lines waiting, in order, in writes of at most :data:`PIPE_BUF` bytes
        (a longer line alone, as it would be unbatched)."""
        lines = self._pending
        if not lines:
            return
        self._pending = []
        try:
            with self._lock:
                start, size = 0, 0
                for i, line in enumerate(lines):
                    if size and size + len(line) >= PIPE_BUF:  # (each line's newline: +1 byte)
                        self._write("\n".join(lines[start:i]) + "\n")
                        self._flush()
                        start, size = i, 0
                    size += len(line) + 1
                self._write("\n".join(lines[start:]) + "\n")
                self._flush()
        except BaseException:
            self._pending = None  # a failed write stops the batching: each line is written itself again
            raise


_writer: LineWriter | None = None


@contextmanager
def turn_batches() -> Iterator[list[Any]]:
    """The instruments for ``trio.run`` that write the lines of each turn of its loop together
    (:class:`LineWriter`), batching while the ``with`` lasts; on leaving it (the run over, or
    failed), whatever waits is written. Nothing to batch (not configured, console lines): none."""
    writer = _writer
    if writer is None or not writer.batchable:
        yield []
        return
    import trio

    class TurnEnd(trio.abc.Instrument):
        """Calls the writer's flush before each wait for I/O and when the run ends."""

    turn_end = TurnEnd()  # the writer's own method as the hooks: one call a turn
    turn_end.before_io_wait = turn_end.after_run = writer.flush  # type: ignore[method-assign, assignment]
    writer.start()
    try:
        yield [turn_end]
    finally:
        writer.stop()


def configure(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Configure structlog process-wide; called once by the command line."""
    # JSON lines carry a traceback as text in "exception" (exc_info alone renders as `true`);
    # the console renderer formats exc_info itself, and warns if it was formatted before it.
    global _writer
    _writer = writer = LineWriter(stream or sys.stderr, batchable=fmt == "json")
    chain: list[Any] = (
        [_stamper(json_lines=True)] if fmt == "json" else [_stamper(), structlog.dev.ConsoleRenderer(colors=False)]
    )
    structlog.configure(
        processors=chain,
        wrapper_class=_bound_logger_class(logging.getLevelNamesMapping()[level.upper()]),
        # One write() per line or per turn (workers share stderr; print() writes the newline apart).
        logger_factory=lambda *_args: writer,
        cache_logger_on_first_use=True,
    )
