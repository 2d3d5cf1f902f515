"""Wiring: a running Parkway is a config, an upstream client, a gateway and its servers.

``Parkway.run`` is what ``parkway serve`` runs and what tests start in a nursery:
``addresses = await nursery.start(parkway.run)`` gives the bound ``host:port`` of each public
listener (``parkway.admin_addresses`` those of the admin listener), and ``parkway.shutdown()``
begins the graceful drain. ``parkway.reload()`` re-reads the TOML file, as SIGHUP does.
"""

from __future__ import annotations

import gc
import os
import select
import signal
import ssl
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import fields as dataclass_fields
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING

import structlog
import trio

from .admin import AdminApp
from .cache.flight import open_cache
from .config import Config, ServerConfig, config_warnings, jobs_problems, load_config
from .errors import ConfigError, Overloaded, ParkwayError
from .gateway.handler import Gateway, utcnow
from .http.connection import HTTPConnection, RequestHead
from .http.parsers import resolve as resolve_http_parser
from .http.server import Server, bound_address, open_listeners
from .jobs.api import JobAPI
from .jobs.runner import JobRunner, open_job_store
from .limits import StateBackend, open_budgets, open_state
from .metrics import Metrics
from .overrides import ConfigOverrides
from .relay.pump import EpollEngine
from .upstream.client import UpstreamClient
from .upstream.outbound import outbound_client
from .urls import split_host_port
from .websocket.session import WebSocketProxy

if TYPE_CHECKING:  # loaded only when tracing is on
    from .telemetry.tracing import Tracing

log = structlog.get_logger("parkway")
JOB_STATS_INTERVAL = 5.0  # seconds between job store counts for the metrics


def _offset_port(address: str, offset: int) -> str:
    host, port = split_host_port(address)
    if port == 0 or offset == 0:
        return address
    return f"[{host}]:{port + offset}" if ":" in host else f"{host}:{port + offset}"


class NotRunning:
    """The public server's application until :meth:`Parkway.run` has built the gateway; its
    listeners are not open before then, so nothing reaches it."""

    async def handle(self, head: RequestHead, conn: HTTPConnection) -> None:
        raise Overloaded("not running yet")

    async def reject(self, head: RequestHead | None, conn: HTTPConnection, exc: ParkwayError) -> None:
        conn.abort()


