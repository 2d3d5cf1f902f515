"""Smoke test of the load-test tooling (``python -m loadtest``): the runner's own code with tiny
numbers, so the tooling does not rot. It checks that the results are sane, not how fast
anything is: performance is measured by hand (README, Performance)."""

from __future__ import annotations

import json

import pytest

from loadtest import nginx, runner

ARGV = [
    "run",
    "--workload",
    "parked,small,latency",
    "--streams",
    "200",
    "--stream-seconds",
    "1",
    "--interval-ms",
    "100",
    "--ramp",
    "1000",
    "--seconds",
    "1",
    "--warmup",
    "0.3",
    "--requests",
    "200",
    "--repeat",
    "1",
    "--max-minutes",
    "2",
    "--no-chart",
    "--quiet",
]


def test_runner_measures_parkway_and_nginx_on_a_tiny_load(tmp_path):
    if nginx.nginx_binary() is None:
        pytest.fail(
            "nginx is not installed; the load tests use it as the reference proxy. "
            "Install it with `bash .ci/system-deps` (`make test` does)."
        )
    argv = [*ARGV, "--out", str(tmp_path), "--label", "smoke"]
    args = runner.build_parser().parse_args(argv)
    args.argv = argv
    runner.run_from_args(args)

    results = json.loads((tmp_path / "smoke.json").read_text())
    assert (tmp_path / "smoke.md").read_text().startswith("Medians of 1 repeat")
    runs = {(r["workload"], r["target"]): r for r in results["runs"]}
    assert set(runs) == {(w, t) for w in ("parked", "small", "latency") for t in ("parkway", "nginx")} | {
        ("latency", "direct")
    }

    for target in ("parkway", "nginx"):
        parked = runs["parked", target]
        assert (parked["completed"], parked["error_count"], parked["errors"]) == (200, 0, {}), parked["errors"]
        assert parked["events"] == 200 * 10
        assert parked["ttfe_p99_ms"] > 0
        assert parked["peak_rss_kb"] >= parked["idle_rss_kb"] > 0
        assert parked["cpu_per_event_us"] > 0
        small = runs["small", target]
        assert small["error_count"] == 0 and small["rps"] > 0
        assert runs["latency", target]["error_count"] == 0

    summary = results["summary"]
    for key in (
        "parked_completed",
        "ttfe_p99_ms",
        "rss_per_stream_kb",
        "cpu_per_event_parked_us",
        "small_rps",
        "added_latency_p50_us",
    ):
        assert summary[key]["parkway"] is not None and summary[key]["nginx"] is not None, key
        assert summary[key]["ratio_vs_nginx"] is not None, key
    assert summary["parked_completed"]["parkway"] == 1.0
    assert [p["streams"] for p in summary["sweep"]] == [200, 200]


def test_websocket_workload_measures_parkway_and_a_direct_connection(tmp_path):
    """``python -m loadtest.websockets run`` with tiny numbers: sessions open and echo through
    Parkway and directly, and every figure is there."""
    from loadtest import websockets

    out = tmp_path / "ws.json"
    argv = ["run", "--sessions", "20", "--messages", "3", "--interval-ms", "10", "--hold", "0.4",
            "--max-minutes", "1", "--out", str(out)]  # fmt: skip
    assert websockets.main(argv) == 0
    direct, parkway = json.loads(out.read_text())["runs"]
    for run in (direct, parkway):
        assert (run["opened"], run["messages"], run["errors"]) == (20, 60, {}), run
    # Tiny numbers: the figures exist; their size is measured by hand (docs/websockets.md).
    for key in ("parkway_rss_per_session_kb", "parkway_cpu_per_message_us", "upstream_cpu_per_message_us"):
        assert isinstance(parkway[key], float), key
    assert isinstance(direct["upstream_rss_per_session_kb"], float)
