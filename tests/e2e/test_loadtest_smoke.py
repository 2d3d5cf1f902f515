"""Smoke test of the load-test tooling (``python -m loadtest``): the runner's own code with tiny
numbers, so the tooling does not rot. It checks that the results are sane, not how fast
anything is: performance is measured by hand (README, Performance)."""

from __future__ import annotations

import json

import pytest

from loadtest import micro, nginx, runner

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


def test_runner_measures_each_http_parser_beside_nginx_in_one_invocation(tmp_path):
    """``--http h11,httptools``: two Parkway variants, each started with its parser, measured
    in the same repeat as nginx, labelled apart in the JSON and in the Markdown table; with
    ``--profile turns`` each parked Parkway run also says how long its set-ups took inside."""
    if nginx.nginx_binary() is None:
        pytest.fail("nginx is not installed; install it with `bash .ci/system-deps` (`make test` does).")
    argv = ["run", "--workload", "parked,latency", "--streams", "100", "--stream-seconds", "0.5",
            "--interval-ms", "100", "--ramp", "1000", "--requests", "100", "--repeat", "1",
            "--max-minutes", "2", "--no-chart", "--quiet", "--http", "h11,httptools", "--profile", "turns",
            "--out", str(tmp_path), "--label", "parsers"]  # fmt: skip
    args = runner.build_parser().parse_args(argv)
    args.argv = argv
    runner.run_from_args(args)

    results = json.loads((tmp_path / "parsers.json").read_text())
    labels = ("parkway (h11)", "parkway (httptools)")
    runs = {(r["workload"], r["target"]): r for r in results["runs"]}
    assert set(runs) == {(w, t) for w in ("parked", "latency") for t in (*labels, "nginx")} | {("latency", "direct")}
    for label, parser in zip(labels, ("h11", "httptools")):
        # What the started proxy's own start-up line reported, not what was asked.
        assert {runs[w, label]["http"] for w in ("parked", "latency")} == {parser}
        assert (runs["parked", label]["completed"], runs["parked", label]["error_count"]) == (100, 0)
        assert runs["latency", label]["error_count"] == 0
    assert "http" not in runs["parked", "nginx"]
    for label in labels:
        parked = runs["parked", label]
        # Accept to relay start can only be shorter than the client's request to first event.
        assert 0 < parked["setup_in_proxy_p50_ms"] <= parked["ttfe_max_ms"], parked
        assert parked["turn_p99_ms"] > 0 and parked["turn_steps_p99"] >= 1, parked
    for label in (*labels, "nginx"):
        parked = runs["parked", label]
        # Lateness is measured from each stream's least-late event: never negative. (A ramp this
        # short may end before any stream's second event: the ramp figures can be None.)
        assert 0 <= parked["lateness_p99_ms"] and parked["connect_p99_ms"] > 0, parked
        if parked["ramp_lateness_p50_ms"] is not None:
            assert 0 <= parked["ramp_lateness_p50_ms"] <= parked["ramp_lateness_max_ms"], parked
    assert "setup_in_proxy_p50_ms" not in runs["parked", "nginx"]

    completed = results["summary"]["parked_completed"]
    assert set(completed["proxies"]) == set(labels)
    assert all(p["value"] == 1.0 and p["ratio_vs_nginx"] == 1.0 for p in completed["proxies"].values())
    table = (tmp_path / "parsers.md").read_text()
    assert "| figure | target | Parkway (h11) | Parkway (httptools) | nginx | Parkway (h11) ÷ nginx |" in table
    assert "| Parked streams completed with zero errors (fraction) | all (1.000) | 1.000 | 1.000 | 1.000 |" in table
    assert "| parkway (h11) | http | 100 |" in table and "| parkway (httptools) | http | 100 |" in table


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


def test_runner_measures_the_floor_beside_parkway_and_counts_their_calls(tmp_path):
    """``--targets parkway,floor --profile calls``: the floor (``loadtest.floor``) serves the small,
    latency and relay workloads without an error, has its column and Parkway ÷ floor ratios, and
    both serve a ``calls`` run whose per-request counts by component are written beside the results."""
    argv = ["run", "--workload", "small,latency,relay", "--targets", "parkway,floor", "--seconds", "0.5",
            "--warmup", "0.3", "--requests", "100", "--relay-streams", "20", "--relay-events", "10",
            "--relay-interval-ms", "10", "--repeat", "1", "--max-minutes", "2", "--no-chart", "--quiet",
            "--profile", "calls", "--out", str(tmp_path), "--label", "floor"]  # fmt: skip
    args = runner.build_parser().parse_args(argv)
    args.argv = argv
    runner.run_from_args(args)

    results = json.loads((tmp_path / "floor.json").read_text())
    runs = {(r["workload"], r["target"]): r for r in results["runs"]}
    assert set(runs) == {(w, t) for w in ("small", "latency", "relay", "calls") for t in ("parkway", "floor")} | {
        ("latency", "direct")
    }
    assert all(r["error_count"] == 0 for r in runs.values()), [r["errors"] for r in runs.values()]
    assert {runs[w, "floor"]["http"] for w in ("small", "latency", "relay", "calls")} == {"httptools"}
    assert runs["relay", "floor"]["events"] == 20 * 10
    for target in ("parkway", "floor"):
        counted = runs["calls", target]
        assert counted["requests"] > 0 and counted["calls_per_request"] > 0, counted
        assert (tmp_path / f"floor-calls-small-{target}.txt").read_text().startswith(f"{target}, 16 keep-alive")
    # Parkway's own code is what the floor lacks: no signature, log line or metrics there.
    assert runs["calls", "floor"]["calls_per_request"] < runs["calls", "parkway"]["calls_per_request"]
    assert "parkway: signing" in runs["calls", "parkway"]["calls_by_component"]
    assert "parkway: signing" not in runs["calls", "floor"]["calls_by_component"]

    summary = results["summary"]
    for key in ("small_cpu_per_request_us", "added_latency_p50_us", "cpu_per_event_relay_us", "calls_per_request"):
        assert summary[key]["floor"] > 0, key
        assert summary[key]["proxies"]["parkway"]["ratio_vs_floor"] > 0, key
    table = (tmp_path / "floor.md").read_text()
    assert "| Floor (httptools) | Parkway ÷ nginx | Parkway ÷ floor | met |" in table
    assert "Python function calls per small request by component" in table


@pytest.mark.parametrize("name", sorted(micro.BENCHES))
def test_every_micro_benchmark_runs_against_the_current_code(name):
    """``python -m loadtest.micro`` builds each piece from Parkway's own modules: one that no
    longer fits them (a renamed attribute, a changed signature) fails here, not when measured."""
    piece = micro.BENCHES[name]()
    for _ in range(3):
        piece()
