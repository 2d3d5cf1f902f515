"""``parkway serve --workers N``: N worker processes sharing the listening port (SO_REUSEPORT).

The supervisor only manages processes: it restarts a worker that dies (with a backoff that
grows while workers keep dying young), forwards SIGHUP (reload) to every worker, and on
SIGTERM/SIGINT forwards it and waits for them to drain; past the drain timeout plus a grace
period it kills what is left. The kernel spreads new connections across the workers.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import AsyncIterator, Sequence

import structlog
import trio

log = structlog.get_logger("parkway.supervisor")

MIN_BACKOFF = 0.5
MAX_BACKOFF = 30.0
HEALTHY_AFTER = 10.0  # a worker that lived this long resets the backoff
KILL_GRACE = 5.0


def _ignore_sighup_until_ready() -> None:
    """In the child, before exec: ignore SIGHUP until the worker installs its reload handler
    (a reload forwarded to a worker still importing must not end it).

    PR_SET_PDEATHSIG is not used: Linux sends it when the *thread* that spawned the child
    exits, and Trio spawns from pooled threads that end after 10 s idle. Workers instead
    watch their parent pid (``app.run_until_signalled``).
    """
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def warn_kept_per_worker(workers: int, kept: Sequence[str]) -> None:
    """Say once, at start, what each worker enforces on its own (the memory state backend)."""
    if kept:
        log.warning(
            "state_per_worker",
            workers=workers,
            kept=list(kept),
            problem=f"[state] backend is memory: each of the {workers} workers enforces these on its own "
            f"(a limit or budget up to {workers} times over, a single-use URL once per worker); "
            'set [state] backend = "redis" to share them',
        )


class Supervisor:
    def __init__(self, worker_argv: Sequence[Sequence[str]], drain_timeout: float):
        self.worker_argv = [list(a) for a in worker_argv]
        self.drain_timeout = drain_timeout
        self.processes: dict[int, trio.Process] = {}
        self.stopping = False
        self.restarts = 0
        self._changed = trio.Event()  # a worker exited or stopping began
        self._stop_requested = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED) -> int:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                for index in range(len(self.worker_argv)):
                    nursery.start_soon(self._keep_running, index)
                nursery.start_soon(self._watch_signals, signals, nursery)
                task_status.started(self)
                await self._all_stopped()
                nursery.cancel_scope.cancel()
        log.info("supervisor_stopped", restarts=self.restarts)
        return 0

    async def _all_stopped(self) -> None:
        while not (self.stopping and not self.processes):
            await self._changed.wait()
            self._changed = trio.Event()

    async def _keep_running(self, index: int) -> None:
        backoff = MIN_BACKOFF
        while not self.stopping:
            started = trio.current_time()
            process = await trio.lowlevel.open_process(
                self.worker_argv[index],
                stdin=subprocess.DEVNULL,
                # Own session: a terminal's Ctrl-C reaches the supervisor only, which forwards
                # one SIGTERM, instead of every worker getting two signals and stopping at once.
                start_new_session=True,
                preexec_fn=_ignore_sighup_until_ready,
            )
            self.processes[index] = process
            log.info("worker_started", worker=index, pid=process.pid)
            try:
                code = await process.wait()
            finally:
                self.processes.pop(index, None)
                self._changed.set()
            if self.stopping:
                log.info("worker_exited", worker=index, pid=process.pid, code=code)
                return
            lived = trio.current_time() - started
            backoff = MIN_BACKOFF if lived >= HEALTHY_AFTER else min(backoff * 2, MAX_BACKOFF)
            self.restarts += 1
            log.error("worker_died", worker=index, pid=process.pid, code=code, restart_in=backoff)
            with trio.move_on_after(backoff):
                await self._stop_requested.wait()

    async def _watch_signals(self, signals: AsyncIterator[int], nursery: trio.Nursery) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                log.info("reload_workers", workers=len(self.processes))
                self._signal_all(signal.SIGHUP)
                continue
            if self.stopping:  # second signal: no more waiting
                self._signal_all(signal.SIGKILL)
                continue
            log.info("stopping_workers", signal=name, workers=len(self.processes))
            self.stopping = True
            self._stop_requested.set()
            self._changed.set()
            self._signal_all(signal.SIGTERM)
            nursery.start_soon(self._kill_after_deadline)

    async def _kill_after_deadline(self) -> None:
        await trio.sleep(self.drain_timeout + KILL_GRACE)
        if self.processes:
            log.error("killing_workers", workers=len(self.processes), reason="drain timeout passed")
            self._signal_all(signal.SIGKILL)

    def _signal_all(self, signum: int) -> None:
        for process in list(self.processes.values()):
            try:
                process.send_signal(signum)
            except ProcessLookupError:
                pass
