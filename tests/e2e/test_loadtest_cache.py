"""Smoke test of ``python -m loadtest.cache`` with tiny numbers: the tooling runs and its figures
are sane (every way of serving answered, without errors), not how fast anything is."""

from __future__ import annotations

import json

import pytest

from loadtest import cache, nginx


def test_nginx_cache_config_caches_post_by_uri_and_body(tmp_path) -> None:
    text = cache.nginx_cache_config(tmp_path, listen="127.0.0.1:1", upstream="127.0.0.1:2", nofile=1024).read_text()
    assert "proxy_cache_methods POST;" in text and '"$request_method$request_uri|$request_body"' in text
    assert "proxy_buffering off" not in text  # nginx caches only what it buffers
    assert text.index("proxy_cache_path") < text.index("upstream llm")


def test_cache_workload_measures_every_way_of_serving(tmp_path) -> None:
    if nginx.nginx_binary() is None:
        pytest.fail("nginx is not installed: `bash .ci/system-deps` (`make test` does)")
    out = tmp_path / "cache.json"
    assert (
        cache.main(
            [
                "--repeat",
                "1",
                "--clients",
                "4",
                "--seconds",
                "0.5",
                "--warmup",
                "0.2",
                "--requests",
                "50",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    results = json.loads(out.read_text())
    summary = results["summary"]
    assert list(summary) == ["direct", "parkway-hit", "parkway-miss", "parkway-uncached", "nginx-hit"]
    assert all(s["errors"] == 0 and s["p50_us"] > 0 for s in summary.values())
    assert all(summary[k]["rps"] > 0 for k in ("parkway-hit", "parkway-uncached", "nginx-hit"))
    memory = results["memory"]
    assert memory["stream_100x140_bytes_per_entry"] > memory["stream_100x140_payload_bytes"]
