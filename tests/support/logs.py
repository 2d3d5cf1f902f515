"""Parkway's structlog lines, captured in this process, that a test can await."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog
import trio


class LogWatcher:
    """Entries captured by ``structlog.testing.capture_logs``; tests can await a matching line."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self._changed = trio.Event()

    def _notify(self, _logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        self._changed.set()
        self._changed = trio.Event()
        return event_dict

    def find(self, **fields: Any) -> list[dict[str, Any]]:
        return [e for e in self.entries if all(e.get(k) == v for k, v in fields.items())]

    async def wait_for(self, **fields: Any) -> dict[str, Any]:
        """The first entry whose fields match, waiting for it to be logged."""
        while not (found := self.find(**fields)):
            await self._changed.wait()
        return found[0]


@contextmanager
def watch_logs() -> Iterator[LogWatcher]:
    watcher = LogWatcher()
    # merge_contextvars first so request_id and credential are part of what is checked.
    with structlog.testing.capture_logs(
        processors=[structlog.contextvars.merge_contextvars, watcher._notify]
    ) as entries:
        watcher.entries = entries
        yield watcher
