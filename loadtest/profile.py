"""Where the proxy's time goes: a breakdown of py-spy's raw (collapsed) stacks by component.

``python -m loadtest.profile FILE.txt [--top 25]`` prints

* self time by component (the file of the innermost frame: h11, httptools, trio, Parkway's packages,
  structlog, the standard library...),
* inclusive time of Parkway's steps (any frame of the stack in that function),
* the hottest leaf functions.

The runner records the stacks with ``--profile py-spy``.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# (component, pattern on the frame's file path); the first match wins.
COMPONENTS = [
    ("h11", r"(^|/)h11/"),
    ("httpcore", r"(^|/)httpcore2?/"),
    ("httpx", r"(^|/)httpx2?/"),
    ("anyio/sniffio", r"(^|/)(anyio|sniffio)/"),
    ("trio", r"(^|/)trio/"),
    ("structlog (logging)", r"(^|/)structlog/"),
    ("prometheus_client (metrics)", r"(^|/)prometheus_client/"),
    ("httptools", r"(^|/)httptools/"),
    ("floor (loadtest/floor.py)", r"loadtest/floor\.py"),
    ("parkway: signing", r"proxy/(signing|urls)\.py"),
    ("parkway: http (client side)", r"proxy/http/"),
    ("parkway: upstream", r"proxy/upstream/"),
    ("parkway: relay", r"proxy/relay/"),
    ("parkway: gateway", r"proxy/gateway/"),
    ("parkway: logging and metrics", r"proxy/(logs|record|metrics|metric_types)\.py"),
    ("parkway: other", r"proxy/"),
    ("stdlib: hmac/hashlib", r"(hmac|hashlib)\.py"),
    ("stdlib: urllib/idna", r"(urllib/|idna/|encodings/idna)"),
    ("stdlib: json", r"json/"),
    ("generated code (attrs and dataclass methods)", r"^<(string|attrs generated)"),
    ("stdlib: contextlib/other", r"\.py|^<frozen "),
]

# Inclusive steps of a request: a sample counts once for each step present anywhere in its stack.
STEPS = [
    ("parse + verify signature (signing.py)", r"proxy/signing\.py"),
    ("upstream request (UpstreamClient.open → response head)", r"UpstreamClient\.(open|_send_request|_exchange) "),
    ("relay (relay/)", r"proxy/relay/(pump|stream|engine)\.py"),
    (
        "client writes (HTTPConnection send_*/flush)",
        r"(HTTP|H11|Httptools)Connection\.(_send|send_head|send_end|flush) ",
    ),
    (
        "client reads (HTTPConnection next_request/body/_receive)",
        r"(HTTP|H11|Httptools)Connection\.(next_request|body_chunks|_receive) ",
    ),
    ("request log line (log_request)", r"log_request "),
    ("metrics (count_request)", r"count_request "),
    ("forwarding headers (forwarding.py)", r"proxy/forwarding\.py"),
    ("trio scheduler (run loop, I/O wait)", r"^(run|unrolled_run|Runner\.|EpollIOManager|get_events)"),
]


def parse(path: str) -> list[tuple[list[tuple[str, str]], int]]:
    stacks = []
    with open(path, encoding="utf-8", errors="replace") as file:
        for line in file:
            line = line.rstrip("\n")
            if not line:
                continue
            body, _, count = line.rpartition(" ")
            frames = []
            for text in body.split(";"):
                m = FRAME.match(text)
                frames.append((m["func"], m["file"]) if m else (text, ""))
            stacks.append((frames, int(count)))
    return stacks


def component(file: str) -> str:
    for name, pattern in COMPONENTS:
        if re.search(pattern, file):
            return name
    return "other (native/idle)"


def breakdown(path: str, top: int = 20) -> str:
    stacks = parse(path)
    total = sum(n for _, n in stacks) or 1
    by_component: Counter[str] = Counter()
    by_leaf: Counter[str] = Counter()
    by_step: Counter[str] = Counter()
    idle = 0
    for frames, n in stacks:
        func, file = frames[-1]
        if func in ("poll", "epoll_wait") or "get_events" in func and "select" in file:
            idle += n
        by_component[component(file)] += n
        by_leaf[f"{func} ({file})"] += n
        texts = [f"{f} ({p})" for f, p in frames]
        for step, pattern in STEPS:
            if any(re.search(pattern, t) for t in texts):
                by_step[step] += n
    out = [f"{total} samples ({path})", "", "self time by component:"]
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in by_component.most_common()]
    out += ["", "inclusive time by step (a sample can be in several):"]
    out += [f"  {100 * by_step[step] / total:5.1f}%  {step}" for step, _ in STEPS]
    out += ["", f"hottest functions (self), top {top}:"]
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in by_leaf.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.profile", description=__doc__.split("\n")[0])
    parser.add_argument("file")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    print(breakdown(args.file, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
