"""Issue 10 end to end: every defect as a hostile client, a careless operator or a bug would meet it.

Real sockets on 127.0.0.1, URLs signed by the real ``signway-sdk``, and an upstream that
records everything: every refusal also proves that nothing reached the upstream.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import pytest
import trio

from proxy.app import Parkway
from proxy.cli import build_parser, serve_config
from proxy.config import Credential, load_config
from proxy.urls import normalize_prefix
from support.http import read_response, read_until_eof, request_bytes
from support.logs import watch_logs
from support.parkway import TEST_CREDENTIAL, RunningParkway, make_config, run_parkway
from support.processes import ProcessGroup, free_port
from support.signing import SECRET, UPSTREAM_KEY, sign
from support.upstream import Upstream


@pytest.fixture(params=["h11", "httptools"])
async def parkway(start_parkway, request):
    """Every test here runs with both request-head parsers (proxy.http.parsers)."""
    return await start_parkway(http=request.param)


pytestmark = pytest.mark.usefixtures("hang_guard")

Start = Callable[..., Awaitable[RunningParkway]]


async def raw_exchange(port: int, data: bytes, *, close_within: float = 3.0) -> tuple[dict, bool, dict]:
    """Send ``data`` on a new connection; the JSON error, whether Parkway closed within
    ``close_within`` seconds, the headers."""
    with trio.fail_after(close_within + 2):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(data)
            response, closed = await read_response(stream, close_within=close_within)
    return {"status": response.status, **response.json()}, closed, response.headers


def assert_nothing_forwarded(upstream: Upstream) -> None:
    assert upstream.requests == []
    assert upstream.connections == 0


def with_params(url: str, **replace: str) -> str:
    """``url`` with some query parameters replaced by raw values (the signature no longer matters:
    every refusal here comes before the signature is checked)."""
    parts = urlsplit(url)
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    params.update(replace)
    return parts._replace(query=urlencode(params)).geturl()


# --- item 2: a Connection header cannot strip a signed or injected header --------------------------

SIGNED_HEADERS = {"X-Model": "small", "Content-Type": "application/json"}
CONNECTIONS = {
    "as reported": [("Connection", "keep-alive, x-model, content-type")],
    "one of them": [("Connection", "X-Model")],
    "upper case, odd spacing": [("Connection", "keep-alive ,\tCONTENT-TYPE")],
    "repeated Connection headers": [("Connection", "keep-alive"), ("connection", "x-model")],
    "the injected header": [("Connection", "authorization")],
}


@pytest.mark.parametrize("connection", CONNECTIONS.values(), ids=CONNECTIONS.keys())
async def test_connection_naming_a_signed_or_injected_header_is_refused(
    upstream: Upstream, parkway: RunningParkway, connection: list[tuple[str, str]]
) -> None:
    body = '{"model":"small"}'
    url = parkway.sign(f"{upstream.base}/v1/chat", method="POST", headers=SIGNED_HEADERS, body=body)
    request = request_bytes("POST", url, body.encode(), headers=[*SIGNED_HEADERS.items(), *connection])
    error, _closed, _ = await raw_exchange(parkway.port, request, close_within=0)
    assert error["status"] == 400 and error["error"]["code"] == "signed_header_in_connection"
    assert_nothing_forwarded(upstream)


async def test_connection_naming_other_headers_still_forwards_the_signed_ones(
    upstream: Upstream, parkway: RunningParkway
) -> None:
    body = '{"model":"small"}'
    url = parkway.sign(f"{upstream.base}/v1/chat", method="POST", headers=SIGNED_HEADERS, body=body)
    request = request_bytes(
        "POST",
        url,
        body.encode(),
        headers=[*SIGNED_HEADERS.items(), ("Connection", "keep-alive, x-hop"), ("X-Hop", "1")],
    )
    with trio.fail_after(5):
        async with await trio.open_tcp_stream("127.0.0.1", parkway.port) as stream:
            await stream.send_all(request)
            response, _ = await read_response(stream, close_within=0)
    assert response.status == 200
    (seen,) = upstream.requests
    assert seen.headers["x-model"] == "small" and seen.headers["content-type"] == "application/json"
    assert seen.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert "x-hop" not in seen.headers


# --- item 3: command-line flags survive every reload --------------------------------------------------

FILE_TOML = """
[server]
listen = ["127.0.0.1:{file_port}"]
upstream_first_byte_timeout = 5
drain_timeout = 1

