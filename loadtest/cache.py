"""``python -m loadtest.cache``: what Parkway's response cache gives and costs, beside nginx's proxy_cache.

One run on loopback, with the runner's upstream, load generator and core pinning (the proxy on a
core of its own), measures the same small JSON answer served four ways:

* ``parkway-hit``: a URL signed with ``pw_cache``, answered from Parkway's memory cache;
* ``parkway-miss``: the same URL with ``Cache-Control: no-cache``: every request goes upstream and
  its answer is recorded and stored again (the most a cacheable miss costs); latency only, since
  concurrent identical misses would collapse into one upstream call;
* ``parkway-uncached``: a URL signed without ``pw_cache``: the plain relay, for comparison;
* ``nginx-hit``: nginx ``proxy_cache`` (POST cached, keyed by URI and body) serving it from its cache;
* ``direct``: the upstream itself, the floor for latency.

For each: requests/s with ``--clients`` keep-alive clients, and p50/p99 latency of one sequential
client; added latency is a p50 minus the direct p50. Memory per stored entry is measured in this
process with tracemalloc, for an entry shaped like a streamed answer and one like a small JSON answer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from proxy.cache.entry import CacheEntry
from proxy.cache.memory import MemoryCache
from proxy.signing import sign_url

from . import nginx, procstat
from .runner import (
    API_KEY,
    CREDENTIAL,
    SECRET,
    SMALL_BODY,
    Bench,
    Proc,
    SetupError,
    Target,
    build_parser,
    free_port,
    one_request,
)

NGINX_CACHE = """\
        location /v1/ {{
            proxy_pass http://llm;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer {api_key}";
            proxy_cache pwcache;
            proxy_cache_methods POST;
            proxy_cache_key "$request_method$request_uri|$request_body";
            proxy_cache_valid 200 10m;
            proxy_ignore_headers Cache-Control Expires Set-Cookie;
            proxy_cache_lock on;
            client_body_buffer_size 64k;
            add_header Cache-Status $upstream_cache_status;
        }}
"""


def nginx_cache_config(directory: Path, *, listen: str, upstream: str, nofile: int) -> Path:
    """The runner's nginx configuration with its /v1/ location caching POST answers."""
    path = nginx.write_config(directory, listen=listen, upstream=upstream, api_key=API_KEY, nofile=nofile)
    text = path.read_text()
    start = text.index("        location /v1/ {")
    end = text.index("        }\n", start) + len("        }\n")
    cache_path = f"    proxy_cache_path {directory}/cache levels=1:2 keys_zone=pwcache:10m max_size=100m;\n"
    text = text[:start] + NGINX_CACHE.format(api_key=API_KEY) + text[end:]
    text = text.replace("    upstream llm {", cache_path + "    upstream llm {", 1)
    path.write_text(text)
    return path


