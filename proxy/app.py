"""Wiring: a running Parkway is a config, an upstream client, a gateway and a server.

``Parkway.run`` is what ``parkway serve`` runs and what tests start in a nursery:
``addresses = await nursery.start(parkway.run)`` gives the bound ``host:port`` of each
listener, and ``parkway.shutdown()`` begins the graceful drain.
"""

from __future__ import annotations

import signal
import ssl
from collections.abc import Callable
from datetime import datetime

import structlog
import trio

from .config import Config
from .handler import Gateway, utcnow
from .http_server import Server, bound_address, open_listeners
from .upstream import UpstreamClient

log = structlog.get_logger("parkway")


class Parkway:
    def __init__(
        self,
        config: Config,
        *,
        upstream_verify: bool | ssl.SSLContext = True,
        clock: Callable[[], datetime] = utcnow,
    ):
        self.config = config
        self.upstream = UpstreamClient(config.server, verify=upstream_verify)
        self.gateway = Gateway(config, self.upstream, clock=clock)
        self.server = Server(config.server, self.gateway)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen, serve until :meth:`shutdown` has drained, then close the upstream pool."""
        listeners = await open_listeners(self.config.server.listen)
        addresses = [bound_address(listener) for listener in listeners]
        log.info(
            "startup",
            listen=addresses,
            credentials=[c.id for c in self.config.credentials],
            max_connections=self.config.server.max_connections,
        )
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.server.serve, listeners)
                task_status.started(addresses)
        finally:
            with trio.CancelScope(shield=True):
                await self.upstream.aclose()
            log.info("shutdown", open_connections=self.server.open_connections)

    def shutdown(self) -> None:
        if not self.server.draining:
            log.info("draining", drain_timeout=self.config.server.drain_timeout,
                     open_connections=self.server.open_connections)
        self.server.shutdown()


async def run_until_signalled(parkway: Parkway) -> None:
    """Run until SIGTERM or SIGINT, then drain gracefully; a second signal cancels at once."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                count = 0
                async for signum in signals:
                    count += 1
                    log.info("signal", signal=signal.Signals(signum).name)
                    if count == 1:
                        parkway.shutdown()
                    else:
                        nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            await parkway.run()
            nursery.cancel_scope.cancel()