[admin]
listen = ["127.0.0.1:{file_admin}"]

[log]
format = "json"

[[credentials]]
id = "app"
secret = "{secret}"
[credentials.headers]
Authorization = "Bearer {key}"
"""

FLAGS = {
    "--allow-private-upstreams": (["--allow-private-upstreams"], lambda c: c.server.allow_private_upstreams is True),
    "--listen": (["--listen", "127.0.0.1:0"], lambda c: c.server.listen == ("127.0.0.1:0",)),
    "--listen twice": (
        ["--listen", "127.0.0.1:0", "--listen", "[::1]:0"],
        lambda c: c.server.listen == ("127.0.0.1:0", "[::1]:0"),
    ),
    "--admin": (["--admin", "127.0.0.1:0"], lambda c: c.admin.listen == ("127.0.0.1:0",)),
    "--log-format": (["--log-format", "console"], lambda c: c.log.format == "console"),
}


def write_file_config(path: Path, *, file_port: int = 1, file_admin: int = 2, secret: str = SECRET) -> Path:
    path.write_text(FILE_TOML.format(file_port=file_port, file_admin=file_admin, secret=secret, key=UPSTREAM_KEY))
    return path


@pytest.mark.parametrize("flags, holds", FLAGS.values(), ids=FLAGS.keys())
async def test_every_serve_flag_survives_a_reload(tmp_path: Path, flags: list[str], holds) -> None:
    path = write_file_config(tmp_path / "parkway.toml")
    parser = build_parser()
    args = parser.parse_args(["serve", "--config", str(path), *flags])
    config, overrides = serve_config(args, parser)
    assert holds(config)
    assert not holds(load_config(path))  # the flag is what made the difference
    parkway = Parkway(config, config_path=path, overrides=overrides)
    with watch_logs() as logs:
        assert parkway.reload() == []
    assert holds(parkway.config) and parkway.config == config
    assert not logs.find(event="config_reload_needs_restart")


@pytest.mark.parametrize("flags, holds", FLAGS.values(), ids=FLAGS.keys())
async def test_flags_apply_to_what_a_reload_changes(tmp_path: Path, flags: list[str], holds) -> None:
    path = write_file_config(tmp_path / "parkway.toml")
    parser = build_parser()
    config, overrides = serve_config(parser.parse_args(["serve", "--config", str(path), *flags]), parser)
    parkway = Parkway(config, config_path=path, overrides=overrides)
    write_file_config(path, secret="rotated")
    assert parkway.reload() == []
    assert parkway.config.credential("app").secrets == ("rotated",)  # the file's change is taken
    assert holds(parkway.config)  # and the flag still holds


@pytest.mark.parametrize(
    "flag",
    ["--header", "--access-control-allow-origin", "--access-control-allow-methods", "--access-control-allow-headers"],
)
async def test_signway_mode_flags_are_refused_with_a_config_file(tmp_path: Path, flag: str, capsys) -> None:
    # With --config they would be silently ignored (and then again at every reload).
    path = write_file_config(tmp_path / "parkway.toml")
    parser = build_parser()
    args = parser.parse_args(["serve", "--config", str(path), flag, "X-Title: app" if flag == "--header" else "*"])
    with pytest.raises(SystemExit) as exited:
        serve_config(args, parser)
    assert exited.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags",
    [
        ["--header", "X-Title: app"],
        ["--access-control-allow-origin", "https://app.example"],
        ["--log-format", "console"],
        ["--allow-private-upstreams"],
        ["--admin", "127.0.0.1:0"],
        ["--listen", "127.0.0.1:0"],
    ],
)
async def test_signway_mode_flags_survive_a_reload_request(flags: list[str]) -> None:
    parser = build_parser()
    config, overrides = serve_config(parser.parse_args(["serve", "app", SECRET, *flags]), parser)
    parkway = Parkway(config, overrides=overrides)
    assert parkway.reload() != []  # no file: the reload is refused and nothing changes
    assert parkway.config == config


async def test_allow_private_upstreams_survives_sighup_and_post_reload(
    processes: ProcessGroup, upstream: Upstream, tmp_path: Path
) -> None:
    """The reported case, as an operator runs it: a process, SIGHUP, then POST /reload."""
    port, admin_port = free_port(), free_port()
    path = write_file_config(tmp_path / "parkway.toml", file_port=free_port(), file_admin=free_port())
    running = await processes.spawn(
        path,
        port,
        "--allow-private-upstreams",
        "--listen",
        f"127.0.0.1:{port}",
        "--admin",
        f"127.0.0.1:{admin_port}",
        admin_port=admin_port,
    )
    await running.logs.wait_for(event="startup", timeout=10)

    async with httpx.AsyncClient(trust_env=False, timeout=5) as client:

        async def status() -> int:
            response = await client.get(sign(running.base, f"{upstream.base}/v1/models", secret=SECRET))
            return response.status_code

        assert await status() == 200
        running.signal(signal.SIGHUP)
        await running.logs.wait_for(event="config_reloaded")
        assert await status() == 200
        reload = await client.post(f"http://127.0.0.1:{admin_port}/reload")
        assert reload.status_code == 200, reload.text
        await running.logs.wait_for(2, event="config_reloaded")
        assert await status() == 200
    assert not running.logs.find(event="config_reload_needs_restart")
    assert len(upstream.requests) == 3
    running.signal(signal.SIGTERM)
    assert await running.wait_exit() == 0


# --- item 4: every request gets an answer -------------------------------------------------------------


@pytest.mark.parametrize("date", ["00010101T000000Z", "99991231T235959Z", "00000101T000000Z"])
async def test_calendar_edge_dates_get_a_json_refusal(
    upstream: Upstream, parkway: RunningParkway, client: httpx.AsyncClient, date: str
) -> None:
    url = with_params(parkway.sign(f"{upstream.base}/v1/models"), **{"X-Sw-Date": date})
    response = await client.get(url)
    assert response.status_code in (400, 403), response.text
    assert response.json()["error"]["code"] in ("expired", "date_in_future", "malformed_signed_url")
    assert_nothing_forwarded(upstream)


@pytest.mark.parametrize("host", ["0177.0.0.1", "127.0.0.01", "010.0.0.1", "0x7f.0.0.1", "127.1", "2130706433"])
async def test_ambiguous_ipv4_upstreams_get_a_json_refusal(
    upstream: Upstream, parkway: RunningParkway, client: httpx.AsyncClient, host: str
) -> None:
    response = await client.get(parkway.sign(f"http://{host}:{upstream.port}/v1/models"))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "malformed_signed_url" and "X-Sw-Proxy" in error["message"]
    assert_nothing_forwarded(upstream)


def broken_clock() -> datetime:
    raise RuntimeError("a bug in the request path")


async def test_a_bug_in_the_request_path_is_a_500_with_a_logged_traceback(
    nursery: trio.Nursery, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    running = await run_parkway(nursery, Parkway(make_config(), clock=broken_clock))
    try:
        with watch_logs() as logs:
            response = await client.get(running.sign(f"{upstream.base}/v1/models"))
            assert response.status_code == 500
            assert response.json()["error"]["code"] == "internal_error"
            assert "RuntimeError" not in response.text and "bug" not in response.text
            assert response.headers["connection"] == "close"
            request_id = response.headers["x-request-id"]
            failed = [e for e in logs.entries if e.get("exc_info")]
            assert failed and failed[0]["request_id"] == request_id
            (line,) = logs.find(event="request", request_id=request_id)
            assert line["status"] == 500 and line["outcome"] == "internal_error"
        # The server lives on: the next connection is served.
        again = await client.get(running.sign(f"{upstream.base}/v1/models"))
        assert again.status_code == 500
    finally:
        running.parkway.shutdown()
    assert_nothing_forwarded(upstream)


@pytest.mark.parametrize("started", [False, True], ids=["before the response", "after the head"])
async def test_a_bug_outside_the_gateway_costs_one_connection_and_is_logged(
    upstream: Upstream, parkway: RunningParkway, client: httpx.AsyncClient, monkeypatch, started: bool
) -> None:
    """The connection task's last resort: a 500 while nothing was sent, else a truncated stream;
    either way the traceback is logged and every other connection is untouched."""

    async def broken_handle(head, conn) -> None:
        if started:
            await conn.send_head(200, [(b"content-type", b"text/plain")])
            await conn.send_data(b"partial")
        raise RuntimeError("a bug in the application")

    monkeypatch.setattr(parkway.parkway.server.app, "handle", broken_handle)
    with watch_logs() as logs:
        request = request_bytes(
            "GET", parkway.sign(f"{upstream.base}/v1/models"), headers=[("connection", "keep-alive")]
        )
        with trio.fail_after(5):
            async with await trio.open_tcp_stream("127.0.0.1", parkway.port) as stream:
                await stream.send_all(request)
                raw = await read_until_eof(stream)
        (failed,) = logs.find(event="connection_failed")
        assert failed["exc_info"] is True and failed["client"] == "127.0.0.1"
    head, _, body = raw.partition(b"\r\n\r\n")
    if started:
        assert head.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding: chunked" in head.lower()
        assert body == b"7\r\npartial\r\n"  # no terminating chunk: the client sees the truncation
    else:
        assert head.startswith(b"HTTP/1.1 500 ") and b"connection: close" in head.lower()
        assert json.loads(body)["error"]["code"] == "internal_error"
        assert b"RuntimeError" not in raw
    monkeypatch.undo()
    assert (await client.get(parkway.sign(f"{upstream.base}/v1/models"))).status_code == 200


# --- item 5: Content-Length and Transfer-Encoding together from the client ------------------------------

CHUNKED_BODY = b"5\r\nhello\r\n0\r\n\r\n"
FRAMINGS = {
    "CL matching the de-chunked body, then TE": [b"Content-Length: 5", b"Transfer-Encoding: chunked"],
    "TE, then CL": [b"Transfer-Encoding: chunked", b"Content-Length: 5"],
    "CL shorter (the reported case)": [b"Content-Length: 3", b"Transfer-Encoding: chunked"],
    "CL longer": [b"Content-Length: 100", b"Transfer-Encoding: chunked"],
    "CL zero": [b"Content-Length: 0", b"Transfer-Encoding: chunked"],
    "CL equal to the chunked bytes": [b"Content-Length: 15", b"Transfer-Encoding: chunked"],
    "TE upper case": [b"Content-Length: 5", b"Transfer-Encoding: CHUNKED"],
    "TE padded": [b"Content-Length: 5", b"Transfer-Encoding:   chunked  "],
    "CL repeated, same value": [b"Content-Length: 5", b"Content-Length: 5", b"Transfer-Encoding: chunked"],
    "CL as a list": [b"Content-Length: 5, 5", b"Transfer-Encoding: chunked"],
    "two CL values": [b"Content-Length: 5", b"Content-Length: 6"],
    "TE repeated": [b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"],
    "TE not ending in chunked": [b"Transfer-Encoding: chunked, gzip"],
    "TE gzip then chunked": [b"Transfer-Encoding: gzip, chunked", b"Content-Length: 5"],
    "TE identity": [b"Transfer-Encoding: identity", b"Content-Length: 5"],
}


@pytest.mark.parametrize("framing", FRAMINGS.values(), ids=FRAMINGS.keys())
async def test_ambiguous_request_framing_is_refused_and_the_connection_closed(
    upstream: Upstream, parkway: RunningParkway, framing: list[bytes]
) -> None:
    url = urlsplit(parkway.sign(f"{upstream.base}/v1/chat", method="POST"))
    head = [f"POST {url.path}?{url.query} HTTP/1.1".encode(), f"Host: {url.netloc}".encode(), *framing]
    error, closed, headers = await raw_exchange(parkway.port, b"\r\n".join(head) + b"\r\n\r\n" + CHUNKED_BODY)
    assert error["status"] == 400 and error["error"]["code"] == "malformed_http"
    assert closed and headers.get("connection") == "close"
    assert_nothing_forwarded(upstream)


# --- item 6: ASCII digits only in X-Sw-Date and X-Sw-Expires ---------------------------------------------


@pytest.mark.parametrize(
    "param, value",
    [
        ("X-Sw-Date", "2026112\u0669T120000Z"),
        ("X-Sw-Date", "\uff12\uff10\uff12\uff16" + "1129T120000Z"),
        ("X-Sw-Date", "20261129T12000\U0001d7ceZ"),
        ("X-Sw-Expires", "6\u0660"),
        ("X-Sw-Expires", "\u00b2"),
    ],
)
async def test_non_ascii_digits_in_date_and_expires_are_refused(
    upstream: Upstream, parkway: RunningParkway, client: httpx.AsyncClient, param: str, value: str
) -> None:
    response = await client.get(with_params(parkway.sign(f"{upstream.base}/v1/models"), **{param: value}))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "malformed_signed_url" and param in error["message"]
    assert_nothing_forwarded(upstream)


# --- item 7: encoded separators and dots in a prefix-checked path -----------------------------------------

AMBIGUOUS = [
    "/v1/..%2F..%2Fadmin",
    "/v1/..%2f..%2fadmin",
    "/v1/..%5Cadmin",
    "/v1/%2E%2E%2Fadmin",
    "/v1/..%252F..%252Fadmin",
    "/v1/%252e%252e/admin",
    "/v1/..%25252Fadmin",
]


@pytest.mark.parametrize("path", AMBIGUOUS)
@pytest.mark.parametrize("restriction", ["allowed_upstreams", "allowed_paths"])
async def test_ambiguous_paths_under_a_prefix_are_refused(
    upstream: Upstream, start_parkway: Start, client: httpx.AsyncClient, path: str, restriction: str
) -> None:
    rule = (normalize_prefix(f"{upstream.base}/v1/"),) if restriction == "allowed_upstreams" else ("/v1/",)
    credential = Credential("app", (SECRET,), TEST_CREDENTIAL.headers, **{restriction: rule})
    running = await start_parkway(credentials=(credential,))
    response = await client.get(running.sign(f"{upstream.base}{path}"))
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "ambiguous_path"
    assert_nothing_forwarded(upstream)
    # The same credential reaches a plain path under the prefix.
    assert (await client.get(running.sign(f"{upstream.base}/v1/models"))).status_code == 200


# --- item 8: the client's malformed header line is capped and escaped -------------------------------------

MALFORMED = {
    "control character": b"X-Bad\x01: v",
    "escape sequence": b"X-Bad\x1b[31m: v",
    "very long line without a colon": b"A" * 12000,
    "very long name with a control character": b"X-" + b"B" * 12000 + b"\x7f: v",
    "bytes beyond ASCII": b"X-Bad\xff\xfe\x00: v",
    "control character in a folded line": b"X-Title: a\r\n \x1b[2J",
    "NUL in a folded line": b"X-Title: a\r\n\t\x00b",
}


@pytest.mark.parametrize("line", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_header_line_is_echoed_capped_and_escaped(
    upstream: Upstream, parkway: RunningParkway, line: bytes
) -> None:
    url = urlsplit(parkway.sign(f"{upstream.base}/v1/models"))
    request = f"GET {url.path}?{url.query} HTTP/1.1\r\nHost: x\r\n".encode() + line + b"\r\n\r\n"
    with watch_logs() as logs:
        error, closed, _ = await raw_exchange(parkway.port, request)
    message = error["error"]["message"]
    assert error["status"] == 400 and error["error"]["code"] == "malformed_http"
    assert len(message) < 400 and message.isprintable() and "\x1b" not in message
    (logged,) = logs.find(event="request")
    assert logged["error"] == message
    assert closed
    assert_nothing_forwarded(upstream)


@pytest.mark.parametrize(
    "request_line",
    [
        b"GET /\x1b[31m HTTP/1.1",
        b"GET /" + b"a" * 12000 + b"\x00 HTTP/1.1",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    ],
    ids=["escape sequence", "very long target with NUL", "TLS hello on the plain port"],
)
async def test_malformed_request_line_is_echoed_capped_and_escaped(
    upstream: Upstream, parkway: RunningParkway, request_line: bytes
) -> None:
    error, closed, _ = await raw_exchange(parkway.port, request_line + b"\r\nHost: x\r\n\r\n")
    message = error["error"]["message"]
    assert error["status"] == 400 and error["error"]["code"] == "malformed_http"
    assert len(message) < 400 and message.isprintable()
    assert closed
    assert_nothing_forwarded(upstream)
