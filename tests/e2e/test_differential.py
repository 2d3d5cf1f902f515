"""Parkway against nginx, side by side, over every way an upstream can answer (issue 18).

Each of :data:`BEHAVIOURS` is a scripted upstream (``tests/support/differential.py``) on a
loopback port of its own; each of the client shapes (GET, HEAD, POST with a length, POST
chunked, HTTP/1.0, two requests on one connection, a pipelined follow-up, a signed-body POST)
is played against it through four proxies started once for the module: ``parkway serve`` on
the epoll relay driver with each client-side parser (h11, the reference, and httptools), on the
portable driver with httptools (each a process of its own), and a real nginx configured as a
streaming reverse proxy. All cases run concurrently in bounded batches before the first test;
each test is one (behaviour, shape) and asserts, for that case:

* Parkway (every driver and parser) gives the client what RFC 9110/9112 require of a proxy: the
  upstream's answer complete and correctly framed, or a clean 502/504 (or the upstream's head
  cut short when it failed mid-body) -- never a hang, never a body on a HEAD answer, 1xx
  forwarded to HTTP/1.1 clients only, a POST sent upstream at most once;
* both drivers and both parsers answer identically;
* a difference from nginx is classified: ``same``, a documented ``deviation`` (listed with its
  reason in docs/proxying.md), nginx's own limits or choices (``nginx_differs``), or nginx
  breaking the RFC (``nginx_wrong``, which the case then names and asserts the RFC for Parkway).

``PARKWAY_DIFF_REPORT=path`` writes every case's outcome and violations on all three targets as
JSON (how harms are counted before and after a fix); ``PARKWAY_DIFF_ONLY=text`` runs only the
behaviours whose id contains ``text`` (the other cases are skipped).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import trio

from support.differential import (
    BIG_BODY,
    SHAPES,
    SMALL_BODY,
    Ask,
    Behaviour,
    BehaviourServer,
    CaseRun,
    Expect,
    Received,
    Shape,
    expected,
    request_bytes,
    run_shape,
    same_answers,
    violations,
)
from support.nginx import nginx_conf, serve_nginx
from support.processes import ROOT, free_port, stop_process, wait_listening
from support.signing import SECRET, sign

TIMEOUT = 4.0  # Parkway's upstream_first_byte_timeout and nginx's proxy_read_timeout
IDLE = 7.0  # Parkway's upstream_idle_timeout: longer than PROMPT, so waiting for it shows as a hang
PROMPT = 5.0  # a client that receives nothing for this long while the upstream has said all: "hang"
SLOW = IDLE + PROMPT  # the bound of a case that ends by the proxy's own timeout
CONCURRENCY = 32  # cases (one shape of one behaviour through one target) in flight at once
# Each Parkway: (relay driver, client-side parser); "epoll" (h11) is the one compared with nginx.
PARKWAYS = {"epoll": ("epoll", "h11"), "httptools": ("epoll", "httptools"), "portable": ("portable", "httptools")}
TARGETS = (*PARKWAYS, "nginx")
TAGS = {"epoll": "E", "httptools": "H", "portable": "P", "nginx": "N"}
DOC = ROOT / "docs" / "proxying.md"


# --- building upstream answers -----------------------------------------------------------------


def resp(
    status: int = 200,
    body: bytes = b"hello",
    *,
    reason: bytes = b"OK",
    headers: tuple[bytes, ...] = (),
    framing: str = "length",
    version: bytes = b"1.1",
    interim: tuple[bytes, ...] = (),
    chunks: tuple[bytes, ...] | None = None,
    trailers: bytes = b"",
) -> bytes:
    """A raw response: ``framing`` is length, chunked (``chunks`` verbatim if given), or close."""
    lines = [b"HTTP/%s %d %s" % (version, status, reason), *headers]
    if framing == "length":
        lines.append(b"Content-Length: %d" % len(body))
    elif framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
        if chunks is None:
            chunks = tuple(b"%x\r\n%s\r\n" % (len(body[i : i + 7]), body[i : i + 7]) for i in range(0, len(body), 7))
        body = b"".join(chunks) + b"0\r\n" + trailers + b"\r\n"
    head = b"".join(interim) + b"\r\n".join(lines) + b"\r\n\r\n"
    return head + body


def info(status: int, *headers: bytes) -> bytes:
    return b"HTTP/1.1 %d Info\r\n" % status + b"".join(h + b"\r\n" for h in headers) + b"\r\n"


B = Behaviour
HELLO = b"hello"
TEXT = b"The quick brown fox jumps over the lazy dog. " * 3
OK0 = resp(body=b"")
BINARY = bytes(range(256)) * 4
HARM1 = "harm 1: an empty body on a kept-alive upstream connection never ends"
HARM2 = "harm 2: an error for a HEAD request drops the connection with no answer"
HARM3 = "harm 3: chunk extensions with whitespace are refused"
HARM4 = "harm 4: a POST is sent to the upstream twice"
HARM5 = "harm 5: an early answer is lost"
NGINX_1XX = "takes a 1xx for the final answer and relays the real one as its body (RFC 9110 §15.2)"
NGINX_NO_ANSWER = "closes the client connection with no answer at all when the framing breaks before the head went out"
NGINX_09 = "relays a status line that is not HTTP/1.x as if it were the answer (RFC 9112 §4: a 502)"
NGINX_HEAD_LIMIT = "limits an upstream head to proxy_buffer_size (one memory page): a 502 beyond it"
NGINX_POOL = "which request meets a reused upstream connection is each proxy's own pool timing"
NGINX_RESET_RACE = (
    "an upstream that closes with the request body unread resets the connection (RFC 9112 §9.6): whether a "
    "proxy reads the early answer before the reset is timing, and nginx sometimes answers 502"
)


def _behaviours() -> list[Behaviour]:
    out: list[Behaviour] = []
    add = out.append

    # Every status class with a small fixed-length body, kept alive.
    for status, reason in [
        (200, b"OK"), (201, b"Created"), (202, b"Accepted"), (203, b"Non-Authoritative"), (206, b"Partial"),
        (226, b"IM Used"), (299, b"Unknown 2xx"), (300, b"Multiple"), (301, b"Moved"), (302, b"Found"),
        (303, b"See Other"), (307, b"Temporary"), (308, b"Permanent"), (399, b"Unknown 3xx"), (400, b"Bad"),
        (401, b"Unauthorized"), (403, b"Forbidden"), (404, b"Not Found"), (405, b"Method"), (409, b"Conflict"),
        (410, b"Gone"), (413, b"Too Large"), (418, b"Teapot"), (422, b"Unprocessable"), (429, b"Too Many"),
        (499, b"Unknown 4xx"), (500, b"Internal"), (501, b"Not Implemented"), (502, b"Bad Gateway"),
        (503, b"Unavailable"), (504, b"Gateway Timeout"), (599, b"Unknown 5xx"),
    ]:  # fmt: skip
        add(B(f"status {status}", resp(status, TEXT, reason=reason)))

    # Content-Length: 0 on a kept-alive connection, every class (harm 1).
    for status in (200, 201, 202, 205, 302, 401, 404, 500, 503):
        add(B(f"status {status} Content-Length 0 kept alive", resp(status, b""), harm=HARM1))
    add(B("Content-Length 0, Connection: close, socket left open",
          resp(body=b"", headers=(b"Connection: close",)), harm=HARM1))  # fmt: skip
    add(B("Content-Length 0, Connection: close, then closed", resp(body=b"", headers=(b"Connection: close",)),
          then="close"))  # fmt: skip
    add(B("Content-Length 0 then reset", OK0, then="reset", either=Expect(None)))
    add(B("Content-Length 0 in many writes", OK0, writes=6, harm=HARM1))

    # 204, 205 and 304, with and without a stray body.
    add(B("204 no body", resp(204, b"", framing="none")))
    add(B("204 with a stray body", resp(204, b"", framing="none") + HELLO))
    add(B("204 with Content-Length 5 and 5 stray bytes", resp(204, b"", headers=(b"Content-Length: 5",),
          framing="none") + HELLO))  # fmt: skip
    add(B("204 then close", resp(204, b"", framing="none"), then="close"))
    add(B("205 with Content-Length 0", resp(205, b"")))
    add(B("205 with Content-Length 0 and a stray body", resp(205, b"") + HELLO))
    add(B("205 without a length, then close", resp(205, b"", framing="none"), then="close"))
    add(B("304 no body", resp(304, b"", framing="none", headers=(b'ETag: "v1"',))))
    add(B("304 with Content-Length of the 200", resp(304, b"", framing="none", headers=(b"Content-Length: 100",))))
    add(B("304 with a stray body", resp(304, b"", framing="none") + HELLO))
    add(B("304 with a stray chunked body", resp(304, b"", framing="none", headers=(b"Transfer-Encoding: chunked",))
          + b"5\r\nhello\r\n0\r\n\r\n"))  # fmt: skip

    # 1xx before the final answer (nginx 1.22 takes a 1xx for the final answer: see NGINX_1XX).
    one = {"nginx_wrong": NGINX_1XX}
    add(B("100 Continue then 200", info(100) + resp(body=TEXT), deviation="unasked-100-dropped", **one))
    add(B("100 Continue then 200 Content-Length 0", info(100) + OK0, harm=HARM1, deviation="unasked-100-dropped",
          **one))  # fmt: skip
    add(B("102 Processing then 200", info(102) + resp(body=TEXT), **one))
    add(B("103 Early Hints then 200", info(103, b"Link: </s.css>; rel=preload") + resp(body=TEXT), **one))
    add(B("two 103 then 200", info(103, b"Link: </a>") + info(103, b"Link: </b>") + resp(body=TEXT), **one))
    add(B("100, 102, 103 then 200", info(100) + info(102) + info(103) + resp(body=TEXT),
          deviation="unasked-100-dropped", **one))  # fmt: skip
    add(B("103 then 204", info(103) + resp(204, b"", framing="none"), **one))
    add(B("103 then chunked", info(103) + resp(body=TEXT, framing="chunked"), **one))
    add(B("103 then 404", info(103) + resp(404, TEXT), **one))
    add(B("199 unknown 1xx then 200", info(199) + resp(body=TEXT), **one))
    add(B("103 then close", info(103), then="close", **one))
    add(B("103 then silence", info(103), then="silent", **one))
    add(B("103 split from its 200", info(103) + resp(body=TEXT), split_at=(len(info(103)),), **one))
    add(B("103, pause, 200", info(103) + resp(body=TEXT), pause=(len(info(103)), 0.3), **one))
    add(B("101 not asked for", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: foo\r\nConnection: upgrade\r\n\r\n",
          then="close", nginx_wrong="relays a 101 nobody asked for, then the raw bytes (RFC 9110 §15.2.2)"))  # fmt: skip

    # Content-Length 1, around the held-head size, large.
    add(B("Content-Length 1", resp(body=b"x")))
    for size in (16383, 16384, 16385, 65536, 1 << 20):
        add(B(f"Content-Length {size}", resp(body=bytes(range(256)) * (size // 256) + b"z" * (size % 256))))
    add(B("2 MiB fixed length, then close", resp(body=b"L" * (2 << 20)), then="close"))
    add(B("binary body", resp(body=BINARY, headers=(b"Content-Type: application/octet-stream",))))
    add(B("gzip body passed as is", resp(body=b"\x1f\x8b\x08\x00" + BINARY[:64],
          headers=(b"Content-Encoding: gzip",)), present=(b"content-encoding",)))  # fmt: skip
    add(B("identical duplicate Content-Length", resp(body=HELLO, headers=(b"Content-Length: 5",))))
    add(B("Content-Length list 5, 5", b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello",
          nginx_wrong="passes the list on and frames the answer wrongly (RFC 9112 §6.3 item 5)"))  # fmt: skip
    bad_length = {"nginx_wrong": "relays an answer whose Content-Length is invalid (RFC 9112 §6.3 item 5: an error)"}
    add(B("conflicting Content-Length", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
          **bad_length))  # fmt: skip
    add(B("Content-Length +5", b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello", **bad_length))
    add(B("Content-Length -1", b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nhello", then="close", **bad_length))
    add(B("Content-Length not a number", b"HTTP/1.1 200 OK\r\nContent-Length: five\r\n\r\nhello", then="close",
          **bad_length))  # fmt: skip
    add(B("body longer than Content-Length", resp(body=HELLO) + b"EXTRA"))
    add(B("body shorter than Content-Length, then close", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello",
          then="close"))  # fmt: skip
    add(B("body shorter than Content-Length, then silence", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello",
          then="silent"))  # fmt: skip
    add(B("body shorter than Content-Length, then reset", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello",
          then="reset"))  # fmt: skip

    # Chunked: plain, extensions (with BWS), trailers, odd sizes.
    add(B("chunked", resp(body=TEXT, framing="chunked")))
    add(B("chunked empty body", resp(body=b"", framing="chunked")))
    add(
        B("chunked one byte chunks", resp(body=TEXT, framing="chunked", chunks=tuple(b"1\r\n%c\r\n" % c for c in TEXT)))
    )
    add(B("chunked 1 MiB chunk", resp(body=b"C" * (1 << 20), framing="chunked",
          chunks=(b"100000\r\n" + b"C" * (1 << 20) + b"\r\n",))))  # fmt: skip
    add(B("chunked upper-case hex", resp(body=b"x" * 26, framing="chunked", chunks=(b"1A\r\n" + b"x" * 26 + b"\r\n",))))
    add(B("chunked leading zeros", resp(body=HELLO, framing="chunked", chunks=(b"0005\r\nhello\r\n",))))
    add(B("chunked extension", resp(body=HELLO, framing="chunked", chunks=(b"5;foo=bar\r\nhello\r\n",))))
    add(B("chunked extension quoted", resp(body=HELLO, framing="chunked", chunks=(b'5;foo="b a r"\r\nhello\r\n',))))
    add(B("chunked extension without value", resp(body=HELLO, framing="chunked", chunks=(b"5;foo\r\nhello\r\n",))))
    add(B("chunked several extensions", resp(body=HELLO, framing="chunked", chunks=(b"5;a=1;b=2\r\nhello\r\n",))))
    for name, line in [("space", b"5 ;foo=bar"), ("tab", b"5\t;foo=bar"), ("spaces around =", b"5 ; foo = bar"),
                       ("space after ;", b"5; foo=bar")]:  # fmt: skip
        add(B(f"chunked extension with BWS ({name})", resp(body=HELLO, framing="chunked",
              chunks=(line + b"\r\nhello\r\n",)), expect=Expect(200, HELLO), harm=HARM3))  # fmt: skip
    add(B("chunked extension on the last chunk", resp(body=HELLO, framing="chunked", chunks=(b"5\r\nhello\r\n",))
          .replace(b"0\r\n\r\n", b"0;end=1\r\n\r\n")))  # fmt: skip
    add(B("chunked bare CR in an extension", resp(body=HELLO, framing="chunked", chunks=(b"5;a=b\rc\r\nhello\r\n",)),
          either=Expect(None, head=200), nginx_wrong=NGINX_NO_ANSWER))  # fmt: skip
    add(B("chunked trailing space on the size", resp(body=HELLO, framing="chunked", chunks=(b"5 \r\nhello\r\n",))))
    add(B("chunked with a trailer", resp(body=TEXT, framing="chunked", trailers=b"X-Checksum: 42\r\n")))
    add(B("chunked with Set-Cookie trailer", resp(body=TEXT, framing="chunked", trailers=b"Set-Cookie: a=b\r\n"),
          absent=(b"set-cookie",)))  # fmt: skip
    add(B("chunked with a Trailer header", resp(body=TEXT, framing="chunked", headers=(b"Trailer: X-Sum",),
          trailers=b"X-Sum: 1\r\n")))  # fmt: skip
    add(B("chunked and Content-Length", resp(body=HELLO, framing="chunked", headers=(b"Content-Length: 5",))))
    add(B("chunked twice in Transfer-Encoding", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n"
          b"5\r\nhello\r\n0\r\n\r\n", either=Expect(200, HELLO),
          nginx_wrong="accepts chunked applied twice (RFC 9112 §6.1: a sender MUST NOT)"))  # fmt: skip
    add(B("Transfer-Encoding gzip, chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
          b"5\r\nhello\r\n0\r\n\r\n", either=Expect(200, HELLO), deviation="transfer-codings"))  # fmt: skip
    add(B("Transfer-Encoding chunked, gzip", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\nhello",
          then="close", nginx_wrong=NGINX_NO_ANSWER))  # fmt: skip
    bad_chunks = {"then": "close", "nginx_wrong": NGINX_NO_ANSWER}
    add(B("chunked invalid size", resp(body=HELLO, framing="chunked", chunks=(b"zz\r\nhello\r\n",)), **bad_chunks))
    add(B("chunked size overflow", resp(body=HELLO, framing="chunked", chunks=(b"fffffffffffffffff\r\nhello\r\n",)),
          **bad_chunks))  # fmt: skip
    add(B("chunked data longer than its size", resp(body=HELLO, framing="chunked", chunks=(b"3\r\nhello\r\n",)),
          **bad_chunks))  # fmt: skip
    add(B("chunked missing CRLF after data", resp(body=HELLO, framing="chunked", chunks=(b"5\r\nhelloX",)),
          **bad_chunks))  # fmt: skip
    add(B("chunked then close mid-chunk", resp(body=TEXT, framing="chunked")[:-20], then="close"))
    add(B("chunked then close before the last chunk", resp(body=HELLO, framing="chunked")[:-5], then="close"))
    add(B("chunked then close mid-trailers", resp(body=HELLO, framing="chunked", trailers=b"X-A: 1\r\n")[:-6],
          then="close"))  # fmt: skip
    add(B("chunked then silence mid-chunk", resp(body=TEXT, framing="chunked")[:-20], then="silent"))
    add(B("chunked then reset mid-chunk", resp(body=TEXT, framing="chunked")[:-20], then="reset"))
    add(B("chunked split every few bytes", resp(body=TEXT, framing="chunked"), writes=12))
    add(B("chunked pause between chunks", resp(body=TEXT, framing="chunked"), pause=(80, 0.3)))
    add(B("SSE stream", resp(body=b"data: one\n\ndata: two\n\ndata: [DONE]\n\n", framing="chunked",
          headers=(b"Content-Type: text/event-stream",)), writes=3))  # fmt: skip
    add(B("chunked then stray bytes", resp(body=HELLO, framing="chunked") + b"JUNK"))

    # Close-delimited bodies.
    add(B("close-delimited", resp(body=TEXT, framing="close", headers=(b"Connection: close",)), then="close"))
    add(B("close-delimited without Connection: close", resp(body=TEXT, framing="close"), then="close"))
    add(B("close-delimited empty", resp(body=b"", framing="close"), then="close"))
    add(B("close-delimited 1 MiB", resp(body=b"D" * (1 << 20), framing="close"), then="close"))
    add(B("close-delimited then reset", resp(body=TEXT, framing="close"), then="reset", either=Expect(None, head=200)))
    add(B("close-delimited in many writes", resp(body=TEXT, framing="close"), then="close", writes=10))
    add(B("close-delimited, close right after the head", resp(body=b"", framing="close"), then="close",
          split_at=(20,)))  # fmt: skip

    # HTTP/1.0 upstreams.
    add(B("HTTP/1.0 close-delimited", resp(body=TEXT, framing="close", version=b"1.0"), then="close"))
    add(B("HTTP/1.0 with length, then close", resp(body=TEXT, version=b"1.0"), then="close"))
    add(B("HTTP/1.0 keep-alive with length", resp(body=TEXT, version=b"1.0", headers=(b"Connection: keep-alive",))))
    add(B("HTTP/1.0 keep-alive Content-Length 0", resp(body=b"", version=b"1.0", headers=(b"Connection: keep-alive",)),
          harm=HARM1))  # fmt: skip
    add(B("HTTP/1.0 with length, socket left open", resp(body=TEXT, version=b"1.0")))
    add(B("HTTP/1.0 204", resp(204, b"", framing="none", version=b"1.0"), then="close"))
    add(B("HTTP/1.0 404 close-delimited", resp(404, TEXT, framing="close", version=b"1.0"), then="close"))

    # Keep-alive and close.
    add(B("Connection: close with length, then closed", resp(body=TEXT, headers=(b"Connection: close",)),
          then="close"))  # fmt: skip
    add(B("Connection: close with length, socket left open", resp(body=TEXT, headers=(b"Connection: close",))))
    add(B("Connection: keep-alive with length", resp(body=TEXT, headers=(b"Connection: keep-alive",))))
    add(B("Keep-Alive header", resp(body=TEXT, headers=(b"Keep-Alive: timeout=5",)), absent=(b"keep-alive",)))
    add(B("length, then close with a FIN at once", resp(body=TEXT), then="close"))
    add(B("length, then reset after the body", resp(body=TEXT), then="reset", either=Expect(None, head=200)))
    add(B("chunked, then close", resp(body=TEXT, framing="chunked"), then="close"))

    # The head split over many writes, odd line endings, pauses.
    add(B("head in 3 writes", resp(body=TEXT), writes=3))
    add(B("status line byte by byte", resp(body=HELLO), split_at=tuple(range(1, 16))))
    add(B("head split before its last CRLF", resp(body=TEXT), split_at=(len(resp(body=TEXT)) - len(TEXT) - 2,)))
    add(B("head and body in separate writes", resp(body=TEXT), split_at=(len(resp(body=TEXT)) - len(TEXT),)))
    add(B("bare LF line endings", b"HTTP/1.1 200 OK\nContent-Length: 5\n\nhello"))
    add(B("obsolete line folding", b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\nContent-Length: 5\r\n\r\nhello",
          either=Expect(None), nginx_differs="rejects obs-fold with a 502 where Parkway (h11) unfolds it; RFC 9112 §5.2 "
          "allows either"))  # fmt: skip
    add(B("status line without reason", b"HTTP/1.1 200 \r\nContent-Length: 5\r\n\r\nhello"))
    add(B("status line without reason or space", b"HTTP/1.1 200\r\nContent-Length: 5\r\n\r\nhello"))
    add(B("pause before the head", resp(body=TEXT), pause=(0, 0.4)))
    n_head = len(resp(body=TEXT)) - len(TEXT)
    add(B("pause between head and body", resp(body=TEXT), pause=(n_head, 1.0), head_first=True))
    add(B("pause between head and 4 KiB body", resp(body=b"p" * 4096), pause=(len(resp(body=b"p" * 4096)) - 4096, 1.0),
          head_first=True))  # fmt: skip
    add(B("pause mid-body", resp(body=TEXT), pause=(n_head + 10, 0.4)))
    add(B("pause mid-head", resp(body=TEXT), pause=(12, 0.4)))

    # The upstream closing, resetting or going silent early.
    add(B("close without answering", b"", then="close"))
    add(B("reset without answering", b"", then="reset"))
    add(B("silent", b"", then="silent"))
    add(B("close mid-status-line", b"HTTP/1.1 20", then="close"))
    add(B("close mid-head", b"HTTP/1.1 200 OK\r\nContent-Le", then="close"))
    add(B("close after status line", b"HTTP/1.1 200 OK\r\n", then="close"))
    add(B("silent mid-head", b"HTTP/1.1 200 OK\r\nContent-Le", then="silent"))
    add(B("close right after a head with length", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", then="close"))
    add(B("close right after a chunked head", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", then="close"))
    add(B("reset right after a head with length", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", then="reset"))
    add(B("silent right after a head with length", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", then="silent"))
    add(B("read the head only, then close", b"", then="close", read_body=False))

    # Oversized and duplicate headers.
    add(B("8 KiB header", resp(body=HELLO, headers=(b"X-Big: " + b"a" * 8192,)), nginx_differs=NGINX_HEAD_LIMIT))
    add(B("20 KiB header", resp(body=HELLO, headers=(b"X-Big: " + b"a" * 20480,)), nginx_differs=NGINX_HEAD_LIMIT))
    add(B("100 headers", resp(body=HELLO, headers=tuple(b"X-H%d: %d" % (i, i) for i in range(100)))))
    # Over Parkway's documented 64 KiB limit on an upstream head (h11 checks its limit only
    # while the head is incomplete, so it is no oracle here): a 502, however the head arrives.
    for size in (70, 130):
        add(B(f"{size} KiB head", resp(body=HELLO, headers=tuple(b"X-H%d: " % i + b"b" * 1000 for i in range(size))),
              expect=Expect(None)))  # fmt: skip
    add(B("duplicate custom headers", resp(body=HELLO, headers=(b"X-Dup: 1", b"X-Dup: 2")), present=(b"x-dup",)))
    add(B("several Set-Cookie", resp(body=HELLO, headers=(b"Set-Cookie: a=1", b"Set-Cookie: b=2")),
          absent=(b"set-cookie",)))  # fmt: skip
    add(B("header without a value", resp(body=HELLO, headers=(b"X-Empty:",))))
    add(B("header with a space before the colon", resp(body=HELLO, headers=(b"X-Bad : 1",)), then="close"))
    add(B("header line without a colon", resp(body=HELLO, headers=(b"NoColon",)), then="close",
          nginx_wrong="skips the line it cannot parse and relays the rest of an invalid head (RFC 9112 §5)"))  # fmt: skip
    add(B("header value with a bare CR", resp(body=HELLO, headers=(b"X-Cr: a\rb",)), then="close"))
    add(B("header named in Connection", resp(body=HELLO, headers=(b"Connection: X-Secret", b"X-Secret: 1")),
          absent=(b"x-secret",)))  # fmt: skip
    add(B("Upgrade header without 101", resp(body=HELLO, headers=(b"Upgrade: foo",)), absent=(b"upgrade",)))
    add(B("Proxy-Authenticate passes", resp(407, HELLO, headers=(b"Proxy-Authenticate: Basic",))))

    # Broken status lines.
    nine = {"harm": HARM2, "nginx_wrong": NGINX_09}
    add(B("not HTTP at all", b"HELLO THERE\r\n\r\n", then="close", **nine))
    add(B("not HTTP, socket left open", b"HELLO THERE\r\n\r\n", **nine))
    add(B("HTTP/0.9 style body", b"<html>hello</html>\n", then="close", **nine))
    add(B("status 1000", b"HTTP/1.1 1000 OK\r\nContent-Length: 0\r\n\r\n", then="close", **nine))
    add(B("status 099", b"HTTP/1.1 099 OK\r\nContent-Length: 0\r\n\r\n", then="close", **nine))
    add(B("HTTP/2.0 status line", b"HTTP/2.0 200 OK\r\nContent-Length: 5\r\n\r\nhello", then="close",
          either=Expect(None)))  # fmt: skip
    add(B("lower-case http", b"http/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", then="close", **nine))

    # Answers sent before the request body was read.
    e413 = resp(413, b'{"error":"too large"}', headers=(b"Connection: close",))
    add(B("early 413, then drain and close", e413, read_body=False, then="drain_close", big_body=True, harm=HARM5))
    add(B("early 413, then stop reading", e413, read_body=False, then="stop_reading", big_body=True, harm=HARM5))
    add(B("early 413, then close at once", e413, read_body=False, then="close", big_body=True, harm=HARM5,
          either=Expect(None), nginx_differs=NGINX_RESET_RACE))  # fmt: skip
    add(B("early 200 kept alive, then read the body", resp(body=TEXT), read_body=False, big_body=True))
    add(B("early 401 with small body, then close", resp(401, TEXT, headers=(b"Connection: close",)), read_body=False,
          then="drain_close"))  # fmt: skip

    # A reused upstream connection that fails (a POST is never sent twice). Which request of a
    # shape meets the reused connection is each proxy's pool timing, so outcomes may differ.
    pool = {"nginx_differs": NGINX_POOL}
    add(B("reused connection closed after reading the request", resp(body=TEXT),
          on_reuse=B("", b"", then="close"), either=Expect(None), harm=HARM4, **pool))  # fmt: skip
    add(B("reused connection reset after reading the request", resp(body=TEXT),
          on_reuse=B("", b"", then="reset"), either=Expect(None), harm=HARM4, **pool))  # fmt: skip
    add(B("reused connection closed mid-head", resp(body=TEXT), on_reuse=B("", b"HTTP/1.1 200 OK\r\n", then="close"),
          either=Expect(None), deviation="no-retry-once-answered", **pool))  # fmt: skip
    add(B("reused connection answers 503 then closes", resp(body=TEXT),
          on_reuse=B("", resp(503, TEXT), then="close"), either=Expect(503, TEXT), **pool))  # fmt: skip
    add(B("reused connection closed without reading", resp(body=TEXT),
          on_reuse=B("", b"", then="close", read_body=False), either=Expect(None), harm=HARM4, **pool))  # fmt: skip
    return out


def _finish(behaviours: list[Behaviour]) -> tuple[Behaviour, ...]:
    done = []
    for i, b in enumerate(behaviours):
        slug = "".join(c if c.isalnum() else "-" for c in b.name.lower()).strip("-")
        while "--" in slug:
            slug = slug.replace("--", "-")
        done.append(replace(b, id=f"{i:03d}-{slug}"))
    return tuple(done)


BEHAVIOURS = _finish(_behaviours())


# --- running every case once per module --------------------------------------------------------


@dataclass
class Matrix:
    runs: dict[tuple[str, str, str], CaseRun]  # (behaviour id, shape, target) -> run
    seconds: float

    def __repr__(self) -> str:  # pytest shows a failed test's arguments: not megabytes of bodies
        return f"Matrix({len(self.runs)} runs in {self.seconds:.0f} s)"


def _nginx_conf(tmp: Path, port: int, servers: list[BehaviourServer]) -> str:
    ups, locs = [], []
    for i, server in enumerate(servers):
        ups.append(f"    upstream u{i} {{ server 127.0.0.1:{server.port}; keepalive 16; }}\n")
        locs.append(f"        location /b{i}/ {{ proxy_pass http://u{i}; }}\n")
    return nginx_conf(
        tmp,
        f"""    access_log off;
    # As in config/nginx/parkway.conf: HTTP/1.1 upstream keep-alive, streamed both ways.
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_buffering off;
    proxy_request_buffering off;
    proxy_read_timeout {int(TIMEOUT * 1000)}ms;
    proxy_send_timeout {int(TIMEOUT * 1000)}ms;
    proxy_connect_timeout {int(TIMEOUT * 1000)}ms;
    client_max_body_size 25m;
    gzip off;
{"".join(ups)}
    server {{
        listen 127.0.0.1:{port};
{"".join(locs)}
    }}
