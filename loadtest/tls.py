"""The https upstream of the ``parked-tls`` workload: nginx terminating TLS in front of the lean upstream.

Every real LLM API is behind TLS, so the proxies are also measured relaying from an https
upstream: an nginx ("the TLS front", on the auxiliary cores like the lean upstream) serves
https on loopback with a throwaway certificate made at run time (ECDSA P-256, for 127.0.0.1
only, valid one day, in the run's private directory) and passes every request on to the lean
upstream with buffering off. Both proxies verify that certificate: Parkway with
``upstream_ca_file``, nginx with ``proxy_ssl_verify``. Nothing here is committed or reused.
The front logs one short line per request, from which :func:`handshakes` counts each proxy's
full and resumed handshakes.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from .nginx import PRELUDE

FRONT_CONF = (
    PRELUDE
    + """\
    # One line per request: which requests opened a connection, and whether its handshake
    # resumed a session (read by handshakes() after each run).
    log_format handshakes '$connection_requests $ssl_session_reused';
    access_log {dir}/handshakes.log handshakes;
    upstream lean {{
        server {upstream};
        keepalive 1024;
        keepalive_requests 1000000;
    }}
    server {{
        listen {listen} ssl backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:front:10m;
        location / {{
            proxy_pass http://lean;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""
)


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A throwaway self-signed certificate for 127.0.0.1 (also its own CA); (cert, key) paths."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "front-cert.pem", directory / "front-key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-addext", "basicConstraints=critical,CA:TRUE"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


def write_front_config(directory: Path, *, listen: str, upstream: str, cert: Path, key: Path, nofile: int,
                       user: str) -> Path:  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "front.conf"
    path.write_text(
        FRONT_CONF.format(
            dir=directory,
            listen=listen,
            upstream=upstream,
            cert=cert,
            key=key,
            nofile=nofile,
            connections=max(1024, nofile * 17 // 16 + 64),
            user=user,
        )
    )
    return path


def handshakes(directory: Path) -> dict[str, int]:
    """Connections the front accepted since the last call, by handshake (full or resumed), and
    the requests they carried; the log is emptied for the next run."""
    path = directory / "handshakes.log"
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return {"tls_full": 0, "tls_resumed": 0, "tls_requests": 0}
    path.write_text("")  # nginx appends (O_APPEND): the next run's lines start at the new end
    firsts = [line.split() for line in lines if line.startswith("1 ")]
    resumed = sum(1 for fields in firsts if fields[1:] == ["r"])
    return {"tls_full": len(firsts) - resumed, "tls_resumed": resumed, "tls_requests": len(lines)}
