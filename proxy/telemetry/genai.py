"""The OpenTelemetry GenAI metrics in Prometheus naming, on ``/metrics`` whether or not traces are on.

``gen_ai.server.time_to_first_token``, ``gen_ai.server.request.duration``,
``gen_ai.server.time_per_output_token`` (seconds) and ``gen_ai.client.token.usage`` (tokens, by
``token_type``), labelled by credential, model and outcome, never by user. The model comes from
the upstream's answer (or the request), so the label set is capped: past ``MAX_MODELS`` distinct
names a new one is counted as ``other``. Label children are cached per (credential, model,
outcome): a request costs a dictionary lookup and a few ``observe`` calls.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from ..metric_types import Histogram, HistogramValue

MAX_MODELS = 64
# The conventions' advice for these instruments.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30, 60)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92, 300)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)

_Children = tuple[HistogramValue, HistogramValue, HistogramValue, HistogramValue, HistogramValue]


class GenAIMetrics:
    def __init__(self, registry: CollectorRegistry):
        labels = ["credential", "model", "outcome"]
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time from the request to the first body chunk of the upstream's answer written to the client.",
            labels,
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.duration = Histogram(
            "gen_ai_server_request_duration_seconds",
            "Duration of requests that reached an upstream, to the last byte.",
            labels,
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.per_token = Histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "Time per output token after the first chunk, of streamed answers that reported usage.",
            labels,
            buckets=TPOT_BUCKETS,
            registry=registry,
        )
        self.tokens = Histogram(
            "gen_ai_client_token_usage",
            "Tokens per request as reported by the upstream, by token_type (input, output).",
            [*labels, "token_type"],
            buckets=TOKEN_BUCKETS,
            registry=registry,
        )
        self._children: dict[tuple[str, str, str], _Children] = {}
        self._models: set[str] = set()

    def model_label(self, model: str | None) -> str:
        if model is None:
            return "unknown"
        if model in self._models:
            return model
        if len(self._models) >= MAX_MODELS:
            return "other"
        self._models.add(model)
        return model

    def children(self, credential: str, model: str | None, outcome: str) -> _Children:
        key = (credential, self.model_label(model), outcome)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = (
                self.ttft.labels(*key),
                self.duration.labels(*key),
                self.per_token.labels(*key),
                self.tokens.labels(*key, "input"),
                self.tokens.labels(*key, "output"),
            )
        return found

    def observe(
        self,
        credential: str,
        model: str | None,
        outcome: str,
        *,
        duration: float,
        first_chunk: float | None,
        tokens: tuple[int, int] | None,
        streamed: bool = True,
    ) -> None:
        """One request that reached an upstream: ``first_chunk`` and ``duration`` from its start,
        ``tokens`` (input, output) when the answer reported usage; time per output token only for a
        ``streamed`` answer (a whole JSON body has no pace)."""
        ttft, total, per_token, input_tokens, output_tokens = self.children(credential, model, outcome)
        total.observe(duration)
        if first_chunk is not None:
            ttft.observe(first_chunk)
        if tokens is not None:
            input_tokens.observe(tokens[0])
            output_tokens.observe(tokens[1])
            if streamed and first_chunk is not None and tokens[1] > 1:
                per_token.observe((duration - first_chunk) / (tokens[1] - 1))