""",
        log_level="warn",
        connections=1024,
    )


PARKWAY_TOML = f"""
[server]
listen = ["127.0.0.1:{{port}}"]
upstream_first_byte_timeout = {TIMEOUT}
upstream_idle_timeout = {IDLE}
client_body_timeout = {SLOW}
keepalive_timeout = 30
request_timeout = 30
allow_private_upstreams = true  # the scripted upstreams are on loopback

[admin]
listen = []

[[credentials]]
id = "app"
secret = ["{SECRET}"]
"""


async def serve_parkway(
    tmp: Path, driver: str, parser: str, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """``parkway serve --http parser`` with ``PARKWAY_RELAY=driver``, as an operator runs it; started
    with its port. A process of its own, so the proxies do not share the test's CPU with the clients."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = tmp / "parkway.toml"
    config.write_text(PARKWAY_TOML.format(port=port))
    env = {**os.environ, "PARKWAY_RELAY": driver}
    with open(tmp / "parkway.log", "wb") as log:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--http", parser],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )  # fmt: skip
        try:
            await wait_listening(proc, port, f"parkway ({driver})", [tmp / "parkway.log"])
            task_status.started(port)
            await proc.wait()
            pytest.fail(f"parkway ({driver}) exited with status {proc.returncode} during the suite", pytrace=False)
        finally:
            with trio.CancelScope(shield=True):
                await stop_process(proc)


