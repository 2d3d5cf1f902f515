"""Micro-costs of the per-request pieces, as the minimum over many timed loops (robust to a busy machine).

    python -m loadtest.micro [NAME ...]        e.g.  python -m loadtest.micro log query head

Each figure is µs per call: the best of ``--repeat`` loops of ``--number`` calls. Run it on two
checkouts (``PYTHONPATH=../base``) to compare a change; the whole-request figures are
``python -m loadtest run`` (interleaved, see docs/performance.md).
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Callable
from urllib.parse import urlsplit

SECRET = "micro-secret"
SDK_HEAD = (
    b"POST /?{query} HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAccept: application/json\r\n"
    b"Accept-Encoding: gzip, deflate\r\nConnection: keep-alive\r\nContent-Type: application/json\r\n"
    b"User-Agent: OpenAI/Python 1.54.0\r\nX-Stainless-Lang: python\r\nX-Stainless-Package-Version: 1.54.0\r\n"
    b"X-Stainless-OS: Linux\r\nX-Stainless-Arch: x64\r\nX-Stainless-Runtime: CPython\r\n"
    b"X-Stainless-Runtime-Version: 3.11.7\r\nX-Stainless-Async: false\r\nX-Stainless-Retry-Count: 0\r\n"
    b"Origin: https://app.example\r\nContent-Length: 61\r\n\r\n"
)


def signed_query() -> str:
    from proxy.signing import sign_url

    url = sign_url(
        id="micro",
        secret=SECRET,
        host="http://127.0.0.1:8080",
        proxy_url="http://127.0.0.1:9000/v1/chat/completions?small=1",
        method="POST",
        expiry=3600,
    )
    return urlsplit(url).query


def best(fn: Callable[[], object], number: int, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        times.append(time.perf_counter() - start)
    return min(times) / number * 1e6


def bench_log() -> Callable[[], object]:
    import structlog

    from proxy import logs

    logs.configure("info", "json", stream=io.StringIO())
    log = structlog.get_logger("parkway.request")
    structlog.contextvars.bind_contextvars(request_id="0123456789abcdef", credential="micro", user=None, job=None)
    fields = dict(
        method="POST",
        client="127.0.0.1",
        user=None,
        upstream_host="127.0.0.1:9000",
        upstream_path="/v1/chat/completions",
        status=200,
        bytes_in=900,
        bytes_out=300,
        ttfb_ms=0.4,
        duration_ms=0.6,
        outcome="ok",
    )
    return lambda: log.info("request", **fields)


def bench_log_request() -> Callable[[], object]:
    """A small request's whole log line: ``record.log_request`` from the record to the written line."""
    import structlog

    from proxy import logs
    from proxy.http.connection import RequestHead
    from proxy.record import RequestRecord, log_request

    logs.configure("info", "json", stream=io.StringIO())
    structlog.contextvars.bind_contextvars(request_id="0123456789abcdef", credential="micro", user=None, job=None)
    head = RequestHead("POST", "/", (), "1.1", "127.0.0.1")
    record = RequestRecord(
        0.0, 0, 0, credential="micro", status=200, ttfb=0.0004, duration=0.0006, bytes_in=900, bytes_out=300,
        upstream_host="127.0.0.1:9000", upstream_path="/v1/chat/completions",
    )  # fmt: skip
    return lambda: log_request(head, record)


def bench_request_fields() -> Callable[[], object]:
    """A request's bound log fields: its id (credential, user, job unset), the credential, the reset."""
    import structlog

    from proxy import logs

    fields = getattr(logs, "request_fields", None)
    if fields is None:  # before logs.RequestFields: structlog's bind and reset
        bind, reset = structlog.contextvars.bind_contextvars, structlog.contextvars.reset_contextvars

        def structlogs() -> None:
            tokens = bind(request_id="0123456789abcdef", credential=None, user=None, job=None)
            bind(credential="micro")
            reset(**tokens)

        return structlogs

    def direct() -> None:
        tokens = fields.bind("0123456789abcdef")
        fields.credential("micro")
        fields.reset(tokens)

    return direct


def bench_query() -> Callable[[], object]:
    from proxy.query import parse_query

    query = signed_query()
    return lambda: parse_query(query)


def bench_signed() -> Callable[[], object]:
    from proxy.verify import parse_signed_request

    query = signed_query()
    return lambda: parse_signed_request(query)