class CacheBench:
    def __init__(self, bench: Bench):
        self.bench = bench
        self.args = bench.args

    def start_nginx_cache(self) -> Target:
        b = self.bench
        binary = nginx.nginx_binary()
        if binary is None:
            raise SetupError("nginx is not installed: run `bash .ci/system-deps`")
        port = free_port()
        directory = b.tmp / f"nginx-cache-{port}"
        config = nginx_cache_config(
            directory, listen=f"127.0.0.1:{port}", upstream=f"127.0.0.1:{b.upstream_port}", nofile=b.nofile
        )
        proc = Proc("nginx", nginx.command(binary, directory, config), cpus=b.proxy_cpus, log=b.tmp / f"ng-{port}.log")
        b.procs.append(proc)
        target = Target("nginx", port, proc, procstat.Group("nginx", []), log=directory / "error.log")
        b._wait_ready(target, directory / "error.log")
        target.signed["cache"] = "/v1/chat/completions?small=1"
        time.sleep(0.5)
        target.group.pids = procstat.tree(proc.pid)[1:] or procstat.tree(proc.pid)
        return target

    def start_parkway(self) -> Target:
        target = self.bench.start_target("parkway")
        url = sign_url(
            id=CREDENTIAL, secret=SECRET, host=f"http://127.0.0.1:{target.port}", method="POST", expiry=6 * 3600,
            proxy_url=f"http://127.0.0.1:{self.bench.upstream_port}/v1/chat/completions?small=1",
            params={"pw_cache": "3600"},
        )  # fmt: skip
        parts = urlsplit(url)
        target.signed["cache"] = f"{parts.path}?{parts.query}"
        return target

    def measure(
        self,
        target: Target,
        label: str,
        headers: tuple[str, ...] = (),
        *,
        request: str | None = None,
        throughput: bool = True,
    ) -> dict[str, Any]:
        a = self.args
        request = request or target.signed.get("cache", "/v1/chat/completions?small=1")
        auth = (f"Authorization: Bearer {API_KEY}",) if target.name == "direct" else ()
        warm = one_request(target.port, request, SMALL_BODY, headers + auth)
        if warm.status != 200:
            raise SetupError(f"{label}: warm-up answered {warm.status}")
        extra = [arg for h in headers for arg in ("--header", h)]
        common = ["--target", request, "--body", SMALL_BODY, *extra]
        out: dict[str, Any] = {"label": label}
        if throughput:
            raw = self.bench.drive(
                target,
                "small",
                [*common, "--clients", str(a.clients), "--seconds", str(a.seconds), "--warmup", str(a.warmup)],
                a.seconds + 60,
            )
            r, m = raw["result"], raw["measured"]
            out |= {
                "rps": r["rps"],
                "errors": r["error_count"],
                "cpu_per_request_us": 1e6 * m["cpu_s"] / r["requests"] if r["requests"] else None,
            }
        raw = self.bench.drive(
            target,
            "latency",
            [*common, "--requests", str(a.requests), "--warmup-requests", str(min(500, a.requests))],
            120,
        )
        r = raw["result"]
        out |= {
            "latency_p50_us": r["latency_s"]["p50"] * 1e6,
            "latency_p99_us": r["latency_s"]["p99"] * 1e6,
            "latency_errors": r["error_count"],
        }
        return out

    def run(self) -> dict[str, Any]:
        b = self.bench
        b.start_upstream()
        runs: list[dict[str, Any]] = []
        for repeat in range(self.args.repeat):
            runs.append(self.measure(b.direct(), "direct", throughput=False) | {"repeat": repeat})
            parkway = self.start_parkway()
            try:
                runs.append(self.measure(parkway, "parkway-hit") | {"repeat": repeat})
                runs.append(
                    self.measure(parkway, "parkway-miss", ("Cache-Control: no-cache",), throughput=False)
                    | {"repeat": repeat}
                )
                plain = b._sign(parkway, "small=1")
                runs.append(self.measure(parkway, "parkway-uncached", request=plain) | {"repeat": repeat})
            finally:
                parkway.stop()
            if not self.args.no_reference:
                ng = self.start_nginx_cache()
                try:
                    runs.append(self.measure(ng, "nginx-hit") | {"repeat": repeat})
                finally:
                    ng.stop()
        return {"runs": runs, "summary": summarise(runs), "memory": entry_memory(), "notes": b.notes}


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Medians over repeats per label; added latency against the direct p50 of the same repeat."""
    direct = {r["repeat"]: r["latency_p50_us"] for r in runs if r["label"] == "direct"}
    out: dict[str, dict[str, float | None]] = {}
    for label in dict.fromkeys(r["label"] for r in runs):
        mine = [r for r in runs if r["label"] == label]

        def med(key: str, rows: list[dict[str, Any]] = mine) -> float | None:
            values = [r[key] for r in rows if r.get(key) is not None]
            return statistics.median(values) if values else None

        added = [r["latency_p50_us"] - direct[r["repeat"]] for r in mine if r["repeat"] in direct]
        out[label] = {
            "rps": med("rps"),
            "p50_us": med("latency_p50_us"),
            "p99_us": med("latency_p99_us"),
            "added_p50_us": statistics.median(added) if added else None,
            "cpu_per_request_us": med("cpu_per_request_us"),
            "errors": sum(r.get("errors", 0) + r.get("latency_errors", 0) for r in mine),
        }
    return out


def entry_memory(count: int = 2000) -> dict[str, float]:
    """Bytes of Python heap per stored entry beyond its body, for two shapes of answer."""
    shapes = {"stream_100x140": (100, 140), "json_1x400": (1, 400)}
    result = {}
    headers = ((b"content-type", b"text/event-stream"), (b"x-request-id", b"0123456789abcdef"))
    for name, (chunks, size) in shapes.items():
        cache = MemoryCache(1 << 40)
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(count):
            body = tuple(bytes([65 + (i + j) % 26]) * size for j in range(chunks))
            entry = CacheEntry(200, headers, body, tuple(0.001 * j for j in range(chunks)), 0.0, 3600.0)
            cache.put(f"{i:064x}", entry, 0.0)
        used = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        result[f"{name}_bytes_per_entry"] = used / count
        result[f"{name}_payload_bytes"] = chunks * size
        result[f"{name}_counted_size"] = entry.size
    return result


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| served as | requests/s | p50 µs | p99 µs | added p50 µs | CPU µs/request |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, s in results["summary"].items():

        def f(v: float | None, fmt: str = "{:,.0f}") -> str:
            return "–" if v is None else fmt.format(v)

        lines.append(
            f"| {label} | {f(s['rps'])} | {f(s['p50_us'])} | {f(s['p99_us'])} | "
            f"{f(s['added_p50_us'])} | {f(s['cpu_per_request_us'])} |"
        )
    mem = results["memory"]
    lines.append("")
    lines.append(
        f"Memory per stored entry (tracemalloc): streamed answer of 100 chunks × 140 B: "
        f"{mem['stream_100x140_bytes_per_entry']:,.0f} B for {mem['stream_100x140_payload_bytes']:,} B "
        f"of body (counted against max_bytes as {mem['stream_100x140_counted_size']:,} B); "
        f"small JSON answer of 400 B: {mem['json_1x400_bytes_per_entry']:,.0f} B "
        f"(counted as {mem['json_1x400_counted_size']:,} B)."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m loadtest.cache", description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per throughput run")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before that")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--no-reference", action="store_true", help="skip nginx")
    parser.add_argument("--out", default=None, help="write the results JSON here")
    args = parser.parse_args(argv)
    run_args = build_parser().parse_args(
        [
            "run",
            "--repeat",
            str(args.repeat),
            "--clients",
            str(args.clients),
            "--seconds",
            str(args.seconds),
            "--warmup",
            str(args.warmup),
            "--requests",
            str(args.requests),
            "--proxy-log",
            "warning",
            "--quiet",
        ]
    )
    run_args.no_reference = args.no_reference
    bench = Bench(run_args)
    try:
        results = CacheBench(bench).run()
    except SetupError as exc:
        print(f"loadtest.cache: {exc}", file=sys.stderr)
        return 2
    finally:
        bench.close()
    results["command"] = "python -m loadtest.cache " + " ".join(argv)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