class Parkway:
    def __init__(
        self,
        config: Config,
        *,
        config_path: str | os.PathLike | None = None,
        overrides: ConfigOverrides | None = None,
        upstream_verify: bool | ssl.SSLContext = True,
        clock: Callable[[], datetime] = utcnow,
        worker_index: int = 0,
        reuse_port: bool = False,
    ):
        self.config = config
        self.config_path = config_path
        self.overrides = overrides or ConfigOverrides()  # command-line flags, applied to every reloaded file
        self.worker_index = worker_index
        self.reuse_port = reuse_port
        self.upstream = UpstreamClient(config.server, verify=upstream_verify)
        self.upstream_verify = upstream_verify  # Parkway's own calls (jobs) verify TLS alike
        # The relay's driver: one epoll engine for every stream (Linux), or each request's own
        # task (PARKWAY_RELAY=portable, and wherever there is no epoll).
        relay = os.environ.get("PARKWAY_RELAY", "epoll" if hasattr(select, "epoll") else "portable")
        self.engine = EpollEngine() if relay == "epoll" and hasattr(select, "epoll") else None
        self._engine_scope = trio.CancelScope()
        self.websockets = WebSocketProxy(
            config.websocket, ssl_context=lambda: self.upstream.ssl_context, resolver=self.upstream.dns
        )
        self.metrics = Metrics(
            open_connections=lambda: self.server.open_connections,
            websocket_sessions=lambda: self.websockets.active,
            upstream_tls_handshakes=lambda: (self.upstream.tls_full, self.upstream.tls_resumed),
            upstream_dns=lambda: (self.upstream.dns.lookups, self.upstream.dns.hits),
        )
        self.clock = clock
        self.tracing: Tracing | None = None
        if config.telemetry.enabled:  # else no OpenTelemetry module is ever imported
            from .telemetry.tracing import open_tracing

            self.tracing = open_tracing(config.telemetry, self.metrics)
        # The gateway is built whole in run(), once the state, cache and job store it uses are
        # open; the server gets it then (it accepts nothing before).
        self.gateway: Gateway | None = None
        self.server = Server(config.server, NotRunning())
        self.admin_server = Server(
            ServerConfig(max_connections=64, drain_timeout=0), AdminApp(self, self.metrics.render)
        )
        self.addresses: list[str] = []
        self.admin_addresses: list[str] = []
        self._accepting = False
        self.state: StateBackend | None = None
        self.runner: JobRunner | None = None
        self._job_stats = trio.CancelScope()

    def _http_parser(self) -> str:
        """The request-head parser new connections use, shown in /metrics too."""
        parser = resolve_http_parser(self.config.server.http)
        self.metrics.set_http_parser(parser)
        return parser

    async def run(self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, serve until :meth:`shutdown` has drained, then close the upstream pool."""
        if problems := jobs_problems(self.config.jobs):  # a configuration built in code: not checked yet
            raise ConfigError(problems)
        listeners = await open_listeners(self.config.server.listen, reuse_port=self.reuse_port)
        admin_listen = tuple(_offset_port(a, self.worker_index) for a in self.config.admin.listen)
        admin_listeners = await open_listeners(admin_listen) if admin_listen else []
        self.addresses = [bound_address(listener) for listener in listeners]
        self.admin_addresses = [bound_address(listener) for listener in admin_listeners]
        log.info(
            "startup",
            listen=self.addresses,
            admin=self.admin_addresses,
            worker=self.worker_index,
            pid=os.getpid(),
            credentials=[c.id for c in self.config.credentials],
            max_connections=self.config.server.max_connections,
            http=self._http_parser(),
        )
        _log_warnings(self.config)
        try:
            async with AsyncExitStack() as stack:
                self.state = state = await stack.enter_async_context(open_state(self.config.state))
                budgets = await stack.enter_async_context(open_budgets(self.config.state, self.clock))
                cache = await stack.enter_async_context(open_cache(self.config.cache, self.config.state.url))
                self.metrics.cache_bytes.set_function(lambda: cache.store.stats()[0])
                self.metrics.cache_entries.set_function(lambda: cache.store.stats()[1])
                jobs: JobAPI | None = None
                if self.config.jobs.enabled:
                    store = await stack.enter_async_context(open_job_store(self.config.jobs, self.config.state))
                    verify = self.upstream_verify
                    if verify is True and self.config.server.upstream_ca_file:  # a private CA, as for proxying
                        verify = ssl.create_default_context(cafile=self.config.server.upstream_ca_file)
                    client = await stack.enter_async_context(outbound_client(verify=verify))
                    self.runner = JobRunner(
                        store, client, lambda: self.config, metrics=self.metrics, state=state, budgets=budgets
                    )
                    self.runner.tracing = self.tracing
                    jobs = JobAPI(store, self.runner, metrics=self.metrics)
                self.server.app = self.gateway = Gateway(
                    self.config,
                    self.upstream,
                    metrics=self.metrics,
                    state=state,
                    cache=cache,
                    jobs=jobs,
                    clock=self.clock,
                    engine=self.engine,
                    websockets=self.websockets,
                    budgets=budgets,
                    tracing=self.tracing,
                )
                nursery = await stack.enter_async_context(trio.open_nursery())
                await nursery.start(self._run_until_drained)
                if self.runner is not None:
                    await nursery.start(self.runner.run)
                    nursery.start_soon(self._refresh_job_stats)
                if admin_listeners:
                    await nursery.start(self.admin_server.serve, admin_listeners)
                await nursery.start(self._serve_public, listeners)
                self._accepting = True
                task_status.started(self.addresses)
        finally:
            self._accepting = False
            with trio.CancelScope(shield=True):
                await self.upstream.aclose()
                if self.tracing is not None:
                    await self._flush_traces(self.tracing)
            log.info("shutdown", open_connections=self.server.open_connections)

    @staticmethod
    async def _flush_traces(tracing: Tracing) -> None:
        """The last spans go out on a thread, for a bounded time: a collector that is down or hangs
        never holds up the exit (the thread is left behind)."""
        from .telemetry.tracing import SHUTDOWN_FLUSH_TIMEOUT

        with trio.move_on_after(SHUTDOWN_FLUSH_TIMEOUT):
            await trio.to_thread.run_sync(tracing.shutdown, abandon_on_cancel=True)

    async def _serve_public(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """The public server; the admin listener (readyz: 503) stays up until it has drained,
        and the relay engine until the last stream it relays has ended."""
        try:
            await self.server.serve(listeners, task_status=task_status)
        finally:
            self._engine_scope.cancel()
            self.admin_server.shutdown()

    async def _run_until_drained(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The relay engine and the upstream client's first-byte sweep, until the public server
        has drained (the last stream relayed, the last upstream head waited for)."""
        with self._engine_scope:
            async with trio.open_nursery() as nursery:
                if self.engine is not None:
                    await nursery.start(self.engine.run)
                await nursery.start(self.upstream.first_bytes.run)
                task_status.started()

    async def _refresh_job_stats(self) -> None:
        """The store's counts into the metrics, until the drain begins."""
        assert self.runner is not None
        with self._job_stats:
            while True:
                await self.runner.refresh_stats()
                await trio.sleep(JOB_STATS_INTERVAL)

    def shutdown(self) -> None:
        self._job_stats.cancel()
        if self.runner is not None:
            self.runner.drain(self.config.server.drain_timeout)
        if not self.server.draining:
            log.info(
                "draining",
                drain_timeout=self.config.server.drain_timeout,
                open_connections=self.server.open_connections,
            )
        self._accepting = False
        self.server.shutdown()

    # --- operations -----------------------------------------------------------------------

    async def readiness(self) -> dict[str, bool]:
        checks = {"accepting": self._accepting and not self.server.draining, "config_loaded": True}
        if self.config.state.backend == "redis":
            checks["redis"] = self.state is not None and await self.state.probe()
        return checks

    def reload(self) -> list[str]:
        """Re-read the config file; apply it to new requests, or keep the old one and say why.

        In-flight requests keep the config they started with (the gateway reads it once per
        request). The upstream timeouts and CA file apply to new proxied requests; listen
        addresses, ``[admin]``, ``[state]``, ``[cache]`` and the jobs store need a restart, and
        a reload that changes them keeps the old values and logs each key path.
        """
        if self.config_path is None:
            problems = ["no configuration file to reload (started without --config)"]
            log.error("config_reload_failed", problems=problems)
            self.metrics.reloads.labels("error").inc()
            return problems
        try:
            new = self.overrides.apply(load_config(self.config_path))
        except ConfigError as exc:
            problems = [str(p) for p in exc.problems]
            log.error("config_reload_failed", path=str(self.config_path), problems=problems)
            self.metrics.reloads.labels("error").inc()
            return problems
        old = self.config
        if new.server.upstream_ca_file != old.server.upstream_ca_file and new.server.upstream_ca_file:
            try:  # refused here, not at the first proxied request
                ssl.create_default_context(cafile=new.server.upstream_ca_file)
            except (OSError, ssl.SSLError) as exc:
                problems = [f"server.upstream_ca_file: cannot be loaded: {exc}"]
                log.error("config_reload_failed", path=str(self.config_path), problems=problems)
                self.metrics.reloads.labels("error").inc()
                return problems
        # Settings read only at start: the old values stay, and each changed key is named.
        keys = _changed(old.server, new.server, "server", ("listen",)) + _changed(old.admin, new.admin, "admin")
        keys += _changed(old.state, new.state, "state") + _changed(old.cache, new.cache, "cache")
        keys += _changed(old.jobs, new.jobs, "jobs", ("enabled", "store", "path"))
        keys += _changed(old.telemetry, new.telemetry, "telemetry")
        if old.jobs.enabled and new.server.upstream_ca_file != old.server.upstream_ca_file:
            keys.append("server.upstream_ca_file (for job calls; proxied requests use the new one)")
        new = replace(
            new,
            server=replace(new.server, listen=old.server.listen),
            admin=old.admin,
            state=old.state,
            cache=old.cache,
            telemetry=old.telemetry,
            jobs=replace(new.jobs, enabled=old.jobs.enabled, store=old.jobs.store, path=old.jobs.path),
        )
        if keys:
            log.warning("config_reload_needs_restart", keys=keys, reason="these settings change only on restart")
        self.config = new
        if self.gateway is not None:  # else run() builds it from self.config
            self.gateway.apply(new)
        self.upstream.apply(new.server)
        self.websockets.ssl_context = self.upstream.ssl_context
        self.server.config = new.server
        self._http_parser()
        self.metrics.reloads.labels("ok").inc()
        log.info("config_reloaded", path=str(self.config_path), credentials=[c.id for c in new.credentials])
        _log_warnings(new)
        return []


def _log_warnings(config: Config) -> None:
    """What ``parkway check-config`` says of a valid file, said again where operators look."""
    for warning in config_warnings(config):
        log.warning("config_warning", key=warning.path, problem=warning.message.removeprefix("warning: "))


def _changed(old: object, new: object, section: str, names: tuple[str, ...] | None = None) -> list[str]:
    """The key paths (``cache.max_bytes``) of ``section`` whose values differ; only ``names`` if given."""
    fields = names if names is not None else tuple(f.name for f in dataclass_fields(old))  # type: ignore[arg-type]
    return [f"{section}.{name}" for name in fields if getattr(old, name) != getattr(new, name)]


# Requests make no reference cycles, yet each allocates enough containers to trigger a young
# collection every ~15 requests at the default of 700 (about 22 µs per request in all).
YOUNG_GC_THRESHOLD = 20_000


def settle_heap() -> None:
    """Once started: what start-up built (modules, config, TLS contexts) is frozen out of every
    later collection, and young collections run less often. Cycles are still collected."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GC_THRESHOLD, older, oldest)


async def run_until_signalled(parkway: Parkway) -> None:
    """Run until SIGTERM or SIGINT, then drain gracefully; a second signal cancels at once.

    SIGHUP reloads the configuration.
    """
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                stops = 0
                async for signum in signals:
                    log.info("signal", signal=signal.Signals(signum).name)
                    if signum == signal.SIGHUP:
                        parkway.reload()
                        continue
                    stops += 1
                    if stops == 1:
                        parkway.shutdown()
                    else:
                        nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            if parkway.worker_index or parkway.reuse_port:
                nursery.start_soon(_drain_when_orphaned, parkway)

            async def serve(*, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
                await parkway.run(task_status=task_status)
                nursery.cancel_scope.cancel()

            await nursery.start(serve)
            settle_heap()


async def _drain_when_orphaned(parkway: Parkway) -> None:
    """A worker whose supervisor died (even by SIGKILL) drains instead of living on."""
    parent = os.getppid()
    while os.getppid() == parent:
        await trio.sleep(1.0)
    log.error("supervisor_gone", parent=parent)
    parkway.shutdown()