def bench_verify() -> Callable[[], object]:
    """The whole signature path of a request: parse, validity, verify (the gateway's steps 1, 3, 5)."""
    from datetime import UTC, datetime

    from proxy.verify import check_validity, parse_signed_request, verify_signature

    query = signed_query()
    now = datetime.now(UTC)

    def verify() -> None:
        signed = parse_signed_request(query)
        check_validity(signed, now, clock_skew=30, max_expiry=86400)
        verify_signature(signed, method="POST", secrets=(SECRET,), paths=("/", "/"), headers={}, body=None)

    return verify


def bench_header_map() -> Callable[[], object]:
    """The gateway's header map of an SDK-sized head, read as a plain request reads it."""
    import h11

    from proxy.gateway.plan import header_map
    from proxy.http.connection import RequestHead

    conn = h11.Connection(h11.SERVER)
    conn.receive_data(_sdk_head())
    event = conn.next_event()
    assert isinstance(event, h11.Request)
    head = RequestHead("POST", "/", tuple((bytes(n), bytes(v)) for n, v in event.headers), "1.1", "127.0.0.1")

    def read() -> object:
        headers = header_map(head)
        return headers.get("upgrade")

    return read


def bench_request_id() -> Callable[[], object]:
    from proxy.gateway import handler

    return getattr(handler, "new_request_id", None) or (lambda: handler._secrets.token_hex(8))  # type: ignore[attr-defined]


def bench_metrics() -> Callable[[], object]:
    from proxy.config import Config
    from proxy.metrics import Metrics
    from proxy.record import RequestRecord, count_request

    metrics, config = Metrics(), Config()
    record = RequestRecord(0.0, 0, 0, credential=None, status=200, ttfb=0.001, overhead=0.0002, duration=0.002)
    return lambda: count_request(metrics, config, record)


def bench_metrics_request() -> Callable[[], object]:
    """Every metric update of a small proxied request: the stream in flight, then ``count_request``
    with the GenAI histograms (a chat completion that named its model and reported usage)."""
    from proxy.config import Config
    from proxy.metrics import Metrics
    from proxy.record import RequestRecord, count_request
    from proxy.relay.usage import Usage

    metrics, config = Metrics(), Config()
    record = RequestRecord(
        0.0, 0, 0, credential="micro", status=200, ttfb=0.001, overhead=0.0002, duration=0.002, bytes_in=900,
        bytes_out=300, upstream_path="/v1/chat/completions", model="mock-gpt", first_chunk=0.0011,
        usage=Usage(12, 31, 43),
    )  # fmt: skip

    def request() -> None:
        metrics.in_flight += 1  # a plain count (proxy.metrics), as the forward step keeps it
        metrics.in_flight -= 1
        count_request(metrics, config, record)

    return request


def bench_forward_context() -> Callable[[], object]:
    from proxy.forwarding import forward_context

    return lambda: forward_context("127.0.0.1", {}, ())


def _sdk_head() -> bytes:
    return SDK_HEAD.replace(b"{query}", signed_query().encode())


def bench_head_h11() -> Callable[[], object]:
    """What reading a request head costs with h11 (a fresh connection: receive, next_event)."""
    import h11

    data = _sdk_head()

    def parse() -> object:
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(data)
        return conn.next_event()

    return parse


def bench_head_httptools() -> Callable[[], object]:
    """The same with httptools: llhttp on the head, h11's checks and framing decision written out
    (proxy.http.parsers, proxy.http.framing), as proxy.http.httptools_impl reads a head."""
    from proxy.http import framing, parsers

    data = _sdk_head()

    def parse() -> object:
        head = parsers.parse_request_head(data)
        return framing.request_framing(head.method, head.target, head.http_version, head.headers)

    return parse


_BODY = b'{"model":"m","messages":[{"role":"user","content":"hi there"}]}'[:61]
_RESPONSE_HEADERS = [
    (b"content-type", b"application/json"),
    (b"date", b"Mon, 07 Dec 2026 03:00:00 GMT"),
    (b"x-request-id", b"0123456789abcdef"),
    (b"content-length", b"61"),
]


def bench_exchange_h11() -> Callable[[], object]:
    """One keep-alive exchange on the client side with h11 (proxy.http.h11_impl): the signed head
    and a 61-byte body read, a 4-header response with its body written, the next cycle started."""
    import h11

    data = _sdk_head() + _BODY
    conn = h11.Connection(h11.SERVER)

    def exchange() -> object:
        conn.receive_data(data)
        conn.next_event()  # Request
        conn.next_event()  # Data
        conn.next_event()  # EndOfMessage
        out = conn.send(h11.Response(status_code=200, headers=_RESPONSE_HEADERS, reason=b"OK"))
        out += conn.send(h11.Data(data=_BODY)) + conn.send(h11.EndOfMessage())  # type: ignore[operator]
        conn.start_next_cycle()
        return out

    return exchange


