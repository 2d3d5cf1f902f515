"""nginx as the reference proxy: ``proxy_pass`` with buffering off, one worker, on loopback.

The configuration is what a careful operator would write for SSE: HTTP/1.1 keep-alive to the
upstream, ``proxy_buffering off`` and ``proxy_request_buffering off``, the key injected with
``proxy_set_header``, a buffered access log. Everything lives in a private directory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# What both nginx configurations of the load test share (this one and :mod:`loadtest.tls`'s TLS
# front): one worker in the foreground, its files under {dir}, long-lived client keep-alive.
PRELUDE = """\
worker_processes 1;
worker_rlimit_nofile {nofile};
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
daemon off;
{user}
events {{
    worker_connections {connections};
    multi_accept on;
}}
http {{
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
"""

CONF = (
    PRELUDE
    + """\
    access_log {dir}/access.log combined buffer=64k flush=1s;
    upstream llm {{
        server {upstream};
        keepalive 512;
        keepalive_requests 1000000;
    }}
    server {{
        listen {listen} backlog=4096;
        location /v1/ {{
            proxy_pass {scheme}://llm;{tls}
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer {api_key}";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 120s;
        }}
    }}
}}
"""
)


def nginx_binary() -> str | None:
    """The nginx executable (Debian installs it in /usr/sbin, often not on a user's PATH)."""
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


TLS = """
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {ca};
            proxy_ssl_name 127.0.0.1;
            proxy_ssl_session_reuse on;"""


def write_config(
    directory: Path, *, listen: str, upstream: str, api_key: str, nofile: int, tls_ca: Path | None = None
) -> Path:
    """``tls_ca``: the upstream serves https with this certificate (verified, as a careful operator would)."""
    directory.mkdir(parents=True, exist_ok=True)
    text = CONF.format(
        dir=directory,
        listen=listen,
        upstream=upstream,
        api_key=api_key,
        nofile=nofile,
        scheme="https" if tls_ca else "http",
        tls=TLS.format(ca=tls_ca) if tls_ca else "",
        # Two sockets per proxied stream, and a few for listeners and logs. nginx starts closing
        # "reusable" connections (fresh ones still waiting for their request) once fewer than
        # 1/16 of its slots are free, so the slots go above the file limit.
        connections=max(1024, nofile * 17 // 16 + 64),
        user=user_line(),
    )
    path = directory / "nginx.conf"
    path.write_text(text)
    return path


def user_line() -> str:
    """As root the master would hand the worker to "nobody", who cannot write our directory."""
    return "user root;" if os.geteuid() == 0 else ""


def command(binary: str, directory: Path, config: Path) -> list[str]:
    return [binary, "-p", str(directory), "-c", str(config), "-e", str(directory / "error.log")]
