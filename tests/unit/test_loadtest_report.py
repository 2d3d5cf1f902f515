"""The load test report's verdicts (loadtest.report), on runs built here: pure, no load."""

from __future__ import annotations

from typing import Any

from loadtest import report

STREAMS = 9500


def parked(workload: str, target: str, rss_kb: float, peak: int) -> dict[str, Any]:
    return {
        "workload": workload,
        "target": target,
        "repeat": 0,
        "streams": STREAMS,
        "completed": STREAMS,
        "error_count": 0,
        "rss_per_stream_kb": rss_kb,
        "parked_peak": peak,
        # the rest of a parked run's record (the report's per-count table reads them)
        "idle_rss_kb": 40_000,
        "peak_rss_kb": 40_000 + rss_kb * STREAMS,
        "steady_cpu_pct": 50.0,
        "cpu_per_event_us": 20.0,
        "ttfe_p99_ms": 100.0,
        "upstream_cpu_pct": 30.0,
        "loadgen_cpu_pct": 30.0,
    }


def verdicts(runs: list[dict[str, Any]]) -> dict[str, bool | None]:
    summary = report.summarise(
        runs, {"streams": [STREAMS], "clients": 64, "pool_clients": [16, 512], "interval_ms": 200}
    )
    return {key: summary[key]["met"] for key in ("rss_per_stream_kb", "tls_rss_per_stream_kb")}


def test_each_memory_figure_is_judged_by_whether_its_own_workload_held_every_stream():
    """A proxy that held every plain stream at once meets the plain memory target whatever its
    TLS runs held (the TLS runs' peak used to decide both), and the TLS target asks the same of
    the TLS runs."""
    runs = [
        parked("parked", "nginx", 17.7, STREAMS),
        parked("parked", "parkway", 15.0, STREAMS),
        parked("parked-tls", "nginx", 45.2, STREAMS),
        parked("parked-tls", "parkway", 55.0, 8000),
    ]
    assert verdicts(runs) == {"rss_per_stream_kb": True, "tls_rss_per_stream_kb": False}
    runs[-1]["parked_peak"] = STREAMS
    assert verdicts(runs) == {"rss_per_stream_kb": True, "tls_rss_per_stream_kb": True}
    runs[1]["parked_peak"] = 9000
    assert verdicts(runs) == {"rss_per_stream_kb": False, "tls_rss_per_stream_kb": True}


def test_set_up_cpu_per_stream_is_the_cpu_beyond_its_events_at_the_steady_rate():
    from loadtest.runner import _setup_cpu

    # 2 s of CPU, 100,000 events at 15 µs once parked (1.5 s): 0.5 s over 1,000 streams.
    assert _setup_cpu(2.0, 100_000, 1_000, 15.0) == 500.0
    assert _setup_cpu(2.0, 100_000, 1_000, None) is None  # no window with every stream parked
    nginx, parkway = parked("parked", "nginx", 17.0, STREAMS), parked("parked", "parkway (httptools)", 15.0, STREAMS)
    nginx["setup_cpu_per_stream_us"], parkway["setup_cpu_per_stream_us"] = 160.0, 800.0
    summary = report.summarise(
        [nginx, parkway], {"streams": [STREAMS], "clients": 64, "pool_clients": [16, 512], "interval_ms": 200}
    )
    figure = summary["setup_cpu_per_stream_us"]
    assert figure["met"] is None  # information, no target
    assert (figure["parkway"], figure["nginx"], figure["ratio_vs_nginx"]) == (800.0, 160.0, 5.0)