def bench_exchange_httptools() -> Callable[[], object]:
    """The same exchange as proxy.http.httptools_impl does it: llhttp on the head, the body counted
    out of the buffer, the response written by proxy.http.framing."""
    from proxy.http import framing, parsers

    data = _sdk_head() + _BODY

    def exchange() -> object:
        buffer = bytearray(data)
        end = parsers.head_end(buffer)
        head = parsers.parse_request_head(bytes(buffer[:end]))
        del buffer[:end]
        request, _ = framing.request_framing(head.method, head.target, head.http_version, head.headers)
        body = bytes(buffer[: request.length])
        del buffer[: request.length]
        start = framing.response_head(
            200, b"OK", _RESPONSE_HEADERS, request_method=head.method, client_version=head.http_version,
            keep_alive=request.keep_alive,
        )  # fmt: skip
        return start.head + body

    return exchange


# One proxied exchange on the upstream face: what Parkway sends for a small signed POST (the
# client's headers after policy, the credential's key) and an OpenAI-like small answer.
UPSTREAM_REQUEST = [
    (b"host", b"127.0.0.1:9000"), (b"accept", b"application/json"), (b"accept-encoding", b"gzip, deflate"),
    (b"content-type", b"application/json"), (b"user-agent", b"OpenAI/Python 1.54.0"),
    (b"x-stainless-lang", b"python"), (b"x-stainless-package-version", b"1.54.0"),
    (b"authorization", b"Bearer sk-micro-0123456789abcdefghijklmnopqrstuvwxyz"), (b"content-length", b"61"),
]  # fmt: skip
UPSTREAM_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nDate: Mon, 07 Dec 2026 03:00:00 GMT\r\nContent-Type: application/json\r\n"
    b"Content-Length: 27\r\nConnection: keep-alive\r\nopenai-processing-ms: 412\r\n"
    b"x-request-id: req_0123456789abcdef\r\nstrict-transport-security: max-age=31536000\r\n"
    b"cache-control: no-cache, must-revalidate\r\n\r\n"
)


def _upstream_exchange(parser: str) -> Callable[[], object]:
    """A request head and body written and the answer's head and body read, on a pooled
    connection (proxy.upstream.wire's interface), as one proxied small request costs."""
    from proxy.upstream.connection import new_http

    http = new_http(parser)
    body, answer = b"x" * 61, b'{"id":"c1","choices":[],"n":1}'[:27]

    def exchange() -> object:
        out = http.request("POST", b"/v1/chat/completions?small=1", UPSTREAM_REQUEST) + http.data(body) + http.end()
        head = http.read_head(UPSTREAM_RESPONSE)
        pieces: list[bytes] = []
        http.deframe(answer, pieces)
        assert http.reusable()
        http.start_next_cycle()
        return out, head

    return exchange


def bench_upstream_h11() -> Callable[[], object]:
    """The upstream face on h11 (proxy.upstream.h11_impl)."""
    return _upstream_exchange("h11")


def bench_upstream_httptools() -> Callable[[], object]:
    """The upstream face's fast implementation (proxy.upstream.httptools_impl)."""
    import httptools  # noqa: F401  (unavailable without it)

    return _upstream_exchange("httptools")


BENCHES: dict[str, Callable[[], Callable[[], object]]] = {
    "log": bench_log,
    "log_request": bench_log_request,
    "request_fields": bench_request_fields,
    "query": bench_query,
    "signed": bench_signed,
    "verify": bench_verify,
    "header_map": bench_header_map,
    "request_id": bench_request_id,
    "metrics": bench_metrics,
    "metrics_request": bench_metrics_request,
    "forward_context": bench_forward_context,
    "head_h11": bench_head_h11,
    "head_httptools": bench_head_httptools,
    "exchange_h11": bench_exchange_h11,
    "exchange_httptools": bench_exchange_httptools,
    "upstream_h11": bench_upstream_h11,
    "upstream_httptools": bench_upstream_httptools,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"any of {', '.join(BENCHES)} (default: all)")
    parser.add_argument("--number", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args(argv)
    for name in args.names or list(BENCHES):
        try:
            fn = BENCHES[name]()
        except (ImportError, AttributeError) as exc:
            print(f"{name:>16}  unavailable ({exc})")
            continue
        print(f"{name:>16}  {best(fn, args.number, args.repeat):8.2f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
