"""proxy.telemetry.genai: the GenAI metrics' figures, labels and their bound."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from proxy.telemetry.genai import MAX_MODELS, GenAIMetrics


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_one_streamed_request_gives_every_figure():
    registry = CollectorRegistry()
    genai = GenAIMetrics(registry)
    genai.observe("app", "gpt-4o-mini", "ok", duration=2.0, first_chunk=0.5, tokens=(12, 31))
    labels = {"credential": "app", "model": "gpt-4o-mini", "outcome": "ok"}
    assert sample(registry, "gen_ai_server_time_to_first_token_seconds_sum", **labels) == 0.5
    assert sample(registry, "gen_ai_server_request_duration_seconds_sum", **labels) == 2.0
    # (duration - first chunk) / (output tokens - 1): the OpenTelemetry definition.
    assert sample(registry, "gen_ai_server_time_per_output_token_seconds_sum", **labels) == 1.5 / 30
    assert sample(registry, "gen_ai_client_token_usage_sum", **labels, token_type="input") == 12
    assert sample(registry, "gen_ai_client_token_usage_sum", **labels, token_type="output") == 31


def test_a_whole_json_answer_has_no_pace_and_no_usage_no_tokens():
    registry = CollectorRegistry()
    genai = GenAIMetrics(registry)
    genai.observe("app", "m", "ok", duration=1.0, first_chunk=1.0, tokens=(3, 40), streamed=False)
    genai.observe("app", "m", "upstream_error", duration=1.0, first_chunk=None, tokens=None)
    ok = {"credential": "app", "model": "m", "outcome": "ok"}
    assert sample(registry, "gen_ai_server_time_per_output_token_seconds_count", **ok) == 0
    failed = {"credential": "app", "model": "m", "outcome": "upstream_error"}
    assert sample(registry, "gen_ai_server_request_duration_seconds_count", **failed) == 1
    assert sample(registry, "gen_ai_server_time_to_first_token_seconds_count", **failed) == 0
    assert sample(registry, "gen_ai_client_token_usage_count", **failed, token_type="input") == 0


def test_model_names_are_capped_and_children_cached():
    genai = GenAIMetrics(CollectorRegistry())
    for i in range(MAX_MODELS + 10):
        genai.observe("app", f"model-{i}", "ok", duration=0.1, first_chunk=None, tokens=None)
    assert genai.model_label("model-0") == "model-0"
    assert genai.model_label(f"model-{MAX_MODELS + 5}") == "other"
    assert genai.model_label(None) == "unknown"
    assert len({key[1] for key in genai._children}) == MAX_MODELS + 1  # the names, then "other"
    assert genai.children("app", "model-1", "ok") is genai.children("app", "model-1", "ok")
