"""What Parkway's three Redis stores (limits, cache, jobs) share: the failures that mean "Redis
is not there", a connection class that cleans up after a failed connect, URLs fit for logs, and
the client each store owns."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any, Self
from urllib.parse import urlsplit, urlunsplit

import anyio
import coredis
import coredis.exceptions
import trio
from coredis.retry import NoRetryPolicy

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


def new_client(url: str, *, timeout: float, **options: Any) -> coredis.Redis[bytes]:
    """A coredis client as every store wants one: no coredis retries (each store decides what a
    failure means, within its own timeout), no idle reaping, and no open buffers left by a
    failed connect (:func:`closing_buffers`)."""
    client: coredis.Redis[bytes] = coredis.Redis.from_url(
        url, connect_timeout=timeout, retry_policy=NoRetryPolicy(), max_idle_time=None, **options
    )
    pool = client.connection_pool
    pool.connection_class = closing_buffers(pool.connection_class)
    return client


class RedisClientOwner:
    """Base of a Redis store: its own client (:func:`new_client`), connected by ``async with``,
    closed after."""

    def __init__(self, url: str, *, timeout: float, **options: Any):
        self._client = new_client(url, timeout=timeout, **options)
        self._stack = AsyncExitStack()
        self._location = without_credentials(url)

    async def __aenter__(self) -> Self:
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(self._client)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stack.aclose()