async def _run_matrix(tmp: Path) -> Matrix:
    records: dict[str, list[Received]] = {}
    runs: dict[tuple[str, str, str], CaseRun] = {}
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        servers: list[BehaviourServer] = []
        for b in BEHAVIOURS:
            servers.append(await nursery.start(BehaviourServer(b, records).serve))
        nginx_port = free_port()
        await nursery.start(serve_nginx, tmp / "nginx", _nginx_conf(tmp / "nginx", nginx_port, servers), nginx_port)
        parkways = {}
        for name, (driver, parser) in PARKWAYS.items():
            parkways[name] = await nursery.start(serve_parkway, tmp / name, driver, parser)

        limit = trio.Semaphore(CONCURRENCY)

        async def sequence(index: int, b: Behaviour, target: str) -> None:
            server = servers[index]
            tag = TAGS[target]
            port = nginx_port if target == "nginx" else parkways[target]
            host = f"127.0.0.1:{port}"
            slow = expected(b, "GET").slow or expected(b, "HEAD").slow

            async def one(shape: Shape) -> None:
                def make(ask: Ask, k: int) -> bytes:
                    path = f"/b{index}/{shape.name}/{tag}/{k}"
                    body = BIG_BODY if b.big_body and ask.body in ("length", "chunked") else SMALL_BODY
                    if target == "nginx":
                        return request_bytes(ask, path, host, body)
                    url = sign(f"http://{host}", f"http://127.0.0.1:{server.port}{path}", method=ask.method,
                               headers={"Content-Type": "application/json"} if ask.body == "signed" else None,
                               body=body.decode() if ask.body == "signed" else None)  # fmt: skip
                    return request_bytes(ask, url.split(host, 1)[1], host, body)

                async with limit if not slow else contextlib.nullcontext():  # a slow case only waits
                    t0 = trio.current_time()
                    outcomes = await run_shape(port, shape, make, SLOW if slow else PROMPT + (1.0 if b.big_body else 0))
                    runs[b.id, shape.name, target] = CaseRun(target, outcomes, {}, trio.current_time() - t0)

            if b.on_reuse is None:  # the shapes side by side
                async with trio.open_nursery() as shapes:
                    for shape in SHAPES:
                        shapes.start_soon(one, shape)
            else:  # in order, so a shape finds the previous one's kept-alive upstream connection
                for shape in SHAPES:
                    await one(shape)

        only = os.environ.get("PARKWAY_DIFF_ONLY", "")  # debugging: run only behaviours whose id contains this
        async with trio.open_nursery() as cases:
            # The slow ones first: they wait for a timeout, side by side with the rest.
            ordered = sorted(enumerate(BEHAVIOURS), key=lambda ib: not (expected(ib[1], "GET").slow
                                                                        or expected(ib[1], "HEAD").slow))  # fmt: skip
            for index, b in ordered:
                if only not in b.id:
                    continue
                for target in TARGETS:
                    cases.start_soon(sequence, index, b, target)
        # What the upstream received for each case, once every case is over: each path is
        # /b<index>/<shape>/<target tag>/<request> (one pass, not every path for every case).
        by_case: dict[str, dict[str, list[Received]]] = {}
        for p, r in records.items():
            parts = p.split("/", 4)
            if len(parts) == 5:
                by_case.setdefault("/".join(parts[:4]) + "/", {})[p] = r
        for (bid, shape_name, target), run in runs.items():
            run.received = by_case.get(f"/b{int(bid[:3])}/{shape_name}/{TAGS[target]}/", {})
        nursery.cancel_scope.cancel()
    return Matrix(runs, trio.current_time() - started)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Matrix]:
    """Every case through every target, once for the module (one nginx, one Parkway per driver and parser)."""
    tmp = tmp_path_factory.mktemp("differential")
    wall = time.monotonic()
    result = trio.run(_run_matrix, tmp)
    result.seconds = time.monotonic() - wall
    report = os.environ.get("PARKWAY_DIFF_REPORT")
    if report:
        _write_report(Path(report), result)
    yield result


