"""Real external programs for end-to-end tests: nginx from the shipped snippet, Ruby, Chromium.

Nothing here assumes anything is running or installed beyond the binaries, which ``make test``
installs (``.ci/system-deps``); a missing binary fails the test with a message saying so.
Each nginx runs as a non-daemon child of the test, with every file it writes inside the
test's temporary directory, listening on a free loopback port, and is stopped with the test.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import h11
import pytest
import trio

ROOT = Path(__file__).resolve().parent.parent
NGINX_SNIPPET = ROOT / "config" / "nginx" / "parkway.conf"
READY_TIMEOUT = 10.0  # seconds for a child process to start listening

# The two lines of the shipped location that select prefix handling (see the snippet's header).
PROXY_PASS_AS_IS = "proxy_pass http://parkway;"
PROXY_PASS_STRIPPED = "proxy_pass http://parkway/;"
SHIPPED_UPSTREAM_SERVER = "server 127.0.0.1:3000;"


# --- binaries -----------------------------------------------------------------------------------


def require_binary(name: str, package: str | None = None) -> str:
    """Path of ``name``; a missing one fails the test (it must not silently skip)."""
    path = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.is_file()), None
    )
    if path is None:
        pytest.fail(
            f"{name} is not installed: `make test` installs it (bash .ci/system-deps), "
            f"or run `apt-get install {package or name}`",
            pytrace=False,
        )
    return path




async def wait_listening(proc: trio.Process, port: int, what: str, log_files: list[Path]) -> None:
    """Poll ``127.0.0.1:port`` until it accepts, failing at once if ``proc`` exits first."""
    with trio.fail_after(READY_TIMEOUT):
        while True:
            if proc.poll() is not None:
                logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in log_files if p.exists())
                pytest.fail(f"{what} exited with status {proc.returncode} before listening:\n{logs}", pytrace=False)
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.02)  # an external process: polling its port is the signal
                continue
            await stream.aclose()
            return


# --- nginx --------------------------------------------------------------------------------------


def snippet_sections(text: str | None = None) -> dict[str, str]:
    """The shipped snippet cut at its ``#>> name`` ... ``#<<`` markers."""
    text = NGINX_SNIPPET.read_text() if text is None else text
    sections: dict[str, str] = {}
    name: str | None = None
    lines: list[str] = []
    for line in text.splitlines():
        if line.startswith("#>> "):
            name, lines = line[4:].strip(), []
        elif line.startswith("#<<"):
            assert name is not None, "#<< without #>>"
            sections[name] = "\n".join(lines) + "\n"
            name = None
        elif name is not None:
            lines.append(line)
    assert set(sections) == {"http: upstream", "http: map", "server: location"}, sections.keys()
    return sections


def _replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"expected exactly one {old!r} in the shipped snippet"
    return text.replace(old, new)


def _uncomment(block: str) -> str:
    """The map as an operator enables it: '# ' removed from each line; comment lines inside stay comments."""
    out = []
    for line in block.splitlines():
        body = line[2:] if line.startswith("# ") else line.lstrip("#")
        out.append(body)
    return "\n".join(out) + "\n"


def render_nginx_conf(tmp: Path, *, listen_port: int, parkway_address: str, strip_prefix: bool) -> str:
    """A complete nginx.conf around the shipped snippet, pointing at ``parkway_address``."""
    parts = snippet_sections()
    upstream = _replace_once(parts["http: upstream"], SHIPPED_UPSTREAM_SERVER, f"server {parkway_address};")
    location = parts["server: location"]
    if strip_prefix:
        location = _replace_once(location, PROXY_PASS_AS_IS, PROXY_PASS_STRIPPED)
    else:
        assert PROXY_PASS_AS_IS in location
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    # As root, nginx's workers would switch to "nobody", who cannot enter pytest's 0700 tmp dir.
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;

{upstream}
{_uncomment(parts["http: map"])}
    server {{
        listen 127.0.0.1:{listen_port};
        server_name localhost;
{location}
    }}
}}
"""


async def serve_nginx(tmp: Path, conf: str, port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run nginx in the foreground until cancelled (then SIGTERM: nginx's fast shutdown)."""
    nginx = require_binary("nginx")
    tmp.mkdir(parents=True, exist_ok=True)
    conf_path = tmp / "nginx.conf"
    conf_path.write_text(conf)
    output = tmp / "nginx.out"
    with open(output, "wb") as out:
        command = [nginx, "-p", f"{tmp}/", "-e", str(tmp / "error.log"), "-c", str(conf_path), "-g", "daemon off;"]
        proc = await trio.lowlevel.open_process(command, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        try:
            await wait_listening(proc, port, "nginx", [output, tmp / "error.log"])
            task_status.started(proc)
            await proc.wait()
            pytest.fail(f"nginx exited with status {proc.returncode} during the test", pytrace=False)
        finally:
            with trio.CancelScope(shield=True):
                await stop_process(proc)


async def stop_process(proc: trio.Process, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; always reaps the process."""
    if proc.returncode is None:
        proc.terminate()
        with trio.move_on_after(grace):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# --- an upstream that observes a request body while it streams ------------------------------------


@dataclass
class BodyProbe:
    """An HTTP/1.1 upstream (raw h11) that counts request-body bytes as they arrive.

    ``wait_received(n)`` returns once ``n`` bytes of the current body are in, so a test can
    prove the body is streamed (not spooled whole by nginx) by holding the rest back. It
    answers 200 with ``{"length", "sha256", "chunked"}`` once the body is complete.
    """

    port: int = 0
    received: int = 0
    requests: list[dict] = field(default_factory=list)
    _progress: trio.Event = field(default_factory=trio.Event)

    async def wait_received(self, count: int) -> None:
        while self.received < count:
            await self._progress.wait()

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        digest = hashlib.sha256()
        head: h11.Request | None = None
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Request):
                    head, self.received = event, 0
                elif isinstance(event, h11.Data):
                    digest.update(event.data)
                    self.received += len(event.data)
                    self._progress.set()
                    self._progress = trio.Event()
                elif isinstance(event, h11.EndOfMessage):
                    assert head is not None
                    headers = {n.decode(): v.decode() for n, v in head.headers}
                    summary = {
                        "length": self.received,
                        "sha256": digest.hexdigest(),
                        "chunked": headers.get("transfer-encoding") == "chunked",
                    }
                    self.requests.append({"target": head.target.decode(), "headers": headers, **summary})
                    body = json.dumps(summary).encode()
                    response = h11.Response(status_code=200, headers=[
                        ("content-type", "application/json"), ("content-length", str(len(body))),
                        ("connection", "close"),
                    ])
                    await stream.send_all(conn.send(response) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
                    return
                else:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            return
        finally:
            await trio.aclose_forcefully(stream)
