"""``python -m loadtest.websockets run``: many concurrent WebSocket sessions, through Parkway and direct.

One run starts an echo upstream (trio-websocket, checking the injected key) once, then drives
the same load twice: straight at the upstream (``direct``), and through ``parkway serve`` with a
signed ``ws://`` URL. The load generator opens ``--sessions`` sessions, holds them all open and
idle for ``--hold`` seconds (memory is read then), then every session sends ``--messages``
messages of ``--size`` bytes, one every ``--interval-ms``, each echoed back (CPU is read around
that phase). Figures, for each target:

* memory per open session: (RSS with every session open - RSS before) / sessions, for Parkway
  (two WebSocket connections per session) and for the upstream when reached directly (one);
* CPU per relayed message: Parkway's CPU seconds in the message phase / messages it relayed
  (each echo is two: one each way), next to the upstream's CPU per message it handled;
* message round trips (client send -> echo received), p50 and p99, direct and through Parkway.

The proxy is pinned to the first allowed core, everything else to the others (as ``run`` does).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import procstat
from .runner import ROOT, Proc, free_port

API_KEY = "sk-loadtest"
CREDENTIAL = "loadtest"
SECRET = "loadtest-secret-not-a-real-one"
RESOURCE = "/v1/realtime?model=loadtest"


# --- the upstream: an echo that checks the key ---------------------------------------------------


async def _upstream(max_seconds: float) -> None:
    import trio
    from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

    async def handler(request: WebSocketRequest) -> None:
        headers = dict(request.headers)
        if headers.get(b"authorization") != f"Bearer {API_KEY}".encode():
            await request.reject(401)
            return
        ws = await request.accept()
        try:
            while True:
                await ws.send_message(await ws.get_message())
        except ConnectionClosed:
            pass

    with trio.move_on_after(max_seconds):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
            print(f"READY {server.port}", flush=True)


# --- the load generator ------------------------------------------------------------------------------


async def _load(
    url: str,
    headers: list[tuple[bytes, bytes]],
    sessions: int,
    messages: int,
    interval: float,
    size: int,
    hold: float,
    max_seconds: float,
) -> None:
    import trio
    from trio_websocket import open_websocket_url

    errors: dict[str, int] = {}
    latencies: list[float] = []
    opened = 0
    all_open, go = trio.Event(), trio.Event()
    payload = json.dumps({"type": "input_audio_buffer.append", "audio": "A" * max(0, size - 48)})
    limiter = trio.CapacityLimiter(64)  # connection ramp: at most this many handshakes at once

    async def session() -> None:
        nonlocal opened
        try:
            async with limiter:
                ws_cm = open_websocket_url(url, extra_headers=headers, max_message_size=16 << 20)
                ws = await ws_cm.__aenter__()
            try:
                opened += 1
                if opened == sessions:
                    all_open.set()
                await go.wait()
                for _ in range(messages):
                    start = time.perf_counter()
                    await ws.send_message(payload)
                    await ws.get_message()
                    latencies.append(time.perf_counter() - start)
                    await trio.sleep(interval)
            finally:
                await ws_cm.__aexit__(None, None, None)
        except Exception as exc:  # noqa: BLE001  # counted, never fatal: the run reports them
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            if opened + sum(errors.values()) >= sessions:
                all_open.set()

    with trio.move_on_after(max_seconds):
        async with trio.open_nursery() as nursery:
            for _ in range(sessions):
                nursery.start_soon(session)
            await all_open.wait()
            print(f"OPEN {opened}", flush=True)
            await trio.sleep(hold)
            print("GO", flush=True)
            started = time.monotonic()
            go.set()
    latencies.sort()
    result = {
        "opened": opened,
        "messages": len(latencies),
        "errors": errors,
        "seconds": round(time.monotonic() - started, 3),
        "rtt_p50_ms": round(latencies[len(latencies) // 2] * 1000, 3) if latencies else None,
        "rtt_p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 3) if latencies else None,
    }
    print("DONE " + json.dumps(result), flush=True)


# --- the runner ----------------------------------------------------------------------------------------


def _python(
    module_args: list[str], *, cpus: set[int] | None, name: str, env_path: Path = ROOT, log: Path | None = None
) -> Proc:
    env = {**os.environ, "PYTHONPATH": str(env_path), "PYTHONDONTWRITEBYTECODE": "1"}
    return Proc(name, [sys.executable, *module_args], cpus=cpus, log=log, env=env, stdout=subprocess.PIPE)


def _expect(proc: Proc, prefix: str) -> str:
    line = proc.popen.stdout.readline() if proc.popen.stdout else ""
    if not line.startswith(prefix):
        raise RuntimeError(f"{proc.name}: expected {prefix!r}, got {line!r}")
    return line[len(prefix) :].strip()


def parkway_config(port: int, upstream_port: int) -> str:
    return f"""\
[server]
listen = ["127.0.0.1:{port}"]
drain_timeout = 2
max_connections = 20000
allow_private_upstreams = true

[websocket]
idle_timeout = 600

[[credentials]]
id = "{CREDENTIAL}"
secret = "{SECRET}"
allowed_upstreams = ["http://127.0.0.1:{upstream_port}/v1/"]
[credentials.headers]
Authorization = "Bearer {API_KEY}"

