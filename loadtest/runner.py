"""``python -m loadtest run``: start everything on loopback, drive it, measure it, write the results.

One invocation starts the lean upstream once, then for every workload and repeat starts a
fresh proxy (Parkway, and nginx ``proxy_pass`` as the reference, in alternating order so
drift on a noisy machine hits both alike), measures it from ``/proc`` while the load
generator runs, and stops it. The proxy is pinned to the first allowed core; the upstream,
the load generator and this runner share the others, so the proxy's core is its own.

Workloads (figures in brackets):

* ``parked``: ``--streams`` SSE streams (a list makes a sweep for the chart), each
  ``--stream-seconds`` long with an event of ``--event-bytes`` every ``--interval-ms``
  [completion, errors, time to first event, RSS per parked stream, CPU per event];
* ``parked-tls``: ``parked`` from an https upstream (nginx terminating TLS in front of the lean
  upstream, :mod:`loadtest.tls`; nginx the reference with ``proxy_pass https://``), at the
  largest ``--streams`` count [the same figures];
* ``relay``: fewer, faster streams [CPU per relayed event];
* ``small``: ``--clients`` keep-alive clients, small non-streaming requests [requests/s];
* ``latency``: one sequential client, also straight to the upstream [added p50 latency];
* ``pool``: ``small`` at ``--pool-clients`` (16 and 512) concurrent upstream requests [ratio];
* ``workers``: ``small`` through ``parkway serve --workers 1`` and ``--workers N`` [ratio].

With ``--targets nginx,parkway,floor`` the ``small``, ``latency`` and ``relay`` workloads also run
the floor (:mod:`loadtest.floor`: a minimal trio proxy, the cost of trio + Python + the head parser
for the same bytes), pinned like the others; the report gives it a column and Parkway ÷ floor ratios.
With ``--profile calls`` every Parkway variant (and the floor) also serves a ``calls`` run after the
``small`` workload of the first repeat: 16 clients of small requests with cProfile switched on
after the warm-up (:mod:`loadtest.calls`), giving Python function calls per request by component.

With ``--http h11,httptools`` every run of Parkway is made once per HTTP parser
(``parkway serve --http X``), beside nginx in every repeat, labelled ``parkway (h11)`` and
``parkway (httptools)``; without it, Parkway runs with the installed default, labelled ``parkway``.

Every child is started here, stopped here by its own pid, and bounded by a deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from proxy.signing import sign_url

from . import calls, nginx, procstat, report, tls, turns
from .loadgen import Response

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "sk-loadtest"
CREDENTIAL = "loadtest"
SECRET = "loadtest-secret-not-a-real-one"
STREAM_BODY = '{"model":"mock-gpt","stream":true,"messages":[{"role":"user","content":"Tell me a story"}]}'
SMALL_BODY = '{"model":"mock-gpt","messages":[{"role":"user","content":"Say hello"}]}'
WORKLOADS = ("parked", "parked-tls", "relay", "small", "latency", "pool", "workers")
TARGETS = ("nginx", "parkway", "floor")
DEFAULT_TARGETS = ("nginx", "parkway")
FLOOR_WORKLOADS = ("small", "latency", "relay")  # what the floor proxies (its relay passes SSE through)
CALLS_CLIENTS = 16  # --profile calls: the concurrency its per-request figures are quoted at
PARSERS = ("h11", "httptools")


def parkway_label(http: str | None) -> str:
    """The target name of a Parkway run: ``parkway``, or ``parkway (h11)`` with ``--http``."""
    return f"parkway ({http})" if http else "parkway"


def target_kind(name: str) -> str:
    """``parkway`` for every Parkway label, else the name itself (``nginx``, ``floor``, ``direct``)."""
    return "parkway" if name.startswith("parkway") else name


def target_http(name: str) -> str | None:
    """The parser a Parkway label asks for (``parkway (h11)`` → ``h11``); None for the default."""
    return name[len("parkway (") : -1] if name.startswith("parkway (") else None


class SetupError(Exception):
    """Something the run needs is missing or did not start; the message says what to do."""


# --- child processes -------------------------------------------------------------------------


class Proc:
    """A child process started by the runner: pinned, logged to a file, stopped by its pid."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        cpus: set[int] | None,
        log: Path | None,
        env: dict[str, str] | None = None,
        stdout: int | None = None,
        cwd: Path = ROOT,
    ):
        self.name = name
        self.argv = argv
        self._log = open(log, "wb") if log else subprocess.DEVNULL
        self.popen = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stdout if stdout is not None else self._log,
            stderr=self._log,
            start_new_session=True,  # a Ctrl-C on the runner does not reach it; stop() does
            text=stdout is not None,
        )
        self.pid = self.popen.pid
        if cpus:
            try:
                os.sched_setaffinity(self.pid, cpus)  # before it starts any thread or worker
            except OSError:
                pass

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Signal it, wait, then SIGKILL it and whatever descendants it left (by pid)."""
        descendants = procstat.tree(self.pid)[1:] if self.alive() else []
        if self.alive():
            try:
                self.popen.send_signal(sig)
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        for pid in descendants:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.popen.stdout:
            self.popen.stdout.close()
        if self._log is not subprocess.DEVNULL:
            self._log.close()


def free_port() -> int:
    """A loopback port free right now, taken below the kernel's ephemeral range (32768+ on Linux):
    a port released by ``bind(0)`` is soon some outgoing connection's local port on a busy machine."""
    for _ in range(100):
        port = random.randrange(20000, 32768)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port found below the ephemeral range")