# --- the assertions ----------------------------------------------------------------------------


def classify(b: Behaviour, shape: Shape, runs: dict[str, CaseRun]) -> tuple[dict[str, list[str]], str]:
    """Each target's RFC violations, and how Parkway compares with nginx."""
    found = {t: violations(b, shape, runs[t]) for t in TARGETS}
    if any(found[t] for t in PARKWAYS):
        verdict = "harm"
    elif same_answers(shape, runs["epoll"], runs["nginx"]):
        verdict = "same"
    elif found["nginx"]:
        verdict = "nginx_wrong"
    else:
        verdict = "deviation"
    return found, verdict


def _write_report(path: Path, matrix: Matrix) -> None:
    cases = []
    for b in BEHAVIOURS:
        for shape in SHAPES:
            if (b.id, shape.name, "nginx") not in matrix.runs:
                continue
            runs = {t: matrix.runs[b.id, shape.name, t] for t in TARGETS}
            found, verdict = classify(b, shape, runs)
            cases.append({
                "behaviour": b.id, "shape": shape.name, "verdict": verdict, "violations": found, "harm": b.harm,
                "outcomes": {t: runs[t].brief() for t in TARGETS},
                "seconds": {t: round(runs[t].seconds, 2) for t in TARGETS},
            })  # fmt: skip
    path.write_text(json.dumps({"seconds": matrix.seconds, "cases": cases}, indent=1))