[log]
level = "warning"
"""


def measure(
    name: str,
    url: str,
    headers: list[str],
    args: argparse.Namespace,
    groups: dict[str, procstat.Group],
    aux: set[int] | None,
) -> dict[str, Any]:
    """Drive one target; read RSS with every session open, CPU around the message phase."""
    argv = [
        "-m",
        "loadtest.websockets",
        "load",
        "--url",
        url,
        "--sessions",
        str(args.sessions),
        "--messages",
        str(args.messages),
        "--interval-ms",
        str(args.interval_ms),
        "--size",
        str(args.size),
        "--hold",
        str(args.hold),
        "--max-seconds",
        str(args.max_minutes * 60),
    ]
    for header in headers:
        argv += ["--header", header]
    before = {g: group.read() for g, group in groups.items()}
    load = _python(argv, cpus=aux, name="loadgen")
    try:
        opened = int(_expect(load, "OPEN "))
        time.sleep(args.hold / 2)  # all open and idle: what they hold now is memory per session
        held = {g: group.read() for g, group in groups.items()}
        _expect(load, "GO")
        go = {g: group.read() for g, group in groups.items()}
        result = json.loads(_expect(load, "DONE "))
        done = {g: group.read() for g, group in groups.items()}
    finally:
        load.stop()
    run: dict[str, Any] = {"target": name, "opened": opened, **result}
    relayed = result["messages"] * 2  # each echo: one message each way
    for g in groups:
        run[f"{g}_rss_per_session_kb"] = round((held[g].rss - before[g].rss) / max(opened, 1) / 1024, 1)
        run[f"{g}_cpu_per_message_us"] = round((done[g].cpu - go[g].cpu) / max(relayed, 1) * 1e6, 1)
    return run


def run(args: argparse.Namespace) -> dict[str, Any]:
    allowed = sorted(os.sched_getaffinity(0))
    proxy_cpus, aux = ({allowed[0]}, set(allowed[1:])) if len(allowed) >= 2 else (None, None)
    tmp = Path(tempfile.mkdtemp(prefix="parkway-ws-loadtest-"))
    upstream = _python(
        ["-m", "loadtest.websockets", "upstream", "--max-seconds", str(args.max_minutes * 60)],
        cpus=aux,
        name="upstream",
    )
    procs = [upstream]
    try:
        upstream_port = int(_expect(upstream, "READY "))
        up = procstat.Group("upstream", [upstream.pid])
        runs = [
            measure(
                "direct",
                f"ws://127.0.0.1:{upstream_port}{RESOURCE}",
                [f"Authorization: Bearer {API_KEY}"],
                args,
                {"upstream": up},
                aux,
            )
        ]

        from proxy.signing import sign_url

        port = free_port()
        config = tmp / "parkway.toml"
        config.write_text(parkway_config(port, upstream_port))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
        parkway = Proc(
            "parkway",
            [sys.executable, "-m", "proxy", "serve", "--config", str(config)],
            cpus=proxy_cpus,
            log=tmp / "parkway.log",
            env=env,
        )
        procs.append(parkway)
        deadline = time.monotonic() + 20
        while True:
            try:
                import socket

                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                if not parkway.alive():  # someone else answered on that port
                    raise OSError("parkway exited")
                break
            except OSError:
                if time.monotonic() > deadline or not parkway.alive():
                    raise RuntimeError(f"parkway did not start: {(tmp / 'parkway.log').read_text()[-2000:]}") from None
                time.sleep(0.05)
        signed = sign_url(
            id=CREDENTIAL,
            secret=SECRET,
            host=f"http://127.0.0.1:{port}",
            proxy_url=f"ws://127.0.0.1:{upstream_port}{RESOURCE}",
            method="GET",
            expiry=3600,
        )
        url = "ws://" + signed.split("://", 1)[1]
        runs.append(
            measure(
                "parkway", url, [], args, {"parkway": procstat.Group("parkway", [parkway.pid]), "upstream": up}, aux
            )
        )
    finally:
        for proc in reversed(procs):
            proc.stop()
    return {"argv": sys.argv[1:], "cores": len(allowed), "pinned": proxy_cpus is not None, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.websockets", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="measure direct and through Parkway")
    r.add_argument("--sessions", type=int, default=1000)
    r.add_argument("--messages", type=int, default=20, help="messages each session sends (each echoed)")
    r.add_argument("--interval-ms", type=float, default=100.0)
    r.add_argument("--size", type=int, default=2000, help="bytes per message (a JSON text message)")
    r.add_argument("--hold", type=float, default=2.0, help="seconds all sessions stay open and idle")
    r.add_argument("--max-minutes", type=float, default=5.0)
    r.add_argument("--out", default=None, help="write the results as JSON here")
    u = sub.add_parser("upstream")
    u.add_argument("--max-seconds", type=float, default=600)
    g = sub.add_parser("load")
    g.add_argument("--url", required=True)
    g.add_argument("--header", action="append", default=[])
    for name, kind in (
        ("sessions", int),
        ("messages", int),
        ("interval-ms", float),
        ("size", int),
        ("hold", float),
        ("max-seconds", float),
    ):
        g.add_argument(f"--{name}", type=kind, required=True)
    args = parser.parse_args(argv)

    if args.command == "upstream":
        import trio

        trio.run(_upstream, args.max_seconds)
    elif args.command == "load":
        import trio

        headers = [(h.split(":", 1)[0].strip().encode(), h.split(":", 1)[1].strip().encode()) for h in args.header]
        trio.run(
            _load,
            args.url,
            headers,
            args.sessions,
            args.messages,
            args.interval_ms / 1000,
            args.size,
            args.hold,
            args.max_seconds,
        )
    else:
        results = run(args)
        text = json.dumps(results, indent=2)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
        direct, parkway = results["runs"]
        if parkway["opened"] and direct["opened"]:
            print(
                f"memory per session: parkway {parkway['parkway_rss_per_session_kb']} KiB, "
                f"upstream direct {direct['upstream_rss_per_session_kb']} KiB",
                file=sys.stderr,
            )
            print(
                f"CPU per message: parkway {parkway['parkway_cpu_per_message_us']} us, "
                f"upstream direct {direct['upstream_cpu_per_message_us']} us",
                file=sys.stderr,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
