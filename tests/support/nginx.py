"""A real nginx around the shipped snippet (``config/nginx/parkway.conf``), for end-to-end tests.

Each nginx runs as a non-daemon child of the test, with every file it writes inside the
test's temporary directory, listening on a free loopback port, and is stopped with the test.
A missing binary fails the test (``make test`` installs it).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import trio

from support.processes import ROOT, require_binary, stop_process, wait_listening

NGINX_SNIPPET = ROOT / "config" / "nginx" / "parkway.conf"

# The two lines of the shipped location that select prefix handling (see the snippet's header).
PROXY_PASS_AS_IS = "proxy_pass http://parkway;"
PROXY_PASS_STRIPPED = "proxy_pass http://parkway/;"
SHIPPED_UPSTREAM_SERVER = "server 127.0.0.1:3000;"


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


def nginx_conf(tmp: Path, http: str, *, log_level: str = "info", connections: int = 256) -> str:
    """A complete nginx.conf whose every file (pid, logs, temporary bodies) is inside ``tmp``,
    around ``http``: the directives, upstreams and servers of its ``http`` block."""
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    # As root, nginx's workers would switch to "nobody", who cannot enter pytest's 0700 tmp dir.
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log {log_level};
events {{ worker_connections {connections}; }}
http {{
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
{http}}}
"""


def render_nginx_conf(tmp: Path, *, listen_port: int, parkway_address: str, strip_prefix: bool) -> str:
    """A complete nginx.conf around the shipped snippet, pointing at ``parkway_address``."""
    parts = snippet_sections()
    upstream = _replace_once(parts["http: upstream"], SHIPPED_UPSTREAM_SERVER, f"server {parkway_address};")
    location = parts["server: location"]
    if strip_prefix:
        location = _replace_once(location, PROXY_PASS_AS_IS, PROXY_PASS_STRIPPED)
    else:
        assert PROXY_PASS_AS_IS in location
    return nginx_conf(
        tmp,
        f"""    access_log {tmp}/access.log;

{upstream}
{_uncomment(parts["http: map"])}
    server {{
        listen 127.0.0.1:{listen_port};
        server_name localhost;
{location}
    }}
""",
    )


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