def _cases() -> Iterator[object]:
    for b in BEHAVIOURS:
        marks = [pytest.mark.xfail(strict=True, reason=b.still_harmed)] if b.still_harmed else []
        for shape in SHAPES:
            yield pytest.param(b, shape, id=f"{b.id}:{shape.name}", marks=marks)


@pytest.mark.parametrize(("behaviour", "shape"), list(_cases()))
def test_case(matrix: Matrix, behaviour: Behaviour, shape: Shape) -> None:
    if (behaviour.id, shape.name, "nginx") not in matrix.runs:
        pytest.skip("not run (PARKWAY_DIFF_ONLY)")
    runs = {t: matrix.runs[behaviour.id, shape.name, t] for t in TARGETS}
    found, verdict = classify(behaviour, shape, runs)
    story = "\n".join(runs[t].brief() for t in TARGETS)
    for name in PARKWAYS:
        assert not found[name], f"Parkway ({name}) breaks the RFC:\n" + "\n".join(found[name]) + "\n" + story
    if behaviour.on_reuse is None:  # with a reused connection, which request meets it is timing
        assert same_answers(shape, runs["epoll"], runs["httptools"]), "the parsers answer differently:\n" + story
        assert same_answers(shape, runs["epoll"], runs["portable"]), "the relay drivers answer differently:\n" + story
    if verdict != "same":
        assert behaviour.nginx_wrong or behaviour.deviation or behaviour.nginx_differs, (
            f"Parkway answers differently from nginx ({verdict}): classify the case (nginx_wrong names the rule "
            "nginx breaks, deviation the docs/proxying.md entry, nginx_differs nginx's own choice):\n"
            + "\n".join(found["nginx"]) + "\n" + story
        )  # fmt: skip
    if behaviour.deviation:
        assert f"`{behaviour.deviation}`" in DOC.read_text(), f"deviation {behaviour.deviation!r} not in {DOC.name}"


def test_table_is_big_enough() -> None:
    assert len(BEHAVIOURS) >= 150
    assert len({b.id for b in BEHAVIOURS}) == len(BEHAVIOURS)
    assert len(SHAPES) == 8


def test_runs_fast_enough(matrix: Matrix) -> None:
    """The whole matrix (every case on four targets) stays within the module's budget: about a
    minute and a half on a loaded 2-core machine, so this bound only catches a case that waits for no reason."""
    assert matrix.seconds < 240, f"the matrix took {matrix.seconds:.0f} s"