def one_request(port: int, target: str, body: str, headers: tuple[str, ...] = (), timeout: float = 10) -> Response:
    """A single blocking request (warm-up and readiness checks)."""
    extra = "".join(f"{h}\r\n" for h in headers)
    data = (
        f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"{extra}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}"
    ).encode()
    resp = Response()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        while not resp.done:
            chunk = sock.recv(65536)
            if not chunk or resp.feed(chunk):
                break
    return resp


# --- the bench -------------------------------------------------------------------------------


@dataclass
class Target:
    """A running proxy under test."""

    name: str  # "parkway" | "parkway (h11)" | "parkway (httptools)" | "nginx" | "floor" | "direct"
    port: int
    proc: Proc | None
    group: procstat.Group
    signed: dict[str, str] = field(default_factory=dict)  # upstream query -> request-target

    log: Path | None = None  # where the proxy's own output goes (nginx: its error.log)
    upstream: str = ""  # scheme://host:port of the upstream it relays from

    @property
    def kind(self) -> str:
        return target_kind(self.name)

    def log_tail(self, lines: int = 12) -> list[str]:
        """The end of the proxy's log, kept in the results when a run saw errors."""
        try:
            return self.log.read_text(errors="replace").splitlines()[-lines:] if self.log else []
        except OSError:
            return []

    def request_target(self, upstream_query: str) -> str:
        return self.signed[upstream_query] if self.kind == "parkway" else f"/v1/chat/completions?{upstream_query}"

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="parkway-loadtest-"))
        self.runs: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.procs: list[Proc] = []
        allowed = sorted(os.sched_getaffinity(0))
        if len(allowed) >= 2 and not args.no_pin:
            self.proxy_cpus: set[int] | None = {allowed[0]}
            self.aux_cpus: set[int] | None = set(allowed[1:])
            os.sched_setaffinity(0, self.aux_cpus)
        else:
            self.proxy_cpus = self.aux_cpus = None
            self.notes.append(
                f"not pinned ({len(allowed)} core(s) allowed or --no-pin): "
                "the proxy shares its core with the load generator"
            )
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it
        self.nofile = hard
        self.proxy_python = args.proxy_python or sys.executable
        self.proxy_path = Path(args.proxy_path).resolve() if args.proxy_path else ROOT
        self._tracemem: dict[int, str] = {}
        self._turns: dict[int, Path] = {}  # port -> where loadtest.turns writes (--profile turns)
        self.upstream: Proc | None = None
        self.upstream_port = 0
        self.upstream_group: procstat.Group | None = None
        self.front_port = 0  # the TLS front (parked-tls), started when first needed
        self.front_cert: Path | None = None
        self.parsers: dict[str, str] = {}  # Parkway label or "floor" -> the parser its start-up line reported

    # --- processes ------------------------------------------------------------------------

    def _python(self, module: str, *argv: str, cpus, log: Path | None, stdout=None) -> Proc:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
        proc = Proc(module, [sys.executable, "-m", module, *argv], cpus=cpus, log=log, env=env, stdout=stdout)
        self.procs.append(proc)
        return proc

    def start_upstream(self) -> None:
        deadline = str(self.args.max_minutes * 60 + 60)
        self.upstream = self._python(
            "loadtest.upstream",
            "--api-key",
            API_KEY,
            "--max-seconds",
            deadline,
            cpus=self.aux_cpus,
            log=None,
            stdout=subprocess.PIPE,
        )
        line = self.upstream.popen.stdout.readline()
        if not line.startswith("READY "):
            raise SetupError(f"the load-test upstream did not start: {line!r}")
        self.upstream_port = int(line.split()[1])
        self.upstream_group = procstat.Group("upstream", [self.upstream.pid])

    def start_tls_front(self) -> None:
        """nginx serving https on loopback in front of the lean upstream (see :mod:`loadtest.tls`)."""
        if self.front_port:
            return
        binary = nginx.nginx_binary()
        if binary is None:
            raise SetupError("parked-tls needs nginx as the TLS front: run `bash .ci/system-deps`")
        directory = self.tmp / "tls-front"
        cert, key = tls.make_certificate(directory)
        port = free_port()
        config = tls.write_front_config(
            directory,
            listen=f"127.0.0.1:{port}",
            upstream=f"127.0.0.1:{self.upstream_port}",
            cert=cert,
            key=key,
            nofile=self.nofile,
            user=nginx.user_line(),
        )
        front = Proc(
            "nginx-front", nginx.command(binary, directory, config), cpus=self.aux_cpus, log=directory / "stderr.log"
        )
        self.procs.append(front)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or not front.alive():
                    raise SetupError(
                        f"the TLS front did not start: {(directory / 'error.log').read_text()[-500:]}"
                    ) from None
                time.sleep(0.05)
        time.sleep(0.3)
        # Its CPU counts as the upstream's: both sit on the auxiliary cores.
        assert self.upstream_group is not None
        self.upstream_group.pids = [self.upstream_group.pids[0], *procstat.tree(front.pid)]
        self.front_port, self.front_cert = port, cert

    def parkway_supports_workers(self) -> bool:
        out = subprocess.run(
            [self.proxy_python, "-m", "proxy", "serve", "--help"],
            cwd=self.proxy_path,
            env=self._proxy_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        return "--workers" in out.stdout

    def _proxy_env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(self.proxy_path), "PYTHONDONTWRITEBYTECODE": "1"}

    def start_target(
        self,
        name: str,
        *,
        workers: int | None = None,
        queries: tuple[str, ...] = (),
        https: bool = False,
        calls_out: Path | None = None,
    ) -> Target:
        """Start ``name`` on a free port, pinned to the proxy's core, and warm it up. ``calls_out``:
        run it under :mod:`loadtest.calls`, its profile written there on SIGUSR2."""
        port = free_port()
        log = self.tmp / f"{target_kind(name)}-{port}.log"
        upstream = f"127.0.0.1:{self.front_port if https else self.upstream_port}"
        ca = self.front_cert if https else None
        if name == "nginx":
            binary = nginx.nginx_binary()
            if binary is None:
                raise SetupError(
                    "nginx is not installed: run `bash .ci/system-deps` (Debian package nginx), or pass --no-reference"
                )
            directory = self.tmp / f"nginx-{port}"
            config = nginx.write_config(
                directory, listen=f"127.0.0.1:{port}", upstream=upstream, api_key=API_KEY, nofile=self.nofile, tls_ca=ca
            )
            proc = Proc("nginx", nginx.command(binary, directory, config), cpus=self.proxy_cpus, log=log)
        elif name == "floor":
            argv = ["-m", "loadtest.floor", "--port", str(port), "--upstream", upstream, "--api-key", API_KEY]
            argv += ["--max-seconds", str(self.args.max_minutes * 60 + 60)]
            env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
            if calls_out:
                argv[:1] = ["-m", "loadtest.calls"]
                env["CALLS_OUT"] = str(calls_out)
            proc = Proc("floor", [sys.executable, *argv], cpus=self.proxy_cpus, log=log, env=env)
        else:
            config = self.tmp / f"parkway-{port}.toml"
            config.write_text(parkway_config(port, upstream, self.args.proxy_log, ca=ca))
            env = self._proxy_env()
            module = "proxy"
            if self.args.profile == "tracemalloc":
                module = "loadtest.tracemem"
                env["PYTHONPATH"] += os.pathsep + str(ROOT)
                env["TRACEMEM_OUT"] = str(Path(self.args.out).resolve() / f"{self.args.label}-tracemem-{port}.txt")
                self._tracemem[port] = env["TRACEMEM_OUT"]
                Path(self.args.out).mkdir(parents=True, exist_ok=True)
            elif calls_out:
                module = "loadtest.calls"
                env["PYTHONPATH"] += os.pathsep + str(ROOT)
                env["CALLS_OUT"] = str(calls_out)
            elif self.args.profile == "turns":
                module = "loadtest.turns"
                env["PYTHONPATH"] += os.pathsep + str(ROOT)
                env["TURNS_OUT"] = str(self.tmp / f"turns-{port}.json")
                self._turns[port] = self.tmp / f"turns-{port}.json"
            argv = [
                self.proxy_python,
                "-m",
                module,
                *(["proxy"] if calls_out else []),
                "serve",
                "--config",
                str(config),
            ]
            http = target_http(name)
            if http:
                argv += ["--http", http]
            cpus = self.proxy_cpus
            if workers is not None:
                argv += ["--workers", str(workers)]
                allowed = sorted(os.sched_getaffinity(0) | (self.proxy_cpus or set()))
                cpus = set(allowed[:workers]) if self.proxy_cpus else None
            # cwd too: `python -m` puts the working directory first on sys.path.
            proc = Proc("parkway", argv, cpus=cpus, log=log, env=env, cwd=self.proxy_path)
        self.procs.append(proc)
        target = Target(
            name,
            port,
            proc,
            procstat.Group(name, []),
            log=self.tmp / f"nginx-{port}" / "error.log" if name == "nginx" else log,
            upstream=f"{'https' if https else 'http'}://{upstream}",
        )
        try:
            self._wait_ready(target, log)
            target.signed = {q: self._sign(target, q) for q in queries}
            self._warm_up(target)
        except BaseException:
            target.stop()
            raise
        time.sleep(0.5)
        if target.kind in ("parkway", "floor"):
            self.parsers[name] = _startup_parser(log) or self.parsers.get(name, "?")
        pids = procstat.tree(proc.pid)
        if name == "nginx":
            pids = pids[1:] or pids  # the worker(s); the master only supervises
        target.group.pids = pids
        return target

    def _sign(self, target: Target, query: str) -> str:
        url = sign_url(
            id=CREDENTIAL,
            secret=SECRET,
            host=f"http://127.0.0.1:{target.port}",
            proxy_url=f"{target.upstream}/v1/chat/completions?{query}",
            method="POST",
            expiry=6 * 3600,
        )
        parts = urlsplit(url)
        return f"{parts.path}?{parts.query}"

    def _wait_ready(self, target: Target, log: Path) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if not target.proc.alive():
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise SetupError(f"{target.name} exited at start (status {target.proc.popen.returncode}):\n{tail}")
            try:
                socket.create_connection(("127.0.0.1", target.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise SetupError(f"{target.name} did not listen on 127.0.0.1:{target.port} within 20 s")

    def _warm_up(self, target: Target) -> None:
        query = "events=2&interval_ms=1&size=140"
        if target.kind == "parkway" and query not in target.signed:
            target.signed[query] = self._sign(target, query)
        for body in (SMALL_BODY, STREAM_BODY):
            resp = one_request(target.port, target.request_target(query), body)
            if resp.status != 200 or resp.error:
                raise SetupError(f"{target.name} warm-up request failed: status {resp.status} {resp.error or ''}")

    def direct(self) -> Target:
        return Target("direct", self.upstream_port, None, procstat.Group("direct", []))

    # --- one measured run -----------------------------------------------------------------

    def drive(
        self,
        target: Target,
        mode: str,
        loadgen_args: list[str],
        deadline: float,
        profile_name: str | None = None,
        parked: int | None = None,
    ) -> dict[str, Any]:
        """Run the load generator against ``target`` while sampling it; return the raw measurements."""
        headers = ["--header", f"Authorization: Bearer {API_KEY}"] if target.name == "direct" else []
        if parked and self._snapshot_due(target):
            os.kill(target.proc.pid, signal.SIGUSR1)  # loadtest.tracemem: the idle baseline
            time.sleep(1.0)
        idle = target.group.read()
        lg = self._python(
            "loadtest.loadgen",
            mode,
            "--port",
            str(target.port),
            "--deadline",
            str(deadline),
            *headers,
            *loadgen_args,
            cpus=self.aux_cpus,
            log=None,
            stdout=subprocess.PIPE,
        )
        lg_group = procstat.Group("loadgen", [lg.pid])
        groups = [target.group, self.upstream_group, lg_group]
        watchdog = threading.Timer(deadline + 30, lambda: lg.alive() and lg.popen.kill())
        watchdog.start()
        stats: list[tuple[float, dict]] = []
        result: dict[str, Any] | None = None
        spy = self._start_profiler(target, profile_name)
        try:
            with procstat.Sampler(groups, self.args.sample_interval):
                t_start = time.monotonic()
                for line in lg.popen.stdout:
                    if line.startswith("STAT "):
                        stats.append((time.monotonic(), json.loads(line[5:])))
                        if parked and stats[-1][1]["open"] >= parked and self._snapshot_due(target):
                            Path(self._tracemem_out(target) + ".streams").write_text(str(parked))
                            os.kill(target.proc.pid, signal.SIGUSR1)  # loadtest.tracemem: write the growth
                            parked = None
                    elif line.startswith("RESULT "):
                        result = json.loads(line[7:])
                lg.popen.wait()
                t_end = time.monotonic()
        finally:
            watchdog.cancel()
            self._stop_profiler(spy)
            lg.stop()
        if result is None:
            raise SetupError(f"the load generator ended without a result (status {lg.popen.returncode})")
        wall = t_end - t_start
        measured = {
            "wall_s": wall,
            "idle_rss_kb": idle.rss / 1024,
            "peak_rss_kb": max(s.rss for s in target.group.samples) / 1024 if target.group.pids else None,
            "cpu_s": _delta(target.group.samples, "cpu"),
            "upstream_cpu_pct": 100 * _delta(self.upstream_group.samples, "cpu") / wall,
            "loadgen_cpu_pct": 100 * result.get("own_cpu_s", 0.0) / wall,
        }
        series = [(s.t - t_start, s.cpu, s.rss) for s in target.group.samples]
        for group in groups:
            group.samples.clear()
        return {"result": result, "stats": [(t - t_start, s) for t, s in stats], "measured": measured, "series": series}

    def _tracemem_out(self, target: Target) -> str:
        return self._tracemem[target.port]

    def _snapshot_due(self, target: Target) -> bool:
        return self.args.profile == "tracemalloc" and target.kind == "parkway"

    def _start_profiler(self, target: Target, name: str | None):
        if not name or target.kind != "parkway" or self.args.profile != "py-spy":
            return None
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not os.access(spy, os.X_OK):
            self.notes.append("--profile py-spy: py-spy is not installed (pip install -e '.[loadtest]')")
            return None
        http = target_http(target.name)
        out = Path(self.args.out) / f"{self.args.label}-profile-{name}{f'-{http}' if http else ''}.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        # Raw collapsed stacks: loadtest.profile turns them into a breakdown by component.
        return Proc(
            "py-spy",
            [
                spy,
                "record",
                "--pid",
                str(target.proc.pid),
                "--rate",
                "200",
                "--nonblocking",
                "--format",
                "raw",
                "--output",
                str(out),
            ],
            cpus=self.aux_cpus,
            log=self.tmp / "py-spy.log",
        )

    def _stop_profiler(self, proc: Proc | None) -> None:
        if proc is not None:
            proc.stop(signal.SIGINT, timeout=30)

    # --- workloads ------------------------------------------------------------------------

    def parked(self, name: str, repeat: int, streams: int, profile: bool) -> dict[str, Any]:
        a = self.args
        events = max(2, round(a.stream_seconds * 1000 / a.interval_ms))
        return self._streams("parked", name, repeat, streams, events, a.interval_ms, profile)

    def parked_tls(self, name: str, repeat: int, streams: int, profile: bool) -> dict[str, Any]:
        a = self.args
        self.start_tls_front()
        events = max(2, round(a.stream_seconds * 1000 / a.interval_ms))
        front = self.tmp / "tls-front"
        tls.handshakes(front)  # what an earlier run left
        run = self._streams("parked-tls", name, repeat, streams, events, a.interval_ms, profile, https=True)
        return {**run, **tls.handshakes(front)}  # the proxy has stopped: its connections are logged

    def relay(self, name: str, repeat: int, profile: bool) -> dict[str, Any]:
        a = self.args
        return self._streams("relay", name, repeat, a.relay_streams, a.relay_events, a.relay_interval_ms, profile)

    def _streams(
        self,
        workload: str,
        name: str,
        repeat: int,
        streams: int,
        events: int,
        interval_ms: float,
        profile: bool,
        https: bool = False,
    ) -> dict[str, Any]:
        a = self.args
        query = f"events={events}&interval_ms={interval_ms:g}&size={a.event_bytes}"
        target = self.start_target(name, queries=(query,), https=https)
        try:
            ramp_s = streams / a.ramp
            deadline = ramp_s + events * interval_ms / 1000 * 3 + 60
            raw = self.drive(
                target,
                "stream",
                [
                    "--target",
                    target.request_target(query),
                    "--body",
                    STREAM_BODY,
                    "--streams",
                    str(streams),
                    "--rate",
                    str(a.ramp),
                    "--expect-events",
                    str(events),
                    "--interval-ms",
                    f"{interval_ms:g}",
                ],
                deadline,
                profile_name=f"{workload}-{streams}" if profile else None,
                parked=streams,
            )
        finally:
            target.stop()
        r, m = raw["result"], raw["measured"]
        steady = _steady(raw, streams, target.group)
        timed = self._turns.pop(target.port, None)
        try:
            in_proxy = turns.summarise(json.loads(timed.read_text())) if timed else {}
        except (OSError, ValueError):
            in_proxy = {}
        return {
            "workload": workload,
            "target": name,
            "repeat": repeat,
            "streams": streams,
            "events_per_stream": events,
            "interval_ms": interval_ms,
            "event_bytes": a.event_bytes,
            "completed": r["completed"],
            "errors": r["errors"],
            "error_count": r["error_count"],
            "events": r["events"],
            "ttfe_p50_ms": _ms(r["ttfe_s"]["p50"]),
            "ttfe_p99_ms": _ms(r["ttfe_s"]["p99"]),
            "ttfe_max_ms": _ms(r["ttfe_s"]["max"]),
            # Connecting is not in the time to first event: a full listen backlog shows here.
            "connect_p99_ms": _ms(r["connect_s"]["p99"]),
            # Events after a stream's first, later than their place on the upstream's schedule
            # (loadtest.loadgen): all of them, and those that arrived during the ramp.
            "lateness_p99_ms": _ms(r.get("lateness_s", {}).get("p99")),
            "ramp_lateness_p50_ms": _ms(r.get("ramp_lateness_s", {}).get("p50")),
            "ramp_lateness_p99_ms": _ms(r.get("ramp_lateness_s", {}).get("p99")),
            "ramp_lateness_max_ms": _ms(r.get("ramp_lateness_s", {}).get("max")),
            "duration_p50_s": r["duration_s"]["p50"],
            "duration_max_s": r["duration_s"]["max"],
            "idle_rss_kb": m["idle_rss_kb"],
            "peak_rss_kb": m["peak_rss_kb"],
            # Per stream actually parked at once: a proxy that could not take them all is not
            # flattered by dividing by streams it never held.
            "parked_peak": r["max_open"],
            "rss_per_stream_kb": (m["peak_rss_kb"] - m["idle_rss_kb"]) / max(1, r["max_open"]),
            "cpu_s": m["cpu_s"],
            "cpu_per_event_us": 1e6 * m["cpu_s"] / r["events"] if r["events"] else None,
            **steady,
            "setup_cpu_per_stream_us": _setup_cpu(m["cpu_s"], r["events"], streams, steady["steady_cpu_per_event_us"]),
            # --profile turns: the set-up inside Parkway and its run loop's turns (loadtest.turns).
            **in_proxy,
            "upstream_cpu_pct": m["upstream_cpu_pct"],
            "loadgen_cpu_pct": m["loadgen_cpu_pct"],
            "wall_s": m["wall_s"],
            "series": raw["series"],
            **({"proxy_log_tail": target.log_tail()} if r["error_count"] else {}),
        }

    def small(
        self,
        name: str,
        repeat: int,
        clients: int,
        workload: str = "small",
        workers: int | None = None,
        profile: bool = False,
    ) -> dict[str, Any]:
        a = self.args
        target = self.start_target(name, workers=workers, queries=("small=1",))
        try:
            raw = self.drive(
                target,
                "small",
                small_argv(target, clients, a.seconds, a.warmup),
                a.seconds + a.warmup + 60,
                profile_name=f"{workload}-{clients}" if profile else None,
            )
        finally:
            target.stop()
        r, m = raw["result"], raw["measured"]
        return {
            "workload": workload,
            "target": name,
            "repeat": repeat,
            "clients": clients,
            "workers": workers,
            "rps": r["rps"],
            "requests": r["counted"],
            "errors": r["errors"],
            "error_count": r["error_count"],
            "latency_p50_us": _us(r["latency_s"]["p50"]),
            "latency_p99_us": _us(r["latency_s"]["p99"]),
            "cpu_pct": 100 * m["cpu_s"] / m["wall_s"],
            "cpu_per_request_us": 1e6 * m["cpu_s"] / r["requests"] if r["requests"] else None,
            "upstream_cpu_pct": m["upstream_cpu_pct"],
            "loadgen_cpu_pct": m["loadgen_cpu_pct"],
            "idle_rss_kb": m["idle_rss_kb"],
            "peak_rss_kb": m["peak_rss_kb"],
            **({"proxy_log_tail": target.log_tail()} if r["error_count"] else {}),
        }

    def latency(self, name: str, repeat: int, profile: bool = False) -> dict[str, Any]:
        a = self.args
        target = self.direct() if name == "direct" else self.start_target(name, queries=("small=1",))
        try:
            raw = self.drive(
                target,
                "latency",
                [
                    "--target",
                    target.request_target("small=1"),
                    "--body",
                    SMALL_BODY,
                    "--requests",
                    str(a.requests),
                    "--warmup-requests",
                    str(min(500, a.requests)),
                ],
                120,
                profile_name="latency" if profile else None,
            )
        finally:
            target.stop()
        r = raw["result"]
        return {
            "workload": "latency",
            "target": name,
            "repeat": repeat,
            "requests": r["requests"],
            "errors": r["errors"],
            "error_count": r["error_count"],
            "latency_p50_us": _us(r["latency_s"]["p50"]),
            "latency_p90_us": _us(r["latency_s"]["p90"]),
            "latency_p99_us": _us(r["latency_s"]["p99"]),
        }

    def calls_run(self, name: str, repeat: int) -> dict[str, Any]:
        """Python function calls per small request (``--profile calls``): the target runs under
        :mod:`loadtest.calls`; the load generator fences the measured window with the profiler's
        signals, so every profiled call belongs to a counted request."""
        a = self.args
        slug = name.replace(" (", "-").rstrip(")")  # parkway, parkway-h11, floor
        out = Path(a.out).resolve() / f"{a.label}-calls-small-{slug}"
        out.parent.mkdir(parents=True, exist_ok=True)
        prof, txt = Path(f"{out}.prof"), Path(f"{out}.txt")
        prof.unlink(missing_ok=True)
        target = self.start_target(name, queries=("small=1",), calls_out=prof)
        try:
            raw = self.drive(
                target,
                "small",
                [
                    *small_argv(target, CALLS_CLIENTS, a.seconds, max(1.0, a.warmup)),
                    "--signal-pid",
                    str(target.proc.pid),
                ],
                a.seconds + a.warmup + 60,
            )
        finally:
            target.stop()
        r = raw["result"]
        run: dict[str, Any] = {
            "workload": "calls",
            "target": name,
            "repeat": repeat,
            "clients": CALLS_CLIENTS,
            "requests": r["counted"],
            "errors": r["errors"],
            "error_count": r["error_count"],
        }
        if not prof.exists() or not r["counted"]:
            run["errors"] = {**r["errors"], "no_profile": 1}
            run["error_count"] += 1
            return run
        summary = calls.summarise(prof, r["counted"])
        title = f"{name}, {CALLS_CLIENTS} keep-alive clients of small requests, profiled after the warm-up: "
        txt.write_text(calls.text(summary, title))
        return {**run, **summary, "calls_file": str(txt)}

    # --- the whole invocation -------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        a = self.args
        started = time.monotonic()
        self.start_upstream()
        parkways = tuple(parkway_label(http) for http in a.http) if a.http else ("parkway",)
        chosen = tuple(t for t in TARGETS if t in a.targets and not (a.no_reference and t == "nginx"))
        targets = tuple(p for t in chosen for p in (parkways if t == "parkway" else (t,)))
        workloads = a.workload
        workers_ok = None
        if "workers" in workloads:
            workers_ok = self.parkway_supports_workers()
            if not workers_ok:
                self.notes.append("workers: skipped, `parkway serve` has no --workers flag yet")
        elif a.workers:
            workers_ok = self.parkway_supports_workers()
            if not workers_ok:
                self.notes.append(f"--workers {a.workers}: not passed, `parkway serve` has no --workers flag yet")
        if "floor" in targets and set(workloads) - set(FLOOR_WORKLOADS):
            skipped = ", ".join(w for w in workloads if w not in FLOOR_WORKLOADS)
            self.notes.append(f"floor: runs {', '.join(FLOOR_WORKLOADS)} only, not {skipped}")
        if a.profile == "calls" and "small" not in workloads:
            self.notes.append("--profile calls: nothing profiled, it needs the small workload")
        budget = a.max_minutes * 60
        for repeat in range(a.repeat):
            order = targets if repeat % 2 == 0 else targets[::-1]
            profile = repeat == 0 and a.profile != "none"
            for workload in workloads:
                if time.monotonic() - started > budget:
                    self.notes.append(f"stopped early: --max-minutes {a.max_minutes} reached at repeat {repeat + 1}")
                    return self.results(started)
                self._log(f"repeat {repeat + 1}/{a.repeat}: {workload}")
                for name in order:
                    if target_kind(name) == "floor" and workload not in FLOOR_WORKLOADS:
                        continue
                    if workload == "parked":
                        # The sweep's smaller counts (the chart) once; the largest (the target) every repeat.
                        counts = a.streams if repeat == 0 or a.sweep_every_repeat else [max(a.streams)]
                        for streams in counts:
                            self._record(self.parked(name, repeat, streams, profile and target_kind(name) == "parkway"))
                    elif workload == "parked-tls":
                        self._record(
                            self.parked_tls(name, repeat, max(a.streams), profile and target_kind(name) == "parkway")
                        )
                    elif workload == "relay":
                        self._record(self.relay(name, repeat, profile and target_kind(name) == "parkway"))
                    elif workload == "small":
                        workers = a.workers if workers_ok and target_kind(name) == "parkway" and a.workers else None
                        self._record(
                            self.small(
                                name,
                                repeat,
                                a.clients,
                                workers=workers,
                                profile=profile and target_kind(name) == "parkway",
                            )
                        )
                        if a.profile == "calls" and repeat == 0 and target_kind(name) in ("parkway", "floor"):
                            self._record(self.calls_run(name, repeat))
                    elif workload == "latency":
                        if name == order[0]:
                            self._record(self.latency("direct", repeat))
                        self._record(self.latency(name, repeat, profile and target_kind(name) == "parkway"))
                    elif workload == "pool":
                        for clients in a.pool_clients:
                            self._record(
                                self.small(
                                    name,
                                    repeat,
                                    clients,
                                    workload="pool",
                                    profile=profile
                                    and target_kind(name) == "parkway"
                                    and clients == max(a.pool_clients),
                                )
                            )
                    elif workload == "workers" and workers_ok and target_kind(name) == "parkway":
                        for n in (1, a.workers or 2):
                            self._record(self.small(name, repeat, a.clients, workload="workers", workers=n))
        return self.results(started)

    def _record(self, run: dict[str, Any]) -> None:
        if target_kind(run["target"]) in ("parkway", "floor"):
            run["http"] = self.parsers.get(run["target"], target_http(run["target"]) or "?")
        self.runs.append(run)
        brief = {
            k: (round(v, 2) if isinstance(v, float) else v)
            for k, v in run.items()
            if k not in ("series", "errors", "proxy_log_tail", "calls_by_component", "top_calls") and v is not None
        }
        self._log("  " + json.dumps(brief))

    def _log(self, text: str) -> None:
        if not self.args.quiet:
            print(text, file=sys.stderr, flush=True)

    def results(self, started: float) -> dict[str, Any]:
        a = self.args
        meta = {
            "command": "python -m loadtest " + " ".join(a.argv),
            "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "elapsed_s": round(time.monotonic() - started, 1),
            "machine": {
                "cores": os.cpu_count(),
                "allowed": sorted(os.sched_getaffinity(0) | (self.proxy_cpus or set())),
                "proxy_cpus": sorted(self.proxy_cpus or ()),
                "aux_cpus": sorted(self.aux_cpus or ()),
                "open_files": self.nofile,
                "python": platform.python_version(),
                "kernel": platform.release(),
            },
            "options": {k: v for k, v in vars(a).items() if k != "argv"},
            "proxy_python": self.proxy_python,
            "proxy_path": str(self.proxy_path),
            "versions": _versions(self.proxy_python, self.proxy_path),
        }
        return {"meta": meta, "notes": self.notes, "runs": self.runs, "summary": report.summarise(self.runs, a)}

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(timeout=5)
        shutil.rmtree(self.tmp, ignore_errors=True)


def small_argv(target: Target, clients: int, seconds: float, warmup: float) -> list[str]:
    """The load generator's arguments for small signed POSTs from ``clients`` keep-alive clients."""
    return ["--target", target.request_target("small=1"), "--body", SMALL_BODY, "--clients", str(clients),
            "--seconds", str(seconds), "--warmup", str(warmup)]  # fmt: skip


def parkway_config(port: int, upstream: str, level: str, ca: Path | None = None) -> str:
    scheme = "https" if ca else "http"
    ca_line = f'upstream_ca_file = "{ca}"\n' if ca else ""
    return f"""\
[server]
listen = ["127.0.0.1:{port}"]
drain_timeout = 2
{ca_line}
[[credentials]]
id = "{CREDENTIAL}"
secret = "{SECRET}"
allowed_upstreams = ["{scheme}://{upstream}/v1/"]
[credentials.headers]
Authorization = "Bearer {API_KEY}"

[admin]
listen = []  # the default port may be taken by another run on a shared machine

[log]
level = "{level}"
format = "json"
"""


def _startup_parser(log: Path) -> str | None:
    """The HTTP parser named by Parkway's start-up log line (what it really runs with)."""
    try:
        for line in log.read_text(errors="replace").splitlines():
            if '"startup"' in line:
                try:
                    return json.loads(line).get("http")
                except ValueError:
                    return None
    except OSError:
        pass
    return None


def _delta(samples: list[procstat.Sample], attr: str) -> float:
    return getattr(samples[-1], attr) - getattr(samples[0], attr) if len(samples) >= 2 else 0.0


def _at(samples: list[procstat.Sample], t: float) -> procstat.Sample:
    """The last sample taken at or before ``t`` (the first one if none)."""
    best = samples[0]
    for s in samples:
        if s.t > t:
            break
        best = s
    return best


def _setup_cpu(cpu_s: float, events: int, streams: int, steady_per_event_us: float | None) -> float | None:
    """CPU per stream beyond its events at the steady rate: its set-up and teardown, and what
    relaying cost more during the ramp than once all were parked. The run's whole CPU figure
    mixes the two; this is the part a cheaper set-up would cut."""
    if steady_per_event_us is None or not streams:
        return None
    return (1e6 * cpu_s - steady_per_event_us * events) / streams


def _steady(raw: dict[str, Any], streams: int, group: procstat.Group) -> dict[str, Any]:
    """CPU while every stream was parked (no connection set-up or teardown in the window)."""
    stats = raw["stats"]
    full = [(t, s) for t, s in stats if s["open"] >= streams]
    if len(full) < 2:
        peak = max((s["open"] for _, s in stats), default=0)
        full = [(t, s) for t, s in stats if peak and s["open"] >= 0.95 * peak]
    if len(full) < 2:
        return {"steady_s": 0.0, "steady_cpu_pct": None, "steady_cpu_per_event_us": None}
    (t0, s0), (t1, s1) = full[0], full[-1]
    series = raw["series"]
    cpu0 = _series_at(series, t0)
    cpu1 = _series_at(series, t1)
    events = s1["events"] - s0["events"]
    return {
        "steady_s": t1 - t0,
        "steady_cpu_pct": 100 * (cpu1 - cpu0) / (t1 - t0),
        "steady_cpu_per_event_us": 1e6 * (cpu1 - cpu0) / events if events else None,
    }


def _series_at(series: list[tuple[float, float, int]], t: float) -> float:
    best = series[0][1]
    for ts, cpu, _ in series:
        if ts > t:
            break
        best = cpu
    return best


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _us(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e6


def _versions(python: str, path: Path) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json\nout = {}\n"
        "for n in ('trio', 'h11', 'httptools', 'httpx', 'httpcore', 'httpx2', 'httpcore2', 'structlog'):\n"
        "    try: out[n] = m.version(n)\n    except Exception: pass\nprint(json.dumps(out))"
    )
    try:
        out = subprocess.run(
            [python, "-c", code],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=path,
            env={**os.environ, "PYTHONPATH": str(path)},
        )
        versions = json.loads(out.stdout)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        versions = {}
    binary = nginx.nginx_binary()
    if binary:
        err = subprocess.run([binary, "-v"], capture_output=True, text=True).stderr.strip()
        versions["nginx"] = err.rpartition("/")[2]
    return versions


# --- command line ----------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _parsers(text: str) -> list[str]:
    names = list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    for name in names:
        if name not in PARSERS:
            raise argparse.ArgumentTypeError(f"unknown HTTP parser {name!r} (choose from {', '.join(PARSERS)})")
    return names


def _targets(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    for name in names:
        if name not in TARGETS:
            raise argparse.ArgumentTypeError(f"unknown target {name!r} (choose from {', '.join(TARGETS)})")
    return names


def _workloads(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if names == ["all"]:
        return list(WORKLOADS)
    for name in names:
        if name not in WORKLOADS:
            raise argparse.ArgumentTypeError(f"unknown workload {name!r} (choose from {', '.join(WORKLOADS)}, all)")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start everything on loopback and measure")
    run.add_argument(
        "--workload",
        type=_workloads,
        default=["parked"],
        help=f"comma-separated: {', '.join(WORKLOADS)}, or all (default parked)",
    )
    g = run.add_argument_group("parked and relay streams")
    g.add_argument("--streams", type=_ints, default=[9500], help="parked streams; a list (1000,5000,9500) sweeps")
    g.add_argument(
        "--sweep-every-repeat",
        action="store_true",
        help="run every --streams count in every repeat (default: the largest only after the first)",
    )
    g.add_argument("--stream-seconds", type=float, default=20.0)
    g.add_argument("--interval-ms", type=float, default=200.0, help="time between events of one stream")
    g.add_argument("--event-bytes", type=int, default=140)
    g.add_argument("--ramp", type=float, default=2000.0, help="new streams per second")
    g.add_argument("--relay-streams", type=int, default=200)
    g.add_argument("--relay-events", type=int, default=250)
    g.add_argument("--relay-interval-ms", type=float, default=20.0)
    g = run.add_argument_group("small requests")
    g.add_argument("--clients", type=int, default=64, help="keep-alive clients for small and workers")
    g.add_argument("--seconds", type=float, default=10.0, help="measured seconds per small run")
    g.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before that")
    g.add_argument("--pool-clients", type=_ints, default=[16, 512])
    g.add_argument("--requests", type=int, default=3000, help="sequential requests for latency")
    g.add_argument("--workers", type=int, default=None, help="pass `--workers N` to parkway serve")
    g = run.add_argument_group("the run")
    g.add_argument("--repeat", type=int, default=3, help="repeats; figures are medians")
    g.add_argument("--max-minutes", type=float, default=45.0, help="stop starting new runs after this")
    g.add_argument("--no-reference", action="store_true", help="skip nginx")
    g.add_argument(
        "--targets",
        type=_targets,
        default=list(DEFAULT_TARGETS),
        help="proxies to measure, of nginx, parkway and floor (a minimal trio proxy: small, latency and "
        "relay only; see loadtest.floor); default nginx,parkway",
    )
    g.add_argument(
        "--http",
        type=_parsers,
        default=None,
        help="measure Parkway once per HTTP parser, comma-separated (h11,httptools): each started with "
        "`parkway serve --http X` and labelled `parkway (X)`; default: the installed default only",
    )
    g.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    g.add_argument("--proxy-python", help="Python that runs Parkway (e.g. a scratch venv)")
    g.add_argument("--proxy-path", help="directory holding the proxy/ package to measure (default: this repo)")
    g.add_argument(
        "--proxy-log",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="Parkway's log level (default info: one JSON line per request, as deployed)",
    )
    g.add_argument(
        "--profile",
        default="none",
        choices=["none", "py-spy", "tracemalloc", "turns", "calls"],
        help="py-spy: record Parkway's stacks during the first repeat of each workload "
        "(loadtest.profile summarises them); tracemalloc: run Parkway under "
        "loadtest.tracemem and snapshot its memory once every stream is parked; turns: run "
        "Parkway under loadtest.turns and add to each parked run its set-ups' accept-to-relay "
        "time and its run loop's turn lengths (where first events wait); calls: after the first "
        "repeat's small runs, one more per Parkway variant (and the floor) under cProfile, switched on "
        "after the warm-up, giving Python function calls per request by component (loadtest.calls)",
    )
    g.add_argument("--sample-interval", type=float, default=0.1)
    g.add_argument("--out", default=str(ROOT / "loadtest" / "results"), help="directory for JSON, Markdown, PNG")
    g.add_argument("--label", default="results", help="base name of the result files")
    g.add_argument("--no-chart", action="store_true")
    g.add_argument("--quiet", action="store_true")
    rep = sub.add_parser("report", help="rewrite the Markdown table and chart from a results JSON")
    rep.add_argument("json")
    rep.add_argument("--out")
    return parser


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Run and write ``<label>.json``, ``<label>.md`` and ``<label>.png``; returns the results."""
    bench = Bench(args)
    try:
        results = bench.run()
    finally:
        bench.close()
    report.write_all(results, Path(args.out), args.label, chart=not args.no_chart)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "report":
        results = json.loads(Path(args.json).read_text())
        results["summary"] = report.summarise(results["runs"], results["meta"]["options"])
        out = Path(args.out) if args.out else Path(args.json).parent
        report.write_all(results, out, Path(args.json).stem, chart=True)
        print(report.markdown(results))
        return 0
    args.argv = argv
    try:
        results = run_from_args(args)
    except SetupError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 2
    print(report.markdown(results))
    return 0
