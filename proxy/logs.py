"""structlog set-up: a pipeline of small processors ending in JSON lines (or console text).

Request-scoped fields (``request_id``, ``credential``) are bound once with
``structlog.contextvars`` and merged into every line. A redaction processor is the last
line of defence: whatever a caller passes, values of secret-looking keys never get out.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

SECRET_KEYS = frozenset({"secret", "secrets", "authorization", "api_key", "password", "signature", "headers"})


def redact(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Replace values of secret-bearing keys; a signature is shortened to a recognisable prefix."""
    for key in list(event_dict):
        lowered = key.lower()
        if lowered in SECRET_KEYS or lowered.endswith("_secret") or lowered.endswith("_token"):
            value = event_dict[key]
            if lowered == "signature" and isinstance(value, str):
                event_dict[key] = value[:8] + "…"
            else:
                event_dict[key] = "[redacted]"
    return event_dict


def configure(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Configure structlog process-wide; called once by the command line."""
    # JSON lines carry a traceback as text in "exception" (exc_info alone renders as `true`);
    # the console renderer formats exc_info itself, and warns if it was formatted before it.
    tail = (
        [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
        if fmt == "json"
        else [structlog.dev.ConsoleRenderer(colors=False)]
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            *tail,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        # One write() per line: workers share stderr, and print() writes the newline apart.
        logger_factory=structlog.WriteLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=True,
    )
