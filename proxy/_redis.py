"""What Parkway's three Redis stores (limits, cache, jobs) share: the failures that mean "Redis
is not there", a connection class that cleans up after a failed connect, and URLs fit for logs."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import coredis
import coredis.exceptions
import trio

# What a lost, refused or hung Redis looks like from here.
REDIS_FAILURES = (
    coredis.exceptions.RedisError,
    OSError,
    trio.TooSlowError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
)


def closing_buffers(cls: type) -> type:
    """``cls`` with its in-memory buffers closed when connecting fails.

    coredis 6.9 creates anyio memory streams in the connection's constructor and closes them
    only once connected; each failed attempt (Redis down) would leave six unclosed streams
    whose ResourceWarnings surface at garbage collection.
    """

    class Connection(cls):
        async def _connect(self) -> Any:  # coredis's hook
            try:
                return await super()._connect()
            except BaseException:
                for name in (
                    "_write_buffer_in", "_write_buffer_out",
                    "_push_message_buffer_in", "_push_message_buffer_out",
                    "_streamed_message_buffer_in", "_streamed_message_buffer_out",
                ):  # fmt: skip
                    stream = getattr(self, name, None)
                    if stream is not None:
                        stream.close()
                raise

    Connection.__name__ = Connection.__qualname__ = f"Closing{cls.__name__}"
    return Connection


def without_credentials(url: str) -> str:
    """The Redis URL for log lines: never its user name or password."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
